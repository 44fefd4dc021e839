"""Out-of-distribution (OOD) evaluation for the SRNets study, and the tasks that need it.

- ``mnli`` (and ``mnli-dev-split``) + **HANS** (McCoy et al. 2019), the 30,000-pair evaluation
  set (``hans/hans_evaluation_derived.tsv``, or the original ``heuristics_evaluation_set.txt``;
  never ``hans_train_derived.tsv``). The 3-way predictions are mapped to 2 labels
  (entailment -> entailment; neutral, contradiction -> non-entailment, ``label_map``) and
  scored as accuracy overall, per label and per heuristic (lexical_overlap, subsequence,
  constituent) x label, and per subcase when the file has one (the derived copy has none).
- ``qqp`` and ``mrpc`` + **PAWS-QQP** (``paws/paws_qqp_dev_and_test.tsv``, 677 pairs; its
  sentences are Python bytes literals, decoded here). Labels are 1 = paraphrase, the same
  as QQP's ``duplicate`` and MRPC's ``equivalent``: no mapping. Accuracy and F1.
- ``fever`` (claim, evidence) with labels SUPPORTS / REFUTES / NOT ENOUGH INFO (3-way, like
  the SRNets reference and its bias-model predictions, which are 3-way): train/dev from local
  ``fever/fever.train.jsonl`` / ``fever.dev.jsonl`` (Schuster et al.'s processed files,
  ``claim``, ``evidence``, ``gold_label``) or, without ``--data-dir``, from the hub dataset
  `FEVER_HUB` (NLI-FEVER; its ``fever_gold_label`` is the label and the shorter of its two
  text columns is taken as the claim, said in a log line). The local copy in ../shared/data
  has no FEVER train/dev: asking for them is a clear error. + **FEVER-Symmetric** v0.1
  (``fever_symmetric_generated.jsonl``, the 717 synthetic pairs) and v0.2 (dev 708, test
  712): SUPPORTS / REFUTES only, scored in the 3-way label space (an NEI prediction is wrong).
- ``mnli-dev-split``: no MNLI train set is available locally, so this *proxy* task splits
  the labelled MNLI dev-matched file (``mnli/mnli_dev_matched_derived.tsv``) by ``promptID``
  (pairID without its last letter where there is no promptID column): the prompt ids are
  ordered by their SHA-256 and the first 80% train, the rest is the in-distribution test
  set. All hypotheses written for one premise land on the same side, so no premise is
  seen in training and test. Numbers on it are a proxy for MNLI, not MNLI dev accuracy.

Every OOD set is ``optional``: where its file is absent (or without ``--data-dir``: the OOD
sets are read from local files only) it is skipped with a log line. Files are looked for
under ``--data-dir`` and, when ``--data-dir`` is a task folder, beside it.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import TASKS, EvalSet
from sparsebert.tasks.glue import _ALIASES, GLUE_TASKS, GlueTask, glue_metrics

logger = logging.getLogger("sparsebert")

FEVER_HUB = "pietrolesci/nli_fever"
FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
HANS_LABELS = ("entailment", "non-entailment")
HANS_HEURISTICS = ("lexical_overlap", "subsequence", "constituent")
MNLI_DEV_FILE = "mnli_dev_matched_derived.tsv"
DEV_SPLIT_TRAIN_FRACTION = 0.8


# -- reading -------------------------------------------------------------------------------------------
def _tsv_rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [r for r in reader if r]
    if not rows:
        raise SparseBertError(f"data file '{path}' is empty")
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, r, strict=False)) for r in rows[1:]]


def _require(path: str, columns: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise SparseBertError(f"'{path}' has no column(s) {missing} (columns: {list(columns)})")


def read_hans(path: str, task: GlueTask) -> dict[str, list]:
    """HANS evaluation pairs: text_a, text_b, label (0 entailment, 1 non-entailment), heuristic
    [, subcase]. Reads the derived TSV and the original heuristics_evaluation_set.txt."""
    rows = _tsv_rows(path)
    cols = list(rows[0]) if rows else []
    label_col = "label" if "label" in cols else "gold_label"
    _require(path, cols, ("sentence1", "sentence2", label_col, "heuristic"))
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": [], "heuristic": []}
    has_subcase = "subcase" in cols
    if has_subcase:
        out["subcase"] = []
    for r in rows:
        raw = r[label_col].strip()
        if raw not in HANS_LABELS:
            raise SparseBertError(f"{path}: HANS label '{raw}' is not one of {list(HANS_LABELS)}")
        out["text_a"].append(r["sentence1"].strip())
        out["text_b"].append(r["sentence2"].strip())
        out["label"].append(HANS_LABELS.index(raw))
        out["heuristic"].append(r["heuristic"].strip())
        if has_subcase:
            out["subcase"].append(r["subcase"].strip())
    return out


def _unbytes(text: str) -> str:
    """PAWS-QQP's generator writes Python bytes literals (b'...' / b"..."): decode them."""
    text = text.strip()
    if len(text) >= 3 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
    return text


