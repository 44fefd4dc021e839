"""A toy criterion, in one small file: random scores (seeded), registered as ``random``.

The example of how a new criterion plugs in: subclass `Criterion`, return one score tensor
per parameter (higher = keep), register it; `--set criterion=random` then prunes with it.
"""

from __future__ import annotations

import torch

from sparsebert.criteria import CRITERIA, Criterion


class RandomScores(Criterion):
    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, params, masks):
        return {n: torch.rand(p.shape, generator=self.generator) for n, p in params.items()}


CRITERIA.register("random", RandomScores, replace=True)
