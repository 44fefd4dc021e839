"""Bias-only models: shallow classifiers that see only a known shortcut, for the debiasing losses.

A bias-only model predicts the label from the bias alone (Clark et al. 2019, Utama et al.
2020, the SRNets study): its probabilities p_b say how far an example can be solved by the
shortcut, and the debiasing losses (`sparsebert.debias`) down-weight what it gets right.

Kinds (scikit-learn, no neural network):

- ``hypothesis-only``: logistic regression on a bag of words and bigrams of the second text
  (the NLI hypothesis; the second question of QQP / MRPC);
- ``claim-only``: the same on the first text (the FEVER claim);
- ``overlap``: logistic regression on hand features of the pair: the share of hypothesis
  words (and bigrams) found in the premise, whether all are, whether the hypothesis is a
  contiguous subsequence of the premise, Jaccard overlap, negation words on either side,
  lengths and their difference (McCoy et al.'s lexical-overlap heuristic and Naik et al.'s
  negation cue).

The probabilities on the training set are **out of fold**: the training set is cut into k
folds (k = 5; stratified when every class has k examples), and each example's probabilities
come from the model fitted on the other k - 1 folds, so no example's p_b comes from a model
that saw it (an in-sample p_b would be over-confident and over-weight the bias). Pairs that
share their first text (the hypotheses written for one MNLI premise) share a fold: otherwise
a sibling's words, seen with another label, push the held-out one's p_b below chance. The model
fitted on the whole training set scores the evaluation sets, in distribution and OOD (it
should be near chance, or below, on the OOD sets: that is what makes them OOD).

The file is safetensors (``probs``: float32, one row per training example in order, one
column per label) with its metadata: task, kind, folds, the label names and the SHA-256 of
the training examples (text, text pair, label, in order), so that a run refuses a file made
for other examples or another order. ``.json`` is written instead for a path ending in .json.
No pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparsebert.errors import SparseBertError

BIAS_KINDS = ("hypothesis-only", "claim-only", "overlap")
FORMAT = "sparsebert-bias-probs"
NEGATION_WORDS = frozenset({"no", "not", "never", "nothing", "nobody", "none", "nowhere", "neither", "nor",
                            "cannot", "n't", "without"})
_TOKEN = re.compile(r"n't|\w+")


# -- identity of the training examples ---------------------------------------------------------------
def examples_hash(ds_or_columns: Any) -> str:
    """SHA-256 of the examples in order: (text_a, text_b or None, label) per row."""
    if hasattr(ds_or_columns, "column_names"):
        names = ds_or_columns.column_names
        cols = {c: ds_or_columns[c] for c in ("text_a", "text_b", "label") if c in names}
    else:
        cols = dict(ds_or_columns)
    if "text_a" not in cols or "label" not in cols:
        raise SparseBertError("bias probabilities need examples with text_a and label columns")
    text_b = cols.get("text_b") or [None] * len(cols["text_a"])
    h = hashlib.sha256()
    for a, b, y in zip(cols["text_a"], text_b, cols["label"], strict=True):
        h.update(json.dumps([a, b, y], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# -- features ----------------------------------------------------------------------------------------
def tokens(text: str) -> list[str]:
    return _TOKEN.findall((text or "").lower().replace("n't", " n't"))


def overlap_features(text_a: str, text_b: str) -> list[float]:
    """Hand features of a (premise, hypothesis) pair; see the module docstring."""
    a, b = tokens(text_a), tokens(text_b)
    sa, sb = set(a), set(b)
    in_a = sum(1 for w in b if w in sa)
    rate = in_a / len(b) if b else 0.0
    bigrams_a = set(zip(a, a[1:], strict=False))
    bigrams_b = list(zip(b, b[1:], strict=False))
    bigram_rate = sum(1 for g in bigrams_b if g in bigrams_a) / len(bigrams_b) if bigrams_b else 0.0
    n = len(b)
    subsequence = float(n > 0 and any(a[i:i + n] == b for i in range(len(a) - n + 1)))
    jaccard = len(sa & sb) / len(sa | sb) if sa | sb else 0.0
    return [
        rate,
        float(bool(b) and in_a == len(b)),
        subsequence,
        bigram_rate,
        jaccard,
        float(any(w in NEGATION_WORDS for w in b)),
        float(any(w in NEGATION_WORDS for w in a)),
        math.log1p(len(b)) - math.log1p(len(a)),
        math.log1p(len(a)),
        math.log1p(len(b)),
        math.log1p(len(b) - in_a),
    ]


def feature_inputs(kind: str, columns: dict[str, Sequence]) -> Any:
    """What the kind's model reads: texts (bag of words) or a feature matrix."""
    if kind not in BIAS_KINDS:
        raise SparseBertError(f"unknown bias-model kind '{kind}': one of {', '.join(BIAS_KINDS)}")
    if kind == "claim-only":
        return list(columns["text_a"])
    if "text_b" not in columns:
        raise SparseBertError(f"a {kind} bias model needs sentence pairs; this task has single sentences")
    if kind == "hypothesis-only":
        return list(columns["text_b"])
    pairs = zip(columns["text_a"], columns["text_b"], strict=True)
    return np.array([overlap_features(a, b) for a, b in pairs], dtype=np.float64)


