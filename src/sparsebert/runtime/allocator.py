"""`keep_freed_memory`: glibc malloc keeps freed memory for reuse (no page-fault churn).

Why: an eager forward pass allocates and frees tensors of several MiB per op. With glibc's
default, adaptive thresholds, some of them are unmapped or trimmed on free and page-faulted
back in on the next allocation: 1-7 thousand faults per MiniLM pass at batch 16 x 128, on
some runs and not others, and none with this setting (measured on this project's machine
with the 90%-sparse model): a few ms of a ~100 ms sparse pass, and noise in every timing.
PyTorch's CPU tuning guide recommends a caching allocator (jemalloc, tcmalloc) for the
same reason; raising glibc's trim and mmap thresholds with ``mallopt`` does the same job
without a preload. It is process-wide, so it is the caller's choice: `benchmark_model`
applies it (to every runtime it times alike), and a serving process can call it once at
start-up. Best effort: where the heap cannot grow in place (other mappings right above
it), glibc still maps large blocks directly.
"""

from __future__ import annotations

import ctypes

MALLOC_KEEP_BYTES = 256 * 1024 * 1024
"""Freed memory glibc may keep (trim threshold), and the allocation size below which it
serves from the heap rather than a fresh mapping (mmap threshold)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def keep_freed_memory(keep_bytes: int = MALLOC_KEEP_BYTES) -> str:
    """Raise glibc malloc's trim and mmap thresholds to ``keep_bytes``; returns what was
    set, for the record, or ``"system default"`` where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(keep_bytes)) and libc.mallopt(
            _M_MMAP_THRESHOLD, int(keep_bytes)
        )
    except (OSError, AttributeError):
        ok = 0
    if not ok:
        return "system default"
    return f"glibc, trim and mmap thresholds {keep_bytes // (1024 * 1024)} MiB"
