"""Exact sparsity by count, and masks that hold through real optimizer steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsebert.allocation import masks_from_scores, n_pruned, topk_mask
from sparsebert.errors import SparseBertError
from sparsebert.masks import FixedMasks
from sparsebert.methods.gradual import GradualPruner as GradualMagnitudePruner
from sparsebert.methods.gradual import ranked_scores as magnitude_scores
from sparsebert.schedules import GradualSchedule


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(37, 53, generator=g), "b": torch.randn(64, 17, generator=g) * 3,
            "c": torch.randn(5, 7, generator=g)}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.8, 0.9, 0.97])
def test_global_exact_count(sparsity):
    scores = _scores()
    masks = masks_from_scores(scores, sparsity, "global")
    total = sum(s.numel() for s in scores.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(sparsity * total)
    # global: every kept score >= every pruned score
    flat_s = torch.cat([scores[n].flatten() for n in scores])
    flat_m = torch.cat([masks[n].flatten() for n in scores])
    if 0 < pruned < total:
        assert flat_s[flat_m].min() >= flat_s[~flat_m].max()


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_uniform_exact_count_per_matrix(sparsity):
    scores = _scores(1)
    masks = masks_from_scores(scores, sparsity, "uniform")
    for name, m in masks.items():
        assert int((~m).sum()) == n_pruned(m.numel(), sparsity)
        assert scores[name][m].min() >= scores[name][~m].max()


def test_ties_do_not_change_the_count():
    # 1000 equal scores: a threshold would keep all or none; counts keep exactly 100
    scores = {"w": torch.ones(10, 100)}
    for alloc in ("global", "uniform"):
        m = masks_from_scores(scores, 0.9, alloc)["w"]
        assert int(m.sum()) == 100
    # partial ties across the boundary
    s = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert int(topk_mask(s, 3).sum()) == 3
    assert topk_mask(s, 3)[0]


def test_bad_sparsity_and_allocation():
    with pytest.raises(SparseBertError, match=r"\[0, 1\)"):
        masks_from_scores(_scores(), 1.0)
    with pytest.raises(SparseBertError, match="did you mean 0.9"):
        masks_from_scores(_scores(), 90)
    with pytest.raises(SparseBertError, match="unknown allocation"):
        masks_from_scores(_scores(), 0.5, "layerwise")


def test_pruned_weights_stay_zero_through_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    pruner = GradualMagnitudePruner(params, GradualSchedule(0.8, init_sparsity=0.5), "global")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner.masks.register_grad_hooks()

    def step():
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        for n, p in params.items():
            assert torch.all(p.grad[~pruner.masks.masks[n]] == 0), "grad of a pruned weight"
        opt.step()
        opt.zero_grad()

    for _ in range(3):  # dense steps build up Adam moments everywhere
        step()
    pruner.prune_to(0.8, opt)
    for n, p in params.items():
        st = opt.state[p]
        assert torch.all(st["exp_avg"][~pruner.masks.masks[n]] == 0)
        assert torch.all(st["exp_avg_sq"][~pruner.masks.masks[n]] == 0)
    for _ in range(5):  # no re-application between steps: zeros must survive on their own
        step()
    for n, p in params.items():
        assert torch.all(p[~pruner.masks.masks[n]] == 0)
    assert pruner.masks.sparsity() == pytest.approx(round(0.8 * (512 + 128)) / 640)


def test_masks_only_shrink_and_pruned_rank_last():
    w = nn.Parameter(torch.randn(20, 20))
    fm = FixedMasks({"w": w})
    fm.set_masks(masks_from_scores(magnitude_scores(fm), 0.5))
    first = fm.masks["w"].clone()
    with torch.no_grad():
        w.add_(torch.randn_like(w) * 0.01)  # kept weights move; pruned stay 0 after apply
    fm.apply_()
    fm.set_masks(masks_from_scores(magnitude_scores(fm), 0.75))
    assert not torch.any(fm.masks["w"] & ~first), "a pruned weight was revived"


def test_masks_save_load_roundtrip(tmp_path):
    w = nn.Parameter(torch.randn(8, 8))
    fm = FixedMasks({"w": w})
    fm.set_masks(masks_from_scores({"w": torch.randn(8, 8)}, 0.6))
    fm.save(str(tmp_path))
    other = FixedMasks({"w": nn.Parameter(torch.randn(8, 8))})
    other.load(str(tmp_path))
    assert other.digest() == fm.digest()
    with pytest.raises(SparseBertError, match="no masks.safetensors"):
        other.load(str(tmp_path / "nowhere"))
