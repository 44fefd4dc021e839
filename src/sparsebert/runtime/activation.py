"""`FastGELU`: exact (erf) GELU for feed-forward blocks that stay dense.

Why: PyTorch's erf GELU costs about as much as a quarter of the dense FFN1 matrix product
it follows on 2 AVX2 cores. The rational erf the sparse kernels fuse (`kernels._gelu`,
a few ulp from libm's erf) vectorises, so a dense block that keeps its matrices still
gets the cheaper activation. `sparsify_for_inference` swaps it in only where it times
faster.
"""

from __future__ import annotations

import torch
from numba import njit, prange
from torch import nn

from sparsebert.runtime.kernels import _gelu
from sparsebert.runtime.sparse_linear import check_inference, sync_threads

_CHUNK = 4096
"""Elements per parallel work item: large enough to amortise scheduling, L1-sized."""


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def gelu_into(src, dst):
    """``dst = gelu(src)`` element-wise on flat float32 arrays (vectorised, threaded)."""
    n = src.shape[0]
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            dst[i] = _gelu(src[i])


class FastGELU(nn.Module):
    """Exact GELU (within 1e-6 of ``torch.nn.functional.gelu``), inference only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, "FastGELU")
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return torch.nn.functional.gelu(x)
        src = x.contiguous()
        out = torch.empty_like(src)
        if src.numel():
            sync_threads()
            gelu_into(src.view(-1).numpy(), out.view(-1).numpy())
        return out
