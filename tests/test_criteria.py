"""The Wanda and oBERT criteria against direct computations of their formulas, and how the
gradual pruner feeds them (oBERT's gradient window, recipe rules)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsebert.config import Recipe
from sparsebert.criteria import CRITERIA, get_criterion
from sparsebert.errors import SparseBertError
from sparsebert.methods.gradual import GradualPruning
from sparsebert.obert import OBert, OBertOptions
from sparsebert.recipe import load_recipe
from sparsebert.wanda import Wanda


class Toy(nn.Module):
    """Two linears in a row, called like a transformers model (``attention_mask`` keyword)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x, attention_mask=None):
        return self.b(torch.relu(self.a(x)))


def test_criteria_are_registered():
    assert {"magnitude", "wanda", "obert"} <= set(CRITERIA.names())
    assert get_criterion("wanda").allocation == "per-row"
    assert get_criterion("obert", OBertOptions(block_size=4)).options.block_size == 4


def test_wanda_scores_are_weight_times_input_norm_without_padding():
    torch.manual_seed(0)
    model = Toy()
    params = {"a.weight": model.a.weight, "b.weight": model.b.weight}
    crit = Wanda()
    crit.attach(model, params)
    xs = [torch.randn(3, 5, 6), torch.randn(2, 7, 6)]
    masks = [torch.ones(3, 5, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)]
    masks[0][1, 2:] = 0
    masks[1][0, 4:] = 0
    with torch.no_grad():
        for x, m in zip(xs, masks, strict=True):
            model(x, attention_mask=m)
    scores = crit.scores(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})
    # direct: the inputs of each linear at the real tokens only
    tok_a = torch.cat([x[m.bool()] for x, m in zip(xs, masks, strict=True)])
    tok_b = torch.relu(tok_a @ model.a.weight.detach().T + model.a.bias.detach())
    for name, toks, w in (("a.weight", tok_a, model.a.weight), ("b.weight", tok_b, model.b.weight)):
        norms = torch.sqrt((toks.double() ** 2).sum(dim=0)).float()
        torch.testing.assert_close(scores[name], w.detach().abs() * norms[None, :], rtol=1e-5, atol=1e-6)
    # the next forward pass starts new statistics (a gradual run's next pruning step)
    x = torch.randn(1, 4, 6)
    with torch.no_grad():
        model(x, attention_mask=torch.ones(1, 4))
    again = crit.scores(params, {})
    norms = x.reshape(-1, 6).pow(2).sum(0).sqrt()
    torch.testing.assert_close(again["a.weight"], model.a.weight.detach().abs() * norms[None, :])
    crit.detach()
    assert not crit._handles


def test_wanda_refuses_non_linear_targets_and_missing_statistics():
    emb = nn.Embedding(10, 4)
    with pytest.raises(SparseBertError, match="linear layers"):
        Wanda().attach(nn.Sequential(emb), {"0.weight": emb.weight})
    model = Toy()
    crit = Wanda()
    crit.attach(model, {"a.weight": model.a.weight})
    with pytest.raises(SparseBertError, match="no input"):
        crit.scores({"a.weight": model.a.weight}, {})


def _direct_fisher_inverse(grads: list[torch.Tensor], block: int, damping: float) -> list[torch.Tensor]:
    """F = λI + (1/m) Σ g gᵀ per block of the flattened, zero-padded gradient; inverted directly."""
    flat = [torch.nn.functional.pad(g.reshape(-1).double(), (0, (-g.numel()) % block)) for g in grads]
    nb = flat[0].numel() // block
    out = []
    for b in range(nb):
        f = damping * torch.eye(block, dtype=torch.float64)
        for g in flat:
            gb = g[b * block : (b + 1) * block]
            f += torch.outer(gb, gb) / len(grads)
        out.append(torch.linalg.inv(f))
    return out


