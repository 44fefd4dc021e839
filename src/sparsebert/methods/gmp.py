"""Gradual magnitude pruning (GMP, GMP*): magnitude criterion + fixed in-place masks.

At each step of the schedule the masks are recomputed from |W| (already pruned weights
rank last, so masks only ever shrink), installed in place, and the optimizer state of
the newly pruned weights is zeroed. In a distributed run rank 0's masks are broadcast so
that every rank prunes exactly the same weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsebert.allocation import masks_from_scores
from sparsebert.masks import FixedMasks
from sparsebert.schedules import GradualSchedule


def magnitude_scores(masks: FixedMasks) -> dict[str, torch.Tensor]:
    """|W|, with pruned positions at -inf so they are never revived by ties."""
    return {
        n: p.detach().abs().float().masked_fill(~masks.masks[n], float("-inf"))
        for n, p in masks.params.items()
    }


class GradualMagnitudePruner:
    """Holds the masks of a GMP run and prunes on its schedule."""

    def __init__(self, params: dict[str, nn.Parameter], schedule: GradualSchedule, allocation: str):
        self.masks = FixedMasks(params)
        self.schedule = schedule
        self.allocation = allocation
        self.current_sparsity = 0.0

    def prune_to(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Prune (exactly, by count) to ``sparsity`` by magnitude."""
        new = masks_from_scores(magnitude_scores(self.masks), sparsity, self.allocation)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for name in sorted(new):
                m = new[name].to(torch.uint8)
                if dist.get_backend() == "nccl":
                    m = m.cuda()
                dist.broadcast(m, src=0)
                new[name] = m.bool().to(self.masks.params[name].device)
        self.masks.set_masks(new, optimizer)
        self.current_sparsity = sparsity

    def maybe_prune(self, step: int, total_steps: int, optimizer=None) -> bool:
        """Prune if ``step`` is one of the schedule's pruning steps; return whether it did."""
        if step not in self.schedule.pruning_steps(total_steps):
            return False
        target = self.schedule.sparsity_at(step, total_steps)
        if target > self.current_sparsity or step == self.schedule.pruning_steps(total_steps)[-1]:
            self.prune_to(max(target, self.current_sparsity), optimizer)
        return True
