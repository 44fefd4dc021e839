"""PubMedQA PQA-L: the official 500 test PMIDs, a deterministic stratified validation split of
the 500-item pool, question + contexts inputs, accuracy and macro-F1."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from sparsebert.errors import SparseBertError
from sparsebert.models import embedded_model_dir
from sparsebert.tasks import get_task

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def splits():
    task = get_task("pubmedqa")
    return {s: task.load_split(s, SHARED) for s in ("train", "validation", "test", "pool")}


def test_splits_are_the_official_test_and_a_stratified_pool_split(splits):
    sizes = {s: len(d) for s, d in splits.items()}
    assert sizes == {"train": 450, "validation": 50, "test": 500, "pool": 500}
    with open(os.path.join(SHARED, "pubmedqa", "test_ground_truth.json")) as f:
        truth = json.load(f)
    test = splits["test"]
    assert set(test["pubid"]) == set(truth)
    labels = get_task("pubmedqa").labels
    assert all(labels[y] == truth[p] for p, y in zip(test["pubid"], test["label"], strict=True))
    train, val = set(splits["train"]["pubid"]), set(splits["validation"]["pubid"])
    assert not train & val and not (train | val) & set(truth)
    assert train | val == set(splits["pool"]["pubid"])
    assert Counter(labels[y] for y in splits["validation"]["label"]) == {"yes": 28, "no": 17, "maybe": 5}
    assert Counter(labels[y] for y in splits["pool"]["label"]) == {"yes": 276, "no": 169, "maybe": 55}


def test_validation_split_is_deterministic(splits):
    again = get_task("pubmedqa").load_split("validation", SHARED)
    assert again["pubid"][:] == splits["validation"]["pubid"][:]


def test_inputs_pair_the_question_with_the_joined_contexts(splits):
    with open(os.path.join(SHARED, "pubmedqa", "ori_pqal.json")) as f:
        items = json.load(f)
    row = splits["train"][0]
    item = items[row["pubid"]]
    assert row["question"] == item["QUESTION"]
    assert row["context"] == " ".join(item["CONTEXTS"])
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    enc = get_task("pubmedqa").encode(splits["train"].select(range(4)), tok, 128)
    ids = enc[0]["input_ids"]
    assert len(ids) == 128  # contexts are long: truncated to the window
    q = tok(row["question"], add_special_tokens=False)["input_ids"]
    assert ids[1 : 1 + len(q)] == q and ids[1 + len(q)] == tok.sep_token_id  # the question is kept whole
    assert enc[0]["label"] == row["label"]


def test_accuracy_and_macro_f1_by_hand():
    task = get_task("pubmedqa")
    gold = np.array([0, 0, 1, 2])
    pred = np.array([0, 1, 1, 1])
    # yes: P 1/1 R 1/2 -> 2/3; no: P 1/3 R 1/1 -> 1/2; maybe: 0 -> macro (2/3 + 1/2 + 0) / 3
    m = task.metrics(pred, gold, task.eval_sets()[0])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert [e.name for e in task.eval_sets()] == ["validation", "test"]


def test_missing_files_are_clear_errors(tmp_path):
    task = get_task("pubmedqa")
    with pytest.raises(SparseBertError, match="no hub copy carries the official test PMIDs"):
        task.load_split("train", None)
    (tmp_path / "pubmedqa").mkdir()
    (tmp_path / "pubmedqa" / "ori_pqal.json").write_text("{}")
    with pytest.raises(SparseBertError, match="no 'test' split .*test_ground_truth.json"):
        task.load_split("train", str(tmp_path))