def make_model(kind: str, seed: int = 0):
    """A fresh, unfitted scikit-learn model of the kind."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    if kind == "overlap":
        return make_pipeline(StandardScaler(), clf)
    words = CountVectorizer(lowercase=True, ngram_range=(1, 2), binary=True, max_features=200_000,
                            token_pattern=r"(?u)\b\w+\b")
    return make_pipeline(words, clf)


def _take(x: Any, idx: np.ndarray) -> Any:
    return x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]


def full_probabilities(model, x: Any, num_labels: int) -> np.ndarray:
    """predict_proba with one column per label id, also for labels the model never saw
    (which get a tiny probability, so that log p_b stays finite)."""
    p = np.asarray(model.predict_proba(x), dtype=np.float64)
    out = np.zeros((p.shape[0], num_labels), dtype=np.float64)
    out[:, np.asarray(model.classes_, dtype=np.int64)] = p
    if len(model.classes_) < num_labels:
        out = (out + 1e-6) / (1.0 + num_labels * 1e-6)
    return out


def fold_ids(labels: np.ndarray, k: int, seed: int, groups: Sequence | None = None) -> np.ndarray:
    """Which fold each example is held out in: stratified when every class has >= k examples;
    examples of one group (e.g. the hypotheses written for one premise) share a fold."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    n = len(labels)
    if not 2 <= k <= n:
        raise SparseBertError(f"--folds must be between 2 and the number of training examples ({n}), got {k}")
    _, counts = np.unique(labels, return_counts=True)
    stratify = counts.min() >= k
    if groups is not None and len(set(groups)) >= k:
        _, group_ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed) if stratify else \
            GroupKFold(k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), labels, group_ids)
    else:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed) if stratify else \
            KFold(k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), labels)
    folds = np.full(n, -1, dtype=np.int64)
    for i, (_, test) in enumerate(splits):
        folds[test] = i
    return folds


