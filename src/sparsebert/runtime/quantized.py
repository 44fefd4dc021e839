"""Sparse INT8 modules: `SparseLinearInt8` and `SparseFFNInt8`, the INT8 twins of
`SparseLinear` and `SparseFFN` (`sparsify_for_inference(model, dtype="int8")` swaps them in).

Quantisation: weights symmetric int8 per output row (``W[r] ~= scale[r] q[r]``, fixed at
conversion); activations symmetric int8 per token, dynamically (``x[t] ~= s[t] q[t]``, ``s[t]
= max|x[t]| / 127``, computed by the kernel for each token tile); products summed in int32,
exactly; the output dequantised as ``sum * scale[r] * s[t] + b[r]`` in the kernel's epilogue,
with the fused GELU (`gelu_q`: within 5e-5 of the exact GELU) / add & norm where the fp32
modules fuse them. Inside the fused feed-forward block the GELU outputs are quantised per
token again for the second matrix.
Everything else of the model (attention, layer norms, embeddings) stays float32.

Kernels: native (`native.spmm_int8`, `native.ffn_int8`: AVX512-VNNI, AVX-512 or AVX2 by the
CPU, see kernels_avx512.c); without native kernels, an exact but slow torch reference
(`int8_reference`), so results never depend on the machine beyond float rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsebert.runtime import kernels, native
from sparsebert.runtime.sparse_format import (
    Int8RowGroups,
    int8_row_groups_to_dense,
    to_int8_row_groups,
)
from sparsebert.runtime.sparse_linear import (
    ACTIVATIONS,
    LinearConversion,
    add_norm_operands,
    as_matrix,
    check_ffn_shapes,
    check_inference,
)


def quantize_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8 of a (tokens, features) float32 array, as the kernels do it:
    (q as float64, scale float32 = max|x| / 127)."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    inv = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.clip(np.rint(x * inv[:, None]), -127, 127)
    return q.astype(np.float64), (amax * np.float32(1.0 / 127.0)).astype(np.float32)


GELU_Q_COEFS = np.array([-2.750082308e-02, 1.330496986e-01, -2.463748948e-01, 1.470374063e-01,
                         2.009967425e-01, -4.339797495e-01, 2.110028976e-01, 1.750285817e-01,
                         -1.839377807e-01, -2.111288274e-02, 4.582455031e-02], np.float32)  # fmt: skip
"""The INT8 kernels' GELU: ``max(x, 0) + h(|x|)``, ``h(u) = -u Phi(-u)`` as this polynomial
(t^0 first) in ``t = u / 2.25 - 1`` over ``u <= 4.5``; within 5e-5 of the exact GELU, which
the 8-bit quantisation of its outputs cannot tell apart (a step is max|x| / 127)."""


def gelu_q(x: np.ndarray) -> np.ndarray:
    """The INT8 kernels' GELU (`GELU_Q_COEFS`), in float32 like the kernels."""
    x = np.asarray(x, np.float32)
    u = np.minimum(np.abs(x), np.float32(4.5))
    t = u * np.float32(1.0 / 2.25) - np.float32(1.0)
    p = np.full_like(x, GELU_Q_COEFS[-1])
    for c in GELU_Q_COEFS[-2::-1]:
        p = p * t + c
    return np.maximum(x, np.float32(0.0)) + p


def int8_reference(
    x: np.ndarray, m: Int8RowGroups, bias: np.ndarray, act: int = kernels.ACT_NONE
) -> np.ndarray:
    """``act(x @ W.T + b)`` the way the INT8 kernels compute it (exact integer sums in
    float64): the fallback without native kernels, and the tests' reference."""
    q, s = quantize_tokens(x)
    w = int8_row_groups_to_dense(m, dequantize=False).astype(np.float64)
    y = ((q @ w.T) * s[:, None].astype(np.float64) * m.scale[None, :].astype(np.float64)).astype(np.float32)
    y += bias[None, :]
    if act == kernels.ACT_GELU:
        y = gelu_q(y)
    return np.ascontiguousarray(y, dtype=np.float32)