@pytest.mark.parametrize("block", [4, 5])  # 5: the last block of 12 weights is padded
def test_obert_importance_and_obs_update_match_a_direct_computation(block):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    params = {"w": w}
    damping = 1e-2
    crit = OBert(OBertOptions(block_size=block, num_grads=8, damping=damping))
    grads = [torch.randn(3, 4) for _ in range(6)]
    for g in grads:
        w.grad = g.clone()
        crit.observe_gradients(params)
    w0 = w.detach().clone()
    rho = crit.scores(params, {"w": torch.ones(3, 4, dtype=torch.bool)})["w"]

    finv = _direct_fisher_inverse(grads, block, damping)
    flat_w = torch.nn.functional.pad(w0.reshape(-1).double(), (0, (-12) % block))
    diag = torch.cat([f.diagonal() for f in finv])[:12]
    expected_rho = (w0.reshape(-1).double() ** 2 / (2 * diag)).view(3, 4)
    torch.testing.assert_close(rho.double(), expected_rho, rtol=1e-4, atol=1e-8)

    # prune 2 weights of the first block and 1 of the second (several in a block: summed updates)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[0, 2, block + 1]] = False
    with torch.no_grad():
        w.masked_fill_(~keep.view(3, 4), 0.0)  # what FixedMasks.set_masks does first
    crit.update_weights(params, {"w": keep.view(3, 4)})
    delta = torch.zeros_like(flat_w)
    for q in torch.nonzero(~keep).flatten().tolist():
        b, j = divmod(q, block)
        delta[b * block : (b + 1) * block] -= finv[b][:, j] * flat_w[q] / finv[b][j, j]
    expected = ((flat_w + delta)[:12] * keep).view(3, 4)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-4, atol=1e-6)


def test_obert_single_weight_update_is_exact_obs():
    """One weight pruned in a block: w + δw has exactly zero at q and the loss increase of the
    quadratic model, ½ δwᵀ F δw, equals ρ_q."""
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(1, 6))
    crit = OBert(OBertOptions(block_size=6, damping=1e-3))
    grads = [torch.randn(1, 6) for _ in range(10)]
    for g in grads:
        w.grad = g
        crit.observe_gradients({"w": w})
    w0 = w.detach().clone().double().reshape(-1)
    rho = crit.scores({"w": w}, {})["w"].reshape(-1)
    keep = torch.ones(1, 6, dtype=torch.bool)
    keep[0, 3] = False
    crit.update_weights({"w": w}, {"w": keep})
    f = 1e-3 * torch.eye(6, dtype=torch.float64) + sum(torch.outer(g[0], g[0]).double() for g in grads) / 10
    finv = torch.linalg.inv(f)
    delta = -finv[:, 3] * w0[3] / finv[3, 3]
    assert abs(float(w0[3] + delta[3])) < 1e-12  # the OBS update zeroes the pruned weight itself
    torch.testing.assert_close(w.detach().double().reshape(-1), (w0 + delta) * keep.reshape(-1).double(),
                               rtol=1e-4, atol=1e-6)
    # the loss increase of the quadratic model, ½ δwᵀ F δw, is the importance ρ_q
    torch.testing.assert_close(0.5 * delta @ f @ delta, rho[3].double(), rtol=1e-4, atol=1e-12)


def test_obert_without_gradients_says_so():
    w = nn.Parameter(torch.randn(2, 4))
    with pytest.raises(SparseBertError, match="no gradients"):
        OBert().scores({"w": w}, {})


def test_obert_options_are_validated():
    with pytest.raises(SparseBertError, match="block_size"):
        OBertOptions(block_size=0)
    with pytest.raises(SparseBertError, match="damping"):
        OBertOptions(damping=-1.0)


