"""Bias-only models: out-of-fold probabilities never come from a model that saw the example,
hand features, the file format and its hash check, and the command on the real MNLI proxy."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparsebert.bias_models import (
    BiasProbs,
    examples_hash,
    fold_ids,
    load_bias_probs,
    out_of_fold_probabilities,
    overlap_features,
    save_bias_probs,
)
from sparsebert.cli import main
from sparsebert.errors import SparseBertError

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


class _Memoriser:
    """Predicts an example it was fitted on with certainty, any other uniformly, and records
    what it saw: out-of-fold probabilities must all be uniform."""

    fitted: list[set[int]] = []

    def fit(self, x, y):
        self.table = {int(i): int(lab) for i, lab in zip(np.asarray(x).ravel(), y, strict=True)}
        self.classes_ = np.unique(y)
        _Memoriser.fitted.append(set(self.table))
        return self

    def predict_proba(self, x):
        out = np.full((len(x), len(self.classes_)), 1.0 / len(self.classes_))
        for row, i in enumerate(np.asarray(x).ravel()):
            if int(i) in self.table:
                out[row] = 0.0
                out[row, list(self.classes_).index(self.table[int(i)])] = 1.0
        return out


def test_out_of_fold_probabilities_never_come_from_a_model_that_saw_the_example():
    rng = np.random.default_rng(0)
    n = 60
    x = np.arange(n).reshape(-1, 1)  # the feature is the example's id
    y = rng.integers(0, 3, n)
    _Memoriser.fitted.clear()
    probs, folds = out_of_fold_probabilities(x, y, 3, k=5, seed=1, model_factory=_Memoriser)
    assert np.allclose(probs, 1 / 3)  # a model that had seen an example would be certain of it
    assert len(_Memoriser.fitted) == 5
    for f, seen in enumerate(_Memoriser.fitted):
        held_out = set(np.flatnonzero(folds == f).tolist())
        assert held_out and not held_out & seen and held_out | seen == set(range(n))
    assert sorted(np.bincount(folds).tolist()) == [12] * 5  # each example held out exactly once


def test_groups_never_straddle_folds_and_folds_are_stratified():
    y = np.array([0, 1, 2] * 20)
    groups = [f"premise{i // 3}" for i in range(60)]  # three hypotheses per premise
    folds = fold_ids(y, 5, seed=0, groups=groups)
    for g in set(groups):
        assert len({folds[i] for i in range(60) if groups[i] == g}) == 1
    plain = fold_ids(y, 5, seed=0)
    for f in range(5):
        assert np.bincount(y[plain == f]).tolist() == [4, 4, 4]
    with pytest.raises(SparseBertError, match="--folds"):
        fold_ids(y, 1, seed=0)


def test_overlap_features_on_hand_made_pairs():
    f = overlap_features("The doctor saw the lawyer .", "The lawyer saw the doctor .")
    rate, all_in, subseq, bigram, jaccard, neg_b, neg_a, len_diff = f[:8]
    assert rate == 1.0 and all_in == 1.0 and subseq == 0.0 and jaccard == 1.0
    assert bigram == pytest.approx(3 / 4)  # the lawyer, saw the, the doctor; not "lawyer saw"
    assert neg_b == neg_a == 0.0 and len_diff == 0.0
    g = overlap_features("The judge who saw the actor ran .", "The actor did n't run .")
    assert g[5] == 1.0 and g[6] == 0.0  # negation in the hypothesis only
    assert g[0] == pytest.approx(2 / 5) and g[1] == 0.0
    h = overlap_features("Hopefully the doctors saw the authors .", "the doctors saw the authors")
    assert h[2] == 1.0  # a contiguous subsequence


def test_the_file_round_trips_and_refuses_other_examples(tmp_path):
    cols = {"text_a": ["a b", "c d", "e f"], "text_b": ["x", "y", "z"], "label": [0, 1, 0]}
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    h = examples_hash(cols)
    for name in ("b.safetensors", "b.json"):
        meta = {"examples_hash": h, "n_examples": 3, "kind": "overlap"}
        path = save_bias_probs(str(tmp_path / name), probs, meta)
        loaded = load_bias_probs(path)
        assert np.allclose(loaded.probs, probs) and loaded.meta["kind"] == "overlap"
        loaded.check(cols, 2)
    swapped = {**cols, "label": [1, 1, 0]}
    reordered = {k: v[::-1] for k, v in cols.items()}
    for other in (swapped, reordered, {k: v[:2] for k, v in cols.items()}):
        with pytest.raises(SparseBertError, match="other training examples"):
            loaded.check(other, 2)
    with pytest.raises(SparseBertError, match="one column per label"):
        BiasProbs(probs, {"examples_hash": h}).check(cols, 3)
    with open(tmp_path / "nope.json", "w") as f:
        json.dump({"probs": [[1.0]]}, f)
    with pytest.raises(SparseBertError, match="not a sparsebert bias-probabilities file"):
        load_bias_probs(str(tmp_path / "nope.json"))


def test_bias_model_command_on_the_mnli_proxy(tmp_path, capsys):
    out = tmp_path / "overlap.safetensors"
    code = main(["bias-model", "--task", "mnli-dev-split", "--data-dir", SHARED, "--kind", "overlap",
                 "--output", str(out), "--max-train-samples", "600", "--max-eval-samples", "600"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train_examples"] == 600 and report["folds"] == 5
    assert report["oof_accuracy"] > report["majority_class_accuracy"]  # overlap predicts MNLI somewhat
    hans = report["eval_sets"]["hans"]
    assert hans["accuracy"] <= 0.56  # ... and not HANS, which is built against the overlap heuristic
    assert hans["entailment_accuracy"] > hans["non_entailment_accuracy"]
    stored = load_bias_probs(str(out))
    assert stored.probs.shape == (600, 3) and np.allclose(stored.probs.sum(1), 1.0, atol=1e-5)
    assert stored.meta["labels"] == ["entailment", "neutral", "contradiction"]
    assert main(["bias-model", "--task", "sst2", "--data-dir", SHARED, "--kind", "overlap",
                 "--output", str(tmp_path / "x.json"), "--max-train-samples", "50"]) == 2
    assert "sentence pairs" in capsys.readouterr().err
