"""IMP and the SRNets settings: per-round sparsities follow the formula, rewinding restores the
saved weights at kept positions, and srnet-rewind starts from the pretrained weights with the
mask of a run on the pretrained model, which stays locked."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_bert
from transformers import AutoModelForSequenceClassification

from sparsebert.cli import main
from sparsebert.errors import SparseBertError
from sparsebert.methods.base import MethodContext, build_method
from sparsebert.methods.imp import imp_sparsities
from sparsebert.pipeline import DataOptions, train_run
from sparsebert.recipe import load_recipe
from sparsebert.targets import select_targets

TRAIN = {"per_device_train_batch_size": 8, "logging_steps": 1, "use_cpu": True, "save_strategy": "no"}


def test_per_round_sparsities_follow_the_formula():
    linear = imp_sparsities(0.9, rate=0.1, spacing="linear")
    assert linear == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])  # the SRNets reference
    geometric = imp_sparsities(0.9, rate=0.2, spacing="geometric")
    assert len(geometric) == 11  # 1 - 0.8^10 = 0.893 < 0.9 <= 1 - 0.8^11
    assert geometric[:10] == pytest.approx([1 - 0.8**r for r in range(1, 11)]) and geometric[-1] == 0.9
    assert imp_sparsities(0.875, spacing="geometric", rounds=3) == pytest.approx([0.5, 0.75, 0.875])
    assert imp_sparsities(0.6, spacing="linear", rounds=4) == pytest.approx([0.15, 0.3, 0.45, 0.6])
    assert imp_sparsities(0.25, rate=0.1) == pytest.approx([0.1, 0.2, 0.25])  # the last round is the target
    with pytest.raises(SparseBertError, match="spacing"):
        imp_sparsities(0.5, spacing="cubic")


def _imp(model, overrides):
    recipe = load_recipe("imp", overrides)
    return build_method(model, select_targets(model, recipe.targets), recipe, MethodContext()), recipe


@torch.no_grad()
def _train_a_little(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_rounds_prune_on_schedule_and_rewind_restores_the_saved_weights():
    model = tiny_bert(seed=3)
    method, _ = _imp(model, ["sparsity=0.875", "imp.rounds=3", "imp.spacing=geometric", "imp.rewind=start",
                             "imp.dense_first=true"])
    total = 40
    assert method.round_steps(total) == [10, 20, 30]  # one dense segment, then one per round
    method.on_train_begin()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(total):
        entry = method.on_step_begin(step, total, None)
        if step in (10, 20, 30):
            r = (10, 20, 30).index(step)
            assert entry == {"imp_round": r + 1, "pruned_to_sparsity": pytest.approx([0.5, 0.75, 0.875][r])}
            for name, p in method.params.items():
                keep = method.masks.masks[name]
                assert torch.equal(p[keep], saved[name][keep])  # kept weights: back at the saved point
                assert not p[~keep].any()  # pruned: zero
                assert 1 - keep.float().mean().item() == pytest.approx([0.5, 0.75, 0.875][r])  # per matrix
            for name, p in model.named_parameters():
                if name not in method.params and not name.startswith("classifier"):
                    assert torch.equal(p, saved[name])  # embeddings, LayerNorms, biases rewound too
            assert not torch.equal(model.classifier.weight, saved["classifier.weight"])  # the head is not
        else:
            assert entry is None
        _train_a_little(model, step)
        method.on_optimizer_step()
    rounds = method.report()["rounds"]
    assert [r["measured_sparsity"] for r in rounds] == pytest.approx([0.5, 0.75, 0.875])
    assert all(r["rewound"] for r in rounds)


def test_rewinding_to_step_k_and_no_rewind(tmp_path):
    overrides = ["sparsity=0.5", "imp.rounds=2", "imp.rewind=step", "imp.rewind_step=3"]
    model = tiny_bert(seed=4)
    method, _ = _imp(model, overrides)
    assert method.round_steps(20) == [0, 10]  # a fine-tuned start: the first round at step 0
    method.on_train_begin()
    at_k = None
    for step in range(20):
        if step == 3:
            at_k = {n: p.detach().clone() for n, p in model.named_parameters()}
        method.on_step_begin(step, 20, None)
        if step == 10:  # the second round rewound every kept (and non-head) weight to step 3
            for name, p in model.named_parameters():
                if name in method.params:
                    keep = method.masks.masks[name]
                    assert torch.equal(p[keep], at_k[name][keep]) and not p[~keep].any()
                elif not name.startswith("classifier"):
                    assert torch.equal(p, at_k[name])
        _train_a_little(model, step)
    assert [r["rewound"] for r in method.history] == [False, True]  # no saved point yet at step 0
    method.save(str(tmp_path))  # the saved point travels with checkpoints (resume)
    other, _ = _imp(tiny_bert(seed=4), overrides)
    other.load(str(tmp_path))
    name = next(iter(method.params))
    assert torch.equal(other.snapshot[name], method.snapshot[name]) and other.history == method.history
    assert other.masks.digest() == method.masks.digest()

    plain, _ = _imp(tiny_bert(seed=5), ["sparsity=0.5", "imp.rounds=2"])
    plain.on_train_begin()
    before = {n: p.detach().clone() for n, p in plain.params.items()}
    plain.on_step_begin(0, 20, None)
    for n, p in plain.params.items():
        keep = plain.masks.masks[n]
        assert torch.equal(p[keep], before[n][keep])  # pruning alone leaves the kept weights as they are
    with pytest.raises(SparseBertError, match="needs at least"):
        plain.round_steps(1)


def test_imp_run_reports_its_rounds(tiny_model_dir, sst2_dir, tmp_path):
    recipe = load_recipe("imp", ["sparsity=0.5", "imp.rate=0.25"])
    run = train_run(tiny_model_dir, DataOptions("sst2", sst2_dir, max_eval_samples=8), recipe,
                    str(tmp_path / "imp"), training_overrides={**TRAIN, "max_steps": 6})
    method = run.info["method"]
    assert method["per_round_sparsity"] == [0.25, 0.5]
    assert [(r["step"], r["measured_sparsity"]) for r in method["rounds"]] == [(0, 0.25), (3, 0.5)]
    assert run.info["sparsity"]["target_sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_srnet_rewind_two_steps_from_a_pretrained_model(tiny_model_dir, sst2_dir, tmp_path):
    # step 1: IMP on the "pretrained" model (one dense segment first), mask at 50%
    find = tmp_path / "find"
    code = main(["prune", "--recipe", "imp", "--sparsity", "0.5", "--set", "imp.rounds=2",
                 "--set", "imp.dense_first=true", "--model", tiny_model_dir, "--task", "sst2",
                 "--data-dir", sst2_dir, "--output-dir", str(find), "--max_steps", "6", "--use_cpu", "true",
                 "--save_strategy", "no", "--max-eval-samples", "8"])
    assert code == 0
    found = AutoModelForSequenceClassification.from_pretrained(find)
    pretrained = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    targets = select_targets(found, ["encoder-linears", "pooler"])
    masks = {n: p.detach() != 0 for n, p in targets.items()}

    # step 2, before training: the weights are the pretrained ones at kept positions, zero elsewhere
    recipe = load_recipe("srnet-rewind")
    student = AutoModelForSequenceClassification.from_pretrained(find)
    method = build_method(student, select_targets(student, recipe.targets), recipe,
                          MethodContext(model_path=str(find)))
    assert method.pretrained.rstrip("/") == tiny_model_dir.rstrip("/")  # from find's sparsebert.json
    ref = dict(pretrained.named_parameters())
    for name, p in student.named_parameters():
        if name in masks:
            assert torch.equal(p[masks[name]], ref[name][masks[name]]) and not p[~masks[name]].any()
        else:
            assert torch.equal(p, ref[name])
    assert method.masks.sparsity() == pytest.approx(0.5, abs=1e-3)

    # step 2, trained: same zeros (mask locked), kept weights moved away from the pretrained ones
    out = tmp_path / "ticket"
    assert main(["prune", "--recipe", "srnet-rewind", "--model", str(find), "--task", "sst2",
                 "--data-dir", sst2_dir, "--output-dir", str(out), "--max_steps", "3", "--use_cpu", "true",
                 "--save_strategy", "no", "--max-eval-samples", "8", "--learning_rate", "1e-3"]) == 0
    ticket = AutoModelForSequenceClassification.from_pretrained(out)
    moved = False
    for name, p in select_targets(ticket, ["encoder-linears", "pooler"]).items():
        assert torch.equal(p.detach() != 0, masks[name])
        moved |= not torch.equal(p[masks[name]], ref[name][masks[name]])
    assert moved
    info = json.loads((out / "sparsebert.json").read_text())
    assert info["method"]["name"] == "srnet-rewind" and info["method"]["rewound_to"].rstrip("/") == \
        tiny_model_dir.rstrip("/")


def test_mask_training_on_the_pretrained_model_recipe(tiny_model_dir, sst2_dir, tmp_path):
    run = train_run(tiny_model_dir, DataOptions("sst2", sst2_dir, max_eval_samples=8),
                    load_recipe("mask-train-pretrained", ["sparsity=0.5"]), str(tmp_path / "mt"),
                    training_overrides={**TRAIN, "max_steps": 3})
    assert run.info["weights_trained"] is False
    assert run.info["sparsity"]["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