def test_gradual_obert_observes_only_the_window_before_each_pruning_step():
    torch.manual_seed(0)
    model = Toy()
    params = {"a.weight": model.a.weight, "b.weight": model.b.weight}
    recipe = load_recipe("obert", ["sparsity=0.8", "criterion_options.num_grads=3", "schedule.start=0.2",
                                   "schedule.frequency=0.2", "schedule.end=0.8"])
    method = GradualPruning(model, params, recipe)
    method.on_train_begin()
    total = 20
    steps = method.pruning_steps(total)
    seen_at_pruning = {}
    observed = []
    for step in range(total):
        before = method.pruner.criterion.num_observed
        entry = method.on_step_begin(step, total, None)
        if entry:
            seen_at_pruning[step] = before
        model.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        n = method.pruner.criterion.num_observed
        method.on_pre_optimizer_step()
        if method.pruner.criterion.num_observed > n:
            observed.append(step)
    assert steps == [4, 8, 12, 16]
    # the three steps before each pruning step, none after the last one
    assert observed == [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert seen_at_pruning == {4: 3, 8: 3, 12: 3, 16: 3}
    assert method.masks.sparsity() == pytest.approx(0.8, abs=1e-2)


def test_recipes_with_observing_criteria_and_options():
    r = load_recipe("obert")
    assert r.criterion == "obert" and r.method == "gmp"
    assert r.criterion_options == OBertOptions(block_size=32, num_grads=64, damping=1e-7)
    wanda = load_recipe("gmp", ["criterion=wanda", "schedule.start=0.1", "allocation=per-row"])
    assert wanda.allocation == "per-row"
    with pytest.raises(SparseBertError, match="schedule.start > 0"):
        load_recipe("gmp", ["criterion=obert"])
    with pytest.raises(SparseBertError, match="takes no criterion_options"):
        load_recipe("gmp", ["criterion_options.block_size=4"])
    with pytest.raises(SparseBertError, match="unknown key 'blocksize'"):
        load_recipe("obert", ["criterion_options.blocksize=4"])
    with pytest.raises(SparseBertError, match="only for|not for method"):
        load_recipe("movement", ["criterion_options.block_size=4"])
    assert Recipe().criterion_options is None


def test_gradual_wanda_with_a_2_4_pattern_from_the_cli(tiny_model_dir, sst2_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForSequenceClassification

    from sparsebert.cli import main
    from sparsebert.report import sparsity_report

    out = str(tmp_path / "wanda24")
    rc = main(["prune", "--task", "sst2", "--data-dir", sst2_dir, "--model", tiny_model_dir,
               "--output-dir", out,
               "--sparsity", "0.5", "--set", "criterion=wanda", "--set", "allocation=per-row",
               "--set", "pattern=2:4", "--set", "schedule.start=0.25", "--set", "schedule.init_sparsity=0.3",
               "--set", "schedule.frequency=0.25", "--max_steps", "6", "--per_device_train_batch_size", "8",
               "--use_cpu", "true", "--save_strategy", "no", "--max-eval-samples", "8"])
    assert rc == 0
    capsys.readouterr()
    info = json.load(open(f"{out}/sparsebert.json"))
    assert info["method"]["criterion"] == "wanda" and info["method"]["pattern"] == "2:4"
    rep = sparsity_report(AutoModelForSequenceClassification.from_pretrained(out))
    assert rep["nm"]["2:4"] and rep["target_sparsity"] == 0.5


def test_two_process_obert_ranks_score_and_update_identically(tiny_model_dir, sst2_dir, tmp_path):
    """Under DDP (gloo, 2 processes) every rank observes the same all-reduced gradients: the
    scores and the OBS-updated weights are bit-identical across ranks at every pruning step."""
    import json
    import os

    from ddp_digests import two_process_prune

    out, lines = two_process_prune(tiny_model_dir, sst2_dir, tmp_path, "obert", 0.9,
                                   ["criterion=obert-digest", "criterion_options.block_size=16"], 29547)
    assert lines[0] == lines[1]
    kinds = [line.split()[0] for line in lines[0]]
    assert kinds.count("scores") == kinds.count("updated") >= 3
    assert all(int(line.split()[1]) > 0 for line in lines[0] if line.startswith("scores"))
    info = json.load(open(os.path.join(out, "sparsebert.json")))
    assert info["sparsity"]["target_sparsity"] == pytest.approx(0.9, abs=1e-3)
