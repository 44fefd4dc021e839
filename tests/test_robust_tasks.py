"""OOD evaluation sets (HANS, PAWS-QQP, FEVER-Symmetric), mnli-dev-split and FEVER: loading
from the team's copies in ../shared/data, label mapping, and the HANS breakdown on hand-made
predictions."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from sparsebert.errors import SparseBertError
from sparsebert.pipeline import DataOptions, evaluate_saved, load_eval_data
from sparsebert.tasks import get_task
from sparsebert.tasks.robust import _unbytes, hans_metrics, prompt_split, read_fever_jsonl

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def test_the_ood_sets_are_registered_with_their_tasks():
    tasks = ("mnli", "mnli-dev-split", "qqp", "mrpc", "fever")
    names = {t: [e.name for e in get_task(t).eval_sets()] for t in tasks}
    assert names["mnli"] == ["validation", "validation_mismatched", "hans"]
    assert names["mnli-dev-split"] == ["validation", "hans"]
    assert names["qqp"] == names["mrpc"] == ["validation", "paws_qqp"]
    assert names["fever"] == ["validation", "fever_symmetric_v1", "fever_symmetric_v2_dev",
                              "fever_symmetric_v2_test"]
    hans = get_task("mnli").eval_sets()[-1]
    assert hans.optional and hans.labels == ("entailment", "non-entailment")
    assert hans.label_map == {0: 0, 1: 1, 2: 1}  # neutral and contradiction are non-entailment
    assert get_task("mnli-m") is get_task("mnli")  # the alias follows the replacement
    assert get_task("fever").labels == ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


def test_hans_is_the_evaluation_set_with_5000_pairs_per_heuristic_and_label():
    task = get_task("mnli")
    ds = task.load_eval_set(task.eval_sets()[-1], SHARED)
    assert len(ds) == 30000
    counts = {}
    for h, y in zip(ds["heuristic"], ds["label"], strict=True):
        counts[h, y] = counts.get((h, y), 0) + 1
    assert set(counts.values()) == {5000} and len(counts) == 6
    assert ("The president advised the doctor .", "The doctor advised the president .") in set(
        zip(ds["text_a"], ds["text_b"], strict=True))
    # not the HANS training set
    with open(os.path.join(SHARED, "hans", "hans_train_derived.tsv")) as f:
        f.readline()
        train_pair = tuple(f.readline().split("\t")[:2])
    assert train_pair not in set(zip(ds["text_a"], ds["text_b"], strict=True))


def test_hans_metrics_on_hand_made_predictions():
    labels = np.array([0, 0, 1, 1, 0, 1])
    preds = np.array([0, 1, 1, 0, 0, 0])
    heur = ["lexical_overlap"] * 3 + ["subsequence"] * 2 + ["constituent"]
    m = hans_metrics(preds, labels, heur)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["entailment_accuracy"] == pytest.approx(2 / 3)
    assert m["non_entailment_accuracy"] == pytest.approx(1 / 3)
    assert m["lexical_overlap_accuracy"] == pytest.approx(2 / 3)
    assert m["lexical_overlap_entailment_accuracy"] == pytest.approx(1 / 2)
    assert m["lexical_overlap_non_entailment_accuracy"] == 1.0
    assert m["subsequence_non_entailment_accuracy"] == 0.0
    assert m["constituent_accuracy"] == 0.0
    with_sub = hans_metrics(preds, labels, heur, subcases=["a", "a", "b", "b", "b", "c"])
    assert with_sub["subcase_b_accuracy"] == pytest.approx(2 / 3)


def test_hans_score_maps_three_way_logits_to_two_labels():
    import datasets

    task = get_task("mnli")
    hans = task.eval_sets()[-1]
    # argmax: entailment, neutral, contradiction, entailment
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 0.5, 0.0]])
    gold = np.array([0, 1, 1, 1])  # entailment, non-entailment x3
    examples = datasets.Dataset.from_dict({"heuristic": ["subsequence"] * 4})
    m = task.score(hans, logits, gold, None, examples)
    assert m["accuracy"] == 0.75
    assert m["non_entailment_accuracy"] == pytest.approx(2 / 3)
    assert m["subsequence_entailment_accuracy"] == 1.0


def test_mnli_dev_split_is_by_prompt_deterministic_and_80_20():
    path = os.path.join(SHARED, "mnli", "mnli_dev_matched_derived.tsv")
    parts = prompt_split(path)
    train, test = parts["train"], parts["validation"]
    assert len(train["label"]) + len(test["label"]) == 9815
    assert not set(train["promptID"]) & set(test["promptID"])  # no premise on both sides
    n_prompts = len(set(train["promptID"])) + len(set(test["promptID"]))
    assert len(set(train["promptID"])) == round(0.8 * n_prompts)
    assert prompt_split(path)["validation"]["promptID"] == test["promptID"]  # deterministic
    task = get_task("mnli-dev-split")
    ds = task.load_split("validation", SHARED, max_samples=5)
    assert ds.column_names == ["text_a", "text_b", "label"] and ds["text_a"] == test["text_a"][:5]
    assert task.prompt() is not None  # SMP's MNLI template
    with pytest.raises(SparseBertError, match="mnli_dev_matched_derived.tsv"):
        task.load_split("train", None)


def test_paws_qqp_decodes_bytes_literals_and_serves_qqp_and_mrpc():
    assert _unbytes("b'What is it ?'") == "What is it ?"
    assert _unbytes('b"I \'m here"') == "I 'm here"
    assert _unbytes("b'caf\\xc3\\xa9'") == "café"
    assert _unbytes("plain text") == "plain text"
    for name in ("qqp", "mrpc"):
        task = get_task(name)
        ds = task.load_eval_set(task.eval_sets()[-1], SHARED)
        assert len(ds) == 677 and sum(ds["label"]) == 191
        assert not any(t.startswith(("b'", 'b"')) for t in list(ds["text_a"]) + list(ds["text_b"]))
        assert task.labels[1] in ("duplicate", "equivalent")  # 1 = paraphrase: no label map


def test_fever_symmetric_sets_and_a_clear_error_for_the_missing_fever_train(tmp_path):
    task = get_task("fever")
    sizes = {es.name: len(task.load_eval_set(es, SHARED)) for es in task.eval_sets()[1:]}
    assert sizes == {"fever_symmetric_v1": 717, "fever_symmetric_v2_dev": 708, "fever_symmetric_v2_test": 712}
    with pytest.raises(SparseBertError, match="no FEVER 'train' split.*hub"):
        task.load_split("train", SHARED)
    fever = tmp_path / "fever"
    fever.mkdir()
    rows = [{"claim": "A is B .", "evidence": "A is B and C .", "gold_label": "SUPPORTS"},
            {"claim": "A is D .", "evidence": "A is B .", "gold_label": "REFUTES"},
            {"claim": "E won .", "evidence": "F lost .", "gold_label": "NOT ENOUGH INFO"}]
    (fever / "fever.train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = task.load_split("train", str(tmp_path))
    assert ds["label"] == [0, 1, 2] and ds["text_a"][0] == "A is B ." and ds["text_b"][1] == "A is B ."
    bad = {"claim": "x", "evidence": "y", "gold_label": "MAYBE"}
    (fever / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(SparseBertError, match="MAYBE"):
        read_fever_jsonl(str(fever / "bad.jsonl"), task)


def test_missing_ood_data_is_skipped_with_a_log_line(tmp_path, tokenizer, caplog):
    mnli = tmp_path / "mnli"
    mnli.mkdir()
    (mnli / "dev_matched.tsv").write_text("premise\thypothesis\tlabel\nA cat sat .\tA cat .\tentailment\n")
    with caplog.at_level(logging.INFO, logger="sparsebert"):
        evals = load_eval_data(get_task("mnli"), DataOptions("mnli", str(tmp_path)), tokenizer)
    assert [e.eval_set.name for e in evals] == ["validation"]
    assert "evaluation set hans skipped" in caplog.text


def test_evaluate_mrpc_with_local_data_includes_paws(tiny_model_dir):
    out = evaluate_saved(tiny_model_dir, DataOptions("mrpc", SHARED, max_eval_samples=16, max_seq_length=48))
    assert list(out["eval_sets"]) == ["validation", "paws_qqp"]
    paws = out["eval_sets"]["paws_qqp"]
    assert {"eval_paws_qqp_accuracy", "eval_paws_qqp_f1"} <= set(paws)
