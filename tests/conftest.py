"""Shared fixtures: a tiny random BERT (with the embedded model's tokenizer) and tiny GLUE files."""

from __future__ import annotations

import os
import random

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

from sparsebert.models import embedded_model_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

POS = ["good", "great", "lovely", "wonderful", "fine", "superb", "charming"]
NEG = ["bad", "awful", "boring", "terrible", "dull", "poor", "ugly"]


def tiny_config(num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
    )


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's (BERT uncased WordPiece) tokenizer."""
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT classifier saved with a real tokenizer."""
    path = str(tmp_path_factory.mktemp("tiny-bert"))
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return path


def _sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(POS if label else NEG, 3) + rng.sample(["the", "film", "was", "a", "plot"], 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory) -> str:
    """A GLUE-format SST-2 folder (sentence<TAB>label) with train and dev."""
    root = tmp_path_factory.mktemp("glue")
    folder = root / "SST-2"
    folder.mkdir()
    for split, n, seed in (("train", 96, 1), ("dev", 32, 2)):
        with open(folder / f"{split}.tsv", "w") as f:
            f.write("sentence\tlabel\n")
            for text, label in _sentences(n, seed):
                f.write(f"{text} \t{label}\n")
    return str(root)


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A tiny random BertForMaskedLM (an MLM head, so SMP classifies with label words)."""
    path = str(tmp_path_factory.mktemp("tiny-mlm"))
    torch.manual_seed(1)
    config = BertConfig.from_pretrained(tiny_model_dir)
    config.architectures = None
    BertForMaskedLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return path
