"""One-shot pruning: SparseGPT against direct computations (OBS on one weight, reconstruction
error below magnitude's), the layer-wise pass on every architecture, Wanda's per-row masks
from the layer inputs, magnitude = `masks_from_scores`, and `sparsebert oneshot` end to end."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers as tf
from tiny_models import tiny_bert

from sparsebert.allocation import is_nm, masks_from_scores, n_pruned
from sparsebert.cli import main as cli_main
from sparsebert.errors import SparseBertError
from sparsebert.oneshot import _capture, _run_layer, layer_stack, prune_oneshot
from sparsebert.report import sparsity_report
from sparsebert.sparsegpt import (
    OneShotSparseGPTOptions,
    SparseGPTOptions,
    reconstruction_error,
    sparsegpt_prune_,
)
from sparsebert.targets import select_targets


def _correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    scale = torch.rand(features, generator=g) * 3 + 0.1
    return (torch.randn(tokens, features, generator=g) @ mixing) * scale


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g)
    x = _correlated_inputs(1024, 256)
    h = 2 * x.T @ x / x.shape[0]
    pruned = w.clone()
    mask = sparsegpt_prune_(pruned, h, 0.5, pattern, SparseGPTOptions(block_size=64))
    assert int((~mask).sum()) == n_pruned(w.numel(), 0.5)
    assert torch.equal(pruned == 0, ~mask)
    if pattern:
        assert is_nm(pruned, *pattern)
    magnitude = w * masks_from_scores({"w": w.abs()}, 0.5, "uniform", pattern=pattern)["w"]
    ours, theirs = reconstruction_error(w, pruned, x), reconstruction_error(w, magnitude, x)
    assert ours < 0.7 * theirs, (ours, theirs)


def test_sparsegpt_on_the_first_column_is_the_obs_update():
    """Pruning one weight of the first column: the rest of the row moves by -w_q H⁻¹e_q/[H⁻¹]_qq."""
    x = _correlated_inputs(200, 8, seed=3)
    h = 2 * x.T @ x / 200
    w = torch.tensor([[0.001, 0.5, -0.7, 0.9, 1.1, -1.3, 0.8, 0.6]])
    pruned = w.clone()
    mask = sparsegpt_prune_(pruned, h, 1 / 8, None, SparseGPTOptions(block_size=8, damp=0.0))
    assert mask.tolist() == [[False] + [True] * 7]
    hinv = torch.linalg.inv(h.double())
    expected = w.double()[0] - w.double()[0, 0] * hinv[:, 0] / hinv[0, 0]
    expected[0] = 0.0
    torch.testing.assert_close(pruned.double()[0], expected, rtol=1e-4, atol=1e-6)


def test_sparsegpt_counts_are_exact_across_blocks():
    g = torch.Generator().manual_seed(4)
    for rows, cols, s in ((7, 50, 0.33), (16, 200, 0.9), (5, 130, 0.5)):
        w = torch.randn(rows, cols, generator=g)
        x = torch.randn(300, cols, generator=g)
        mask = sparsegpt_prune_(w, 2 * x.T @ x / 300, s, None, SparseGPTOptions(block_size=32))
        assert int((~mask).sum()) == n_pruned(rows * cols, s)


def _batches(vocab: int = 100, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for size, seq in ((4, 24), (3, 30)):
        mask = torch.ones(size, seq, dtype=torch.long)
        mask[1, seq // 2 :] = 0
        out.append({"input_ids": torch.randint(5, vocab, (size, seq), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, 3, (size,), generator=g)})
    return out


def test_oneshot_magnitude_equals_masks_from_scores():
    for allocation in ("uniform", "global", "per-row"):
        model = tiny_bert()
        params = select_targets(model, "encoder-linears")
        expected = masks_from_scores({n: p.detach().abs() for n, p in params.items()}, 0.7, allocation)
        report = prune_oneshot(model, [], "magnitude", 0.7, allocation=allocation)
        assert report["layerwise"] is False
        for name, p in params.items():
            assert torch.equal(p.detach() != 0, expected[name]), (allocation, name)


SIZES = {"vocab_size": 100, "max_position_embeddings": 64, "num_labels": 2}
CONFIGS = {
    "bert": tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          **SIZES),
    "distilbert": tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **SIZES),
    "deberta-v2": tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, relative_attention=True,
                                     pos_att_type=["p2c", "c2p"],
                                     position_buckets=16, position_biased_input=False, share_att_key=False,
                                     **SIZES),
    # layers differ in their arguments (global / sliding-window attention, rotary embeddings)
    "modernbert": tf.ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=64, local_attention=16, global_attn_every_n_layers=2,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                      sep_token_id=2, **SIZES),
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_layerwise_pass_replays_the_encoder_and_prunes_every_architecture(arch):
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(CONFIGS[arch]).eval()
    batches = _batches()
    layers = layer_stack(model)
    assert len(layers) == CONFIGS[arch].num_hidden_layers if arch != "distilbert" else 2
    # replaying the captured arguments layer by layer gives the model's own last-layer output
    seen = []
    hook = layers[-1][1].register_forward_hook(lambda m, a, o: seen.append(o if torch.is_tensor(o) else o[0]))
    with torch.no_grad():
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
    hook.remove()
    first, calls = _capture(model, layers, batches, torch.device("cpu"))
    with torch.no_grad():
        for i, h in enumerate(first):
            for index, (_, layer) in enumerate(layers):
                h = _run_layer(layer, h, calls[index][i])
            torch.testing.assert_close(h, seen[i])
    for criterion, kwargs in (("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"pattern": "2:4"}),
                              ("wanda", {"pattern": "2:4"})):
        pruned = copy.deepcopy(model)
        report = prune_oneshot(pruned, batches, criterion, **kwargs)
        assert report["layerwise"] is True
        for name, p in select_targets(pruned).items():
            assert int((p == 0).sum()) == p.numel() // 2, name
        if "pattern" in kwargs:
            assert sparsity_report(pruned)["nm"]["2:4"]


def test_wanda_oneshot_masks_are_per_row_topk_of_the_layer_inputs():
    model = tiny_bert(hidden=32, intermediate=64)
    batches = _batches()
    first_layer = layer_stack(model)[0][0]
    params = {n: p for n, p in select_targets(model).items() if n.startswith(first_layer + ".")}
    # the first layer's linears see the dense model's activations: collect them directly
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    hooks = []
    for name in params:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        hooks.append(module.register_forward_hook(
            lambda m, a, o, name=name: inputs[name].append(a[0].detach())))
    with torch.no_grad():
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
    for h in hooks:
        h.remove()
    expected = {}
    for name, p in params.items():
        toks = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs[name], batches, strict=True)])
        score = p.detach().abs() * toks.pow(2).sum(0).sqrt()[None, :]
        keep = p.shape[1] - n_pruned(p.shape[1], 0.6)
        kept = score.topk(keep, dim=1).indices
        expected[name] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, kept, True)
    report = prune_oneshot(model, batches, "wanda", 0.6)
    assert report["allocation"] == "per-row" and report["layerwise"]
    for name, p in select_targets(model).items():
        assert bool(((p == 0).sum(1) == n_pruned(p.shape[1], 0.6)).all())
        if name in expected:
            assert torch.equal(p.detach() != 0, expected[name]), name


def test_true_sequential_sparsegpt_takes_each_group_hessian_after_the_groups_before_it():
    """In the first layer (its input, the embeddings, does not depend on pruning): Q/K/V are
    pruned from the dense layer's inputs, and the FFN output from the inputs it receives once
    every other linear of the layer is pruned; both recomputed here with the test's own hooks.
    ``true_sequential=false`` takes every Hessian from the dense pass."""
    dense = tiny_bert(hidden=32, intermediate=64, seed=5)
    batches = _batches(seed=2)
    prefix = layer_stack(dense)[0][0]
    names = {k: f"{prefix}.{k}.weight" for k in ("attention.self.query", "attention.self.key",
                                                  "attention.self.value", "attention.output.dense",
                                                  "intermediate.dense", "output.dense")}

    def inputs_of(model, name):
        module, seen = model.get_submodule(name.rsplit(".", 1)[0]), []
        handle = module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != "labels"})
        handle.remove()
        x = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches, strict=True)])
        return 2 * x.T @ x / x.shape[0]

    def direct(model, name, hessian):
        w = model.get_parameter(name).detach().clone()
        sparsegpt_prune_(w, hessian, 0.6, None, SparseGPTOptions())
        return w

    results = {}
    for true_sequential in (True, False):
        model = copy.deepcopy(dense)
        prune_oneshot(model, batches, "sparsegpt", 0.6,
                      options=OneShotSparseGPTOptions(true_sequential=true_sequential))
        results[true_sequential] = model
    query = direct(dense, names["attention.self.query"], inputs_of(dense, names["attention.self.query"]))
    for model in results.values():
        torch.testing.assert_close(model.get_parameter(names["attention.self.query"]).detach(), query)
    # FFN output: true-sequential sees the layer with everything else pruned
    partial = copy.deepcopy(dense)
    for key, name in names.items():
        if key != "output.dense":
            partial.get_parameter(name).data.copy_(results[True].get_parameter(name).detach())
    out_name = names["output.dense"]
    torch.testing.assert_close(results[True].get_parameter(out_name).detach(),
                               direct(dense, out_name, inputs_of(partial, out_name)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[False].get_parameter(out_name).detach(),
                               direct(dense, out_name, inputs_of(dense, out_name)), rtol=1e-4, atol=1e-5)
    assert not torch.equal(results[True].get_parameter(out_name), results[False].get_parameter(out_name))


def test_sparsegpt_and_obert_keep_the_outputs_closer_than_magnitude():
    dense = tiny_bert(hidden=32, intermediate=64, seed=3)
    batches = _batches(seed=1)

    def hidden(model):
        with torch.no_grad():
            return torch.cat([model.bert(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state
                              .flatten(0, 1) for b in batches])

    ref = hidden(dense)
    errors = {}
    for criterion in ("magnitude", "sparsegpt", "obert"):
        model = copy.deepcopy(dense)
        report = prune_oneshot(model, batches, criterion, 0.6, allocation="uniform")
        if criterion == "obert":
            assert report["calibration_passes"] == 7  # one gradient per example
        errors[criterion] = float((hidden(model) - ref).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_oneshot_refuses_what_it_cannot_do():
    model = tiny_bert()
    with pytest.raises(SparseBertError, match="sparsity 0.5"):
        prune_oneshot(model, _batches(), "sparsegpt", 0.7, pattern="2:4")
    with pytest.raises(SparseBertError, match="uniform"):
        prune_oneshot(model, _batches(), "sparsegpt", 0.5, allocation="global")
    with pytest.raises(SparseBertError, match="calibration batches"):
        prune_oneshot(model, [], "wanda", 0.5)
    with pytest.raises(SparseBertError, match="encoder layers"):
        prune_oneshot(model, _batches(), "sparsegpt", 0.5, targets=["encoder-linears", "classifier"])
    with pytest.raises(SparseBertError, match="give a sparsity"):
        prune_oneshot(model, _batches(), "magnitude")


@pytest.mark.parametrize(("criterion", "extra"), [
    ("sparsegpt", ["--pattern", "2:4"]),
    ("wanda", ["--sparsity", "0.6"]),
    ("obert", ["--sparsity", "0.6", "--option", "block_size=16", "--option", "damping=1e-6"]),
])
def test_oneshot_cli_on_a_tiny_model(tiny_model_dir, sst2_dir, tmp_path, capsys, criterion, extra):
    from sparsebert.verify import verify_path

    out = str(tmp_path / criterion)
    rc = cli_main(["oneshot", tiny_model_dir, "--task", "sst2", "--data-dir", sst2_dir,
                   "--criterion", criterion, "--calibration-samples", "16", "--calibration-batch-size", "8",
                   "--output-dir", out, *extra])
    assert rc == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[stdout.rindex('{\n  "'):])  # the summary, after any Trainer log lines
    assert summary["criterion"] == criterion and summary["calibration_examples"] == 16
    assert "eval_accuracy" in summary["metrics"]
    target = 0.5 if "--pattern" in extra else 0.6
    assert summary["target_sparsity"] == target
    model = tf.AutoModelForSequenceClassification.from_pretrained(out)
    rep = sparsity_report(model)
    for r in rep["layers"]:  # exact: per row for wanda (its allocation), per matrix otherwise
        rows, cols = r["shape"]
        expected = rows * n_pruned(cols, target) if criterion == "wanda" else n_pruned(r["numel"], target)
        assert r["zeros"] == expected, r["name"]
    if "--pattern" in extra:
        assert rep["nm"]["2:4"]
    info = json.load(open(os.path.join(out, "sparsebert.json")))
    assert info["command"] == "oneshot" and info["task"] == "sst2"
    assert os.path.isfile(os.path.join(out, "sparsity.txt"))
    assert verify_path(out).ok


def test_oneshot_cli_errors(tiny_model_dir, sst2_dir, tmp_path, capsys):
    base = ["oneshot", tiny_model_dir, "--task", "sst2", "--data-dir", sst2_dir,
            "--output-dir", str(tmp_path / "x")]
    assert cli_main([*base, "--criterion", "sparsegpd", "--sparsity", "0.5"]) == 2
    assert "unknown one-shot criterion" in capsys.readouterr().err
    assert cli_main([*base, "--criterion", "wanda", "--sparsity", "0.5", "--option", "block_size=3"]) == 2
    assert "takes no options" in capsys.readouterr().err
    assert cli_main([*base, "--criterion", "obert", "--sparsity", "0.5", "--option", "blok_size=3"]) == 2
    assert "unknown key 'blok_size'" in capsys.readouterr().err
