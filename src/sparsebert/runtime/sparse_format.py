"""The weight layouts the sparse kernels read.

`RowPanels` (the native AVX2 and AVX-512 kernels, one layout for both): input features cut
into panels, within a panel one run of (index, value) entries per output row, rows in
natural order, no padding. The native kernels read four entries at a time with wide loads
and split each row between independent accumulators themselves, so they need no grouping
(see kernels_avx2.c).

`GroupedSparse` (the numba kernels), and why each step:
- rows sorted by non-zero count, then cut into groups of `GROUP`: the kernel runs the
  rows of a group in one loop (independent FMA chains, one loop exit per group), and
  rows of similar length need little zero padding to a common length;
- entries of a group interleaved (entry ``e`` of row ``r`` at ``GROUP * e + r``): one
  sequential stream of indices and one of values, which the hardware prefetcher follows;
- input features cut into panels: the kernel finishes one panel for all rows before the
  next, so the part of the token buffer it reads stays in L1 even for wide inputs;
- uint16 indices when the input has at most 65536 features: fewer bytes streamed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from sparsebert.runtime.kernels import GROUP, LANES

L1_BYTES = 32 * 1024
"""Per-core L1 data cache assumed when sizing panels (32 KiB on current x86 cores)."""


NATIVE_LANES = 32
"""Tokens per tile of the native AVX2 kernels on large inputs (`native.WIDE_LANES`): the
tile width `to_row_panels` sizes its default panels for."""

NATIVE_LANES_AVX512 = 64
"""Tokens per tile of the native AVX-512 kernels on large inputs (`native.WIDE_LANES_AVX512`)."""

MIN_RUN = 16
"""Entries per row and panel below which a sparse row's fixed costs (partial sums, loop
exits) outweigh keeping its panel of the token buffer in L1; see `default_panel`."""


def default_panel(n_in: int, lanes: int = LANES, density: float | None = None) -> int:
    """Input features per panel: the most even split of ``n_in`` whose slice of the token
    buffer (``lanes`` tokens) fills at most 3/4 of L1 (the rest holds the weight stream and
    the outputs); measured on MiniLM shapes with 16 lanes, 384-feature panels beat 192 and
    768, and with the native kernel's 32 lanes, 192 beats 128 and 384.

    With ``density`` (non-zeros per weight), panels are widened until a row has about
    `MIN_RUN` entries per panel: a 97%-sparse 384 x 1536 matrix has ~6 per 192-feature
    panel, and runs ~1.2x faster with 512-feature panels read from L2 than with 192 (native
    kernel, 32 lanes, measured on this project's 2-core Zen 3 machine)."""
    limit = max(1, L1_BYTES * 3 // 4 // (lanes * 4))
    if density is not None and density > 0:
        limit = max(limit, int(np.ceil(MIN_RUN / density)))
    n_panels = -(-n_in // limit)
    return -(-n_in // n_panels)


@dataclass(frozen=True)
class GroupedSparse:
    """A sparse (out, in) matrix in the kernel's layout; see the module docstring."""

    ptr: np.ndarray  # (n_panels, n_groups + 1) uint64: entry offsets per panel and group
    indices: np.ndarray  # (n_entries,) uint16 / uint32 input feature of each entry
    values: np.ndarray  # (n_entries,) float32, zero for padding
    perm: np.ndarray  # (n_groups * GROUP,) uint64: output feature of each sorted row
    shape: tuple[int, int]
    nnz: int

    @property
    def n_groups(self) -> int:
        """Number of row groups (rows padded to a multiple of `GROUP`)."""
        return self.ptr.shape[1] - 1

    @property
    def padding(self) -> float:
        """Fraction of stored entries that are padding zeros."""
        return 1.0 - self.nnz / max(1, self.values.size)

    def sorted_bias(self, bias: np.ndarray | None) -> np.ndarray:
        """``bias`` reordered like the rows (zeros when there is none)."""
        if bias is None:
            return np.zeros(self.perm.size, np.float32)
        return np.ascontiguousarray(np.asarray(bias, np.float32)[self.perm.astype(np.int64)])


def as_weight_matrix(weight: np.ndarray) -> np.ndarray:
    """``weight`` as a non-empty 2-D float32 array, or a ValueError naming its shape."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"cannot convert an empty weight of shape {weight.shape}")
    return weight


def to_grouped(
    weight: np.ndarray, panel: int | None = None, sort_block: int | None = 64
) -> GroupedSparse:
    """Convert a dense (out, in) float32 matrix whose zeros are the pruned weights."""
    weight = as_weight_matrix(weight)
    n_out, n_in = weight.shape
    panel = default_panel(n_in) if panel is None else max(1, min(int(panel), n_in))
    n_panels = max(1, -(-n_in // panel))
    n_groups = -(-n_out // GROUP)

    counts = np.count_nonzero(weight, axis=1)
    block = n_out if sort_block is None else max(1, sort_block)
    # Sort rows by count within blocks of consecutive rows: similar lengths in a group,
    # while the output columns one tile writes at a time stay within a few cache lines.
    order = np.lexsort((-counts, np.arange(n_out) // block))
    # Pad the row list to whole groups by repeating the last (emptiest) row: the kernel then
    # computes that row twice and writes the same values to the same place.
    order = np.concatenate([order, np.full(n_groups * GROUP - n_out, order[-1])])

    rows, cols = np.nonzero(weight[order])  # rows: sorted position, cols ascending per row
    vals = weight[order][rows, cols]
    group, slot, pan = rows // GROUP, rows % GROUP, cols // panel
    # Rank of each entry within its (row, panel) run: entries are row-major and column-sorted.
    key = rows.astype(np.int64) * n_panels + pan
    run_start = np.searchsorted(key, key, side="left")
    rank = np.arange(key.size) - run_start
    # Entries per (panel, group) = longest row of the group in that panel.
    per_row = np.zeros((n_panels, n_groups * GROUP), np.int64)
    np.add.at(per_row, (pan, rows), 1)
    length = per_row.reshape(n_panels, n_groups, GROUP).max(axis=2)
    sizes = (length * GROUP).reshape(-1)  # panel-major
    starts = np.concatenate([[0], np.cumsum(sizes)])
    ptr = starts[:-1].reshape(n_panels, n_groups)
    ptr = np.concatenate([ptr, starts[1:].reshape(n_panels, n_groups)[:, -1:]], axis=1)

    total = int(starts[-1])
    index_dtype = np.uint16 if n_in <= np.iinfo(np.uint16).max + 1 else np.uint32
    # Padding entries point at the first feature of their panel with a zero weight.
    panel_of_entry = np.repeat(np.repeat(np.arange(n_panels), n_groups), sizes.reshape(-1))
    indices = (panel_of_entry * panel).astype(index_dtype)
    values = np.zeros(total, np.float32)
    where = ptr[pan, group] + rank * GROUP + slot
    indices[where] = cols
    values[where] = vals
    return GroupedSparse(
        ptr=np.ascontiguousarray(ptr, dtype=np.uint64),
        indices=indices,
        values=values,
        perm=order.astype(np.uint64),
        shape=(n_out, n_in),
        nnz=int(counts.sum()),
    )


@dataclass(frozen=True)
class RowPanels:
    """A sparse (out, in) matrix as panels of row runs, for the native kernels.

    Entry ``e`` of row ``r`` in panel ``p`` is at ``ptr[p, r] + e``; ``ptr[p, out]`` ends
    the panel. Entries are panel-major, then row-major, columns ascending.
    """

    ptr: np.ndarray  # (n_panels, n_out + 1) uint64
    indices: np.ndarray  # (nnz,) uint16 / uint32 input feature of each entry
    values: np.ndarray  # (nnz,) float32
    shape: tuple[int, int]
    panel: int

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) weights."""
        return int(self.values.size)

    @functools.cached_property
    def addresses(self) -> tuple[int, int, int, int]:
        """(ptr, n_panels, indices, values) as the native kernels take them: asking numpy
        for an array's address costs ~2 us, four times per matrix and kernel call."""
        return (self.ptr.ctypes.data, self.ptr.shape[0], self.indices.ctypes.data,
                self.values.ctypes.data)  # fmt: skip

    def __getstate__(self) -> dict:
        # copies and pickles get new arrays: never carry the addresses of the old ones
        state = dict(self.__dict__)
        state.pop("addresses", None)
        return state


def to_row_panels(weight: np.ndarray, panel: int | None = None) -> RowPanels:
    """Convert a dense (out, in) float32 matrix whose zeros are the pruned weights.

    panel: input features per panel; default `default_panel` for `NATIVE_LANES`-token tiles
    at this matrix's density. The AVX-512 kernels read the same panels with 64-token tiles:
    on Ice Lake (48 KiB L1) 192-feature panels ran as fast as 96 or 128 there (the buffer
    then spills to L2, but each row has half the loop exits and partial sums)."""
    weight = as_weight_matrix(weight)
    n_out, n_in = weight.shape
    rows, cols = np.nonzero(weight)  # row-major, columns ascending within a row
    if panel is None:
        panel = default_panel(n_in, NATIVE_LANES, density=rows.size / weight.size)
    panel = max(1, min(int(panel), n_in))
    n_panels = max(1, -(-n_in // panel))
    pan = cols // panel
    order = np.lexsort((cols, rows, pan))  # panel, then row, then column
    counts = np.zeros((n_panels, n_out), np.int64)
    np.add.at(counts, (pan, rows), 1)
    starts = np.concatenate([[0], np.cumsum(counts.reshape(-1))])
    ptr = np.empty((n_panels, n_out + 1), np.uint64)
    ptr[:, :n_out] = starts[:-1].reshape(n_panels, n_out)
    ptr[:, n_out] = starts[n_out::n_out]
    index_dtype = np.uint16 if n_in <= np.iinfo(np.uint16).max + 1 else np.uint32
    return RowPanels(
        ptr=ptr,
        indices=np.ascontiguousarray(cols[order].astype(index_dtype)),
        values=np.ascontiguousarray(weight[rows[order], cols[order]]),
        shape=(n_out, n_in),
        panel=panel,
    )


def row_panels_to_dense(sparse: RowPanels) -> np.ndarray:
    """The dense (out, in) float32 matrix back from the row-panel layout."""
    n_out, n_in = sparse.shape
    counts = np.diff(sparse.ptr.astype(np.int64), axis=1)  # (n_panels, n_out) per run
    rows = np.repeat(np.tile(np.arange(n_out), sparse.ptr.shape[0]), counts.reshape(-1))
    dense = np.zeros((n_out, n_in), np.float32)
    dense[rows, sparse.indices.astype(np.int64)] = sparse.values
    return dense


def to_dense(sparse: GroupedSparse) -> np.ndarray:
    """The dense (out, in) float32 matrix back from the grouped layout."""
    n_out, n_in = sparse.shape
    dense = np.zeros((n_out, n_in), np.float32)
    n_entries = sparse.values.size
    slot = np.arange(n_entries) % GROUP
    group = np.zeros(n_entries, np.int64)
    for p in range(sparse.ptr.shape[0]):
        for g in range(sparse.n_groups):
            group[int(sparse.ptr[p, g]) : int(sparse.ptr[p, g + 1])] = g
    rows = sparse.perm.astype(np.int64)[group * GROUP + slot]
    keep = sparse.values != 0
    # Padding entries carry zeros; duplicated padding rows rewrite identical values.
    dense[rows[keep], sparse.indices[keep].astype(np.int64)] = sparse.values[keep]
    return dense


INT8_GROUP = 4
"""Weights per stored group of `Int8RowGroups`: the 4 bytes one VPDPBUSD lane sums."""

INT8_PANEL_BYTES = 48 * 1024
"""Token-buffer bytes per panel of the INT8 kernels (64 tokens x 768 features): a panel's
slice of the uint8 buffer fits a 48 KiB L1. Measured on the Ice Lake Xeon (MiniLM shapes,
90%): 768-feature panels 0-4% faster than 384 or 192, one panel of 1536 no faster."""


@dataclass(frozen=True)
class Int8RowGroups:
    """A sparse (out, in) matrix quantised to int8 per output row, for the INT8 kernels.

    ``W[r] ~= scale[r] * q[r]`` with ``q`` in [-127, 127] (symmetric, ``scale = max|W[r]| /
    127``). Input features are cut into panels; within a panel each row is a run of groups
    of `INT8_GROUP` non-zeros (any columns, ascending), the last group of a run padded with
    zero weights (index 0). Group ``g`` of row ``r`` in panel ``p`` is group ``ptr[p, r] +
    g``: indices ``indices[4 g : 4 g + 4]``, weights ``values[4 g : 4 g + 4]``.
    ``comp[r] = 128 * sum(q[r])``: the kernels feed activations as ``q + 128`` (unsigned
    bytes) and subtract it.
    """

    ptr: np.ndarray  # (n_panels, n_out + 1) uint64, in groups
    indices: np.ndarray  # (4 n_groups,) uint16
    values: np.ndarray  # (4 n_groups,) int8
    scale: np.ndarray  # (n_out,) float32
    comp: np.ndarray  # (n_out,) int32
    shape: tuple[int, int]
    panel: int
    nnz: int

    @property
    def n_groups(self) -> int:
        """Stored groups (each 4 weights, padding included)."""
        return int(self.values.size // INT8_GROUP)

    @property
    def padding(self) -> float:
        """Fraction of stored weights that are padding zeros."""
        return 1.0 - self.nnz / max(1, self.values.size)

    @functools.cached_property
    def addresses(self) -> tuple[int, ...]:
        """(ptr, n_panels, indices, values, comp, scale) as the native kernels take them."""
        return (self.ptr.ctypes.data, self.ptr.shape[0], self.indices.ctypes.data,
                self.values.ctypes.data, self.comp.ctypes.data, self.scale.ctypes.data)  # fmt: skip

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("addresses", None)
        return state


def quantize_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row: (q int8 (out, in), scale float32 (out,)), ``W ~= scale
    q``; a row of zeros gets scale 0."""
    weight = as_weight_matrix(weight)
    amax = np.abs(weight).max(axis=1).astype(np.float32)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.clip(np.rint(weight * inv[:, None]), -127, 127).astype(np.int8)
    return q, scale


def default_int8_panel(n_in: int, lanes: int = 64) -> int:
    """Input features per panel of the INT8 kernels: the most even split of ``n_in`` whose
    uint8 buffer slice (``lanes`` tokens) fits `INT8_PANEL_BYTES`."""
    limit = max(INT8_GROUP, INT8_PANEL_BYTES // lanes)
    n_panels = -(-n_in // limit)
    return -(-n_in // n_panels)


def to_int8_row_groups(weight: np.ndarray, panel: int | None = None) -> Int8RowGroups:
    """Quantise a dense (out, in) float32 matrix whose zeros are the pruned weights (weights
    that round to 0 in int8 are dropped) and lay it out for the INT8 kernels."""
    q, scale = quantize_rows(weight)
    n_out, n_in = q.shape
    if n_in > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"the INT8 kernels take at most 65536 input features, not {n_in}")
    panel = default_int8_panel(n_in) if panel is None else max(1, min(int(panel), n_in))
    n_panels = max(1, -(-n_in // panel))
    rows, cols = np.nonzero(q)
    pan = cols // panel
    order = np.lexsort((cols, rows, pan))  # panel, then row, then column
    rows, cols, pan = rows[order], cols[order], pan[order]
    counts = np.zeros((n_panels, n_out), np.int64)
    np.add.at(counts, (pan, rows), 1)
    groups = -(-counts // INT8_GROUP)
    starts = np.concatenate([[0], np.cumsum(groups.reshape(-1))])
    ptr = np.empty((n_panels, n_out + 1), np.uint64)
    ptr[:, :n_out] = starts[:-1].reshape(n_panels, n_out)
    ptr[:, n_out] = starts[n_out::n_out]
    run = pan.astype(np.int64) * n_out + rows
    first = np.concatenate([[0], np.cumsum(counts.reshape(-1))])[:-1]
    rank = np.arange(rows.size) - first[run]
    where = starts[:-1][run] * INT8_GROUP + rank
    total = int(starts[-1]) * INT8_GROUP
    indices = np.zeros(total, np.uint16)
    values = np.zeros(total, np.int8)
    indices[where] = cols
    values[where] = q[rows, cols]
    comp = (128 * q.astype(np.int32).sum(axis=1)).astype(np.int32)
    return Int8RowGroups(ptr=ptr, indices=indices, values=values, scale=scale, comp=comp,
                         shape=(n_out, n_in), panel=panel, nnz=int(rows.size))  # fmt: skip


def int8_row_groups_to_dense(sparse: Int8RowGroups, dequantize: bool = True) -> np.ndarray:
    """The (out, in) matrix back: float32 ``scale * q`` (or the int8 ``q`` itself)."""
    n_out, n_in = sparse.shape
    q = np.zeros((n_out, n_in), np.int8)
    groups = np.diff(sparse.ptr.astype(np.int64), axis=1)  # (n_panels, n_out) per run
    rows = np.repeat(np.tile(np.arange(n_out), sparse.ptr.shape[0]), groups.reshape(-1) * INT8_GROUP)
    keep = sparse.values != 0
    q[rows[keep], sparse.indices[keep].astype(np.int64)] = sparse.values[keep]
    if not dequantize:
        return q
    return q.astype(np.float32) * sparse.scale[:, None]