def read_paws(path: str, task: GlueTask) -> dict[str, list]:
    """PAWS pairs: text_a, text_b, label (1 = paraphrase)."""
    rows = _tsv_rows(path)
    cols = list(rows[0]) if rows else []
    _require(path, cols, ("sentence1", "sentence2", "label"))
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    for r in rows:
        label = int(r["label"])
        if label not in (0, 1):
            raise SparseBertError(f"{path}: PAWS label {label} is not 0 or 1")
        out["text_a"].append(_unbytes(r["sentence1"]))
        out["text_b"].append(_unbytes(r["sentence2"]))
        out["label"].append(label)
    return out


def read_fever_jsonl(path: str, task: GlueTask) -> dict[str, list]:
    """FEVER-format JSON lines: text_a = claim, text_b = evidence (``evidence`` or, in
    FEVER-Symmetric v0.1, ``evidence_sentence``), label = ``gold_label`` or ``label``."""
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise SparseBertError(f"{path}:{n} is not a JSON object: {err}") from None
            evidence = row.get("evidence", row.get("evidence_sentence"))
            label = row.get("gold_label", row.get("label"))
            if not isinstance(evidence, str) or "claim" not in row or label is None:
                raise SparseBertError(
                    f"{path}:{n}: a FEVER row needs 'claim', 'evidence' (or 'evidence_sentence') and "
                    f"'gold_label' (or 'label'); found keys {sorted(row)}"
                )
            if label not in task.labels:
                raise SparseBertError(f"{path}:{n}: label '{label}' is not one of {list(task.labels)}")
            out["text_a"].append(row["claim"].strip())
            out["text_b"].append(evidence.strip())
            out["label"].append(task.labels.index(label))
    if not out["label"]:
        raise SparseBertError(f"'{path}' has no examples")
    return out


# -- OOD sets -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OODSet:
    """An extra evaluation set read from its own file: ``eval_set`` (its ``split`` is the key),
    ``files`` (paths tried, relative to --data-dir and to its parent) and ``reader``."""

    eval_set: EvalSet
    files: tuple[str, ...]
    reader: Callable[[str, GlueTask], dict[str, list]]
    what: str = ""


HANS = OODSet(
    EvalSet("hans", "hans", label_map={0: 0, 1: 1, 2: 1}, labels=HANS_LABELS, optional=True),
    ("hans/hans_evaluation_derived.tsv", "hans/heuristics_evaluation_set.txt",
     "MNLI/hans/heuristics_evaluation_set.txt", "mnli/hans/heuristics_evaluation_set.txt"),
    read_hans, "HANS evaluation set",
)
PAWS_QQP = OODSet(
    EvalSet("paws_qqp", "paws_qqp", optional=True),
    ("paws/paws_qqp_dev_and_test.tsv", "paws_qqp/dev_and_test.tsv", "QQP/paws_qqp/dev_and_test.tsv",
     "qqp/paws_qqp/dev_and_test.tsv"),
    read_paws, "PAWS-QQP dev and test",
)
FEVER_SYMMETRIC = (
    OODSet(EvalSet("fever_symmetric_v1", "fever_symmetric_v1", optional=True),
           ("fever_symmetric/v0.1_fever_symmetric_generated.jsonl",
            "fever_symmetric/symmetric_v0.1/fever_symmetric_generated.jsonl", "fever/sym1/test.jsonl"),
           read_fever_jsonl, "FEVER-Symmetric v0.1 (generated pairs)"),
    OODSet(EvalSet("fever_symmetric_v2_dev", "fever_symmetric_v2_dev", optional=True),
           ("fever_symmetric/v0.2_fever_symmetric_dev.jsonl",
            "fever_symmetric/symmetric_v0.2/fever_symmetric_dev.jsonl", "fever/sym2/dev.jsonl"),
           read_fever_jsonl, "FEVER-Symmetric v0.2 dev"),
    OODSet(EvalSet("fever_symmetric_v2_test", "fever_symmetric_v2_test", optional=True),
           ("fever_symmetric/v0.2_fever_symmetric_test.jsonl",
            "fever_symmetric/symmetric_v0.2/fever_symmetric_test.jsonl", "fever/sym2/test.jsonl"),
           read_fever_jsonl, "FEVER-Symmetric v0.2 test"),
)


