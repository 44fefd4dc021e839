"""`FusedAddNorm`: a transformer block's "add & norm" in one native pass.

Why: at 90% sparsity every remaining dense op counts; BERT's output blocks compute
``LayerNorm(dense(h) + residual)`` as two torch ops (an add that writes a tensor, a layer
norm that reads it back), ~0.5 ms per block at batch 16 x 128 on 2 cores, 12 blocks per
MiniLM. The native kernel adds, normalises and scales each row while it is in cache; when
``dense`` is a `SparseLinear` (the attention output) or a `SparseFFN` (the whole
feed-forward block, which `sparsify_for_inference` places here), or their INT8 twins, the
sparse kernel does it
for each token tile it has just computed, so its output never makes a trip through memory.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from sparsebert.runtime import native
from sparsebert.runtime.fused import SparseFFN
from sparsebert.runtime.quantized import SparseFFNInt8, SparseLinearInt8
from sparsebert.runtime.sparse_linear import SparseLinear


class FusedAddNorm(nn.Module):
    """Stands in for a BERT-style output block (``dense``, ``dropout``, ``LayerNorm``, called
    as ``block(hidden_states, input_tensor)``); inference only, exact to rounding."""

    def __init__(self, dense: nn.Module, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.dense = dense
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        ln = self.LayerNorm
        if isinstance(self.dense, SparseLinear | SparseFFN | SparseLinearInt8 | SparseFFNInt8):  # one pass
            fused = self.dense.forward_add_norm(hidden_states, input_tensor, ln)
            if fused is not None:
                return fused
        h = self.dense(hidden_states)
        if (
            native.library() is not None
            and not (torch.is_grad_enabled() and (h.requires_grad or input_tensor.requires_grad))
            and h.shape == input_tensor.shape
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (h, input_tensor))
        ):
            return native.add_layernorm(h, input_tensor, ln.weight, ln.bias, ln.eps, torch.get_num_threads())
        return ln(h + input_tensor)


def is_output_block(module: nn.Module) -> bool:
    """A BERT-style output block: dense + dropout + affine LayerNorm over one dimension,
    whose forward takes (hidden_states, input_tensor)."""
    ln = getattr(module, "LayerNorm", None)
    if not (isinstance(ln, nn.LayerNorm) and hasattr(module, "dense") and hasattr(module, "dropout")):
        return False
    if ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1:
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[:2] == ["hidden_states", "input_tensor"]
