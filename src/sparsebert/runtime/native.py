"""The native kernels (``kernels_avx2.c``, ``kernels_avx512.c``): compiled on first use,
loaded with ctypes.

What is in them, in both files with the same C signatures: the sparse products (`spmm`, the
fused feed-forward block `ffn`; their INT8 twins `spmm_int8`, `ffn_int8`, on
`sparse_format.Int8RowGroups`), encoder attention (`attention`; the AVX-512 one for head
widths that are a multiple of 16, the AVX2 one serves the others) and the residual add +
LayerNorm of output blocks (`add_layernorm`). Both include ``kernels_common.h`` and
``kernels_drivers.h`` (the tile loops they share; `HEADERS`), so each file keeps only its
instruction set's code. The AVX-512 library gets ``-mavx512vnni`` where the CPU has it (its
INT8 products then use VPDPBUSD; without it, an exact emulation).

Instruction sets (`isa`): on a CPU with AVX-512 (F, BW, DQ, VL; read from /proc/cpuinfo)
the kernels of ``kernels_avx512.c`` run (zmm registers: 16 token lanes per register and
64-token tiles in the sparse products), elsewhere the AVX2 ones (8 lanes, 32-token tiles):
both read the same weight layout (`sparse_format.RowPanels`, same panels).
``SPARSEBERT_ISA=avx2`` forces the AVX2 kernels on an AVX-512 CPU (to compare the two;
`set_isa` does the same in a running process); when the AVX-512 file does not build (an
old compiler), the AVX2 kernels run.

Why a C twin of the numba kernels: numba has no shuffle intrinsics, so the transposes of
activations into and out of the token tiles move one float at a time; in C they are 8x8
register transposes, and the inner loop reads four weights and their indices with two
wide loads. Same results as the numba kernels to rounding.

Why compiled on first use and not by ``pip install``: the package stays pure Python, so
one wheel or editable install works on any machine; each library is built on the CPU that
runs it (its instruction set checked first); and a machine without a C compiler gets the
numba kernels instead of a failed install. The sources are plain C (no Python or torch
headers): the system C compiler builds one in about a second, and the shared library is
cached per source and flags hash in ``$SPARSEBERT_CACHE`` (default ``~/.cache/sparsebert``).
OpenMP in it binds to the libgomp torch has loaded, so torch ops and these kernels share one
thread pool.

When anything is missing (not x86-64 with AVX2 and FMA, no C compiler, a failed build) or
``SPARSEBERT_NATIVE=0``, `library` returns None once and for all and the numba kernels run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sparsebert.runtime.sparse_format import (
    NATIVE_LANES,
    NATIVE_LANES_AVX512,
    Int8RowGroups,
    RowPanels,
)

logger = logging.getLogger("sparsebert")

SOURCE = Path(__file__).with_name("kernels_avx2.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
SOURCE_AVX512 = Path(__file__).with_name("kernels_avx512.c")
FLAGS_AVX512 = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-fopenmp",
                "-shared", "-fPIC", "-std=c11")  # fmt: skip
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "fma")
"""/proc/cpuinfo flags the AVX-512 kernels need (Linux lists them only where the OS saves
the zmm registers)."""
HEADERS = (Path(__file__).with_name("kernels_common.h"), Path(__file__).with_name("kernels_drivers.h"))
"""Headers both kernel sources include: part of each build's cache key."""

ISAS = ("avx512", "avx2")
WIDE_LANES = NATIVE_LANES
"""Tokens per tile of the AVX2 kernels when there are enough tokens: each index and
weight load feeds four FMAs instead of two (up to ~20% faster at 50% sparsity)."""
WIDE_LANES_AVX512 = NATIVE_LANES_AVX512
"""Tokens per tile of the AVX-512 sparse products when there are enough tokens: four zmm
registers per row, so each index and weight load feeds four 16-lane FMAs."""

_UNSET = object()
_library: object = _UNSET
_library_avx512: object = _UNSET
_isa: object = _UNSET


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_avx512() -> bool:
    """Whether this CPU (and OS) run the AVX-512 kernels: x86-64 listing `AVX512_FLAGS`."""
    return platform.machine().lower() in ("x86_64", "amd64") and set(AVX512_FLAGS) <= cpu_flags()


