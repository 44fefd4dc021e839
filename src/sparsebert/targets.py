"""Which parameters may be pruned.

A *target spec* is a preset name or a regular expression over parameter names; a list of
specs selects the union. The default, ``encoder-linears``, is the pruned set of every paper
sparsebert implements: Q, K, V, attention-output and both FFN matrices of every layer.

Presets, per architecture (with or without the task model's prefix: ``bert.``, ``model.``):

- ``encoder-linears``: every linear of the layer stack (``encoder.layer.N`` for BERT,
  RoBERTa, XLM-RoBERTa, ELECTRA and DeBERTa; ``transformer.layer.N`` for DistilBERT;
  ``layers.N`` for ModernBERT, whose Q/K/V is one fused ``attn.Wqkv`` and whose ``mlp.Wi``
  is a GLU giving twice the intermediate size), except DeBERTa's ``pos_key_proj`` /
  ``pos_query_proj``, which project the relative position embeddings, not the tokens:
  4 linears per layer for ModernBERT, 6 for all the others;
- ``embeddings``: token and absolute position embeddings (``word_embeddings``,
  ``position_embeddings``; ModernBERT's ``tok_embeddings``, it has rotary positions);
  never token types nor DeBERTa's relative ``rel_embeddings``;
- ``pooler``: the pooler's linear, where there is one (BERT, DeBERTa);
- ``classifier``: the linears of the task head that are not the pooler
  (`sparsebert.heads.is_task_head`): ``classifier`` (BERT, DeBERTa), ``classifier.dense`` /
  ``classifier.out_proj`` (RoBERTa, XLM-RoBERTa, ELECTRA), ``pre_classifier`` +
  ``classifier`` (DistilBERT), ``head.dense`` + ``classifier`` (ModernBERT); for a masked
  LM the head's transform (``cls.predictions.transform.dense``, ``lm_head.dense`` ...), never
  the vocabulary decoder (tied to the word embeddings);
- ``all-2d``: every 2-D parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.heads import POOLER, is_mlm_head, is_task_head

_LAYER_STACK = re.compile(r"(^|\.)((encoder|transformer)\.(layer|layers)|layers)\.\d+\.")
_NOT_ENCODER_LINEARS = ("pos_key_proj", "pos_query_proj")
"""Linears inside a layer that are not among the six pruned matrices (DeBERTa's projections
of its relative position embeddings, used when ``share_att_key`` is off)."""
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "tok_embeddings")


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _encoder_linears(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, _ in _linears(model)
        if _LAYER_STACK.search(name + ".") and name.rsplit(".", 1)[-1] not in _NOT_ENCODER_LINEARS
    ]


def _embeddings(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _EMBEDDINGS
    ]


def _pooler(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, _ in _linears(model) if POOLER.search(name + ".")]


def _head(model: nn.Module) -> list[str]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return [
        f"{name}.weight"
        for name, m in _linears(model)
        if not _LAYER_STACK.search(name + ".")
        and (is_task_head(name, with_pooler=False) or (is_mlm_head(name) and m.out_features != vocab))
    ]


def _all_2d(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.dim() == 2]


PRESETS = {
    "encoder-linears": _encoder_linears,
    "embeddings": _embeddings,
    "pooler": _pooler,
    "classifier": _head,
    "all-2d": _all_2d,
}


def select_targets(
    model: nn.Module, specs: str | Iterable[str] = "encoder-linears"
) -> dict[str, nn.Parameter]:
    """Return ``{parameter name: parameter}`` for the union of ``specs``, in model order.

    Raises `SparseBertError` for a spec that is neither a preset nor a regex matching
    at least one 2-D parameter, listing the presets and a few real parameter names.
    """
    if isinstance(specs, str):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise SparseBertError("no pruning targets given: use e.g. 'encoder-linears'")
    params = dict(model.named_parameters())
    chosen: set[str] = set()
    for spec in specs:
        if spec in PRESETS:
            found = PRESETS[spec](model)
        else:
            try:
                pattern = re.compile(spec)
            except re.error as err:
                raise SparseBertError(
                    f"target '{spec}' is not a preset ({', '.join(PRESETS)}) "
                    f"and not a valid regular expression: {err}"
                ) from None
            found = [n for n, p in params.items() if p.dim() >= 2 and pattern.search(n)]
        if not found:
            examples = ", ".join([n for n, p in params.items() if p.dim() == 2][:4])
            raise SparseBertError(
                f"target '{spec}' matches no prunable (2-D) parameter of "
                f"{type(model).__name__}. Presets: {', '.join(PRESETS)}; or a regex over "
                f"parameter names such as: {examples}"
            )
        chosen.update(found)
    return {n: p for n, p in params.items() if n in chosen}
