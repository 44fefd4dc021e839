"""ChemProt (SciBERT's 13-label version): the shared JSONL files and micro-F1 over the positive
relations."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from sparsebert.errors import SparseBertError
from sparsebert.models import embedded_model_dir
from sparsebert.tasks import get_task
from sparsebert.tasks.chemprot import CHEMPROT_LABELS, ChemProtTask, read_jsonl

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def test_shared_files_have_scibert_counts_and_labels():
    task = get_task("chemprot")
    assert task.kind == "sequence-classification" and task.num_labels == 13 and task.main_metric == "micro_f1"
    sizes = {s: len(task.load_split(s, SHARED)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 4169, "validation": 2427, "test": 3469}
    train = task.load_split("train", SHARED)
    counts = Counter(task.labels[i] for i in train["label"])
    assert counts["INHIBITOR"] == 1642 and counts["AGONIST-INHIBITOR"] == 4
    assert set(counts) == set(CHEMPROT_LABELS)  # all 13 occur in train; no 'false' class in this copy
    assert "<<" in train[0]["text"] and "[[" in train[0]["text"]


def test_micro_f1_over_positive_labels_by_hand():
    task = ChemProtTask(labels=("false", "A", "B"))
    gold = np.array([0, 1, 2, 1])
    pred = np.array([1, 1, 0, 2])
    # positives {A, B}: predicted positive 3 (idx 0, 1, 3), gold positive 3 (idx 1, 2, 3), correct 1
    m = task.metrics(pred, gold, task.eval_sets()[0])
    assert m["micro_f1"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(1 / 4)
    # SciBERT's copy has no negative class: micro-F1 over all labels is then the accuracy
    real = get_task("chemprot")
    rng = np.random.default_rng(0)
    g, p = rng.integers(0, 13, 200), rng.integers(0, 13, 200)
    m = real.metrics(p, g, real.eval_sets()[0])
    assert m["micro_f1"] == pytest.approx(m["accuracy"])


def test_score_takes_the_argmax_of_logits():
    task = get_task("chemprot")
    logits = np.zeros((3, 13))
    logits[[0, 1, 2], [8, 8, 10]] = 1.0
    m = task.score(task.eval_sets()[0], logits, np.array([8, 10, 10]))
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_encode_keeps_labels_and_lengths():
    task = get_task("chemprot")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    enc = task.encode(task.load_split("validation", SHARED, max_samples=8), tok, 64)
    assert set(enc.column_names) >= {"input_ids", "attention_mask", "label", "length"}
    assert all(len(x) <= 64 for x in enc["input_ids"])


def test_bad_lines_are_clear_errors(tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text('{"text": "a", "label": "INHIBITOR"}\n{"text": "b", "label": "false"}\n')
    with pytest.raises(SparseBertError, match=r"train\.txt, line 2: label 'false' is not one of"):
        read_jsonl(str(bad), CHEMPROT_LABELS)
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(SparseBertError, match="line 1: expected an object with 'text' and 'label'"):
        read_jsonl(str(bad), CHEMPROT_LABELS)
    bad.write_text("text\tlabel\n")
    with pytest.raises(SparseBertError, match="line 1: not JSON"):
        read_jsonl(str(bad), CHEMPROT_LABELS)
    with pytest.raises(SparseBertError, match="no 'validation' split .*dev.txt"):
        get_task("chemprot").load_split("validation", str(tmp_path))
    with pytest.raises(SparseBertError, match="no hub copy"):
        get_task("chemprot").load_split("train", None)
