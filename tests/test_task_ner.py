"""Biomedical NER tasks: the shared CoNLL files, first-sub-token label alignment, and the
seqeval entity-level metric on word-level sequences."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_models import predict_with_tiny_model
from transformers import BertForTokenClassification

from sparsebert.errors import SparseBertError
from sparsebert.tasks import get_task
from sparsebert.tasks.base import EvalSet
from sparsebert.tasks.ner import align_labels, ner_metrics, read_conll

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")



@pytest.mark.parametrize(
    "task,counts",
    [
        ("bc5cdr_chem", (4560, 4581, 4797)),
        ("bc5cdr_disease", (4560, 4581, 4797)),
        ("bc5cdr", (4560, 4581, 4797)),
        ("ncbi_disease", (5424, 923, 940)),
        ("bc2gm", (12574, 2519, 5038)),  # bare B/I tags
    ],
)
def test_shared_files_have_the_documented_sentence_counts(task, counts):
    t = get_task(task)
    got = tuple(len(t.load_split(s, SHARED)) for s in ("train", "validation", "test"))
    assert got == counts
    ds = t.load_split("validation", SHARED, max_samples=50)
    assert all(len(w) == len(y) > 0 for w, y in zip(ds["tokens"], ds["ner_tags"], strict=True))


def test_tag_sets_are_fixed_with_o_first():
    assert get_task("bc5cdr_chem").labels == ("O", "B-Chemical", "I-Chemical")
    assert get_task("bc5cdr").labels == ("O", "B-Chemical", "B-Disease", "I-Chemical", "I-Disease")
    assert get_task("bc2gm").labels == ("O", "B", "I")
    assert get_task("ncbi-disease").kind == "token-classification"


def test_first_sub_token_alignment_on_a_hand_made_sentence(tokenizer):
    task = get_task("bc5cdr")
    words = ["Naloxone", "reverses", "clonidine-induced", "hypotension", "."]
    tags = [task.labels.index(t) for t in ("B-Chemical", "O", "B-Chemical", "B-Disease", "O")]
    import datasets

    ds = datasets.Dataset.from_dict({"tokens": [words], "ner_tags": [tags]})
    feat = task.encode_eval(ds, tokenizer, 64)[0]
    # expected, independently of word_ids(): each word's pieces, tag on the first one only
    expected = [-100]
    for word, tag in zip(words, tags, strict=True):
        pieces = tokenizer.tokenize(word)
        assert pieces, word
        expected += [tag] + [-100] * (len(pieces) - 1)
    expected.append(-100)
    assert feat["labels"] == expected
    assert len(feat["input_ids"]) == len(expected) == feat["length"]
    assert feat["word_index"] == [0, 1, 2, 3, 4]
    assert sum(len(tokenizer.tokenize(w)) > 1 for w in words) >= 2  # the test really exercises sub-tokens
    # the training encoding is the same minus the word map
    train = task.encode(ds, tokenizer, 64)[0]
    assert train["labels"] == expected and "word_index" not in train


def test_align_labels_direct():
    labels, words = align_labels([None, 0, 0, 1, 2, 2, 2, None], [1, 0, 2])
    assert labels == [-100, 1, -100, 0, 2, -100, -100, -100]
    assert words == [0, 1, 2]


def test_seqeval_entity_f1_on_a_hand_made_prediction():
    gold = [["B-Disease", "I-Disease", "O", "B-Disease", "O"], ["O", "B-Disease", "O"]]
    pred = [["B-Disease", "I-Disease", "O", "O", "B-Disease"], ["O", "O", "O"]]
    # gold entities: (0,0-1), (0,3), (1,1) = 3; predicted: (0,0-1), (0,4) = 2; correct: 1
    p, r = 1 / 2, 1 / 3
    m = ner_metrics(gold, pred)
    assert m["precision"] == pytest.approx(p)
    assert m["recall"] == pytest.approx(r)
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))  # 0.4
    assert m["accuracy"] == pytest.approx(5 / 8)  # words 3, 4 and (1, 1) wrong


def test_bare_bio_tags_are_scored_as_entities():
    m = ner_metrics([["B", "I", "O", "B"]], [["B", "I", "O", "O"]])
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5)


def test_score_uses_first_sub_tokens_and_counts_truncated_words_as_missed(tokenizer):
    import datasets

    task = get_task("ncbi_disease")
    b, i, o = (task.labels.index(t) for t in ("B-Disease", "I-Disease", "O"))
    words = ["Familial", "polyposis", "is", "rare", "and", "ataxia", "too"]  # 4, 3, 1, 1, 1, 2, 1 pieces
    tags = [b, i, o, o, o, b, o]
    examples = datasets.Dataset.from_dict({"tokens": [words], "ner_tags": [tags]})
    features = task.encode_eval(examples, tokenizer, 12)  # [CLS] + 10 pieces + [SEP]: 'ataxia' is lost
    labels = np.array(features["labels"])
    assert features[0]["word_index"] == [0, 1, 2, 3, 4]
    # a perfect model on what it sees: one-hot logits equal to the labels at labelled positions,
    # junk ('I-Disease') on the other sub-tokens, which must be ignored
    logits = np.zeros((*labels.shape, 3), dtype=np.float32)
    logits[..., i] = 1.0
    keep = labels != -100
    logits[keep] = 0.0
    logits[keep, labels[keep]] = 5.0
    m = task.score(EvalSet("validation", "validation"), logits, labels, features, examples)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5)  # 'ataxia' missed
    # without the raw examples, only what the window holds is scored
    m2 = task.score(EvalSet("validation", "validation"), logits, labels)
    assert m2["f1"] == 1.0


def test_conll_quirks_and_clear_errors(tmp_path):
    labels = get_task("ncbi_disease").labels
    good = tmp_path / "train.tsv"
    good.write_text("-DOCSTART-\tO\n\nA\tO\r\nB\tB-Disease\n\n\n\nC D\tI-Disease\nE\tO")  # no final newline
    cols = read_conll(str(good), labels)
    assert cols["tokens"] == [["A", "B"], ["C D", "E"]]  # tab-separated: a token may hold a space
    assert cols["ner_tags"][0] == [0, 1]
    bad = tmp_path / "bad.tsv"
    bad.write_text("A\tO\nB\tB-Chemical\n")
    with pytest.raises(SparseBertError, match=r"bad\.tsv, line 2: tag 'B-Chemical'"):
        read_conll(str(bad), labels)
    short = tmp_path / "short.tsv"
    short.write_text("A\tO\nlonely\n")
    with pytest.raises(SparseBertError, match=r"short\.tsv, line 2: expected 'token<TAB>tag'"):
        read_conll(str(short), labels)


def test_missing_split_and_folder_are_clear_errors(tmp_path):
    (tmp_path / "ncbi_disease").mkdir()
    (tmp_path / "ncbi_disease" / "train.tsv").write_text("A\tO\n")
    with pytest.raises(SparseBertError, match="no 'validation' split .*devel.tsv"):
        get_task("ncbi_disease").load_split("validation", str(tmp_path))
    with pytest.raises(SparseBertError, match="no bc2gm data"):
        get_task("bc2gm").load_split("train", str(tmp_path))


def test_tiny_model_forward_and_trainer_predict_on_real_features(tokenizer, tmp_path):
    task = get_task("bc5cdr_chem")
    raw = task.load_eval_set(task.eval_sets()[0], SHARED, max_samples=12)
    features = task.encode_eval(raw, tokenizer, 32)
    pred, model = predict_with_tiny_model(
        BertForTokenClassification, task, features, tokenizer, str(tmp_path), 5
    )
    m = task.score(task.eval_sets()[0], pred.predictions, pred.label_ids, features, raw)
    assert set(m) == {"precision", "recall", "f1", "accuracy"}
    assert 0.0 <= m["f1"] <= 1.0


def test_hub_copies_are_mapped_onto_the_fixed_tag_set(monkeypatch):
    import datasets

    import sparsebert.tasks.ner as ner

    features = datasets.Features({
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-GENE", "I-GENE"])),
    })
    gm = datasets.Dataset.from_dict({"tokens": [["BRCA1", "gene", "x"]], "ner_tags": [[1, 2, 0]]},
                                    features=features)
    # tner/bc5cdr: plain integer 'tags' named by its label2id: O, B-Chem, B-Dis, I-Dis, I-Chem
    cdr = datasets.Dataset.from_dict({"tokens": [["a", "b", "c", "d"]], "tags": [[1, 4, 2, 3]]})
    monkeypatch.setattr(ner, "load_hub", lambda name, hub, split, config=None: gm if "bc2gm" in hub else cdr)
    assert get_task("bc2gm").load_split("train", None)[0]["ner_tags"] == [1, 2, 0]  # B, I, O
    chem = get_task("bc5cdr_chem")
    assert [chem.labels[t] for t in chem.load_split("train", None)[0]["ner_tags"]] == [
        "B-Chemical", "I-Chemical", "O", "O"]
    both = get_task("bc5cdr")
    assert [both.labels[t] for t in both.load_split("train", None)[0]["ner_tags"]] == [
        "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]
