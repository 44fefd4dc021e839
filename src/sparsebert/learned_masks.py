"""Learned masks in the forward pass: W ⊙ M(S) with a straight-through binariser.

The mechanism of movement pruning, SMP and SRNets mask training. Every targeted matrix W gets
a score tensor S of its shape; the forward pass uses W ⊙ M(S), where M binarises S:

- ``topk``: keep exactly ``round(v·n)`` highest scores of the matrix (keep fraction v);
- ``threshold``: keep where S > φ (SRNets' real-valued mask m̂ > φ);
- ``sigmoid-threshold``: keep where σ(S) > τ (soft movement pruning).

All three use the straight-through estimator: the binarisation is treated as the identity
in the backward pass, so dL/dS = dL/dM = dL/d(W⊙M) ⊙ W — for movement pruning this *is* the
movement score (weights moving away from zero gain score).

Why ``torch.nn.utils.parametrize`` and not forward hooks or replacing modules: a
parametrisation works for any module and any parameter name (Linear, Embedding, a classifier
head) because the module keeps reading ``self.weight``; the original Parameter object is
kept (so optimizers, weight tying checks and ``requires_grad`` behave as before); the scores
are ordinary Parameters of the model, so the Trainer's optimizer, checkpoints and resume
carry them without any extra code; and baking is ``remove_parametrizations(...,
leave_parametrized=True)``, which writes W ⊙ M into that same Parameter and leaves a plain
Hugging Face model. Hooks cannot change the weight a Linear multiplies by without
re-implementing its forward, and module replacement needs one class per module type.

Mid-training checkpoints therefore hold ``...weight.original`` and ``...weight.0.scores``
(everything needed to resume); the final model is baked and loads with plain transformers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from sparsebert.allocation import masks_from_scores, n_pruned, topk_mask
from sparsebert.errors import SparseBertError, check_sparsity

BINARIZERS = ("topk", "threshold", "sigmoid-threshold")
SCORE_INITS = ("zeros", "magnitude", "magnitude-scaled", "magnitude-hard", "magnitude-soft")


class _StepCounter:
    """Counts optimizer steps of every torch optimizer in the process.

    Why: a cached mask must be recomputed when its scores change, and the scores change in
    ``optimizer.step()``. ``Tensor._version`` does not see every update: the fused AdamW
    kernels (the Trainer's default optimizer) write the parameters without bumping it, so a
    cache keyed on it alone froze the masks. A global step post-hook sees every optimizer
    that subclasses `torch.optim.Optimizer`, fused or not, in the Trainer or a plain loop;
    `LearnedMasks.invalidate` covers anything else.
    """

    value = 0

    @classmethod
    def bump(cls, *_args) -> None:
        cls.value += 1


register_optimizer_step_post_hook(_StepCounter.bump)


# -- binarisers ---------------------------------------------------------------------------------
class _StraightThrough(torch.autograd.Function):
    """Forward: the precomputed binary mask. Backward: the gradient passes to S unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
        return binary

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def binary_mask(scores: torch.Tensor, binarizer: str, keep: int, threshold: float) -> torch.Tensor:
    """The boolean mask a binariser gives for ``scores`` (no autograd)."""
    s = scores.detach()
    if binarizer == "topk":
        return topk_mask(s, keep)
    if binarizer == "threshold":
        return s > threshold
    if binarizer == "sigmoid-threshold":
        return torch.sigmoid(s) > threshold
    raise SparseBertError(f"unknown binarizer '{binarizer}': use one of {', '.join(BINARIZERS)}")


def binarize(scores: torch.Tensor, binarizer: str, keep: int = 0, threshold: float = 0.0) -> torch.Tensor:
    """M(S) as a float tensor with the straight-through gradient (dL/dS = dL/dM).

    ``topk`` keeps exactly ``keep`` scores (the caller turns a keep fraction v into
    ``round(v·n)``), ``threshold`` keeps S > ``threshold``, ``sigmoid-threshold`` keeps
    σ(S) > ``threshold``; in every case the backward pass is the identity.
    """
    binary = binary_mask(scores, binarizer, keep, threshold).to(scores.dtype)
    return _StraightThrough.apply(scores, binary)


class ScoreMask(nn.Module):
    """The parametrisation W -> W ⊙ M(S) of one matrix; holds its scores S.

    ``binarizer`` may change during training (a final exact top-k phase), ``keep`` (a count)
    and ``threshold`` follow the method's schedule. The binary mask is cached per version of
    S and of the process's optimizer steps, so it is computed once per optimizer step (and
    once for a whole evaluation), not once per forward; the straight-through function
    re-attaches the gradient path to S.
    """

    def __init__(self, scores: torch.Tensor, binarizer: str, keep: int, threshold: float = 0.0):
        super().__init__()
        if binarizer not in BINARIZERS:
            raise SparseBertError(f"unknown binarizer '{binarizer}': use one of {', '.join(BINARIZERS)}")
        self.scores = nn.Parameter(scores.detach().clone().float())
        self.binarizer = binarizer
        # buffers, so that checkpoints carry them and a resumed run has the same masks
        self.register_buffer("keep_count", torch.tensor(int(keep), dtype=torch.int64))
        self.register_buffer("threshold_value", torch.tensor(float(threshold), dtype=torch.float64))
        self.fixed: torch.Tensor | None = None  # a frozen mask (set just before baking)
        self._cache: tuple | None = None
        self._generation = 0  # bumped by `invalidate`

    @property
    def numel(self) -> int:
        return self.scores.numel()

    @property
    def keep(self) -> int:
        return int(self.keep_count)

    @keep.setter
    def keep(self, value: int) -> None:
        self.keep_count.fill_(int(value))

    @property
    def threshold(self) -> float:
        return float(self.threshold_value)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.threshold_value.fill_(float(value))

    def invalidate(self) -> None:
        """Forget the cached mask (the scores were changed by something the cache cannot see)."""
        self._generation += 1

    def current_mask(self) -> torch.Tensor:
        """The boolean mask in force (cached until S, the binariser or its parameter change, or
        any optimizer steps)."""
        if self.fixed is not None:
            return self.fixed
        key = (_StepCounter.value, self._generation, self.scores._version, self.scores.data_ptr(),
               self.binarizer, self.keep, self.threshold)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, binary_mask(self.scores, self.binarizer, self.keep, self.threshold))
        return self._cache[1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        binary = self.current_mask().to(dtype=weight.dtype, device=weight.device)
        if self.fixed is not None or not torch.is_grad_enabled() or not self.scores.requires_grad:
            return weight * binary
        return weight * _StraightThrough.apply(self.scores, binary)


# -- initial scores -------------------------------------------------------------------------------
def initial_scores(
    weight: torch.Tensor, init: str, sparsity: float, threshold: float
) -> tuple[torch.Tensor, float]:
    """Scores to start from and the threshold that goes with them.

    ``zeros``: S = 0 (movement, SMP: every score equal, the schedule starts fully dense);
    ``magnitude``: S = |W|; ``magnitude-scaled``: S = |W| / mean |W| of the matrix, so that
    the first masks are the magnitude masks and the scores sit on a scale (mean 1, the 90th
    percentile of Gaussian weights near 2) that a score learning rate of ~1e-2 can reorder
    within a few hundred steps — from zeros, the first keep ratios below 1 cut by a few steps
    of noisy gradients, which is what collapsed short runs from a pretrained model
    (`bench/results/accuracy.md`); ``magnitude-hard`` (SRNets): m̂ = 2φ where the magnitude
    mask at ``sparsity`` keeps, 0 elsewhere, threshold φ; ``magnitude-soft`` (SRNets): m̂ = |W|,
    threshold φ = the k-th smallest magnitude (k = weights to prune), so m̂ > φ is exactly
    the magnitude mask (ties aside).
    """
    w = weight.detach().float()
    if init == "zeros":
        return torch.zeros_like(w), threshold
    if init == "magnitude":
        return w.abs(), threshold
    if init == "magnitude-scaled":
        a = w.abs()
        return a / a.mean().clamp_min(torch.finfo(a.dtype).tiny), threshold
    k = n_pruned(w.numel(), sparsity)
    if init == "magnitude-hard":
        keep = topk_mask(w.abs(), w.numel() - k)
        return torch.where(keep, torch.full_like(w, 2.0 * threshold), torch.zeros_like(w)), threshold
    if init == "magnitude-soft":
        phi = float(w.abs().reshape(-1).kthvalue(k).values) if k > 0 else -1.0
        return w.abs(), phi
    raise SparseBertError(f"unknown score init '{init}': use one of {', '.join(SCORE_INITS)}")


def matrix_type(name: str) -> str:
    """The name with its layer index replaced by '*': groups Q (K, V, ...) of all layers."""
    return re.sub(r"\.(\d+)\.", ".*.", name, count=1)


def _by_type(names) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(matrix_type(name), []).append(name)
    return groups


def smp_s_keep_ratios(
    scores: Mapping[str, torch.Tensor], keep: float, temperature: float = 1.0
) -> dict[str, float]:
    """SMP-S: v_i = v · L · mean σ(S_i/p) / Σ_j mean σ(S_j/p) within each matrix type.

    Ratios above 1 are capped and the excess is given to the other layers of the type in
    proportion to their shares (water-filling), so the average keep ratio of every type
    stays exactly v.
    """
    out: dict[str, float] = {}
    for names in _by_type(scores).values():
        share = {n: float(torch.sigmoid(scores[n].detach().float() / temperature).mean()) for n in names}
        free, budget = list(names), keep * len(names)
        while free:
            total = sum(share[n] for n in free)
            ratios = {n: (budget * share[n] / total if total > 0 else budget / len(free)) for n in free}
            over = [n for n in free if ratios[n] > 1.0]
            if not over:
                out.update(ratios)
                break
            for n in over:
                out[n] = 1.0
                budget -= 1.0
                free.remove(n)
    return out


def keep_counts(numels: Mapping[str, int], ratios: Mapping[str, float]) -> dict[str, int]:
    """Integer keep counts per matrix whose total is the rounded total of ``ratio·n``.

    Largest-remainder rounding, so that per-type averages (SMP-S) are exact by count, not
    just on average; with one ratio for all matrices of one size this is round(v·n) each.
    """
    exact = {n: ratios[n] * numels[n] for n in numels}
    counts = {n: int(exact[n]) for n in numels}
    target = int(round(sum(exact.values())))
    order = sorted(numels, key=lambda n: exact[n] - counts[n], reverse=True)
    for n in order[: max(0, target - sum(counts.values()))]:
        counts[n] += 1
    return {n: min(counts[n], numels[n]) for n in numels}


# -- the set of learned masks of one model ------------------------------------------------------------
class LearnedMasks:
    """Attaches a `ScoreMask` to every targeted parameter and bakes them at the end."""

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        binarizer: str = "topk",
        init: str = "zeros",
        threshold: float = 0.0,
        init_sparsity: float = 0.0,
    ):
        if binarizer not in BINARIZERS:
            raise SparseBertError(f"unknown binarizer '{binarizer}': use one of {', '.join(BINARIZERS)}")
        check_sparsity(init_sparsity, "initial sparsity of the scores")
        self.model = model
        self.binarizer = binarizer
        self.masks: dict[str, ScoreMask] = {}
        self.modules: dict[str, tuple[nn.Module, str]] = {}
        owners: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(name)
        for name, p in params.items():
            if len(owners.get(id(p), [])) > 1:
                raise SparseBertError(
                    f"'{name}' is tied to {[o for o in owners[id(p)] if o != name]}: learned masks on "
                    "tied weights are not supported (drop it from the targets, e.g. keep embeddings dense)"
                )
            module_name, attr = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            scores, thr = initial_scores(p, init, init_sparsity, threshold)
            keep = p.numel() - n_pruned(p.numel(), init_sparsity)
            mask = ScoreMask(scores.to(p.device), binarizer, keep, thr)
            parametrize.register_parametrization(module, attr, mask, unsafe=True)
            self.masks[name] = mask
            self.modules[name] = (module, attr)
        self.baked = False

    # -- state ----------------------------------------------------------------------------------
    def score_parameters(self) -> list[nn.Parameter]:
        return [m.scores for m in self.masks.values()]

    def scores(self) -> dict[str, torch.Tensor]:
        return {n: m.scores.detach() for n, m in self.masks.items()}

    def numels(self) -> dict[str, int]:
        return {n: m.numel for n, m in self.masks.items()}

    def original(self, name: str) -> nn.Parameter:
        """The unmasked weight Parameter of a target."""
        module, attr = self.modules[name]
        return module.parametrizations[attr].original

    def invalidate(self) -> None:
        """Recompute every mask at the next forward (after a step of an optimizer that is not a
        `torch.optim.Optimizer`; torch optimizers are seen by a global step hook)."""
        for m in self.masks.values():
            m.invalidate()

    def current_masks(self) -> dict[str, torch.Tensor]:
        return {n: m.current_mask() for n, m in self.masks.items()}

    def sparsity(self) -> float:
        """Fraction of masked-out weights over all targets, as the forward pass sees it now."""
        total = sum(m.numel for m in self.masks.values())
        kept = sum(int(m.current_mask().sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.masks):
            h.update(name.encode())
            h.update(self.masks[name].current_mask().cpu().numpy().tobytes())
        return h.hexdigest()

    # -- driving ----------------------------------------------------------------------------------
    def set_keep_counts(self, counts: Mapping[str, int]) -> None:
        for name, k in counts.items():
            self.masks[name].keep = int(k)

    def set_keep_ratio(self, keep: float, allocation: str = "uniform", temperature: float = 1.0) -> None:
        """TopK keep ratio v for the masks: the same per matrix (``uniform``), ranked over all
        scores together (``global``), or redistributed per matrix type (``smp-s``)."""
        if allocation == "uniform":  # the same count rule as allocation.masks_from_scores
            self.set_keep_counts({n: m.numel - n_pruned(m.numel, 1.0 - keep) for n, m in self.masks.items()})
            return
        if allocation == "smp-s":  # counts rounded within each matrix type: its average stays v
            ratios = smp_s_keep_ratios(self.scores(), keep, temperature)
            numels = self.numels()
            for names in _by_type(numels).values():
                self.set_keep_counts(keep_counts({n: numels[n] for n in names}, ratios))
            return
        if allocation == "global":
            chosen = masks_from_scores(self.scores(), 1.0 - keep if keep < 1.0 else 0.0, "global")
            self.set_keep_counts({n: int(m.sum()) for n, m in chosen.items()})
            return
        raise SparseBertError(f"unknown allocation '{allocation}' for learned masks")

    def set_threshold(self, threshold: float | Mapping[str, float]) -> None:
        for name, m in self.masks.items():
            m.threshold = float(threshold[name] if isinstance(threshold, Mapping) else threshold)

    def set_binarizer(self, binarizer: str) -> None:
        if binarizer not in BINARIZERS:
            raise SparseBertError(f"unknown binarizer '{binarizer}'")
        for m in self.masks.values():
            m.binarizer = binarizer

    @torch.no_grad()
    def recalibrate_thresholds(self, sparsity: float) -> None:
        """Re-set each matrix's φ so that m̂ > φ prunes exactly ``round(s·n)`` weights (SRNets'
        gradual sparsity: φ = the k-th smallest m̂).

        Ties are ranked by |W| (the magnitude the masks started from): with the hard init
        all kept m̂ are equal, and a k-th-value threshold would prune all or none of them.
        When ties straddle the boundary, φ is put just below the smallest kept m̂ and the
        tied pruned m̂ are lowered to φ (a change of one float step), so the count is exact.
        """
        if self.binarizer != "threshold":
            raise SparseBertError("threshold recalibration needs the threshold binarizer")
        for name, m in self.masks.items():
            k = n_pruned(m.numel, sparsity)
            flat = m.scores.data.view(-1)
            magnitude = self.original(name).detach().abs().reshape(-1).float()
            by_magnitude = torch.argsort(magnitude, descending=True, stable=True)
            order = by_magnitude[torch.argsort(flat[by_magnitude], descending=True, stable=True)]
            kept, pruned = order[: m.numel - k], order[m.numel - k:]
            if len(kept) == 0:
                m.threshold = float(flat.max())
                continue
            hi = flat[kept].min()
            lo = flat[pruned].max() if len(pruned) else None
            if lo is not None and lo < hi:
                m.threshold = float(lo)
                continue
            phi = torch.nextafter(hi, torch.tensor(float("-inf"), dtype=hi.dtype))
            if len(pruned):
                flat[pruned] = torch.minimum(flat[pruned], phi)
            m.threshold = float(phi)

    def penalty(self, temperature: float = 1.0) -> torch.Tensor:
        """Mean over matrices of ||σ(S/p)||_1 / numel (SMP's and soft movement's L1 term)."""
        terms = [torch.sigmoid(m.scores / temperature).mean() for m in self.masks.values()]
        return torch.stack(terms).mean()

    def freeze_scores(self) -> None:
        for m in self.masks.values():
            m.scores.requires_grad_(False)

    # -- finishing ----------------------------------------------------------------------------------
    def exact_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Exact top-k by count of the learned scores at ``sparsity``, per matrix."""
        return {n: topk_mask(m.scores.detach(), m.numel - n_pruned(m.numel, sparsity))
                for n, m in self.masks.items()}

    def bake(self, final_masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Write W ⊙ M into each weight Parameter and remove the parametrisations.

        ``final_masks`` (e.g. `exact_masks`) replace the binariser's current masks. Returns
        the sparsity the binariser itself gave just before baking and the baked sparsity.
        """
        if self.baked:
            raise SparseBertError("the learned masks were already baked into the weights")
        raw = self.sparsity()
        for name, m in self.masks.items():
            if final_masks is not None:
                m.fixed = final_masks[name].to(device=m.scores.device, dtype=torch.bool)
            else:
                m.fixed = m.current_mask().clone()
        total = sum(m.numel for m in self.masks.values())
        kept = sum(int(m.fixed.sum()) for m in self.masks.values())
        for module, attr in self.modules.values():
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        self.baked = True
        return {"binarizer_sparsity": raw, "baked_sparsity": 1.0 - kept / total if total else 0.0}


__all__ = [
    "BINARIZERS",
    "LearnedMasks",
    "ScoreMask",
    "binarize",
    "binary_mask",
    "initial_scores",
    "keep_counts",
    "matrix_type",
    "smp_s_keep_ratios",
]
