"""SQuAD v1.1: the official EM/F1, n-best span post-processing, and sliding-window features on
the shared (explorer-reconstructed) files."""

from __future__ import annotations

import os
import unicodedata

import datasets
import numpy as np
import pytest
from tiny_models import predict_with_tiny_model
from transformers import BertForQuestionAnswering

from sparsebert.errors import SparseBertError
from sparsebert.tasks import get_task
from sparsebert.tasks.squad import postprocess_spans, read_squad_json
from sparsebert.tasks.squad_metric import exact_match_score, f1_score, normalize_answer, squad_v1_scores

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")



@pytest.fixture(scope="module")
def dev():
    return get_task("squad").load_split("validation", SHARED)


# -- official metric --------------------------------------------------------------------------
def test_normalize_answer_follows_the_official_definition():
    assert normalize_answer("  The  Cat's, a hat!") == "cats hat"
    assert normalize_answer("An apple-pie") == "applepie"  # punctuation removed before splitting
    assert normalize_answer("theme") == "theme"  # articles are whole words only


def test_exact_match_and_f1_on_known_strings():
    assert exact_match_score("The Cat", "cat") == 1.0
    assert f1_score("The Cat", "cat") == 1.0
    # 'the big black cat' -> [big, black, cat]; 'black cat sat' -> [black, cat, sat]: 2 shared
    assert exact_match_score("the big black cat", "black cat sat") == 0.0
    assert f1_score("the big black cat", "black cat sat") == pytest.approx(2 / 3)
    # precision 1/1, recall 1/4 -> F1 = 2 * 1 * 0.25 / 1.25 = 0.4
    assert f1_score("Denver", "the Denver Broncos football team") == pytest.approx(0.4)
    assert f1_score("a", "the") == 0.0  # both normalise to nothing


def test_scores_take_the_max_over_references_and_average_x100():
    refs = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1973"], "q3": ["blue"]}
    preds = {"q1": "the Broncos", "q2": "in 1973 October"}  # q3 unanswered -> 0
    out = squad_v1_scores(preds, refs)
    assert out["exact_match"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)  # q2: P 1/3, R 1 -> 0.5


# -- post-processing ------------------------------------------------------------------------
def test_postprocessing_picks_the_best_valid_span_over_all_windows():
    context = "The quick brown fox jumps over the lazy dog"
    examples = datasets.Dataset.from_dict({"id": ["q"], "context": [context]})
    # window 1: [CLS] q q [SEP] The quick brown fox [SEP]; window 2: ... fox jumps over the lazy dog
    w1 = [None, None, None, None, (0, 3), (4, 9), (10, 15), (16, 19), None]
    w2 = [None, None, None, None, (16, 19), (20, 25), (26, 30), (31, 34), (35, 39), (40, 43), None]
    features = datasets.Dataset.from_dict({"example_id": ["q", "q"], "offset_mapping": [w1, w2]})
    start = np.full((2, 11), -100.0)
    end = np.full((2, 11), -100.0)
    start[0, :9] = 0.0
    end[0, :9] = 0.0
    start[0, 1], end[0, 2] = 50.0, 50.0  # inside the question: never an answer
    start[0, 7], end[0, 5] = 9.0, 8.0  # (7, 5) is invalid (end before start); window 1's best: 'fox', 9
    start[1, :11] = 0.0
    end[1, :11] = 0.0
    start[1, 8], end[1, 9] = 5.0, 5.0  # 'lazy dog', 10: the best over both windows
    assert postprocess_spans(examples, features, start, end) == {"q": "lazy dog"}
    # answers of at most 1 token: 'dog' (4.5 + 5) beats 'fox' (9), 'quick' (8) and 'lazy' (5)
    start[1, 9] = 4.5
    assert postprocess_spans(examples, features, start, end, max_answer_length=1) == {"q": "dog"}
    # window 1 alone
    one = features.select([0])
    assert postprocess_spans(examples, one, start[:1], end[:1]) == {"q": "fox"}
    # no valid span at all: the empty answer
    none = datasets.Dataset.from_dict({"example_id": ["q"], "offset_mapping": [[None, None, None]]})
    assert postprocess_spans(examples, none, start[:1, :3], end[:1, :3]) == {"q": ""}


# -- real files -----------------------------------------------------------------------------
def test_shared_files_load_with_the_documented_counts(dev):
    assert len(dev) == 10570
    assert len(set(dev["id"])) == 10570
    first = dev[0]
    assert first["question"] == "When did the 1973 oil crisis begin?"
    assert first["answers"]["text"][0] == "October 1973"
    assert 1 <= min(len(a["text"]) for a in dev.select(range(200))["answers"])


