"""Masked-LM tasks: corpora and held-out split, packing, training vs fixed evaluation masking,
and masked-token accuracy / perplexity from small per-sequence sums."""

from __future__ import annotations

import gzip
import json
import math
import os

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from sparsebert.errors import SparseBertError
from sparsebert.tasks import get_task
from sparsebert.tasks.mlm import MlmCollator, is_heldout, masked_lm_sums, pack, read_source, text_mlm_task

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")



@pytest.fixture(scope="module")
def general():
    task = get_task("mlm-general")
    return task.load_split("train", SHARED), task.load_split("validation", SHARED)


def _special(tokenizer) -> torch.Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids)))


# -- corpora and held-out split -----------------------------------------------------------------
def test_general_corpus_holds_brown_and_squad_train_but_no_dev_text(general):
    train, val = general
    assert len(train) + len(val) == 57340 + 18896  # Brown sentences + SQuAD train paragraphs
    assert 0.015 < len(val) / (len(train) + len(val)) < 0.025  # ~1 in 50
    train_set, val_set = set(train["text"]), set(val["text"])
    assert not train_set & val_set
    assert all(is_heldout(t) for t in val["text"]) and not any(is_heldout(t) for t in train["text"][:2000])
    assert train[0]["text"].startswith("The Fulton County Grand Jury said Friday")  # file order, Brown first
    with open(os.path.join(SHARED, "squad_v1.1", "squad_v1.1_dev_from_explorer_html.json")) as f:
        dev_contexts = {p["context"].strip() for a in json.load(f)["data"] for p in a["paragraphs"]}
    assert not (train_set | val_set) & dev_contexts


def test_squad_dev_articles_are_excluded_by_title_and_text(tmp_path):
    def squad(path, articles):
        with gzip.open(path, "wt") as f:
            json.dump({"data": [{"title": t, "paragraphs": [{"context": c, "qas": []} for c in cs]}
                                for t, cs in articles]}, f)

    (tmp_path / "squad_v1.1").mkdir()
    (tmp_path / "general_english_nltk").mkdir()
    with gzip.open(tmp_path / "general_english_nltk" / "brown_untagged_sentences.txt.gz", "wt") as f:
        f.write("A Brown sentence .\n\nAnother one .\n")
    squad(tmp_path / "squad_v1.1" / "squad_v1.1_train_from_explorer_html.json.gz",
          [("Kept", ["kept paragraph"]), ("Dev_title", ["same title as dev"]), ("Other", ["dev paragraph"])])
    with open(tmp_path / "squad_v1.1" / "squad_v1.1_dev_from_explorer_html.json", "w") as f:
        dev = [{"title": "Dev_title", "paragraphs": [{"context": "dev paragraph", "qas": []}]}]
        json.dump({"data": dev}, f)
    task = get_task("mlm-general")
    lines = [t for source in task.sources for t in read_source(source, str(tmp_path))]
    assert lines == ["A Brown sentence .", "Another one .", "kept paragraph"]


def test_pubmed_corpus_is_the_derived_tsv_text_column():
    task = get_task("mlm-pubmed")
    train, val = task.load_split("train", SHARED), task.load_split("validation", SHARED)
    assert len(train) + len(val) == 12336
    assert not set(train["text"]) & set(val["text"])
    assert train[0]["text"].startswith("Ghrelin was identified")


def test_generic_text_task_reads_a_file_or_folder(tmp_path):
    lines = [f"line number {i} of the corpus" for i in range(400)]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n\n")
    task = text_mlm_task("mlm-test-file", str(tmp_path / "c.txt"), register=False)
    train, val = task.load_split("train", None), task.load_split("validation", None)
    assert sorted(train["text"][:] + val["text"][:]) == sorted(lines) and len(val) > 0
    generic = get_task("mlm-text")  # --data-dir is the file or folder itself
    assert len(generic.load_split("train", str(tmp_path))) == len(train)
    (tmp_path / "t.tsv").write_text("id\tbody\n1\tx\n")
    with pytest.raises(SparseBertError, match=r"t\.tsv' has no 'text' column"):
        generic.load_split("train", str(tmp_path))
    with pytest.raises(SparseBertError, match="pass --data-dir"):
        get_task("mlm-pubmed").load_split("train", None)
    with pytest.raises(SparseBertError, match="not found under"):
        get_task("mlm-pubmed").load_split("train", str(tmp_path))


# -- packing --------------------------------------------------------------------------------------
def test_packing_makes_full_blocks_of_the_stream(tokenizer):
    lines = [f"sentence {i} says something about packing blocks" for i in range(60)]
    ds = datasets.Dataset.from_dict({"text": lines})
    blocks = pack(ds, tokenizer, 32)
    assert len(blocks) > 5
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    stream = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        stream += ids + [sep]
    for i, b in enumerate(blocks):
        assert len(b["input_ids"]) == 32 == b["length"] == len(b["attention_mask"])
        assert b["input_ids"][0] == cls and b["input_ids"][-1] == sep
        assert b["input_ids"][1:-1] == stream[i * 30 : (i + 1) * 30]  # contiguous, nothing skipped
    assert len(blocks) == len(stream) // 30  # the short remainder is dropped
    tiny = pack(datasets.Dataset.from_dict({"text": ["just a few words"]}), tokenizer, 32)
    assert len(tiny) == 1 and len(tiny[0]["input_ids"]) < 32  # a lone short block is kept