def _build(cache: Path, source_path: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    source = source_path.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    tag = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    target = cache / f"{source_path.stem}-{tag}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source_path), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{compiler} failed: {err.stderr.strip()[-500:]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of the four kernels (both libraries export the same C signatures)."""
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
    quantized = [p, i64, p, p, p, p, p]  # ptr, n_panels, idx, val, comp, scale, bias
    lib.sb_spmm_i8.argtypes = [p, i64, i64, *quantized, i32, p, i64, i32, p, p, p, f32]
    lib.sb_spmm_i8.restype = i32
    lib.sb_ffn_i8.argtypes = [p, i64, i64, *quantized, i64, *quantized, p, i64, i32, p, p, p, f32]
    lib.sb_ffn_i8.restype = i32


def _cache() -> Path:
    return Path(os.environ.get("SPARSEBERT_CACHE") or Path.home() / ".cache" / "sparsebert")


def cpu_has_vnni() -> bool:
    """Whether the AVX-512 INT8 kernels get VPDPBUSD (AVX512-VNNI); without it they emulate
    it exactly with two VPMADDWD."""
    return "avx512_vnni" in cpu_flags()


def avx512_build_flags() -> tuple[str, ...]:
    """`FLAGS_AVX512`, plus ``-mavx512vnni`` on a CPU that has it."""
    return (*FLAGS_AVX512, "-mavx512vnni") if cpu_has_vnni() else FLAGS_AVX512


def library() -> ctypes.CDLL | None:
    """The loaded AVX2 kernels (all of them: the sparse products, attention, add & norm),
    or None (then the numba kernels are used and attention stays torch's)."""
    global _library
    if _library is not _UNSET:
        return _library  # type: ignore[return-value]
    _library = None
    if os.environ.get("SPARSEBERT_NATIVE", "1") == "0" or not _cpu_ok():
        return None
    try:
        lib = ctypes.CDLL(str(_build(_cache())))
        _declare(lib)
        _library = lib
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
        logger.warning("native sparse kernels unavailable, using numba: %s", err)
    return _library  # type: ignore[return-value]


def library_avx512() -> ctypes.CDLL | None:
    """The loaded AVX-512 kernels, or None: no AVX-512 CPU, no AVX2 library (the AVX-512
    one serves only beside it), or a failed build (then the AVX2 kernels run)."""
    global _library_avx512
    if _library_avx512 is not _UNSET:
        return _library_avx512  # type: ignore[return-value]
    _library_avx512 = None
    if library() is None or not cpu_has_avx512():
        return None
    try:
        lib = ctypes.CDLL(str(_build(_cache(), SOURCE_AVX512, avx512_build_flags())))
        _declare(lib)
        _library_avx512 = lib
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
        logger.warning("AVX-512 sparse kernels unavailable, using the AVX2 ones: %s", err)
    return _library_avx512  # type: ignore[return-value]


def available_isas() -> list[str]:
    """The instruction sets whose sparse kernels can run here, best first."""
    found = [] if library() is None else ["avx2"]
    if library_avx512() is not None:
        found.insert(0, "avx512")
    return found


def isa() -> str | None:
    """The instruction set of the sparse kernels that run: ``avx512``, ``avx2``, or None
    (numba). The best available unless ``SPARSEBERT_ISA`` (or `set_isa`) names another."""
    global _isa
    if library() is None:
        return None
    if _isa is _UNSET:
        want = os.environ.get("SPARSEBERT_ISA", "").strip().lower() or None
        if want not in (None, "auto", *ISAS):
            logger.warning("SPARSEBERT_ISA=%s is not one of auto, %s: ignored", want, ", ".join(ISAS))
            want = None
        found = available_isas()
        _isa = want if want in found else found[0]
        if want not in (None, "auto") and want not in found:
            logger.warning("SPARSEBERT_ISA=%s cannot run here; using %s", want, _isa)
    return _isa  # type: ignore[return-value]


def set_isa(name: str | None) -> str | None:
    """Run the sparse products with ``name``'s kernels from now on (None: the best
    available); returns the previous choice. A ValueError if they cannot run here."""
    global _isa
    previous = isa()
    if name is None:
        _isa = _UNSET
    elif name not in available_isas():
        raise ValueError(f"the {name} kernels cannot run here (available: {available_isas() or 'none'})")
    else:
        _isa = name
    return previous


@contextlib.contextmanager
def using_isa(name: str | None) -> Iterator[None]:
    """Run the kernels of ``name`` inside the block (None, or the running one: no change)."""
    if name is None or name == isa():
        yield
        return
    previous = set_isa(name)
    try:
        yield
    finally:
        set_isa(previous)


def _kernels() -> ctypes.CDLL:
    """The library of the running instruction set (`isa`)."""
    lib = library_avx512() if isa() == "avx512" else library()
    assert lib is not None
    return lib


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
    """Tokens per tile: the widest tiles of the running kernels that give every thread
    work, else the next narrower ones (at least 16). AVX2: 32-token tiles when every thread
    gets two of them. AVX-512: 64-token tiles when every thread gets one full tile, since a
    64-token tile costs ~20% less per token than two of 32 (measured at batch 1 x 128)."""
    if isa() != "avx512":
        return WIDE_LANES if n_tokens >= 2 * WIDE_LANES * max(1, threads) else 16
    lanes = WIDE_LANES_AVX512
    while lanes > 16 and n_tokens < lanes * max(1, threads):
        lanes //= 2
    return lanes


def _matrix(m: RowPanels, bias: np.ndarray) -> list:
    return [*m.addresses, bias.ctypes.data]


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
    bias in natural row order (zeros for none); ``lanes``: tokens per tile, 16 or 32
    (AVX-512 also 64).
    With ``add_norm``: ``out = LayerNorm(x @ W.T + b + residual) * gamma + beta``, each
    tile normalised while in cache."""
    lib = _kernels()
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
    lib = _kernels()
    rc = lib.sb_ffn(x.data_ptr(), x.shape[0], x.shape[1], *_matrix(m1, b1), m1.shape[0],
                    *_matrix(m2, b2), out.data_ptr(), out.shape[1], int(threads), int(lanes),
                    *_add_norm_args(add_norm))  # fmt: skip
    _check(rc, "sparse kernel")


INT8_LANES = {"avx512": 64, "avx2": 32}
"""Tokens per tile of the INT8 kernels of each instruction set."""


def int8_isa() -> str:
    """What runs the INT8 products here, for reports: ``avx512-vnni``, ``avx512`` (VPDPBUSD
    emulated), ``avx2``, or ``reference`` (no native kernels: a slow exact torch path)."""
    name = isa()
    if name is None:
        return "reference"
    return "avx512-vnni" if name == "avx512" and cpu_has_vnni() else name


def _quantized(m: Int8RowGroups, bias: np.ndarray) -> list:
    return [*m.addresses, bias.ctypes.data]


def spmm_int8(x: torch.Tensor, m: Int8RowGroups, bias: np.ndarray, act: int, out: torch.Tensor,
              threads: int, add_norm: AddNorm | None = None) -> None:
    """``out = act(x @ W.T + b)`` with ``W`` int8 per row (`Int8RowGroups`) and ``x``
    quantised per token inside the kernel; x, out: C-contiguous float32; with ``add_norm``
    as `spmm`."""
    lib = _kernels()
    rc = lib.sb_spmm_i8(x.data_ptr(), x.shape[0], x.shape[1], *_quantized(m, bias), int(act),
                        out.data_ptr(), out.shape[1], int(threads), *_add_norm_args(add_norm))  # fmt: skip
    _check(rc, "INT8 sparse kernel")


def ffn_int8(x: torch.Tensor, m1: Int8RowGroups, b1: np.ndarray, m2: Int8RowGroups, b2: np.ndarray,
             out: torch.Tensor, threads: int, add_norm: AddNorm | None = None) -> None:
    """``out = W2 gelu(W1 x + b1) + b2`` in INT8 (the hidden activations quantised per
    token again), fused per token tile; ``add_norm`` as `spmm`."""
    lib = _kernels()
    rc = lib.sb_ffn_i8(x.data_ptr(), x.shape[0], x.shape[1], *_quantized(m1, b1), m1.shape[0],
                       *_quantized(m2, b2), out.data_ptr(), out.shape[1], int(threads),
                       *_add_norm_args(add_norm))  # fmt: skip
    _check(rc, "INT8 sparse kernel")


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
    lib = _kernels()
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    n_cols = x.shape[-1]
    lib.sb_add_layernorm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                         float(eps), out.data_ptr(), x.numel() // max(1, n_cols), n_cols,
                         int(threads))  # fmt: skip
    return out
