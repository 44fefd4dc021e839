"""Budgets that scale with the target sparsity (GMP*): the rule, the recipe option, a real run."""

from __future__ import annotations

import math

import pytest

from sparsebert.budgets import budget_factor, scale_training
from sparsebert.errors import SparseBertError
from sparsebert.pipeline import DataOptions, train_and_prune
from sparsebert.recipe import load_recipe


@pytest.mark.parametrize("s, want", [(0.5, 1.0), (0.75, 2.0), (0.875, 3.0), (0.9, 3.321928), (0.3, 1.0)])
def test_factor_is_halvings_of_kept_weights(s, want):
    # ln(1 - s) / ln(0.5) = number of halvings of the kept fraction; never below 1
    assert math.isclose(budget_factor(s), want, rel_tol=1e-5)


def test_factor_clamped_and_reference():
    assert budget_factor(0.999, max_factor=4.0) == 4.0
    assert math.isclose(budget_factor(0.9, reference_sparsity=0.8), math.log(0.1) / math.log(0.2))


def test_scale_training_epochs_and_steps():
    r = load_recipe("gmp", ["sparsity=0.9", "budget.scale=sparsity"])
    kw, info = scale_training({"num_train_epochs": 2.0}, r)
    assert math.isclose(kw["num_train_epochs"], 2.0 * math.log(0.1) / math.log(0.5))
    assert info["base_epochs"] == 2.0 and math.isclose(info["factor"], 3.3219, rel_tol=1e-4)
    kw, info = scale_training({"max_steps": 10, "num_train_epochs": 2.0}, r)
    assert kw["max_steps"] == 34 and kw["num_train_epochs"] == 2.0
    plain = load_recipe("gmp", ["sparsity=0.9"])
    assert scale_training({"max_steps": 10}, plain) == ({"max_steps": 10}, None)


def test_budget_option_validation():
    with pytest.raises(SparseBertError, match="budget.scale must be one of"):
        load_recipe("gmp", ["budget.scale=epochs"])
    with pytest.raises(SparseBertError, match="reference_sparsity"):
        load_recipe("gmp", ["budget.scale=sparsity", "budget.reference_sparsity=1.0"])
    with pytest.raises(SparseBertError, match="has none"):
        load_recipe("transfer", ["budget.scale=sparsity"])


def test_run_with_scaled_budget_trains_longer_and_prunes_on_the_stretched_schedule(
        tiny_model_dir, sst2_dir, tmp_path):
    """Base 6 steps at 75% -> factor 2 -> 12 steps; pruning every 25% of training = every 3 steps."""
    recipe = load_recipe("gmp", ["sparsity=0.75", "budget.scale=sparsity", "schedule.frequency=0.25",
                                 "schedule.end=0.75", "schedule.init_sparsity=0.5"])
    out = str(tmp_path / "scaled")
    info = train_and_prune(tiny_model_dir, DataOptions("sst2", sst2_dir, max_eval_samples=8), recipe, out,
                           training_overrides={"max_steps": 6, "use_cpu": True, "save_steps": 100,
                                               "per_device_train_batch_size": 8})
    assert info["train_steps"] == 12
    assert info["budget"]["factor"] == 2.0 and info["budget"]["base_max_steps"] == 6
    assert info["budget"]["max_steps"] == 12
    assert abs(info["sparsity"]["target_sparsity"] - 0.75) < 1e-3