def test_packed_train_blocks_hold_no_validation_text(general, tokenizer):
    train, val = general
    task = get_task("mlm-general")
    train_blocks = task.encode(train.select(range(3000)), tokenizer, 64)
    joined = " ".join(tokenizer.decode(b) for b in train_blocks["input_ids"])
    long_val = [t for t in val["text"] if len(t.split()) > 12][:50]
    for t in long_val:
        assert tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"]) not in joined


# -- masking ----------------------------------------------------------------------------------------
def test_training_collator_masks_15_percent_with_the_80_10_10_rule(general, tokenizer):
    task = get_task("mlm-general")
    blocks = task.encode(general[0].select(range(2000)), tokenizer, 128).select(range(160))
    features = [{"input_ids": b} for b in blocks["input_ids"]]
    collator = task.collator(tokenizer)
    assert isinstance(collator, MlmCollator)
    torch.manual_seed(0)
    batch = collator(features)
    original = torch.tensor(blocks["input_ids"])
    labels, inputs = batch["labels"], batch["input_ids"]
    chosen = labels != -100
    special = torch.isin(original, _special(tokenizer))
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], original[chosen])
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.01  # ~17.5k candidates
    n = chosen.sum().item()
    masked = (inputs == tokenizer.mask_token_id) & chosen
    kept = (inputs == original) & chosen
    randomised = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1) < 0.025
    assert abs(randomised.sum().item() / n - 0.1) < 0.025
    assert torch.equal(inputs[~chosen], original[~chosen])


def test_eval_masking_is_fixed_and_the_collator_does_not_remask(general, tokenizer):
    task = get_task("mlm-general")
    raw = general[1].select(range(300))
    a = task.encode_eval(raw, tokenizer, 64)
    b = task.encode_eval(raw, tokenizer, 64)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    plain = task.encode(raw, tokenizer, 64)
    original, masked, labels = (np.array(x) for x in (plain["input_ids"], a["input_ids"], a["labels"]))
    chosen = labels != -100
    assert np.array_equal(labels[chosen], original[chosen])
    assert np.array_equal(masked[~chosen], original[~chosen])
    assert 0.12 < chosen.sum() / (~np.isin(original, _special(tokenizer).numpy())).sum() < 0.18
    assert (masked[chosen] == tokenizer.mask_token_id).mean() > 0.7
    # another seed masks other tokens
    from dataclasses import replace

    other = replace(task, eval_seed=task.eval_seed + 1).encode_eval(raw, tokenizer, 64)
    assert other["labels"] != a["labels"]
    # batches of pre-masked features are padded, never re-masked (whatever the torch RNG does)
    collator = task.collator(tokenizer)
    feats = [{k: a[i][k] for k in ("input_ids", "labels", "attention_mask", "length")} for i in range(4)]
    feats[-1] = {k: v[:20] if isinstance(v, list) else 20 for k, v in feats[-1].items()}
    for seed in (0, 1):
        torch.manual_seed(seed)
        batch = collator(feats)
        assert torch.equal(batch["input_ids"][0], torch.tensor(a["input_ids"][0]))
        assert torch.equal(batch["labels"][1], torch.tensor(a["labels"][1]))
        assert batch["labels"][3, 20:].eq(-100).all() and batch["attention_mask"][3, 20:].eq(0).all()
    with pytest.raises(SparseBertError, match="mixes"):
        collator([feats[0], {"input_ids": feats[1]["input_ids"]}])


# -- metrics -------------------------------------------------------------------------------------------
def test_accuracy_and_perplexity_match_the_models_own_loss(general, tokenizer, tmp_path):
    task = get_task("mlm-general")
    features = task.encode_eval(general[1].select(range(200)), tokenizer, 32).select(range(10))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForMaskedLM(config).eval()
    batch = task.collator(tokenizer)([features[i] for i in range(len(features))])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "length"})
    sums = task.preprocess_logits(out.logits, batch["labels"])
    assert sums.shape == (10, 3)  # small: no vocabulary-size tensor leaves the batch
    m = task.score(task.eval_sets()[0], sums.numpy(), batch["labels"].numpy())
    assert m["cross_entropy"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-5)
    keep = batch["labels"] != -100
    acc = (out.logits.argmax(-1)[keep] == batch["labels"][keep]).float().mean().item()
    assert m["accuracy"] == pytest.approx(acc)
    # raw logits (no preprocess_logits) give the same numbers
    m2 = task.score(task.eval_sets()[0], out.logits.numpy(), batch["labels"].numpy())
    assert m2["perplexity"] == pytest.approx(m["perplexity"], rel=1e-5)
    # distillation compares the masked positions only
    rows = task.distillation_logits(out, batch)[0]
    assert rows.shape == (keep.sum().item(), len(tokenizer))

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, data_collator=task.collator(tokenizer),
                      preprocess_logits_for_metrics=task.preprocess_logits)
    pred = trainer.predict(features)
    m3 = task.score(task.eval_sets()[0], pred.predictions, pred.label_ids, features)
    assert m3["perplexity"] == pytest.approx(m["perplexity"], rel=1e-4)
    assert m3["accuracy"] == pytest.approx(m["accuracy"])


def test_masked_lm_sums_per_sequence():
    probs = [[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]
    logits = torch.log(torch.tensor(probs))
    labels = torch.tensor([[0, -100], [1, -100]])
    sums = masked_lm_sums(logits, labels)
    assert sums[0].tolist() == pytest.approx([math.log(2), 1.0, 1.0])
    assert sums[1].tolist() == pytest.approx([math.log(5), 0.0, 1.0])
