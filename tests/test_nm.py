"""N:M semi-structured masks: exact on random and tied scores, the per-row allocation, a
gradual schedule that ramps to an exact 2:4, the recipe key and the sparsity report."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert

from sparsebert.allocation import is_nm, masks_from_scores, n_pruned, nm_mask, parse_pattern
from sparsebert.errors import SparseBertError
from sparsebert.methods.gradual import GradualPruner
from sparsebert.recipe import load_recipe
from sparsebert.report import format_report, sparsity_report
from sparsebert.schedules import GradualSchedule
from sparsebert.targets import select_targets


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_best_of_every_m(n, m):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 64, generator=g)
    mask = nm_mask(scores, n, m)
    groups_s, groups_m = scores.reshape(-1, m), mask.reshape(-1, m)
    assert bool((groups_m.sum(1) == n).all())
    for s, k in zip(groups_s, groups_m, strict=True):  # the kept ones are the group's n largest
        assert set(torch.nonzero(k).flatten().tolist()) == set(torch.topk(s, n).indices.tolist())
    assert is_nm(scores * mask, n, m)


def test_nm_mask_is_exact_on_ties_and_inf():
    assert bool((nm_mask(torch.ones(8, 16), 2, 4).reshape(-1, 4).sum(1) == 2).all())
    s = torch.tensor([[float("-inf"), float("-inf"), 1.0, 1.0, 3.0, 3.0, 3.0, 0.0]])
    mask = nm_mask(s, 2, 4)[0]
    assert mask[:4].tolist() == [False, False, True, True]  # -inf (already pruned) goes first
    assert int(mask[4:7].sum()) == 2 and not mask[7]  # three tied for two places: exactly two


def test_nm_errors():
    with pytest.raises(SparseBertError, match="multiple of 4"):
        nm_mask(torch.randn(3, 6), 2, 4)
    with pytest.raises(SparseBertError, match="0 < N < M"):
        parse_pattern("4:4")
    with pytest.raises(SparseBertError, match="N:M"):
        parse_pattern("2-4")
    with pytest.raises(SparseBertError, match="above"):
        masks_from_scores({"w": torch.randn(4, 8)}, 0.6, "uniform", pattern="2:4")
    assert parse_pattern(" 2 : 4 ") == (2, 4)


@pytest.mark.parametrize("allocation", ["global", "uniform", "per-row"])
def test_pattern_below_its_sparsity_protects_the_n_best(allocation):
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.randn(8, 32, generator=g), "b": torch.randn(16, 8, generator=g) * 2}
    for s in (0.1, 0.3, 0.5):
        masks = masks_from_scores(scores, s, allocation, pattern="2:4")
        for name, mask in masks.items():
            best = nm_mask(scores[name], 2, 4)
            assert bool(mask[best].all()), "one of a group's 2 best was pruned"
            assert bool(((~mask).reshape(-1, 4).sum(1) <= 2).all())
        if s == 0.5:
            assert all(torch.equal(masks[n], nm_mask(scores[n], 2, 4)) for n in scores)
        elif allocation == "global":
            total = sum(x.numel() for x in scores.values())
            assert sum(int((~m).sum()) for m in masks.values()) == n_pruned(total, s)


def test_per_row_allocation_is_exact_per_row():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(12, 30, generator=g)
    mask = masks_from_scores({"w": s}, 0.7, "per-row")["w"]
    assert bool(((~mask).sum(1) == n_pruned(30, 0.7)).all())
    for row, keep in zip(s, mask, strict=True):
        assert row[keep].min() >= row[~keep].max()
    tied = masks_from_scores({"w": torch.ones(4, 10)}, 0.5, "per-row")["w"]
    assert bool((tied.sum(1) == 5).all())


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_gradual_pruner_ramps_to_an_exact_2_4(allocation):
    model = tiny_bert()
    params = select_targets(model, "encoder-linears")
    schedule = GradualSchedule(0.5, init_sparsity=0.1, start=0.0, end=0.8, frequency=0.2)
    pruner = GradualPruner(params, schedule, allocation, pattern="2:4")
    total = 50
    seen = []
    for step in range(total):
        if pruner.maybe_prune(step, total):
            seen.append(pruner.masks.sparsity())
            for m in pruner.masks.masks.values():  # never more than M - N of a group pruned
                assert bool(((~m).reshape(-1, 4).sum(1) <= 2).all())
    assert len(seen) > 2 and seen == sorted(seen) and seen[0] == pytest.approx(0.1, abs=1e-3)
    assert seen[1] < 0.5 and seen[-1] == 0.5
    rep = sparsity_report(model)
    assert rep["nm"] == {"2:4": True, "4:8": True}
    assert all(r["zeros"] == r["numel"] // 2 for r in rep["layers"])


def test_recipe_pattern_key():
    r = load_recipe("gmp", ["pattern=2:4", "sparsity=0.5"])
    assert r.pattern == "2:4" and r.to_dict()["pattern"] == "2:4"
    assert load_recipe("gmp", ["pattern=null"]).pattern is None
    with pytest.raises(SparseBertError, match="sparsity 0.5"):
        load_recipe("gmp", ["pattern=2:4"])  # the recipe says 0.9
    with pytest.raises(SparseBertError, match="quoted"):
        from sparsebert.recipe import recipe_from_dict

        recipe_from_dict({"method": "gmp", "pattern": 124, "sparsity": 0.5})
    with pytest.raises(SparseBertError, match="not for method 'movement'"):
        load_recipe("movement", ["pattern=2:4", "sparsity=0.5"])


def test_gradual_method_with_pattern_checks_shapes_early():
    from transformers import BertConfig, BertForSequenceClassification

    from sparsebert.methods.gradual import GradualPruning

    config = BertConfig(vocab_size=50, hidden_size=30, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=36, max_position_embeddings=16)
    model = BertForSequenceClassification(config)
    recipe = load_recipe("gmp", ["pattern=4:8", "sparsity=0.5"])
    with pytest.raises(SparseBertError, match="not a multiple of 8"):
        GradualPruning(model, select_targets(model), recipe)


def test_sparsity_report_detects_2_4():
    model = tiny_bert()
    params = select_targets(model, "encoder-linears")
    rep = sparsity_report(model)
    assert rep["nm"] == {"2:4": False, "4:8": False}
    masks = masks_from_scores({n: p.detach().abs() for n, p in params.items()}, 0.5, pattern="2:4")
    with torch.no_grad():
        for n, p in params.items():
            p.masked_fill_(~masks[n], 0.0)
    rep = sparsity_report(model)
    assert rep["nm"] == {"2:4": True, "4:8": True}
    assert all(r["nm"]["2:4"] for r in rep["layers"])
    assert "2:4 yes (12/12 matrices)" in format_report(rep)
    # one group with 3 non-zeros breaks 2:4 for that matrix and the model, not 4:8 ...
    first = next(iter(params.values()))
    with torch.no_grad():
        row = first[0]
        row[:4] = torch.tensor([1.0, 1.0, 1.0, 0.0])
        row[4:8] = torch.tensor([0.0, 0.0, 0.0, 0.0])
    rep = sparsity_report(model)
    assert rep["nm"]["2:4"] is False and rep["layers"][0]["nm"] == {"2:4": False, "4:8": True}
    assert "2:4 no (11/12 matrices)" in format_report(rep)
    # ... and 4:8 needs whole groups of 8
    assert not is_nm(torch.ones(2, 6), 4, 8)
