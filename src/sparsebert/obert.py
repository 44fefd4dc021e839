"""oBERT, the Optimal BERT Surgeon (Kurtic et al. 2022): second-order importance and the OBS
weight update, from a block-diagonal empirical Fisher.

Statistics. The weights of each targeted tensor, flattened (row-major), are cut into blocks
of ``block_size`` consecutive weights (the last block padded with weights that never exist);
each block q has its own Fisher

    F = λ I + (1/m) Σ_k g_k g_kᵀ        (g_k: the block's part of gradient k)

over a window of the last ``m`` observed gradients, ``λ`` = ``damping``. While training, a
gradient is one optimizer step's mini-batch gradient (after gradient accumulation and, under
DDP, after the all-reduce: `observe_gradients` runs in the Trainer's pre-optimizer-step
callback, so every rank observes the same averaged gradients, builds the same Fisher and
computes the same scores and updates; the gradual pruner broadcasts rank 0's masks and
corrected weights anyway). The gradual pruner observes only the ``num_grads`` optimizer steps
before each pruning step (the window), and the statistics restart after each pruning step.
In one-shot pruning each calibration example gives one gradient. Gradients are read after
the Trainer's gradient clipping, as the optimizer sees them.

Importance. ρ_q = w_q² / (2 [F⁻¹]_qq), F⁻¹ per block by a direct batched inverse (float64;
equal, up to rounding, to oBERT's m Woodbury rank-one updates from (1/λ) I).

Update. When a set Q of weights of a block is pruned at once, oBERT's approximation (as in
its reference implementation) is used: the single-weight OBS updates are *summed*, ignoring
the correlations between the pruned weights,

    δw = - Σ_{q∈Q} F⁻¹ e_q w_q / [F⁻¹]_qq,

then the pruned weights are set to zero. Weights pruned earlier are zero and have zero
gradients (their gradients are masked), so they neither contribute nor move.

Memory: the Fisher blocks of every targeted tensor, numel/B blocks of B x B float32 =
4·numel·B bytes (accumulated in place, then inverted in place, chunk by chunk, in float64),
plus one float32 copy of the weights between scoring and updating; the gradients themselves
are not stored. With the defaults (B = 32) MiniLM's encoder linears (10.6 M weights) need
1.4 GB; BERT-base's (85 M) 10.9 GB (the paper's B = 50: 17 GB, a GPU's job). Each observed
gradient costs numel·B multiply-adds (0.34 G for MiniLM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsebert.criteria import CRITERIA, Criterion
from sparsebert.errors import SparseBertError

_INVERT_CHUNK = 4096  # blocks inverted at once (transient: chunk · B² float64)


@dataclass
class OBertOptions:
    """oBERT's settings. Paper: block_size 50, num_grads 1024, damping 1e-7; the defaults here
    fit a CPU for MiniLM-sized models (see the memory formula in the module docstring)."""

    block_size: int = 32
    num_grads: int = 64
    damping: float = 1e-7

    def __post_init__(self) -> None:
        for key in ("block_size", "num_grads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SparseBertError(f"criterion_options.{key} must be a positive integer, got {value!r}")
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping > 0:
            raise SparseBertError(f"criterion_options.damping must be a number > 0, got {self.damping!r}")
        self.damping = float(self.damping)


def blocks_of(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """``t`` flattened, zero-padded to a multiple of ``block_size``, as (blocks, block_size)."""
    flat = t.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def fisher_memory_bytes(numel: int, block_size: int) -> int:
    """Bytes of the Fisher blocks of ``numel`` weights (float32)."""
    return 4 * math.ceil(numel / block_size) * block_size * block_size


class OBert(Criterion):
    """Block-diagonal empirical-Fisher importance and OBS weight update."""

    name = "obert"
    needs = frozenset({"gradients"})
    Options = OBertOptions
    updates_weights = True

    def __init__(self, options: OBertOptions | None = None):
        self.options = options if options is not None else OBertOptions()
        self.fisher: dict[str, torch.Tensor] = {}  # Σ g gᵀ per block (blocks, B, B)
        self.num_observed = 0
        self._inverse: dict[str, torch.Tensor] = {}  # F⁻¹ per block, between scores and update
        self._weights: dict[str, torch.Tensor] = {}

    @property
    def observation_window(self) -> int:
        return self.options.num_grads

    def detach(self) -> None:
        self.fisher, self._inverse, self._weights = {}, {}, {}
        self.num_observed = 0

    @torch.no_grad()
    def observe_gradients(self, params: Mapping[str, nn.Parameter]) -> None:
        b = self.options.block_size
        for name, p in params.items():
            if name not in self.fisher:
                nb = math.ceil(p.numel() / b)
                self.fisher[name] = torch.zeros(nb, b, b, dtype=torch.float32, device=p.device)
            if p.grad is None:
                continue  # a zero gradient adds nothing
            g = blocks_of(p.grad.detach().float(), b)
            self.fisher[name].baddbmm_(g.unsqueeze(2), g.unsqueeze(1))
        self.num_observed += 1

    @torch.no_grad()
    def _invert(self, name: str) -> torch.Tensor:
        """F⁻¹ of every block of ``name``, computed in place of the accumulated Σ g gᵀ."""
        acc = self.fisher.pop(name)
        b = self.options.block_size
        eye = torch.eye(b, dtype=torch.float64, device=acc.device)
        for start in range(0, acc.shape[0], _INVERT_CHUNK):
            chunk = acc[start : start + _INVERT_CHUNK]
            f = chunk.double() / self.num_observed + self.options.damping * eye
            chunk.copy_(torch.linalg.inv(f))
        return acc

    @torch.no_grad()
    def scores(self, params, masks):
        if self.num_observed == 0:
            raise SparseBertError(
                "criterion obert has observed no gradients: it needs backward passes before its "
                "first pruning step (in a recipe, schedule.start > 0; in one-shot, calibration batches "
                "with labels)"
            )
        self._inverse, self._weights = {}, {}
        out = {}
        for name, p in params.items():
            if name not in self.fisher:
                raise SparseBertError(f"criterion obert has no gradients of '{name}'")
            inverse = self._invert(name)
            diag = inverse.diagonal(dim1=1, dim2=2).reshape(-1)[: p.numel()].view(p.shape)
            w = p.detach().float()
            out[name] = w.pow(2) / (2.0 * diag)
            self._inverse[name] = inverse
            self._weights[name] = w.clone()
        # the next observation starts a new window
        self.fisher, self.num_observed = {}, 0
        return out

    @torch.no_grad()
    def update_weights(self, params, masks):
        """δw = -Σ_{q pruned} F⁻¹ e_q w_q / [F⁻¹]_qq per block (weights as scored), then the
        pruned weights are zeroed by the caller's masks."""
        b = self.options.block_size
        for name, p in params.items():
            inverse = self._inverse.pop(name, None)
            w = self._weights.pop(name, None)
            if inverse is None or w is None:
                continue
            pruned = ~masks[name].to(device=w.device, dtype=torch.bool)
            diag = inverse.diagonal(dim1=1, dim2=2)
            z = blocks_of(torch.where(pruned, w, torch.zeros_like(w)), b) / diag
            delta = -torch.bmm(inverse, z.unsqueeze(2)).reshape(-1)[: w.numel()].view(w.shape)
            p.copy_((w + delta).masked_fill(pruned, 0.0).to(p.dtype))
        self._inverse, self._weights = {}, {}


CRITERIA.register("obert", OBert)

__all__ = ["OBert", "OBertOptions", "blocks_of", "fisher_memory_bytes"]
