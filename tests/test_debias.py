"""Debiasing losses: each equals its formula on hand-made numbers, PoE's gradient leaves alone
what the bias model explains, and --debias wires the bias probabilities into a run in order."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparsebert.bias_models import examples_hash, save_bias_probs
from sparsebert.cli import main
from sparsebert.debias import (
    ConfidenceRegularisation,
    DebiasOptions,
    ExampleReweighting,
    ProductOfExperts,
    apply_debias,
    conf_reg_loss,
    debias_from_cli,
    poe_loss,
    reweight_loss,
)
from sparsebert.errors import SparseBertError
from sparsebert.losses import LOSS_TERMS, Distillation, LossBatch, TaskLoss, distillation_terms
from sparsebert.pipeline import DataOptions, train_run
from sparsebert.recipe import load_recipe
from sparsebert.tasks import get_task

TRAIN = {"per_device_train_batch_size": 8, "logging_steps": 1, "use_cpu": True, "save_strategy": "no",
         "train_sampling_strategy": "sequential"}


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _ce(z, y):
    return -math.log(_softmax(z)[y])


def test_poe_equals_its_formula():
    z, pb, y = [1.0, 0.0, -1.0], [0.5, 0.25, 0.25], 0
    p = _softmax(z)
    joint = [a * b for a, b in zip(p, pb, strict=True)]
    expected = -math.log(joint[y] / sum(joint))  # the normalised product of the two experts
    got = poe_loss(torch.tensor([z]), torch.tensor([pb]), torch.tensor([y]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.22442, abs=1e-5)
    # a uniform bias changes nothing: PoE is then plain cross-entropy
    assert poe_loss(torch.tensor([z]), torch.full((1, 3), 1 / 3), torch.tensor([2])).item() == \
        pytest.approx(_ce(z, 2), rel=1e-6)


def test_reweighting_equals_its_formula():
    z = [[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    y = [0, 0, 1]
    pb = [[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]
    w = [1 - pb[i][y[i]] for i in range(3)]  # 0.1, 0.7, 0.6
    expected = sum(w[i] * _ce(z[i], y[i]) for i in range(3)) / sum(w)
    got = reweight_loss(torch.tensor(z), torch.tensor(pb), torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_confidence_regularisation_equals_its_formula():
    z = [[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]]
    teacher = [[2.0, 0.0, -1.0], [0.0, 1.0, 1.5]]
    y = [0, 2]
    pb = [[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]]
    expected = 0.0
    for i in range(2):
        t = _softmax(teacher[i])
        scaled = [v ** (1 - pb[i][y[i]]) for v in t]  # t_j^(1 - p_b(y))
        target = [v / sum(scaled) for v in scaled]
        log_s = [math.log(v) for v in _softmax(z[i])]
        expected += -sum(a * b for a, b in zip(target, log_s, strict=True)) / 2
    got = conf_reg_loss(torch.tensor(z), torch.tensor(teacher), torch.tensor(pb), torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # a bias that is sure of the label flattens the teacher to uniform
    flat = conf_reg_loss(torch.tensor([z[0]]), torch.tensor([teacher[0]]), torch.tensor([[1.0, 0.0, 0.0]]),
                         torch.tensor([0]))
    assert flat.item() == pytest.approx(-sum(math.log(v) for v in _softmax(z[0])) / 3, rel=1e-5)


def test_poe_gradient_is_smaller_where_the_bias_model_is_already_right():
    def label_grad(bias: list[float] | None) -> float:
        z = torch.zeros(1, 3, requires_grad=True)
        y = torch.tensor([0])
        loss = poe_loss(z, torch.tensor([bias]), y) if bias else torch.nn.functional.cross_entropy(z, y)
        loss.backward()
        return z.grad[0, 0].item()

    right, plain, wrong = label_grad([0.8, 0.1, 0.1]), label_grad(None), label_grad([0.1, 0.45, 0.45])
    assert right == pytest.approx(0.8 - 1)  # softmax(z + log p_b)_y - 1
    assert plain == pytest.approx(1 / 3 - 1)
    assert wrong == pytest.approx(0.1 - 1)
    assert abs(right) < abs(plain) < abs(wrong)  # pushed toward what the bias does not explain


def _batch(logits, labels, bias, teacher=None):
    return LossBatch(SimpleNamespace(logits=torch.tensor(logits)), {"labels": torch.tensor(labels)},
                     {"bias_probs": torch.tensor(bias)}, get_task("sst2"),
                     (lambda: SimpleNamespace(logits=torch.tensor(teacher))) if teacher else None)


def test_the_terms_are_registered_and_read_the_bias_column():
    assert {"poe", "reweight", "conf-reg"} <= set(LOSS_TERMS.names())
    assert LOSS_TERMS.get("conf-reg") is ConfidenceRegularisation and ConfidenceRegularisation.needs_teacher
    for cls in (ProductOfExperts, ExampleReweighting, ConfidenceRegularisation):
        assert cls.columns == ("bias_probs",)
    z, y, b, t = [[1.0, -1.0]], [1], [[0.3, 0.7]], [[0.0, 2.0]]
    assert ProductOfExperts()(_batch(z, y, b)).item() == pytest.approx(
        poe_loss(torch.tensor(z), torch.tensor(b), torch.tensor(y)).item())
    assert ExampleReweighting()(_batch(z, y, b)).item() == pytest.approx(_ce(z[0], 1))
    assert ConfidenceRegularisation()(_batch(z, y, b, t)).item() == pytest.approx(
        conf_reg_loss(torch.tensor(z), torch.tensor(t), torch.tensor(b), torch.tensor(y)).item())
    with pytest.raises(ValueError, match="bias_probs"):
        ProductOfExperts()(LossBatch(SimpleNamespace(logits=torch.tensor(z)), {"labels": torch.tensor(y)}))


def _bias_file(path, raw_train, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1.0, 1.0], size=len(raw_train))
    meta = {"examples_hash": examples_hash(raw_train), "n_examples": len(raw_train),
            "labels": ["negative", "positive"], "kind": "hand-made"}
    save_bias_probs(str(path), probs, meta)
    return probs


def test_apply_debias_replaces_the_task_loss_keeps_kd_and_checks_the_examples(sst2_dir, tokenizer, tmp_path):
    task = get_task("sst2")
    raw = task.load_split("train", sst2_dir)
    feats = task.encode(raw, tokenizer, 64)
    probs = _bias_file(tmp_path / "b.safetensors", raw)
    opts = DebiasOptions("poe", str(tmp_path / "b.safetensors"))
    ds, terms, info = apply_debias(opts, task, raw, feats, distillation_terms(0.5, 2.0, True))
    assert [type(t) for t in terms] == [ProductOfExperts, Distillation] and terms[0].weight == 0.5
    assert np.allclose(np.array(ds["bias_probs"]), probs, atol=1e-6)  # in order
    assert info["method"] == "poe" and info["examples_hash"] == examples_hash(raw)
    with pytest.raises(SparseBertError, match="other training examples"):
        apply_debias(opts, task, raw.select(range(10)), feats.select(range(10)), [TaskLoss()])
    with pytest.raises(SparseBertError, match="hardness 1.0"):
        apply_debias(opts, task, raw, feats, distillation_terms(1.0, 2.0, True))
    with pytest.raises(SparseBertError, match="unknown --debias"):
        DebiasOptions("focal", "x")


def test_debias_options_from_the_command_line():
    ns = SimpleNamespace(command="finetune", debias=None, bias_probs=None, teacher=None)
    assert debias_from_cli(ns) == (None, [])
    with pytest.raises(SparseBertError, match="finetune does not distil"):
        debias_from_cli(SimpleNamespace(command="finetune", debias=None, bias_probs=None, teacher="t"))
    with pytest.raises(SparseBertError, match="--bias-probs is used with"):
        debias_from_cli(SimpleNamespace(command="prune", debias=None, bias_probs="f", teacher=None))
    ns = SimpleNamespace(command="finetune", debias="conf-reg", bias_probs="f", teacher="t")
    opts, extra = debias_from_cli(ns)
    assert opts.needs_teacher and extra == ["distillation.enabled=false"]
    opts, extra = debias_from_cli(SimpleNamespace(command="prune", debias="poe", bias_probs="f", teacher="t"))
    assert opts.method == "poe" and extra == []


def test_a_debiased_run_reads_the_bias_probabilities_in_order(tiny_model_dir, sst2_dir, tmp_path,
                                                               monkeypatch):
    raw = get_task("sst2").load_split("train", sst2_dir)
    probs = _bias_file(tmp_path / "b.safetensors", raw)
    seen = []
    original = ProductOfExperts.__call__

    def spy(self, batch):
        seen.append(batch.extras["bias_probs"].clone())
        assert "bias_probs" not in batch.inputs
        return original(self, batch)

    monkeypatch.setattr(ProductOfExperts, "__call__", spy)
    data = DataOptions("sst2", sst2_dir, max_eval_samples=8)
    run = train_run(tiny_model_dir, data, load_recipe("finetune"),
                    str(tmp_path / "run"), training_overrides={**TRAIN, "max_steps": 2},
                    debias=DebiasOptions("poe", str(tmp_path / "b.safetensors")))
    assert run.info["loss_terms"] == {"poe_loss": 1.0}
    assert run.info["debias"]["method"] == "poe"
    assert np.allclose(seen[0].numpy(), probs[:8], atol=1e-6)
    assert np.allclose(seen[1].numpy(), probs[8:16], atol=1e-6)
    with pytest.raises(SparseBertError, match="needs --teacher"):
        train_run(tiny_model_dir, data, load_recipe("finetune"), str(tmp_path / "r2"),
                  training_overrides={**TRAIN, "max_steps": 1},
                  debias=DebiasOptions("conf-reg", str(tmp_path / "b.safetensors")))


def test_finetune_with_conf_reg_from_the_command_line(tiny_model_dir, sst2_dir, tmp_path):
    raw = get_task("sst2").load_split("train", sst2_dir)
    _bias_file(tmp_path / "b.json", raw)
    out = tmp_path / "cr"
    code = main(["finetune", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", sst2_dir,
                 "--output-dir", str(out), "--max_steps", "2", "--use_cpu", "true", "--save_strategy", "no",
                 "--max-eval-samples", "8", "--debias", "conf-reg", "--bias-probs", str(tmp_path / "b.json"),
                 "--teacher", tiny_model_dir])
    assert code == 0
    info = json.loads((out / "sparsebert.json").read_text())
    assert info["loss_terms"] == {"conf_reg_loss": 1.0}  # finetune does not distil: no kd_loss
    assert info["debias"]["bias_kind"] == "hand-made"
