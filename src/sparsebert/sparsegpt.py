"""SparseGPT (Frantar & Alistarh 2023): prune one linear layer so that its outputs on the
calibration inputs change as little as possible, updating the weights that stay.

For a layer y = W x with calibration inputs X (features x tokens), the layer-wise loss
||W X - Ŵ X||² has Hessian H = 2 X Xᵀ (damped: + λ I, λ = ``damp`` · mean diag H). The
columns (input features) are processed left to right in blocks of ``block_size``: in each
block the mask is chosen from w_ij² / [H_{F_j}⁻¹]_jj (the OBS error of dropping w_ij given the
columns still free, read off the upper Cholesky factor U of H⁻¹ as U_jj²: adaptive per block,
since earlier blocks' updates have already moved these weights), then column by column the
pruned weights are dropped and their error is spread over the remaining columns of the
block (w_{:, j+1..} -= e_j U_{j, j+1..} with e_j = (w_j - ŵ_j) / U_jj); the block's
accumulated error is applied to the later columns at once (lazy batch update).

Counts are exact: block b prunes round(s·R·c_b) - round(s·R·c_{b-1}) weights (R rows, c_b the
columns up to the end of block b), so the layer prunes exactly round(s·R·C). With a pattern
N:M, every group of M consecutive columns keeps, in every row, the N weights with the
largest w²/U_jj² at the time the group is reached.

With ``pruned`` (the weights an earlier pruning step removed; gradual use, see
`sparsebert.gradual_sparsegpt`) those weights are dropped first in their block (they are zero,
but the OBS updates of earlier columns would otherwise move them off zero and revive them),
and each block prunes at least them: the layer prunes round(s·R·C) weights, or more where a
block already holds more pruned weights than its share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsebert.activations import all_reduce_sum, tokens
from sparsebert.allocation import check_pattern_shape, n_pruned
from sparsebert.errors import SparseBertError, check_sparsity


@dataclass
class SparseGPTOptions:
    """SparseGPT's settings (the reference's defaults)."""

    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise SparseBertError(
                f"sparsegpt option block_size must be a positive integer, got {self.block_size!r}"
            )
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or self.damp < 0:
            raise SparseBertError(f"sparsegpt option damp must be a number >= 0, got {self.damp!r}")
        self.damp = float(self.damp)


@dataclass
class OneShotSparseGPTOptions(SparseGPTOptions):
    """One-shot SparseGPT's settings. ``true_sequential`` (the reference's ``--true-sequential``):
    within each encoder layer the linears are pruned in the order they run (Q/K/V together,
    attention output, FFN in, FFN out), each group's Hessian taken from inputs that went
    through the groups pruned before it; off (the default): every linear of a layer from the
    layer's unpruned pass, one pass per layer. Off by default on the evidence: on SST-2
    (MiniLM, bench/results/accuracy.md) it gained 1.0 point at 70% but lost 0.7 at 50%,
    1.0 at 80%, 6.1 at 90% and 0.5 at 2:4."""

    true_sequential: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.true_sequential, bool):
            raise SparseBertError(
                f"sparsegpt option true_sequential must be true or false, got {self.true_sequential!r}"
            )


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ I)⁻¹ (H⁻¹ = Uᵀ U), in float64; the damping grows
    tenfold until H is positive definite."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0  # an input feature that is always zero
    h[dead, dead] = 1.0
    mean = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * mean
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        lam = max(lam * 10, 1e-8 * mean + 1e-12)
    raise SparseBertError("sparsegpt: the calibration Hessian is not positive definite even with damping")


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    options: SparseGPTOptions | None = None,
    pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune ``weight`` (rows x columns, in place) with SparseGPT given ``hessian`` (columns x
    columns, e.g. 2 X Xᵀ / tokens); return the mask (True = kept). ``pruned`` (rows x
    columns, True = already pruned) stay pruned."""
    opts = options or SparseGPTOptions()
    check_sparsity(sparsity)
    rows, cols = weight.shape
    if pattern is not None:
        n, m = pattern
        check_pattern_shape("weight", weight.shape, n, m)
        if opts.block_size % m:
            raise SparseBertError(f"sparsegpt block_size {opts.block_size} is not a multiple of M = {m}")
    if hessian.shape != (cols, cols):
        raise SparseBertError(f"hessian has shape {tuple(hessian.shape)}, expected {(cols, cols)}")
    if pruned is not None and pruned.shape != weight.shape:
        raise SparseBertError(f"pruned has shape {tuple(pruned.shape)}, expected {tuple(weight.shape)}")
    if pruned is not None and pattern is not None:
        raise SparseBertError("sparsegpt: an N:M pattern on top of earlier pruned weights is not supported")
    # transposed (columns x rows): column j of W is the contiguous row j here
    wt = weight.detach().float().t().contiguous()
    upper = _inverse_cholesky(hessian, opts.damp).float()
    keep = torch.ones(cols, rows, dtype=torch.bool, device=wt.device)
    before = None if pruned is None else pruned.t().to(device=wt.device, dtype=torch.bool)
    total = rows * cols
    for i1 in range(0, cols, opts.block_size):
        i2 = min(i1 + opts.block_size, cols)
        count = i2 - i1
        w1 = wt[i1:i2]  # a view: updated in place
        u1 = upper[i1:i2, i1:i2]
        d1 = torch.diagonal(u1).unsqueeze(1)
        keep1 = keep[i1:i2]
        if pattern is None:
            k = n_pruned(total, sparsity * i2 / cols) - n_pruned(total, sparsity * i1 / cols)
            score = (w1.pow(2) / d1.pow(2)).reshape(-1)
            if before is not None:
                gone = before[i1:i2].reshape(-1)
                score = score.masked_fill(gone, float("-inf"))
                k = max(k, int(gone.sum()))
            if k > 0:
                keep1.view(-1)[torch.topk(score, k, largest=False, sorted=False).indices] = False
        scale = (~keep1).float() / d1  # e_j = w_j (pruned part) / U_jj
        err1 = torch.empty_like(w1)
        for i in range(count):
            if pattern is not None and i % m == 0:
                score = w1[i : i + m].pow(2) / d1[i : i + m].pow(2)
                drop = torch.topk(score, m - n, dim=0, largest=False, sorted=False).indices
                keep1[i : i + m].scatter_(0, drop, False)
                scale[i : i + m] = (~keep1[i : i + m]).float() / d1[i : i + m]
            torch.mul(w1[i], scale[i], out=err1[i])
            if i + 1 < count:
                w1[i + 1 :].addr_(u1[i, i + 1 :], err1[i], alpha=-1.0)
        if i2 < cols:
            wt[i2:].addmm_(upper[i1:i2, i2:].t(), err1, alpha=-1.0)
    mask = keep.t().contiguous()
    weight.copy_(wt.masked_fill(~keep, 0.0).t().to(weight.dtype))
    return mask


