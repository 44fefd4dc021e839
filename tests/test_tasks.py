"""GLUE loading from the team's real copies (../shared/data), their quirks, and the metrics."""

from __future__ import annotations

import os

import numpy as np
import pytest
from transformers import EvalPrediction

from sparsebert.errors import SparseBertError
from sparsebert.tasks import get_task
from sparsebert.tasks.glue import compute_metrics_fn, load_split, read_glue_file

# CI clones the repo with ../shared beside it: the real copies are part of the test contract.
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.parametrize(
    "task,split,rows,first_label",
    [
        ("sst2", "train", 67349, None),  # alps_train + alps_dev = the GLUE train set
        ("sst2", "validation", 872, 1),  # alps_test = the GLUE dev set
        ("cola", "validation", 527, 1),  # no header
        ("mrpc", "validation", 408, 1),  # UTF-8 BOM before the header
        ("stsb", "validation", 1500, 5.0),
        ("rte", "validation", 277, 1),
        ("mnli", "validation", 9815, 1),  # derived file, premise/hypothesis/label; 'neutral' = 1
        ("qnli", "validation", 5463, 0),
    ],
)
def test_shared_copies_load_with_their_quirks(task, split, rows, first_label):
    ds = load_split(task, split, SHARED)
    assert len(ds) == rows
    if first_label is not None:
        assert ds[0]["label"] == first_label
    assert all(t.strip() for t in ds["text_a"][:50])
    if get_task(task).pair:
        assert all(t for t in ds["text_b"][:50])


def test_sst2_label_balance_matches_glue():
    train = load_split("sst2", "train", SHARED)
    assert sum(train["label"]) == 37569  # GLUE SST-2 train: 37,569 positive / 29,780 negative
    dev = load_split("sst2", "validation", SHARED)
    assert sum(dev["label"]) == 444


def test_mrpc_bom_does_not_leak_into_column_names():
    path = os.path.join(SHARED, "mrpc", "dev.tsv")
    cols = read_glue_file(get_task("mrpc"), path)
    assert cols["text_a"][0].startswith("He said the foodservice")


def test_absent_train_split_is_a_clear_error():
    with pytest.raises(SparseBertError, match="no 'train' split"):
        load_split("qnli", "train", SHARED)


def test_max_samples_takes_a_prefix(sst2_dir):
    full = load_split("sst2", "train", sst2_dir)
    sub = load_split("sst2", "train", sst2_dir, max_samples=10)
    assert sub["text_a"] == full["text_a"][:10]


def test_metrics_match_their_definitions():
    preds = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 0, 1])
    m = compute_metrics_fn(get_task("mrpc"))(EvalPrediction(preds, labels))
    assert m["accuracy"] == 0.5 and m["f1"] == pytest.approx(0.5)
    c = compute_metrics_fn(get_task("cola"))(EvalPrediction(preds, labels))
    assert c["matthews_correlation"] == pytest.approx(0.0)  # tp=1 tn=1 fp=1 fn=1
    reg = EvalPrediction(np.array([[1.0], [2.0], [3.0]]), np.array([2, 4, 6.5]))
    s = compute_metrics_fn(get_task("stsb"))(reg)
    assert s["spearmanr"] == pytest.approx(1.0) and 0.99 < s["pearson"] <= 1.0
