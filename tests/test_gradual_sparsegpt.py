"""SparseGPT as a gradual criterion: earlier pruned weights stay pruned, each pruning step is
SparseGPT on the inputs of the window before it (checked against a direct call on inputs the
test records itself), and the recipe's rules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsebert.allocation import masks_from_scores, n_pruned
from sparsebert.errors import SparseBertError
from sparsebert.gradual_sparsegpt import GradualSparseGPTOptions
from sparsebert.methods.gradual import GradualPruning
from sparsebert.recipe import load_recipe
from sparsebert.sparsegpt import SparseGPTOptions, reconstruction_error, sparsegpt_prune_


def _inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    scale = torch.rand(features, generator=g) * 3 + 0.1
    return (torch.randn(tokens, features, generator=g) @ mixing) * scale


def test_sparsegpt_keeps_earlier_pruned_weights_pruned_and_reconstructs_better_than_magnitude():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=g)
    x = _inputs(600, 96, seed=1)
    h = 2 * x.T @ x / x.shape[0]
    earlier = masks_from_scores({"w": w.abs()}, 0.3, "uniform")["w"]  # True = kept
    start = w * earlier
    ours = start.clone()
    mask = sparsegpt_prune_(ours, h, 0.6, None, SparseGPTOptions(block_size=32), pruned=~earlier)
    assert not (mask & ~earlier).any()  # nothing revived
    assert torch.equal(ours == 0, ~mask) and int((~mask).sum()) == n_pruned(w.numel(), 0.6)
    # the independent baseline: magnitude extends the same earlier mask to 60%, no update
    scores = start.abs().masked_fill(~earlier, float("-inf"))
    magnitude = start * masks_from_scores({"w": scores}, 0.6, "uniform")["w"]
    assert reconstruction_error(w, ours, x) < 0.7 * reconstruction_error(w, magnitude, x)
    # a block that holds more earlier pruned weights than its share prunes them all
    crowded = torch.zeros_like(w, dtype=torch.bool)
    crowded[:, :32] = True  # the whole first block of 32 columns
    again = w.clone() * ~crowded
    mask2 = sparsegpt_prune_(again, h, 0.4, None, SparseGPTOptions(block_size=32), pruned=crowded)
    assert not mask2[:, :32].any() and torch.equal(again == 0, ~mask2)
    with pytest.raises(SparseBertError, match="N:M"):
        sparsegpt_prune_(w.clone(), h, 0.5, (2, 4), None, pruned=~earlier)


class Toy(nn.Module):
    def __init__(self, wide: int = 24):
        super().__init__()
        self.a = nn.Linear(16, wide)
        self.b = nn.Linear(wide, 8)

    def forward(self, x, attention_mask=None):
        return self.b(torch.relu(self.a(x)))


def test_each_pruning_step_is_sparsegpt_on_the_window_before_it():
    torch.manual_seed(0)
    model = Toy()
    params = {"a.weight": model.a.weight, "b.weight": model.b.weight}
    recipe = load_recipe("sparsegpt-gmp", ["sparsity=0.75", "criterion_options.calibration_steps=2",
                                           "schedule.start=0.2", "schedule.frequency=0.2", "schedule.end=0.8",
                                           "schedule.init_sparsity=0.5"])
    method = GradualPruning(model, params, recipe)
    method.on_train_begin()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # the test's own record of every linear input, per step
    seen: dict[str, list[list[torch.Tensor]]] = {"a.weight": [], "b.weight": []}
    for name, module in (("a.weight", model.a), ("b.weight", model.b)):
        module.register_forward_hook(lambda m, args, out, name=name: seen[name][-1].append(args[0].detach()))
    total, checked = 20, []
    for step in range(total):
        upcoming = step in method.pruning_steps(total)
        if upcoming:
            before = {n: p.detach().clone() for n, p in params.items()}
            kept = {n: m.clone() for n, m in method.masks.masks.items()}
        entry = method.on_step_begin(step, total, opt)
        if entry:
            target = entry["pruned_to_sparsity"]
            for name, p in params.items():
                xs = torch.cat([x for inputs in seen[name][step - 2 : step] for x in inputs])
                expected = before[name].clone()
                mask = sparsegpt_prune_(expected, 2 * xs.T @ xs / xs.shape[0], target, None,
                                        SparseGPTOptions(), pruned=~kept[name])
                torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-5)
                assert torch.equal(method.masks.masks[name], mask)
                assert not (mask & ~kept[name]).any()
                assert int((~mask).sum()) == n_pruned(p.numel(), target)  # uniform, exact
            checked.append(step)
        for name in seen:
            seen[name].append([])
        opt.zero_grad()
        model(torch.randn(5, 16)).pow(2).mean().backward()
        method.on_pre_optimizer_step()
        opt.step()
        method.masks.apply_()
    assert checked == [4, 8, 12, 16]
    # forward passes outside the windows were not accumulated: nothing is pending after the last step
    assert method.pruner.criterion._hooks.tokens == {}
    assert method.masks.sparsity() == pytest.approx(0.75, abs=1e-2)


def test_sparsegpt_recipe_rules():
    r = load_recipe("sparsegpt-gmp")
    assert r.criterion == "sparsegpt" and r.allocation == "uniform"
    assert r.criterion_options == GradualSparseGPTOptions(calibration_steps=4)
    with pytest.raises(SparseBertError, match="schedule.start > 0"):
        load_recipe("sparsegpt-gmp", ["schedule.start=0"])
    with pytest.raises(SparseBertError, match="calibration_steps"):
        load_recipe("sparsegpt-gmp", ["criterion_options.calibration_steps=0"])
    with pytest.raises(SparseBertError, match="allocation: uniform"):
        load_recipe("sparsegpt-gmp", ["allocation=global"])
    with pytest.raises(SparseBertError, match="N:M"):
        load_recipe("sparsegpt-gmp", ["sparsity=0.5", "pattern=2:4"])
    # the same refusals when the criterion is driven directly
    model = Toy()
    params = {"a.weight": model.a.weight}
    method = GradualPruning(model, params, load_recipe("sparsegpt-gmp"))
    method.on_train_begin()
    model(torch.randn(3, 16))
    criterion = method.pruner.criterion
    with pytest.raises(SparseBertError, match="allocation: uniform"):
        criterion.solve_masks(params, method.masks.masks, 0.5, "global", None)
    with pytest.raises(SparseBertError, match="N:M"):
        criterion.solve_masks(params, method.masks.masks, 0.5, "uniform", (2, 4))
    with pytest.raises(SparseBertError, match="not by scores"):
        criterion.scores(params, {})


def test_a_pruning_step_without_observed_inputs_is_magnitude_pruning(caplog):
    """A run resumed exactly at a pruning step has seen no inputs: that step prunes by
    magnitude (SparseGPT with H = I), kept weights untouched, instead of failing."""
    torch.manual_seed(1)
    model = Toy(wide=300)  # b has more columns than one SparseGPT block
    params = {"a.weight": model.a.weight, "b.weight": model.b.weight}
    method = GradualPruning(model, params, load_recipe("sparsegpt-gmp"))
    method.on_train_begin()
    before = {n: p.detach().clone() for n, p in params.items()}
    with caplog.at_level("WARNING", logger="sparsebert"):
        method.pruner.prune_to(0.6)
    assert "pruning it by magnitude" in caplog.text
    expected = masks_from_scores({n: w.abs() for n, w in before.items()}, 0.6, "uniform")
    for name, p in params.items():
        assert torch.equal(method.masks.masks[name], expected[name])
        torch.testing.assert_close(p.detach(), before[name] * expected[name])


def test_sparsegpt_gmp_from_the_cli(tiny_model_dir, sst2_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from sparsebert.cli import main
    from sparsebert.report import sparsity_report

    out = str(tmp_path / "sgpt-gmp")
    rc = main(["prune", "--recipe", "sparsegpt-gmp", "--task", "sst2", "--data-dir", sst2_dir,
               "--model", tiny_model_dir, "--output-dir", out, "--sparsity", "0.8",
               "--set", "schedule.start=0.25", "--set", "schedule.frequency=0.25",
               "--set", "criterion_options.calibration_steps=1", "--max_steps", "6",
               "--per_device_train_batch_size", "8", "--use_cpu", "true", "--save_strategy", "no",
               "--max-eval-samples", "8"])
    assert rc == 0
    capsys.readouterr()
    info = json.load(open(f"{out}/sparsebert.json"))
    assert info["method"]["criterion"] == "sparsegpt"
    rep = sparsity_report(AutoModelForSequenceClassification.from_pretrained(out))
    assert rep["target_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_two_process_sparsegpt_ranks_prune_from_the_same_hessians(tiny_model_dir, sst2_dir, tmp_path):
    """Under DDP (gloo, 2 processes, each its own shard of the batches) the Hessians are summed
    over the ranks: every rank prunes from the same statistics to the same weights and masks."""
    from ddp_digests import two_process_prune

    settings = ["criterion=sparsegpt-digest", "criterion_options.calibration_steps=1"]
    _, lines = two_process_prune(tiny_model_dir, sst2_dir, tmp_path, "sparsegpt-gmp", 0.8, settings, 29549)
    assert lines[0] == lines[1]
    kinds = [line.split()[0] for line in lines[0]]
    assert kinds.count("hessians") >= 2 and kinds.count("solved") == kinds.count("hessians")
