"""Sparse modules that do the work of several linears at once.

Why: at 90% sparsity a sparse matrix product is so cheap that transposing its input into
the kernel's token buffer and scattering its output become a large share of the time.
- `SharedInputGroup`: linears fed the same tensor (attention's query, key and value) run
  as one matrix, so the input is read and transposed once; each linear's slot
  (`GroupSlice`) returns a view of the shared output.
- `SparseFFN`: a transformer feed-forward block, ``W2 gelu(W1 x + b1) + b2``, run tile by
  tile so the wide hidden activations stay in the core's cache (`kernels.spmm_ffn`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sparsebert.runtime import kernels, native
from sparsebert.runtime.quantized import SparseLinearInt8
from sparsebert.runtime.sparse_linear import (
    SparseLinear,
    add_norm_operands,
    as_matrix,
    check_ffn_shapes,
    check_inference,
    run_spmm,
    sync_threads,
    tiles_for_every_thread,
)


class SharedInputGroup:
    """One `SparseLinear` over the stacked weights of linears that share their input.

    The output for the most recent input is kept until every member has taken its slice,
    so query, key and value called on the same tensor cost one kernel call. A member
    called with any other tensor (or after the input changed in place) triggers a fresh
    computation, so results never depend on the call pattern, only the speed does. The
    cache is per thread, so concurrent callers never see each other's outputs.
    """

    def __init__(
        self, linears: Sequence[nn.Linear], activation: str | None = None, dtype: str = "float32"
    ) -> None:
        if len({lin.in_features for lin in linears}) != 1:
            raise ValueError("linears of a shared-input group must have the same input size")
        weight = torch.cat([lin.weight.detach() for lin in linears])
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat(
                [
                    lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features)
                    for lin in linears
                ]
            )
        else:
            bias = None
        kind = SparseLinearInt8 if dtype == "int8" else SparseLinear  # see quantized.py
        self.linear: SparseLinear | SparseLinearInt8 = kind(weight, bias, activation=activation)
        bounds = np.cumsum([0] + [lin.out_features for lin in linears])
        self.slices = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        # thread id -> (input, fingerprint, output, members served)
        self._cache: dict[int, tuple[torch.Tensor, tuple, torch.Tensor, set[int]]] = {}

    @staticmethod
    def _fingerprint(x: torch.Tensor) -> tuple:
        # inference tensors keep no version counter (asking raises, and the exception cost
        # ~20 us a call: 1.4 ms per MiniLM forward pass, a tenth of it at batch 1 x 128)
        version = None if x.is_inference() else x._version
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), version)

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """The stacked output for ``x``; computed once per input for all members."""
        thread = threading.get_ident()
        key = self._fingerprint(x)
        hit = self._cache.get(thread)
        if hit is None or hit[0] is not x or hit[1] != key or member in hit[3]:
            hit = (x, key, self.linear(x), set())
            self._cache[thread] = hit
        hit[3].add(member)
        if len(hit[3]) == len(self.slices):
            del self._cache[thread]  # every member served: hold no memory between calls
        return hit[2]

    def __deepcopy__(self, memo: dict) -> SharedInputGroup:
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.linear = copy.deepcopy(self.linear, memo)
        clone._cache = {}
        return clone


class GroupSlice(nn.Module):
    """Stands in for one member linear of a `SharedInputGroup`: returns its output columns."""

    def __init__(self, group: SharedInputGroup, member: int) -> None:
        super().__init__()
        self.group = group
        self.member = member
        self.out_features = group.slices[member][1] - group.slices[member][0]
        self.in_features = group.linear.in_features

    def extra_repr(self) -> str:
        lo, hi = self.group.slices[self.member]
        return (
            f"member {self.member} of a shared-input group: columns {lo}:{hi} of "
            f"{self.group.linear.extra_repr()}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.group.slices[self.member]
        return self.group.output(x, self.member)[..., lo:hi]


class SparseFFN(nn.Module):
    """``W2 gelu(W1 x + b1) + b2`` (exact GELU) with both matrices sparse, fused per token tile.

    Inputs with too few token tiles to occupy every thread are run as two separate sparse
    products instead, which can also split the rows of each matrix between threads.
    """

    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        check_ffn_shapes(first, second)
        self.first = SparseLinear.from_linear(first, activation="gelu")
        self.second = SparseLinear.from_linear(second)
        self.in_features = first.in_features
        self.hidden_features = first.out_features
        self.out_features = second.out_features

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.hidden_features} (gelu) -> {self.out_features}, "
            f"density {self.first.density:.3f} / {self.second.density:.3f}"
        )

    def forward_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm
    ) -> torch.Tensor | None:
        """``norm(self(x) + residual)``, the whole feed-forward sublayer, in one native pass
        per token tile; None where that cannot run (see `SparseLinear.forward_add_norm`)."""
        if not native.usable(self.first.rows, self.second.rows):
            return None
        operands = add_norm_operands(x, residual, norm, self.out_features)
        if operands is None:
            return None
        x2 = as_matrix(x, self.in_features, "SparseFFN")
        threads = sync_threads()
        if not tiles_for_every_thread(x2.shape[0], threads):
            return None
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        native.ffn(x2, self.first.rows, self.first.bias_natural, self.second.rows,
                   self.second.bias_natural, out, torch.get_num_threads(),
                   native.lanes_for(x2.shape[0], threads), add_norm=operands)  # fmt: skip
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, "SparseFFN")
        x2 = as_matrix(x, self.in_features, "SparseFFN")
        n_tok = x2.shape[0]
        out = torch.empty((n_tok, self.out_features), dtype=torch.float32)
        threads = sync_threads()
        if not tiles_for_every_thread(n_tok, threads):
            hidden = torch.empty((n_tok, self.hidden_features), dtype=torch.float32)
            run_spmm(x2, self.first, kernels.ACT_GELU, hidden)
            run_spmm(hidden, self.second, kernels.ACT_NONE, out)
        elif native.usable(self.first.rows, self.second.rows):
            native.ffn(x2, self.first.rows, self.first.bias_natural, self.second.rows,
                       self.second.bias_natural, out, torch.get_num_threads(),
                       native.lanes_for(n_tok, threads))  # fmt: skip
        else:
            a, b = self.first.sparse, self.second.sparse
            with kernels.vector_codegen():
                kernels.spmm_ffn(
                    x2.numpy(), a.ptr, a.indices, a.values, a.perm, self.first.bias_sorted,
                    self.hidden_features, b.ptr, b.indices, b.values, b.perm,
                    self.second.bias_sorted, threads, out.numpy(),
                )  # fmt: skip
        return out.reshape(*x.shape[:-1], self.out_features)