def find_file(data_dir: str | None, files: Sequence[str]) -> str | None:
    """The first of ``files`` under ``data_dir`` or its parent (``data_dir`` may be a task folder)."""
    if not data_dir:
        return None
    bases = [data_dir, os.path.dirname(os.path.abspath(data_dir))]
    for base in bases:
        for rel in files:
            path = os.path.join(base, rel)
            if os.path.isfile(path):
                return path
    return None


def load_ood_set(ood: OODSet, task: GlueTask, data_dir: str | None, max_samples: int | None = None):
    """One OOD set as a `datasets.Dataset` (text_a, text_b, label [, heuristic, subcase])."""
    import datasets

    if not data_dir:
        raise SparseBertError(f"{ood.what or ood.eval_set.name} is read from local files: pass --data-dir")
    path = find_file(data_dir, ood.files)
    if path is None:
        raise SparseBertError(
            f"no {ood.what or ood.eval_set.name} under '{data_dir}' (looked for {', '.join(ood.files)})"
        )
    ds = datasets.Dataset.from_dict(ood.reader(path, task))
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


# -- metrics ---------------------------------------------------------------------------------------------
def hans_metrics(predictions: np.ndarray, labels: np.ndarray, heuristics: Sequence[str],
                 subcases: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy overall, per label, per heuristic and per heuristic x label (and per subcase
    when given) of 2-way predictions (0 entailment, 1 non-entailment)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    heuristics = np.asarray(heuristics)
    if not len(predictions) == len(labels) == len(heuristics):
        raise ValueError("predictions, labels and heuristics differ in length")
    right = predictions == labels
    out = {"accuracy": float(right.mean())}
    names = {0: "entailment", 1: "non_entailment"}
    for label, name in names.items():
        sel = labels == label
        if sel.any():
            out[f"{name}_accuracy"] = float(right[sel].mean())
    for h in sorted(set(heuristics.tolist())):
        sel = heuristics == h
        out[f"{h}_accuracy"] = float(right[sel].mean())
        for label, name in names.items():
            both = sel & (labels == label)
            if both.any():
                out[f"{h}_{name}_accuracy"] = float(right[both].mean())
    if subcases is not None:
        subcases = np.asarray(subcases)
        for s in sorted(set(subcases.tolist())):
            out[f"subcase_{s}_accuracy"] = float(right[subcases == s].mean())
    return out


def mapped_predictions(eval_set: EvalSet, predictions) -> np.ndarray:
    """Argmax predictions mapped into the evaluation set's label space."""
    logits = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
    preds = np.argmax(logits, axis=-1)
    if eval_set.label_map is not None:
        preds = np.array([eval_set.label_map.get(int(i), int(i)) for i in preds], dtype=np.int64)
    return preds


# -- tasks -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RobustGlueTask(GlueTask):
    """A GLUE-style task with OOD evaluation sets read from their own files."""

    ood_sets: tuple[OODSet, ...] = ()

    def _ood(self, eval_set: EvalSet) -> OODSet | None:
        return next((o for o in self.ood_sets if o.eval_set.split == eval_set.split), None)

    def eval_sets(self) -> list[EvalSet]:
        return [*super().eval_sets(), *(o.eval_set for o in self.ood_sets)]

    def load_eval_set(self, eval_set: EvalSet, data_dir: str | None, max_samples: int | None = None):
        ood = self._ood(eval_set)
        if ood is None:
            return super().load_eval_set(eval_set, data_dir, max_samples)
        return load_ood_set(ood, self, data_dir, max_samples)

    def encode_eval(self, ds, tokenizer, max_seq_length: int):
        features = self.encode(ds, tokenizer, max_seq_length)
        drop = [c for c in ("heuristic", "subcase") if c in features.column_names]
        return features.remove_columns(drop) if drop else features

    def score(self, eval_set: EvalSet, predictions, label_ids, features=None,
              examples=None) -> dict[str, float]:
        if eval_set.split != HANS.eval_set.split:
            return super().score(eval_set, predictions, label_ids, features, examples)
        if examples is None:
            raise ValueError("HANS scores need the examples (their heuristic column)")
        preds = mapped_predictions(eval_set, predictions)
        subcases = examples["subcase"] if "subcase" in examples.column_names else None
        return hans_metrics(preds, np.asarray(label_ids), examples["heuristic"], subcases)

    def metrics(self, predictions, label_ids, eval_set: EvalSet) -> dict[str, float]:
        return glue_metrics(self, predictions, label_ids)


def prompt_split(path: str, train_fraction: float = DEV_SPLIT_TRAIN_FRACTION) -> dict[str, dict[str, list]]:
    """Split MNLI dev rows by prompt: {'train': cols, 'validation': cols}, each with text_a,
    text_b, label and promptID. Prompt ids are ordered by SHA-256 (not by file order) and
    the first ``train_fraction`` of them train."""
    rows = _tsv_rows(path)
    cols = list(rows[0]) if rows else []
    _require(path, cols, ("premise", "hypothesis", "label"))
    if "promptID" not in cols and "pairID" not in cols:
        raise SparseBertError(f"'{path}' has neither a promptID nor a pairID column to split by")
    labels = GLUE_TASKS["mnli"].labels
    kept = []
    for r in rows:
        label = r["label"].strip()
        if label in ("", "-"):
            continue
        if label not in labels:
            raise SparseBertError(f"{path}: label '{label}' is not one of {list(labels)}")
        prompt = r.get("promptID", "").strip() or r["pairID"].strip()[:-1]
        kept.append((prompt, r["premise"].strip(), r["hypothesis"].strip(), labels.index(label)))
    prompts = sorted({k[0] for k in kept}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    train_prompts = set(prompts[: int(round(train_fraction * len(prompts)))])
    out = {s: {"text_a": [], "text_b": [], "label": [], "promptID": []} for s in ("train", "validation")}
    for prompt, a, b, y in kept:
        part = out["train" if prompt in train_prompts else "validation"]
        part["text_a"].append(a)
        part["text_b"].append(b)
        part["label"].append(y)
        part["promptID"].append(prompt)
    return out


@dataclass(frozen=True)
class MnliDevSplitTask(RobustGlueTask):
    """MNLI dev-matched split 80/20 by prompt: a local proxy for MNLI train / dev."""

    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        import datasets

        if split not in ("train", "validation"):
            raise SparseBertError(f"{self.name} has the splits train and validation, not '{split}'")
        path = find_file(data_dir, [f"{d}/{MNLI_DEV_FILE}" for d in self.folders] + [MNLI_DEV_FILE])
        if path is None:
            raise SparseBertError(
                f"{self.name} is a split of {MNLI_DEV_FILE} (MNLI dev matched with promptIDs): pass a "
                f"--data-dir holding mnli/{MNLI_DEV_FILE}"
                + (f"; not found under '{data_dir}'" if data_dir else "")
            )
        cols = prompt_split(path)[split]
        del cols["promptID"]
        ds = datasets.Dataset.from_dict(cols)
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        return ds

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet("validation", "validation"), *(o.eval_set for o in self.ood_sets)]

    def prompt(self):
        from sparsebert.tasks.prompts import PROMPTS

        return PROMPTS.get("mnli")

    def encode_prompt(self, ds, tokenizer, max_seq_length: int):
        from sparsebert.tasks.prompts import tokenize_with_prompt

        return tokenize_with_prompt(ds, tokenizer, GLUE_TASKS["mnli"], max_seq_length)


@dataclass(frozen=True)
class FeverTask(RobustGlueTask):
    """FEVER claim-evidence pairs, 3-way, with FEVER-Symmetric as OOD sets."""

    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        import datasets

        if data_dir:
            files = self.split_files.get(split)
            if files is None:
                raise SparseBertError(f"{self.name} has the splits {', '.join(self.split_files)}, "
                                      f"not '{split}'")
            names = [g[0] for g in files]
            path = find_file(data_dir, [f"{d}/{n}" for d in self.folders for n in names] + names)
            if path is None:
                raise SparseBertError(
                    f"no FEVER '{split}' split under '{data_dir}': expected fever/{' or fever/'.join(names)} "
                    "(Schuster et al.'s processed FEVER, JSON lines with claim, evidence, gold_label); "
                    "FEVER-Symmetric files alone are evaluation sets, not FEVER train/dev. Omit --data-dir "
                    f"to load FEVER from the hub ({FEVER_HUB})"
                )
            cols = read_fever_jsonl(path, self)
        else:
            cols = _load_fever_hub(self, split)
        ds = datasets.Dataset.from_dict(cols)
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        return ds


def _load_fever_hub(task: FeverTask, split: str) -> dict[str, list]:
    from sparsebert.tasks.datafiles import load_hub

    ds = load_hub(task.name, FEVER_HUB, task.hub_splits.get(split, split))
    cols = ds.column_names
    if not {"premise", "hypothesis", "fever_gold_label"} <= set(cols):
        raise SparseBertError(f"hub dataset '{FEVER_HUB}' has unexpected columns {cols}")
    premise, hypothesis = list(ds["premise"]), list(ds["hypothesis"])

    def mean_words(texts: list[str]) -> float:
        sample = texts[:2000]
        return sum(len(t.split()) for t in sample) / max(1, len(sample))

    claim_first = mean_words(premise) <= mean_words(hypothesis)
    claims, evidence = (premise, hypothesis) if claim_first else (hypothesis, premise)
    logger.info("FEVER from %s: claim = '%s' (the shorter text), evidence = '%s'", FEVER_HUB,
                "premise" if claim_first else "hypothesis", "hypothesis" if claim_first else "premise")
    gold = list(ds["fever_gold_label"])
    unknown = sorted(set(gold) - set(task.labels))
    if unknown:
        raise SparseBertError(f"hub dataset '{FEVER_HUB}' has labels {unknown}, not {list(task.labels)}")
    return {"text_a": claims, "text_b": evidence, "label": [task.labels.index(lab) for lab in gold]}


# -- registration ---------------------------------------------------------------------------------------
def _with_ood(base: GlueTask, cls: type[RobustGlueTask] = RobustGlueTask, **changes) -> RobustGlueTask:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return cls(**{**fields, **changes})


ROBUST_TASKS: dict[str, RobustGlueTask] = {
    "mnli": _with_ood(GLUE_TASKS["mnli"], ood_sets=(HANS,)),
    "qqp": _with_ood(GLUE_TASKS["qqp"], ood_sets=(PAWS_QQP,)),
    "mrpc": _with_ood(GLUE_TASKS["mrpc"], ood_sets=(PAWS_QQP,)),
    "mnli-dev-split": _with_ood(
        GLUE_TASKS["mnli"], MnliDevSplitTask, name="mnli-dev-split", extra_eval_sets=(), ood_sets=(HANS,),
        split_files={"train": ((MNLI_DEV_FILE,),), "validation": ((MNLI_DEV_FILE,),)}, hub_splits={},
    ),
    "fever": FeverTask(
        "fever", True, FEVER_LABELS, "accuracy", ("fever", "FEVER"),
        {"train": (("fever.train.jsonl",), ("train.jsonl",)),
         "validation": (("fever.dev.jsonl",), ("dev.jsonl",))},
        hub_splits={"validation": "dev"}, ood_sets=FEVER_SYMMETRIC,
    ),
}
for _task in ROBUST_TASKS.values():  # replaces the plain GLUE mnli / qqp / mrpc (same data, more sets)
    TASKS.register(_task.name, _task, aliases=_ALIASES.get(_task.name, ()), replace=True)


__all__ = [
    "FEVER_HUB", "FEVER_SYMMETRIC", "HANS", "PAWS_QQP", "FeverTask", "MnliDevSplitTask", "OODSet",
    "ROBUST_TASKS", "RobustGlueTask", "find_file", "hans_metrics", "load_ood_set", "prompt_split",
    "read_fever_jsonl", "read_hans", "read_paws",
]
