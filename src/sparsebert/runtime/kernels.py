"""Numba kernels: a sparse weight matrix times dense activations, vectorised over tokens.

Why this shape:
- Unstructured sparsity leaves no dense blocks in the weight, so the dimension to
  vectorise is the tokens'. A tile of ``LANES`` = 16 tokens is transposed into a buffer
  ``buf[feature, lane]`` (one 64-byte line per input feature) that stays in L1 while every
  output row of the tile is computed.
- Rows are computed ``GROUP`` = 4 at a time from the interleaved layout of
  `sparse_format`: each entry costs one broadcast of the weight, two 256-bit loads of
  ``buf[k]`` and two FMAs, and the 4 rows x 2 registers give 8 independent FMA chains,
  enough to hide the FMA latency. Accumulators are 16-element tuples, which LLVM's SLP
  vectoriser keeps in AVX2 registers for the whole loop.
- Finished rows go to a per-tile output buffer (feature x lane, vector stores) and are
  copied out in 16 x 16 blocks, so every write to the (tokens, features) output fills a
  whole cache line; an exact GELU can be applied on the way (vectorised rational erf).
- `spmm_ffn` chains two matrices per tile: the hidden activations go straight into the
  second matrix's token buffer and never reach memory.
- Each thread takes a contiguous run of tiles and allocates its scratch once: scratch
  freed per tile goes back to the OS and costs page faults on every tile.

Codegen details: numba disables LLVM's SLP vectoriser by default, and its loop vectoriser
would vectorise over non-zeros with gathers instead, so every call goes through
`vector_codegen`, which flips both settings while a kernel is compiled (compiled code is
cached on disk). Positions are unsigned so that numba emits no negative-index wraparound
code, and ``error_model="numpy"`` drops the division-by-zero branch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from numba import config, njit, prange

LANES = 16
"""Tokens per tile: two AVX2 registers of float32, one 64-byte cache line per feature."""

GROUP = 4
"""Output rows computed together: 4 rows x 2 registers = 8 independent FMA chains."""

ACT_NONE = 0
ACT_GELU = 1
"""Epilogue codes: nothing, or exact (erf) GELU fused into the output store."""


@contextlib.contextmanager
def vector_codegen() -> Iterator[None]:
    """Compile with SLP vectorisation on and loop vectorisation off (see module docstring)."""
    old = (config.SLP_VECTORIZE, config.LOOP_VECTORIZE)
    config.SLP_VECTORIZE, config.LOOP_VECTORIZE = 1, 0
    try:
        yield
    finally:
        config.SLP_VECTORIZE, config.LOOP_VECTORIZE = old


# Inlining: the inner-loop helper `_axpy` and the scalar/tuple helpers are inlined at
# numba level, so LLVM sees the accumulator tuples as plain values it can keep in vector
# registers. Group-level helpers that take arrays are small plain functions that LLVM
# inlines: numba's IR inliner would add atomic reference-count updates around them.
_JIT = {"fastmath": True, "error_model": "numpy"}


@njit(inline="always")
def _splat(v):
    return (v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v)


@njit(inline="always")
def _axpy(a, w, buf, k):
    """``a + w * buf[k]`` lane by lane (no row view, so no reference counting)."""
    return (
        a[0] + w * buf[k, 0], a[1] + w * buf[k, 1], a[2] + w * buf[k, 2],
        a[3] + w * buf[k, 3], a[4] + w * buf[k, 4], a[5] + w * buf[k, 5],
        a[6] + w * buf[k, 6], a[7] + w * buf[k, 7], a[8] + w * buf[k, 8],
        a[9] + w * buf[k, 9], a[10] + w * buf[k, 10], a[11] + w * buf[k, 11],
        a[12] + w * buf[k, 12], a[13] + w * buf[k, 13], a[14] + w * buf[k, 14],
        a[15] + w * buf[k, 15],
    )  # fmt: skip


@njit(**_JIT)
def _spill(a, dst, r):
    """Write the 16 lanes to row ``r`` of ``dst`` (two vector stores)."""
    dst[r, 0], dst[r, 1], dst[r, 2], dst[r, 3] = a[0], a[1], a[2], a[3]
    dst[r, 4], dst[r, 5], dst[r, 6], dst[r, 7] = a[4], a[5], a[6], a[7]
    dst[r, 8], dst[r, 9], dst[r, 10], dst[r, 11] = a[8], a[9], a[10], a[11]
    dst[r, 12], dst[r, 13], dst[r, 14], dst[r, 15] = a[12], a[13], a[14], a[15]


@njit(**_JIT)
def _fill(src, r):
    """Read row ``r`` of ``src`` as 16 lanes."""
    return (
        src[r, 0], src[r, 1], src[r, 2], src[r, 3], src[r, 4], src[r, 5], src[r, 6],
        src[r, 7], src[r, 8], src[r, 9], src[r, 10], src[r, 11], src[r, 12], src[r, 13],
        src[r, 14], src[r, 15],
    )  # fmt: skip


@njit(inline="always")
def _gelu(x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), with a branch-free rational erf.

    The erf approximation (Eigen / TensorFlow float erf) is accurate to a few ulp on
    [-4, 4] and saturates outside; unlike libm's erf it vectorises. ``np.divide`` is plain
    IEEE division (no ZeroDivisionError branch; q < 0 on [-4, 4]).
    """
    z = x * np.float32(0.7071067811865476)
    z = min(max(z, np.float32(-4.0)), np.float32(4.0))
    z2 = z * z
    p = z2 * np.float32(-2.72614225801306e-10) + np.float32(2.77068142495902e-08)
    p = z2 * p + np.float32(-2.10102402082508e-06)
    p = z2 * p + np.float32(-5.69250639462346e-05)
    p = z2 * p + np.float32(-7.34990630326855e-04)
    p = z2 * p + np.float32(-2.95459980854025e-03)
    p = z2 * p + np.float32(-1.60960333262415e-02)
    p = z * p
    q = z2 * np.float32(-1.45660718464996e-05) + np.float32(-2.13374055278905e-04)
    q = z2 * q + np.float32(-1.68282697438203e-03)
    q = z2 * q + np.float32(-7.37332916720468e-03)
    q = z2 * q + np.float32(-1.42647390514189e-02)
    return np.float32(0.5) * x * (np.float32(1.0) + np.divide(p, q))


