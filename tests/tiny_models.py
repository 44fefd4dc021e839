"""Tiny random BERT classifiers, magnitude-pruned on request: shared by the runtime, export
and attention tests (the conftest fixtures save models to disk; these stay in memory)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from sparsebert.allocation import masks_from_scores
from sparsebert.targets import select_targets


def tiny_bert(
    sparsity: float | None = None, seed: int = 0, hidden: int = 64, intermediate: int = 256,
    num_labels: int = 3,
) -> BertForSequenceClassification:
    """2 layers, 4 heads, vocabulary 100; encoder linears pruned to ``sparsity`` (global, exact)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=intermediate, max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    if sparsity is not None:
        targets = select_targets(model, "encoder-linears")
        masks = masks_from_scores({n: p.detach().abs() for n, p in targets.items()}, sparsity)
        with torch.no_grad():
            for name, p in targets.items():
                p.masked_fill_(~masks[name], 0.0)
    return model