class SparseLinearInt8(LinearConversion, nn.Module):
    """``y = act(x @ W.T + b)`` with ``W`` sparse int8 per output row and ``x`` quantised per
    token (see the module docstring); inference only, (..., in) -> (..., out)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        activation: str | None = None,
        panel: int | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported fused activation {activation!r}: use one of {list(ACTIVATIONS)}")
        w = weight.detach().to("cpu", torch.float32).numpy()
        self.groups: Int8RowGroups = to_int8_row_groups(w, panel=panel)
        self.out_features, self.in_features = w.shape
        self.nnz = int(np.count_nonzero(w))  # before int8 rounding drops any
        self.has_bias = bias is not None
        self.bias_natural = (
            np.zeros(self.out_features, np.float32) if bias is None
            else np.ascontiguousarray(bias.detach().to("cpu", torch.float32).numpy())
        )  # fmt: skip
        self.activation = activation


    def to_linear(self) -> nn.Linear:
        """The equivalent dense `nn.Linear` with the dequantised weight (activations then stay
        float32: not the same outputs)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(int8_row_groups_to_dense(self.groups)))
            if self.has_bias:
                linear.bias.copy_(torch.from_numpy(self.bias_natural))
        return linear

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.has_bias}, density={self.density:.3f}, int8{act}")  # fmt: skip

    def _run(
        self, x2: torch.Tensor, act: int, out: torch.Tensor, add_norm: native.AddNorm | None = None
    ) -> None:
        if x2.shape[0] == 0:
            return
        if native.library() is not None:
            native.spmm_int8(x2, self.groups, self.bias_natural, act, out, torch.get_num_threads(), add_norm)
            return
        y = torch.from_numpy(int8_reference(x2.numpy(), self.groups, self.bias_natural, act))
        if add_norm is not None:
            residual, gamma, beta, eps = add_norm
            y = torch.nn.functional.layer_norm(y + residual, (y.shape[1],), gamma, beta, eps)
        out.copy_(y)

    def forward_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm
    ) -> torch.Tensor | None:
        """``norm(self(x) + residual)`` in one pass, or None where that cannot run (see
        `sparse_linear.add_norm_operands`; also a fused activation)."""
        if self.activation is not None:
            return None
        operands = add_norm_operands(x, residual, norm, self.out_features)
        if operands is None:
            return None
        x2 = as_matrix(x, self.in_features, "SparseLinearInt8")
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        self._run(x2, kernels.ACT_NONE, out, operands)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, "SparseLinearInt8")
        x2 = as_matrix(x, self.in_features, "SparseLinearInt8")
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        self._run(x2, ACTIVATIONS[self.activation], out)
        return out.reshape(*x.shape[:-1], self.out_features)


class SparseFFNInt8(nn.Module):
    """``W2 gelu(W1 x + b1) + b2`` (exact GELU) in sparse INT8, fused per token tile: the
    GELU outputs of a tile are quantised per token for ``W2`` inside the kernel."""

    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        check_ffn_shapes(first, second)
        self.first = SparseLinearInt8.from_linear(first, activation="gelu")
        self.second = SparseLinearInt8.from_linear(second)
        self.in_features = first.in_features
        self.hidden_features = first.out_features
        self.out_features = second.out_features

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.hidden_features} (gelu) -> {self.out_features}, "
                f"density {self.first.density:.3f} / {self.second.density:.3f}, int8")  # fmt: skip

    def _run(self, x2: torch.Tensor, out: torch.Tensor, add_norm: native.AddNorm | None = None) -> None:
        if x2.shape[0] == 0:
            return
        if native.library() is not None:
            a, b = self.first, self.second
            native.ffn_int8(
                x2, a.groups, a.bias_natural, b.groups, b.bias_natural, out, torch.get_num_threads(), add_norm
            )
            return
        hidden = torch.empty((x2.shape[0], self.hidden_features), dtype=torch.float32)
        self.first._run(x2, kernels.ACT_GELU, hidden)
        self.second._run(hidden, kernels.ACT_NONE, out, add_norm)

    def forward_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm
    ) -> torch.Tensor | None:
        """``norm(self(x) + residual)``, the whole feed-forward sublayer, in one pass per
        token tile; None where that cannot run."""
        operands = add_norm_operands(x, residual, norm, self.out_features)
        if operands is None:
            return None
        x2 = as_matrix(x, self.in_features, "SparseFFNInt8")
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        self._run(x2, out, operands)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, "SparseFFNInt8")
        x2 = as_matrix(x, self.in_features, "SparseFFNInt8")
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        self._run(x2, out)
        return out.reshape(*x.shape[:-1], self.out_features)