@njit(inline="always")
def _gelu16(a):
    return (
        _gelu(a[0]), _gelu(a[1]), _gelu(a[2]), _gelu(a[3]),
        _gelu(a[4]), _gelu(a[5]), _gelu(a[6]), _gelu(a[7]),
        _gelu(a[8]), _gelu(a[9]), _gelu(a[10]), _gelu(a[11]),
        _gelu(a[12]), _gelu(a[13]), _gelu(a[14]), _gelu(a[15]),
    )  # fmt: skip


@njit(**_JIT)
def _gelu_rows(rows, r0, r1, r2, r3):
    """GELU in place on rows ``r0 .. r3`` (16 lanes each) of ``rows``."""
    _spill(_gelu16(_fill(rows, r0)), rows, r0)
    _spill(_gelu16(_fill(rows, r1)), rows, r1)
    _spill(_gelu16(_fill(rows, r2)), rows, r2)
    _spill(_gelu16(_fill(rows, r3)), rows, r3)


@njit(**_JIT)
def _pack(x, t0, nt, buf):
    """Transpose tokens ``t0 .. t0+nt`` of ``x`` (tokens, features) into ``buf``
    (features, LANES); lanes past the last token are zeroed."""
    n_in = x.shape[1]
    for i in range(nt):
        row = np.uint64(t0 + i)  # unsigned: no negative-index wraparound code
        for k in range(n_in):
            buf[k, i] = x[row, k]
    for i in range(nt, LANES):
        for k in range(n_in):
            buf[k, i] = np.float32(0.0)


@njit(**_JIT)
def _unpack(obuf, out, t0, nt):
    """Copy a finished tile, ``obuf[feature, lane]``, to ``out[t0 : t0 + nt, :]``.

    In blocks of 16 features, so reads stay in L1 and every write fills a cache line:
    much cheaper than scattering single floats into 16 output rows during the product.
    """
    n_out = obuf.shape[0]
    t0u = np.uint64(t0)
    for o0 in range(0, n_out, LANES):
        o1 = min(o0 + LANES, n_out)
        for i in range(nt):
            row = t0u + np.uint64(i)
            for o in range(o0, o1):
                out[row, o] = obuf[o, i]


