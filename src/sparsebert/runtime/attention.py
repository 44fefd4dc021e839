"""A faster CPU attention for encoders, plugged in through transformers' attention interface.

Why: at 90% sparsity the sparse linears of a MiniLM layer cost about as much as its
attention, which is dense work sparsity cannot touch; torch's CPU flash attention is tuned
for long sequences, while an encoder's heads are short (128 x 128 scores fit in cache).
`kernels_avx2.c` computes the whole score block per head with register-blocked FMAs.

How it plugs in: ``AttentionInterface.register`` (transformers' supported extension point)
under `NAME`, with the sdpa mask format, and ``model.config._attn_implementation = NAME``:
no module of the model is replaced, and every call the native kernel cannot serve (autograd,
dropout, causal or grouped heads, a head width not a multiple of 8, per-head masks, no
native library) goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsebert.runtime import native

NAME = "sparsebert_cpu"
"""The attention implementation name under which the native kernel is registered."""

_registered = False


def _bias(mask: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
    """The mask as an additive float32 (B|1, S|1, S_k) bias; (False, None) if unsupported."""
    if mask is None:
        return True, None
    if mask.dim() != 4 or mask.shape[1] != 1:
        return False, None
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    elif mask.dtype.is_floating_point:
        bias = mask.to(torch.float32)
    else:
        return False, None
    bias = bias[:, 0]
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    return True, bias


def cpu_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, S, D) inputs -> ((B, S, H, D) output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    d = query.shape[-1]
    usable = (
        native.library() is not None
        and dropout == 0.0
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
        and not kwargs.get("is_causal", getattr(module, "is_causal", False))
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1
                for t in (query, key, value))
        and key.shape[1] == query.shape[1] and value.shape == key.shape
        and d % 8 == 0 and d <= 256 and key.shape[2] > 0
    )  # fmt: skip
    if usable:
        ok, bias = _bias(attention_mask)
        if ok:
            scale = scaling if scaling is not None else d**-0.5
            return native.attention(query, key, value, bias, scale, torch.get_num_threads()), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)  # fmt: skip


def register() -> None:
    """Register `cpu_attention` (and the sdpa mask format) under `NAME`, once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, cpu_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def supports_attention_interface(model: nn.Module) -> bool:
    """Whether a transformers model calls its attention through the attention interface (its
    class says ``_supports_attention_backend``: BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
    DistilBERT, ModernBERT); DeBERTa's disentangled attention, for one, does not."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and hasattr(config, "_attn_implementation")
        and bool(getattr(model, "_supports_attention_backend", False))
    )


def use_native_attention(model: nn.Module) -> bool:
    """Switch a transformers model to `cpu_attention`; False if it does not call attention
    through the attention interface or the native kernels are unavailable (the model is
    then left unchanged)."""
    if not supports_attention_interface(model) or native.library() is None:
        return False
    register()
    model.config._attn_implementation = NAME
    return True
