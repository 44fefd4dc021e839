"""`SparseLinear`: an inference-only drop-in for `nn.Linear` whose weight is mostly zeros."""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import nn

from sparsebert.runtime import kernels, native
from sparsebert.runtime.sparse_format import (
    GroupedSparse,
    RowPanels,
    default_panel,
    to_dense,
    to_grouped,
    to_row_panels,
)

ACTIVATIONS = {None: kernels.ACT_NONE, "gelu": kernels.ACT_GELU}
"""Activations the kernel can fuse into its output store (``gelu`` = exact, erf-based)."""


def sync_threads() -> int:
    """Make numba use as many threads as torch (capped by numba's pool); return that count.

    Numba's OpenMP layer binds to the libgomp torch loaded, so both share one thread pool
    and handing over between a torch op and a sparse kernel costs no spinning threads. But
    starting numba's pool resets OpenMP's thread count, which is torch's: put it back.
    """
    want = torch.get_num_threads()
    n = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return n


def tiles_for_every_thread(n_tokens: int, threads: int) -> bool:
    """Whether ``n_tokens`` make at least two 16-token tiles per thread: then the kernels
    split work by token tiles (the native kernels only ever do), else by output rows."""
    return -(-n_tokens // kernels.LANES) >= 2 * threads


def work_chunks(n_tokens: int, n_groups: int, threads: int) -> int:
    """Row chunks per token tile, so that small inputs (batch 1) still give every thread work."""
    if tiles_for_every_thread(n_tokens, threads):
        return 1
    n_tiles = -(-n_tokens // kernels.LANES)
    return max(1, min(n_groups, -(-2 * threads // n_tiles)))


def check_inference(x: torch.Tensor, what: str) -> None:
    """Refuse to run where autograd would need a gradient the sparse kernel cannot give."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"{what} is inference-only: run the model under torch.no_grad() or "
            "torch.inference_mode()"
        )


def as_matrix(x: torch.Tensor, n_in: int, what: str) -> torch.Tensor:
    """(..., n_in) -> (tokens, n_in) float32, C-contiguous, on the CPU."""
    if x.shape[-1] != n_in:
        raise ValueError(f"{what} expects {n_in} input features, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, n_in)
    if x2.dtype != torch.float32 or x2.device.type != "cpu" or not x2.is_contiguous():
        x2 = x2.to("cpu", torch.float32).contiguous()
    return x2


def run_spmm(x2: torch.Tensor, linear: SparseLinear, act: int, out: torch.Tensor) -> None:
    """``out = act(x2 @ W.T + b)`` on torch's thread count: the native kernel (AVX-512 or
    AVX2) when it is available and there are enough token tiles for every thread, else the
    numba kernel."""
    if x2.shape[0] == 0:
        return
    threads = sync_threads()
    sparse = linear.sparse
    chunks = work_chunks(x2.shape[0], sparse.n_groups, threads)
    if chunks == 1 and native.usable(linear.rows):
        native.spmm(x2, linear.rows, linear.bias_natural, act, out, torch.get_num_threads(),
                    native.lanes_for(x2.shape[0], threads))  # fmt: skip
        return
    with kernels.vector_codegen():
        kernels.spmm(
            x2.numpy(), sparse.ptr, sparse.indices, sparse.values, sparse.perm,
            linear.bias_sorted, act, chunks, threads, out.numpy(),
        )  # fmt: skip


def add_norm_operands(
    x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm, n_out: int
) -> native.AddNorm | None:
    """The operands of a native add & norm epilogue for output ``x``-shaped (..., n_out),
    or None where it cannot run: autograd recording, a residual of another shape, dtype or
    device, a LayerNorm over other dimensions or without affine float32 parameters, no
    tokens."""
    if (
        torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad)
        or residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != n_out
        or residual.dtype != torch.float32 or residual.device.type != "cpu"
        or residual.numel() == 0
        or tuple(norm.normalized_shape) != (n_out,)
        or norm.weight is None or norm.bias is None
        or norm.weight.dtype != torch.float32 or norm.bias.dtype != torch.float32
    ):  # fmt: skip
        return None
    return (residual.reshape(-1, n_out).contiguous(), norm.weight.detach().contiguous(),
            norm.bias.detach().contiguous(), float(norm.eps))  # fmt: skip


class LinearConversion:
    """What the sparse linear modules (fp32 `SparseLinear`, INT8 `SparseLinearInt8`) share:
    construction from an `nn.Linear` and their density; a subclass sets ``nnz``."""

    in_features: int
    out_features: int
    nnz: int

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None, panel: int | None = None):
        """Convert an `nn.Linear` (its zeros are the pruned weights)."""
        return cls(linear.weight, linear.bias, activation=activation, panel=panel)

    @property
    def density(self) -> float:
        """Fraction of non-zero weights (of the fp32 matrix the module was built from)."""
        return self.nnz / max(1, self.out_features * self.in_features)


def check_ffn_shapes(first: nn.Linear, second: nn.Linear) -> None:
    """A feed-forward block's two linears must chain (hidden outputs = second's inputs)."""
    if second.in_features != first.out_features:
        raise ValueError(
            f"feed-forward shapes do not chain: {first.out_features} hidden outputs "
            f"but {second.in_features} inputs to the second linear"
        )


class SparseLinear(LinearConversion, nn.Module):
    """``y = act(x @ W.T + b)`` with ``W`` stored sparse and multiplied by a sparse kernel.

    The weight is kept in two layouts: `GroupedSparse` for the numba kernels (always: they
    also serve inputs too small to give every thread a token tile) and `RowPanels` for the
    native kernels (AVX2 and AVX-512 read it alike) when those are built. Inference only: the
    weight is a converted copy (no parameters, no gradients), and the forward pass refuses to
    run while autograd is recording. Any leading batch dimensions are kept, (..., in) ->
    (..., out); batch 1, empty rows and fully dense rows all work.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        activation: str | None = None,
        panel: int | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported fused activation {activation!r}: use one of {list(ACTIVATIONS)}"
            )
        w = weight.detach().to("cpu", torch.float32).numpy()
        # Default panels sized for each kernel's token tiles (numba 16, native 32 lanes).
        self.sparse: GroupedSparse = to_grouped(
            w, panel=default_panel(w.shape[1], kernels.LANES) if panel is None else panel
        )
        self.rows: RowPanels | None = None
        if native.library() is not None:
            self.rows = to_row_panels(w, panel=panel)
        self.out_features, self.in_features = w.shape
        b = None if bias is None else bias.detach().to("cpu", torch.float32).numpy()
        self.bias_sorted = self.sparse.sorted_bias(b)
        self.bias_natural = (
            np.zeros(self.out_features, np.float32) if b is None else np.ascontiguousarray(b)
        )
        self.has_bias = bias is not None
        self.activation = activation

    @property
    def nnz(self) -> int:
        return self.sparse.nnz

    def to_linear(self) -> nn.Linear:
        """The equivalent dense `nn.Linear` (without the fused activation)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(to_dense(self.sparse)))
            if self.has_bias:
                bias = np.empty(self.out_features, np.float32)
                bias[self.sparse.perm.astype(np.int64)] = self.bias_sorted
                linear.bias.copy_(torch.from_numpy(bias))
        return linear

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.has_bias}, density={self.density:.3f}{act}"
        )

    def forward_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm
    ) -> torch.Tensor | None:
        """``norm(self(x) + residual)`` in one native pass (the add & norm of each token
        tile runs while the tile is in cache), or None where that pass cannot run (see
        `add_norm_operands`; also a fused activation): the caller then runs the steps one
        by one."""
        if self.activation is not None or not native.usable(self.rows):
            return None
        operands = add_norm_operands(x, residual, norm, self.out_features)
        if operands is None:
            return None
        x2 = as_matrix(x, self.in_features, "SparseLinear")
        threads = sync_threads()
        if not tiles_for_every_thread(x2.shape[0], threads):
            return None
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        native.spmm(x2, self.rows, self.bias_natural, kernels.ACT_NONE, out, torch.get_num_threads(),
                    native.lanes_for(x2.shape[0], threads), add_norm=operands)  # fmt: skip
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, "SparseLinear")
        x2 = as_matrix(x, self.in_features, "SparseLinear")
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        run_spmm(x2, self, ACTIVATIONS[self.activation], out)
        return out.reshape(*x.shape[:-1], self.out_features)