def out_of_fold_probabilities(
    x: Any, labels: Sequence[int], num_labels: int, k: int = 5, seed: int = 0,
    model_factory: Callable[[], Any] | None = None, kind: str = "overlap", groups: Sequence | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(probs, folds): each example's probabilities from the model fitted on the other folds
    (a group never straddles folds)."""
    y = np.asarray(labels, dtype=np.int64)
    folds = fold_ids(y, k, seed, groups)
    probs = np.zeros((len(y), num_labels), dtype=np.float64)
    for f in range(k):
        test = np.flatnonzero(folds == f)
        train = np.flatnonzero(folds != f)
        model = model_factory() if model_factory is not None else make_model(kind, seed)
        model.fit(_take(x, train), y[train])
        probs[test] = full_probabilities(model, _take(x, test), num_labels)
    return probs, folds


# -- the file --------------------------------------------------------------------------------------------
@dataclass
class BiasProbs:
    """Bias-model probabilities of the training examples, in order, and what they were made for."""

    probs: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def examples_hash(self) -> str:
        return str(self.meta.get("examples_hash", ""))

    def check(self, examples: Any, num_labels: int, source: str = "bias probabilities") -> None:
        """Refuse probabilities made for other training examples (or another order, or
        another label space)."""
        wanted = examples_hash(examples)
        n = len(examples) if hasattr(examples, "__len__") else None
        if self.examples_hash != wanted:
            made = self.meta.get("n_examples", "?")
            raise SparseBertError(
                f"{source} were made for other training examples ({made} examples, hash "
                f"{self.examples_hash[:12]}) than this run's ({n} examples, hash {wanted[:12]}): make them "
                "with `sparsebert bias-model` for the same task, data and --max-train-samples"
            )
        if self.probs.ndim != 2 or self.probs.shape[1] != num_labels:
            raise SparseBertError(
                f"{source} have shape {tuple(self.probs.shape)}: expected one column per label ({num_labels})"
            )


def save_bias_probs(path: str, probs: np.ndarray, meta: dict[str, Any]) -> str:
    """Write ``probs`` and ``meta`` as safetensors (or JSON for a .json path)."""
    probs = np.ascontiguousarray(np.asarray(probs, dtype=np.float32))
    meta = {**meta, "format": FORMAT}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**meta, "probs": probs.tolist()}, f)
        return path
    from safetensors.numpy import save_file

    save_file({"probs": probs}, path, metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def load_bias_probs(path: str) -> BiasProbs:
    """Read a file written by `save_bias_probs` (safetensors or JSON; never pickle)."""
    if not os.path.isfile(path):
        raise SparseBertError(f"bias probabilities '{path}' do not exist: make them with "
                              "`sparsebert bias-model`")
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            probs = np.asarray(data.pop("probs"), dtype=np.float32)
            meta = data
        else:
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                raw = f.metadata() or {}
                probs = f.get_tensor("probs")
            meta = {k: json.loads(v) for k, v in raw.items()}
    except (OSError, ValueError, KeyError) as err:
        raise SparseBertError(f"'{path}' is not a bias-probabilities file: {err}") from None
    if meta.get("format") != FORMAT:
        raise SparseBertError(f"'{path}' is not a sparsebert bias-probabilities file (no format tag)")
    return BiasProbs(probs, meta)


# -- the command -------------------------------------------------------------------------------------------
def _columns(ds) -> dict[str, list]:
    return {c: list(ds[c]) for c in ("text_a", "text_b", "label") if c in ds.column_names}


def build_bias_model(
    task_name: str, data_dir: str | None, kind: str, output: str, folds: int = 5, seed: int = 0,
    max_train_samples: int | None = None, max_eval_samples: int | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Fit the bias-only model, write its out-of-fold training probabilities to ``output`` and
    return a report: OOF accuracy in distribution and accuracy on every evaluation set."""
    from sparsebert.tasks import get_task

    task = get_task(task_name)
    if task.kind != "sequence-classification" or task.is_regression:
        raise SparseBertError(f"bias-only models are for classification tasks; {task.name} is {task.kind}"
                              f"{' (regression)' if task.is_regression else ''}")
    if kind not in BIAS_KINDS:
        raise SparseBertError(f"unknown --kind '{kind}': one of {', '.join(BIAS_KINDS)}")
    train = task.load_split("train", data_dir, max_train_samples)
    cols = _columns(train)
    y = np.asarray(cols["label"], dtype=np.int64)
    x = feature_inputs(kind, cols)
    log(f"bias model {kind} on {task.name}: {len(y)} training examples, {folds}-fold out-of-fold")
    groups = cols["text_a"] if "text_b" in cols else None  # pairs sharing a first text share a fold
    probs, _ = out_of_fold_probabilities(x, y, task.num_labels, folds, seed, kind=kind, groups=groups)
    oof_acc = float((probs.argmax(1) == y).mean())
    majority = float(np.bincount(y, minlength=task.num_labels).max() / len(y))
    model = make_model(kind, seed).fit(x, y)
    evals: dict[str, Any] = {}
    for i, es in enumerate(task.eval_sets()):
        try:
            ds = task.load_eval_set(es, data_dir, max_eval_samples)
        except SparseBertError as err:
            if es.optional or i == 0:  # a missing in-distribution dev set is reported, not fatal
                log(f"evaluation set {es.name} skipped: {err}")
                continue
            raise
        p = full_probabilities(model, feature_inputs(kind, _columns(ds)), task.num_labels)
        scores = task.score(es, np.log(np.clip(p, 1e-12, 1.0)), np.asarray(ds["label"]), None, ds)
        evals[es.name] = {"examples": len(ds), **scores}
    meta = {
        "task": task.name, "kind": kind, "folds": folds, "seed": seed, "labels": list(task.labels),
        "n_examples": len(y), "examples_hash": examples_hash(cols), "max_train_samples": max_train_samples,
        "oof_accuracy": oof_acc, "eval_sets": evals,
    }
    save_bias_probs(output, probs, meta)
    return {"task": task.name, "kind": kind, "output": output, "train_examples": len(y), "folds": folds,
            "oof_accuracy": oof_acc, "majority_class_accuracy": majority, "eval_sets": evals,
            "examples_hash": meta["examples_hash"]}




def run_from_cli(ns: Any) -> int:
    """``sparsebert bias-model``: fit, write the file, print the report (JSON)."""
    import sys

    report = build_bias_model(ns.task, ns.data_dir, ns.kind, ns.output, folds=ns.folds, seed=ns.seed,
                              max_train_samples=ns.max_train_samples, max_eval_samples=ns.max_eval_samples,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2))
    return 0


__all__ = [
    "BIAS_KINDS", "BiasProbs", "build_bias_model", "examples_hash", "feature_inputs", "fold_ids",
    "full_probabilities", "load_bias_probs", "make_model", "out_of_fold_probabilities", "overlap_features",
    "run_from_cli", "save_bias_probs",
]
