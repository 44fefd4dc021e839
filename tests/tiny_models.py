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


def predict_with_tiny_model(model_class, task, features, tokenizer, out_dir: str, batch_size: int = 4):
    """``Trainer.predict`` of a tiny random model of ``model_class`` for ``task`` (one layer,
    the tokenizer's vocabulary) on encoded ``features``, and the model: checks that a task's
    features, collator and `preprocess_logits` go through the Trainer."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=task.num_labels)
    args = TrainingArguments(out_dir, per_device_eval_batch_size=batch_size, report_to=[], use_cpu=True)
    trainer = Trainer(model=model_class(config), args=args, data_collator=task.collator(tokenizer),
                      preprocess_logits_for_metrics=task.preprocess_logits)
    return trainer.predict(features), trainer.model


def save_tiny_classifier(path, seed: int = 0, **config) -> str:
    """A tiny random BertForSequenceClassification saved with the embedded model's tokenizer
    (vocabulary 30522 unless ``vocab_size`` says otherwise); ``config`` overrides the sizes."""
    from transformers import AutoTokenizer

    from sparsebert.models import embedded_model_dir

    sizes = {"vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 64, "num_labels": 2, **config}
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(**sizes)).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return str(path)