class HessianHooks:
    """H = 2 X Xᵀ / tokens of every hooked linear's input (padding left out); computed once per
    distinct input tensor of a forward pass (Q, K and V read the same one). With ``model``
    given, the per-forward cache is cleared after each of its forward passes (training use);
    otherwise call `end_call`. Nothing is accumulated while ``active`` is False."""

    def __init__(self, modules: Mapping[str, nn.Linear], model: nn.Module | None = None):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.active = True
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._modules = dict(modules)
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]
        if model is not None:
            self._handles.append(model.register_forward_hook(lambda *_: self.end_call(), always_call=True))

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.active:
                return
            x = args[0]
            hit = self._cache.get(id(x))
            if hit is None or hit[0] is not x:
                t = tokens(x)
                hit = (x, t.T @ t, t.shape[0])
                self._cache[id(x)] = hit
            self.sums[name] = self.sums[name] + hit[1] if name in self.sums else hit[1].clone()
            self.tokens[name] = self.tokens.get(name, 0) + hit[2]

        return hook

    def end_call(self) -> None:
        self._cache.clear()

    def observed(self, name: str) -> int:
        """Tokens seen by ``name`` (summed over the processes of a distributed run)."""
        return int(all_reduce_sum(torch.tensor([float(self.tokens.get(name, 0))], dtype=torch.float64)))

    def hessian(self, name: str, count: int | None = None) -> torch.Tensor:
        """2 X Xᵀ / tokens over everything seen (summed over the processes of a distributed run);
        ``count``: `observed` already taken by the caller."""
        count = self.observed(name) if count is None else count
        if not count:
            raise SparseBertError(f"sparsegpt: no calibration tokens reached '{name}'")
        mine = self.sums.get(name)
        if mine is None:  # this process saw none of the tokens the others saw
            n = self._modules[name].in_features
            mine = torch.zeros(n, n, device=self._modules[name].weight.device)
        return 2.0 * all_reduce_sum(mine) / float(count)

    def reset(self) -> None:
        """Start new statistics (the weights, and so the inputs, have moved)."""
        self.sums, self.tokens = {}, {}
        self._cache.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._cache.clear()


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - Ŵ X||² for inputs ``x`` (tokens x features)."""
    return float((x.float() @ (weight.float() - pruned.float()).T).pow(2).sum())


__all__ = ["HessianHooks", "OneShotSparseGPTOptions", "SparseGPTOptions", "reconstruction_error",
           "sparsegpt_prune_"]