@njit(**_JIT)
def _tile(buf, ptr, indices, values, perm, bias, g0, g1, act, to_buffer, dst, t0, nt, part):
    """All output rows of groups ``g0 .. g1`` for the token tile held in ``buf``.

    With ``to_buffer`` the results go to ``dst[feature, lane]`` (the next matrix's token
    buffer) instead of ``dst[token, feature]``. ``part`` holds partial sums between panels.
    """
    n_panels = ptr.shape[0]
    step = np.uint64(GROUP)
    u1, u2, u3 = np.uint64(1), np.uint64(2), np.uint64(3)
    stage = np.empty((GROUP, LANES), np.float32)
    t0u = np.uint64(t0)
    for p in range(n_panels):
        last = p == n_panels - 1
        for gi in range(g1 - g0):
            g = np.uint64(g0 + gi)
            r = np.uint64(GROUP) * g
            q = GROUP * gi
            if p == 0:
                a0 = _splat(bias[r])
                a1 = _splat(bias[r + u1])
                a2 = _splat(bias[r + u2])
                a3 = _splat(bias[r + u3])
            else:
                a0 = _fill(part, q)
                a1 = _fill(part, q + 1)
                a2 = _fill(part, q + 2)
                a3 = _fill(part, q + 3)
            # Unsigned positions: numba then emits no negative-index wraparound code.
            j = ptr[p, g]
            end = ptr[p, g + u1]
            while j < end:
                a0 = _axpy(a0, values[j], buf, indices[j])
                a1 = _axpy(a1, values[j + u1], buf, indices[j + u1])
                a2 = _axpy(a2, values[j + u2], buf, indices[j + u2])
                a3 = _axpy(a3, values[j + u3], buf, indices[j + u3])
                j += step
            if last and to_buffer:  # epilogue into rows dst[feature, lane]
                if act == ACT_GELU:  # in registers: a padding row repeats a real one
                    a0, a1, a2, a3 = _gelu16(a0), _gelu16(a1), _gelu16(a2), _gelu16(a3)
                _spill(a0, dst, perm[r])
                _spill(a1, dst, perm[r + u1])
                _spill(a2, dst, perm[r + u2])
                _spill(a3, dst, perm[r + u3])
            elif last:  # epilogue into this tile's tokens of columns dst[token, feature]
                _spill(a0, stage, 0)
                _spill(a1, stage, 1)
                _spill(a2, stage, 2)
                _spill(a3, stage, 3)
                if act == ACT_GELU:
                    _gelu_rows(stage, 0, 1, 2, 3)
                for q in range(GROUP):
                    o = perm[r + np.uint64(q)]
                    for i in range(nt):
                        dst[t0u + np.uint64(i), o] = stage[q, i]
            else:
                _spill(a0, part, q)
                _spill(a1, part, q + 1)
                _spill(a2, part, q + 2)
                _spill(a3, part, q + 3)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def spmm(x, ptr, indices, values, perm, bias, act, n_chunks, n_threads, out):
    """``out = act(x @ W.T + bias)`` for ``W`` in the grouped layout of `sparse_format`.

    x: (tokens, in) float32, C-contiguous; out: (tokens, out) float32. W's rows are sorted
    by non-zero count and cut into groups of ``GROUP`` rows whose entries are interleaved
    (entry ``e`` of row ``r`` at ``GROUP * e + r``) and zero-padded to a common length, so
    one loop drives ``GROUP`` rows = 8 independent FMA chains. ``ptr[p, g]`` is where group
    ``g``'s entries for input panel ``p`` start; ``perm[r]`` is the output feature of sorted
    row ``r`` and ``bias`` is in sorted order. Work items are (token tile, chunk of groups);
    ``n_chunks`` > 1 only when there are too few tiles to keep every thread busy; each of
    ``n_threads`` workers takes a contiguous run of items.
    """
    n_tok, n_in = x.shape
    n_groups = ptr.shape[1] - 1
    n_tiles = (n_tok + LANES - 1) // LANES
    for item in prange(n_tiles * n_chunks):
        tile = item // n_chunks
        chunk = item % n_chunks
        g0 = chunk * n_groups // n_chunks
        g1 = (chunk + 1) * n_groups // n_chunks
        t0 = tile * LANES
        nt = min(LANES, n_tok - t0)
        buf = np.empty((n_in, LANES), np.float32)
        part = np.empty((GROUP * (g1 - g0), LANES), np.float32)
        _pack(x, t0, nt, buf)
        if n_chunks == 1:  # whole tile: finish it in a buffer, then copy out row-wise
            obuf = np.empty((out.shape[1], LANES), np.float32)
            _tile(buf, ptr, indices, values, perm, bias, 0, n_groups, act, True, obuf, 0, LANES,
                  part)  # fmt: skip
            _unpack(obuf, out, t0, nt)
        else:
            _tile(buf, ptr, indices, values, perm, bias, g0, g1, act, False, out, t0, nt, part)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def spmm_ffn(
    x, ptr1, idx1, val1, perm1, bias1, n_hidden, ptr2, idx2, val2, perm2, bias2, n_threads, out
):
    """Feed-forward block ``out = W2 @ gelu(W1 @ x + b1) + b2``, one token tile at a time.

    The hidden activations of a tile never leave the core: W1's epilogue writes them, with
    GELU applied, straight into the token buffer that W2 reads (features x lanes), so the
    wide intermediate tensor is neither stored, re-read nor transposed.
    """
    n_tok, n_in = x.shape
    n_tiles = (n_tok + LANES - 1) // LANES
    groups1 = ptr1.shape[1] - 1
    groups2 = ptr2.shape[1] - 1
    n_workers = max(1, min(n_threads, n_tiles))
    for w in prange(n_workers):
        buf = np.empty((n_in, LANES), np.float32)
        hidden = np.empty((n_hidden, LANES), np.float32)
        part1 = np.empty((GROUP * groups1, LANES), np.float32)
        part2 = np.empty((GROUP * groups2, LANES), np.float32)
        obuf = np.empty((out.shape[1], LANES), np.float32)
        for tile in range(w * n_tiles // n_workers, (w + 1) * n_tiles // n_workers):
            t0 = tile * LANES
            nt = min(LANES, n_tok - t0)
            _pack(x, t0, nt, buf)
            _tile(buf, ptr1, idx1, val1, perm1, bias1, 0, groups1, ACT_GELU, True, hidden, 0,
                  LANES, part1)  # fmt: skip
            _tile(hidden, ptr2, idx2, val2, perm2, bias2, 0, groups2, ACT_NONE, True, obuf, 0,
                  LANES, part2)  # fmt: skip
            _unpack(obuf, out, t0, nt)