def test_gold_answer_is_recovered_from_eval_features_offsets(dev, tokenizer):
    task = get_task("squad")
    raw = dev.select(range(40))
    features = task.encode_eval(raw, tokenizer, 128)  # short windows: long contexts get several
    assert len(features) > len(raw)
    assert {"example_id", "offset_mapping", "input_ids"} <= set(features.column_names)
    # an oracle: in every window holding the first gold answer, put the logits on its tokens
    start = np.zeros((len(features), 128))
    end = np.zeros((len(features), 128))
    contexts = dict(zip(raw["id"], raw["context"], strict=True))
    answers = dict(zip(raw["id"], raw["answers"], strict=True))
    found = set()
    for i, (qid, offsets) in enumerate(zip(features["example_id"], features["offset_mapping"], strict=True)):
        assert all(o is None for o in offsets[:2])  # [CLS] and the question are outside the context
        a0 = answers[qid]["answer_start"][0]
        a1 = a0 + len(answers[qid]["text"][0])
        s = [j for j, o in enumerate(offsets) if o is not None and o[0] == a0]
        e = [j for j, o in enumerate(offsets) if o is not None and o[1] == a1]
        if s and e:
            start[i, s[0]], end[i, e[0]] = 10.0, 10.0
            found.add(qid)
            assert contexts[qid][offsets[s[0]][0] : offsets[e[0]][1]] == answers[qid]["text"][0]
    assert len(found) >= 38  # a few answers end inside a word piece
    scores = task.score(task.eval_sets()[0], (start, end), None, features, raw)
    assert scores["exact_match"] >= 100 * 38 / 40
    assert scores["f1"] >= scores["exact_match"]


def _plain(s: str) -> str:
    s = unicodedata.normalize("NFD", s.lower())
    return "".join(c for c in s if not unicodedata.combining(c) and not c.isspace())


def test_train_features_point_at_the_answer_or_at_cls(tokenizer):
    task = get_task("squad")
    raw = task.load_split("train", SHARED, max_samples=60)
    features = task.encode(raw, tokenizer, 128)
    assert {"start_positions", "end_positions", "length"} <= set(features.column_names)
    assert len(features) > len(raw)
    cls_hits = 0
    texts = [_plain(a["text"][0]) for a in raw["answers"]]
    hits = 0
    for f in features:
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0
            cls_hits += 1
            continue
        assert s <= e < len(f["input_ids"])
        span = _plain(tokenizer.decode(f["input_ids"][s : e + 1]).replace(" ##", ""))
        hits += span in texts
    assert cls_hits > 0  # windows without the answer
    assert hits >= 0.95 * (len(features) - cls_hits)


def test_questions_that_are_too_long_are_cut_not_fatal(tokenizer):
    task = get_task("squad")
    raw = datasets.Dataset.from_dict({
        "id": ["x"], "title": ["t"], "context": ["Paris is the capital of France. " * 20],
        "question": [" ".join(["why"] * 300)], "answers": [{"text": ["Paris"], "answer_start": [0]}],
    })
    features = task.encode(raw, tokenizer, 64)
    assert all(len(ids) <= 64 for ids in features["input_ids"])
    assert features[0]["start_positions"] > 0  # the first window still holds the answer


def test_local_json_quirks_are_clear_errors(tmp_path):
    bad = tmp_path / "dev-v1.1.json"
    bad.write_text('{"version": "2.0", "data": [{"title": "t", "paragraphs": [{"context": "c", '
                   '"qas": [{"id": "1", "question": "q", "answers": []}]}]}]}')
    with pytest.raises(SparseBertError, match="no answers; this is the SQuAD v1.1 task"):
        read_squad_json(str(bad))
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(SparseBertError, match="no top-level 'data' list"):
        read_squad_json(str(tmp_path / "x.json"))
    with pytest.raises(SparseBertError, match="no 'train' split"):
        get_task("squad").load_split("train", str(tmp_path))


def test_tiny_qa_model_through_trainer_predict_and_score(dev, tokenizer, tmp_path):
    task = get_task("squad")
    assert task.num_labels == 2 and task.kind == "question-answering"
    raw = dev.select(range(6))
    features = task.encode_eval(raw, tokenizer, 64)
    pred, model = predict_with_tiny_model(
        BertForQuestionAnswering, task, features, tokenizer, str(tmp_path), 4
    )
    scores = task.score(task.eval_sets()[0], pred.predictions, pred.label_ids, features, raw)
    assert set(scores) == {"exact_match", "f1"}
    assert 0.0 <= scores["exact_match"] <= scores["f1"] <= 100.0
    # distillation compares start and end logits
    batch = task.collator(tokenizer)([{k: features[0][k] for k in ("input_ids", "attention_mask")}])
    out = model(**batch)
    assert len(task.distillation_logits(out, batch)) == 2
