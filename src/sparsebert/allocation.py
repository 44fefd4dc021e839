"""How many weights to keep where, and exactly which ones.

Sparsity is enforced by *counts*, never by thresholds: with ties (e.g. many equal
magnitudes) a threshold can make a 90% target 89.7%; a top-k by count cannot.

Allocations: ``global`` (one ranking over every targeted weight), ``uniform`` (each matrix
its own exact count), ``per-row`` (each output row of each matrix its own exact count: Wanda
compares scores within a row). A *pattern* ``N:M`` (semi-structured sparsity, e.g. 2:4 for
GPU sparse tensor cores) keeps exactly the N highest scores of every M consecutive weights
along the input (last) dimension; it fixes the sparsity at 1 - N/M. Below that sparsity (the
earlier steps of a gradual schedule) the N best of each group are protected and the
allocation prunes among the others, so a mask on the way there never prunes more than M - N
of a group and the last step is exactly N:M.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from sparsebert.errors import SparseBertError, check_sparsity

ALLOCATIONS = ("global", "uniform", "per-row")


def n_pruned(numel: int, sparsity: float) -> int:
    """Number of weights to prune from ``numel`` for ``sparsity`` (round half to even)."""
    return int(round(sparsity * numel))


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of ``scores``' shape keeping exactly the ``keep`` highest scores."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        idx = torch.topk(flat.float(), keep, sorted=False).indices
        mask[idx] = True
    return mask.view_as(scores)


def parse_pattern(pattern: str | tuple[int, int] | None, where: str = "pattern") -> tuple[int, int] | None:
    """``"N:M"`` -> ``(N, M)`` with 0 < N < M (None stays None)."""
    if pattern is None:
        return None
    if isinstance(pattern, tuple):
        n, m = pattern
    else:
        text = str(pattern).strip()
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if not match:
            raise SparseBertError(
                f"{where} must look like N:M (e.g. 2:4: keep 2 of every 4 weights), got {pattern!r}"
            )
        n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise SparseBertError(f"{where} N:M needs 0 < N < M, got {n}:{m}")
    return n, m


def pattern_sparsity(n: int, m: int) -> float:
    """The sparsity an N:M pattern fixes: 1 - N/M."""
    return 1.0 - n / m


def check_pattern_shape(name: str, shape: tuple[int, ...] | torch.Size, n: int, m: int) -> None:
    """Raise unless the input (last) dimension of ``name`` splits into groups of ``m``."""
    if len(shape) == 0 or shape[-1] % m:
        raise SparseBertError(
            f"pattern {n}:{m}: '{name}' has input dimension {shape[-1] if len(shape) else 0}, "
            f"not a multiple of {m}; prune other targets or use another M"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep exactly the ``n`` highest scores of every ``m`` consecutive weights along the last
    dimension (ties broken by position, never by keeping more)."""
    check_pattern_shape("scores", scores.shape, n, m)
    groups = scores.detach().float().reshape(-1, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    mask.scatter_(1, torch.topk(groups, n, dim=1, sorted=False).indices, True)
    return mask.view(scores.shape)


def is_nm(tensor: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``tensor`` has at most ``n`` non-zeros in every ``m`` consecutive entries along
    its last dimension (False when that dimension is not a multiple of ``m``)."""
    if tensor.dim() == 0 or tensor.shape[-1] % m:
        return False
    return bool(((tensor.detach() != 0).reshape(-1, m).sum(dim=1) <= n).all())


def masks_from_scores(
    scores: Mapping[str, torch.Tensor], sparsity: float, allocation: str = "global",
    pattern: str | tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring weights so that exactly ``round(s*N)`` are pruned.

    ``global`` ranks every weight of every matrix together (N = all targeted weights);
    ``uniform`` gives each matrix its own exact count (N = that matrix's size); ``per-row``
    each output row (N = the row's length). A score of ``-inf`` marks a weight that must be
    pruned first (an already pruned one). With ``pattern`` N:M the result at sparsity 1 - N/M
    is exactly N:M; below it, the N best of each group are kept and the allocation prunes
    among the rest; above it is an error.
    """
    check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise SparseBertError(f"unknown allocation '{allocation}': use one of {', '.join(ALLOCATIONS)}")
    nm = parse_pattern(pattern)
    if nm is not None:
        n, m = nm
        final = pattern_sparsity(n, m)
        if sparsity > final + 1e-9:
            raise SparseBertError(
                f"pattern {n}:{m} keeps {n} of every {m} weights (sparsity {final:g}); "
                f"sparsity {sparsity:g} is above that"
            )
        for name, s in scores.items():
            check_pattern_shape(name, s.shape, n, m)
        structured = {name: nm_mask(s, n, m) for name, s in scores.items()}
        if sparsity >= final - 1e-9:
            return structured
        scores = {name: s.float().masked_fill(structured[name], float("inf")) for name, s in scores.items()}
    if allocation == "per-row":
        out = {}
        for name, s in scores.items():
            rows = s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(1, -1)
            keep = rows.shape[1] - n_pruned(rows.shape[1], sparsity)
            mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
            if keep > 0:
                mask.scatter_(1, torch.topk(rows.float(), keep, dim=1, sorted=False).indices, True)
            out[name] = mask.view(s.shape)
        return out
    if allocation == "uniform":
        return {
            name: topk_mask(s, s.numel() - n_pruned(s.numel(), sparsity)) for name, s in scores.items()
        }
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    keep = flat.numel() - n_pruned(flat.numel(), sparsity)
    mask = topk_mask(flat, keep)
    out, offset = {}, 0
    for name in names:
        size = scores[name].numel()
        out[name] = mask[offset : offset + size].view_as(scores[name])
        offset += size
    return out
