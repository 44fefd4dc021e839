"""How many weights to keep where, and exactly which ones.

Sparsity is enforced by *counts*, never by thresholds: with ties (e.g. many equal
magnitudes) a threshold can make a 90% target 89.7%; a top-k by count cannot.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsebert.errors import SparseBertError, check_sparsity

ALLOCATIONS = ("global", "uniform")


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


def masks_from_scores(
    scores: Mapping[str, torch.Tensor], sparsity: float, allocation: str = "global"
) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring weights so that exactly ``round(s*N)`` are pruned.

    ``global`` ranks every weight of every matrix together (N = all targeted weights);
    ``uniform`` gives each matrix its own exact count (N = that matrix's size).
    A score of ``-inf`` marks a weight that must be pruned first (an already pruned one).
    """
    check_sparsity(sparsity)
    if allocation == "uniform":
        return {
            name: topk_mask(s, s.numel() - n_pruned(s.numel(), sparsity)) for name, s in scores.items()
        }
    if allocation != "global":
        raise SparseBertError(f"unknown allocation '{allocation}': use one of {', '.join(ALLOCATIONS)}")
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
