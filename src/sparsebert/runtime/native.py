"""The AVX2 kernels of ``kernels_avx2.c``: compiled on first use, loaded with ctypes.

What is in it: the sparse products (`spmm`, the fused feed-forward block `ffn`), encoder
attention (`attention`) and the residual add + LayerNorm of output blocks (`add_layernorm`).

Why a C twin of the numba kernels: numba has no shuffle intrinsics, so the transposes of
activations into and out of the token tiles move one float at a time; in C they are 8x8
register transposes, and the inner loop reads four weights and their indices with two
wide loads. The C kernels read their own weight layout (`sparse_format.RowPanels`, no
padding); same results as the numba kernels to rounding.

Why compiled on first use and not by ``pip install``: the package stays pure Python, so
one wheel or editable install works on any machine; the library is built on the CPU that
runs it (AVX2 + FMA checked first); and a machine without a C compiler gets the numba
kernels instead of a failed install. The source is plain C (no Python or torch headers):
the system C compiler builds it in about a second, and the shared library is cached per
source hash in ``$SPARSEBERT_CACHE`` (default ``~/.cache/sparsebert``). OpenMP in it binds to
the libgomp torch has loaded, so torch ops and these kernels share one thread pool.

When anything is missing (not x86-64 with AVX2 and FMA, no C compiler, a failed build) or
``SPARSEBERT_NATIVE=0``, `library` returns None once and for all and the numba kernels run.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from sparsebert.runtime.sparse_format import NATIVE_LANES, RowPanels

logger = logging.getLogger("sparsebert")

SOURCE = Path(__file__).with_name("kernels_avx2.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")

WIDE_LANES = NATIVE_LANES
"""Tokens per tile of the native kernels when there are enough tokens: each index and
weight load feeds four FMAs instead of two (up to ~20% faster at 50% sparsity)."""

_UNSET = object()
_library: object = _UNSET


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build(cache: Path) -> Path:
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache / f"kernels_avx2-{tag}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{compiler} failed: {err.stderr.strip()[-500:]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    matrix = [p, i64, p, p, p]  # ptr, n_panels, idx, val, bias
    f32 = ctypes.c_float
    lib.sb_spmm.argtypes = [p, i64, i64, *matrix, i32, p, i64, i32, i64, p, p, p, f32]
    lib.sb_spmm.restype = i32
    lib.sb_ffn.argtypes = [p, i64, i64, *matrix, i64, *matrix, p, i64, i32, i64, p, p, p, f32]
    lib.sb_ffn.restype = i32
    lib.sb_attention.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, p, p, p, i64, i64, f32, p, i32]
    lib.sb_attention.restype = i32
    lib.sb_add_layernorm.argtypes = [p, p, p, p, f32, p, i64, i64, i32]
    lib.sb_add_layernorm.restype = i32


def library() -> ctypes.CDLL | None:
    """The loaded native kernels, or None (then the numba kernels are used)."""
    global _library
    if _library is not _UNSET:
        return _library  # type: ignore[return-value]
    _library = None
    if os.environ.get("SPARSEBERT_NATIVE", "1") == "0" or not _cpu_ok():
        return None
    cache = Path(os.environ.get("SPARSEBERT_CACHE") or Path.home() / ".cache" / "sparsebert")
    try:
        lib = ctypes.CDLL(str(_build(cache)))
        _declare(lib)
        _library = lib
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
        logger.warning("native sparse kernels unavailable, using numba: %s", err)
    return _library  # type: ignore[return-value]


def usable(*matrices: RowPanels | None) -> bool:
    """Whether the native kernels can run these matrices (built, and uint16 indices)."""
    return library() is not None and all(
        m is not None and m.indices.dtype == np.uint16 for m in matrices
    )


def _check(rc: int, what: str) -> None:
    """Kernel return codes: 0 ok, -1 scratch allocation failed, -2 unsupported argument."""
    if rc == -1:
        raise MemoryError(f"native {what} could not allocate its scratch buffers")
    if rc != 0:
        raise ValueError(f"native {what} rejected its arguments (code {rc}): this is a sparsebert bug")


def lanes_for(n_tokens: int, threads: int) -> int:
    """32-token tiles when every thread still gets two of them, else 16."""
    return WIDE_LANES if n_tokens >= 2 * WIDE_LANES * max(1, threads) else 16


def _matrix(m: RowPanels, bias: np.ndarray) -> list:
    return [m.ptr.ctypes.data, m.ptr.shape[0], m.indices.ctypes.data, m.values.ctypes.data,
            bias.ctypes.data]  # fmt: skip


AddNorm = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]
"""(residual, gamma, beta, eps) of a fused residual add + LayerNorm epilogue; the residual
is shaped like the output and C-contiguous, gamma and beta float32 of the output width."""


def _add_norm_args(add_norm: AddNorm | None) -> list:
    if add_norm is None:
        return [None, None, None, 0.0]
    residual, gamma, beta, eps = add_norm
    return [residual.data_ptr(), gamma.data_ptr(), beta.data_ptr(), float(eps)]


def spmm(
    x: torch.Tensor,
    m: RowPanels,
    bias: np.ndarray,
    act: int,
    out: torch.Tensor,
    threads: int,
    lanes: int = 16,
    add_norm: AddNorm | None = None,
) -> None:
    """``out = act(x @ W.T + b)``; x, out: C-contiguous float32 CPU tensors; ``b``: the
    bias in natural row order (zeros for none); ``lanes``: tokens per tile, 16 or 32.
    With ``add_norm``: ``out = LayerNorm(x @ W.T + b + residual) * gamma + beta``, each
    tile normalised while in cache."""
    lib = library()
    assert lib is not None
    rc = lib.sb_spmm(x.data_ptr(), x.shape[0], x.shape[1], *_matrix(m, bias), int(act),
                     out.data_ptr(), out.shape[1], int(threads), int(lanes),
                     *_add_norm_args(add_norm))  # fmt: skip
    _check(rc, "sparse kernel")


def ffn(
    x: torch.Tensor,
    m1: RowPanels,
    b1: np.ndarray,
    m2: RowPanels,
    b2: np.ndarray,
    out: torch.Tensor,
    threads: int,
    lanes: int = 16,
    add_norm: AddNorm | None = None,
) -> None:
    """``out = W2 gelu(W1 x + b1) + b2``, fused per token tile; with ``add_norm`` (see
    `spmm`) also the residual add + LayerNorm of the block."""
    lib = library()
    assert lib is not None
    rc = lib.sb_ffn(x.data_ptr(), x.shape[0], x.shape[1], *_matrix(m1, b1), m1.shape[0],
                    *_matrix(m2, b2), out.data_ptr(), out.shape[1], int(threads), int(lanes),
                    *_add_norm_args(add_norm))  # fmt: skip
    _check(rc, "sparse kernel")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              scale: float, threads: int) -> torch.Tensor:
    """softmax(scale q k^T + bias) v for q, k, v of shape (B, H, S, D), float32, last dim
    contiguous; ``bias`` (B or 1, S or 1, S_k) float32 with a contiguous last dim, or None.
    Returns (B, S, H, D), contiguous."""
    lib = library()
    assert lib is not None
    b, h, s, d = q.shape
    s_k = k.shape[2]
    out = torch.empty((b, s, h, d), dtype=torch.float32)
    strides = [np.ascontiguousarray(t.stride()[:3], dtype=np.int64) for t in (q, k, v)]
    if bias is None:
        bias_ptr, bias_b, bias_i = None, 0, 0
    else:
        bias_ptr = bias.data_ptr()
        bias_b = bias.stride(0) if bias.shape[0] > 1 else 0
        bias_i = bias.stride(1) if bias.shape[1] > 1 else 0
    rc = lib.sb_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), b, h, s, s_k, d,
                          *(x.ctypes.data for x in strides), bias_ptr, bias_b, bias_i,
                          float(scale), out.data_ptr(), int(threads))  # fmt: skip
    _check(rc, "attention kernel")
    return out


def add_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float, threads: int) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension; float32 CPU tensors of one shape."""
    lib = library()
    assert lib is not None
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    n_cols = x.shape[-1]
    lib.sb_add_layernorm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                         float(eps), out.data_ptr(), x.numel() // max(1, n_cols), n_cols,
                         int(threads))  # fmt: skip
    return out
