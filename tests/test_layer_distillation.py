"""Layer-wise distillation (hidden states, attention maps) against a direct computation."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from sparsebert.errors import SparseBertError
from sparsebert.layer_distillation import (
    AttentionDistillation,
    HiddenStateDistillation,
    attention_loss,
    hidden_state_loss,
    layer_map,
)
from sparsebert.losses import LOSS_TERMS, LossBatch, distillation_terms
from sparsebert.pipeline import DataOptions, train_and_prune
from sparsebert.recipe import load_recipe
from sparsebert.trainer import use_eager_attention


def test_layer_map_one_to_one_and_uniform():
    assert layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert layer_map(3, 6) == [2, 4, 6]
    assert layer_map(4, 12) == [3, 6, 9, 12]
    with pytest.raises(ValueError, match="more than the teacher"):
        layer_map(4, 2)


def _mse_by_hand(hs, ht, mask):
    """Mean over layers of sum over real tokens of squared error / (tokens * dim), by loops."""
    per_layer = []
    for a, b in zip(hs, ht, strict=True):
        total, n = 0.0, 0
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if mask[i, j]:
                    total += float(((a[i, j] - b[i, j]) ** 2).sum())
                    n += 1
        per_layer.append(total / (n * a.shape[-1]))
    return sum(per_layer) / len(per_layer)


def test_hidden_state_loss_equals_formula_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    hs = tuple(torch.randn(2, 5, 4, generator=g) for _ in range(3))
    ht = tuple(torch.randn(2, 5, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = float(hidden_state_loss(hs, ht, mask))
    assert math.isclose(got, _mse_by_hand([h.numpy() for h in hs], [h.numpy() for h in ht], mask.numpy()),
                        rel_tol=1e-5)
    # padding positions do not count: change them, same loss
    hs2 = tuple(h.clone() for h in hs)
    for h in hs2:
        h[0, 3:] = 100.0
    assert math.isclose(float(hidden_state_loss(hs2, ht, mask)), got, rel_tol=1e-6)
    assert float(hidden_state_loss(ht, ht, mask)) == 0.0


def test_hidden_state_loss_maps_a_shallower_student():
    g = torch.Generator().manual_seed(1)
    ht = tuple(torch.randn(1, 3, 4, generator=g) for _ in range(5))  # 4 layers + embeddings
    hs = (ht[0], ht[2], ht[4])  # 2 layers: follow teacher layers 2 and 4
    mask = torch.ones(1, 3)
    assert float(hidden_state_loss(hs, ht, mask)) == 0.0
    assert float(hidden_state_loss((ht[0], ht[1], ht[4]), ht, mask)) > 0.0


def _kl_by_hand(a_s, a_t, mask):
    per_layer = []
    for s, t in zip(a_s, a_t, strict=True):
        total, n = 0.0, 0
        for b in range(s.shape[0]):
            for h in range(s.shape[1]):
                for i in range(s.shape[2]):
                    if not mask[b, i]:
                        continue
                    total += sum(t[b, h, i, j] * math.log(t[b, h, i, j] / s[b, h, i, j])
                                 for j in range(s.shape[3]) if t[b, h, i, j] > 0)
                    n += 1
        per_layer.append(total / n)
    return sum(per_layer) / len(per_layer)


def test_attention_loss_equals_kl_formula():
    g = torch.Generator().manual_seed(2)
    a_s = tuple(torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1) for _ in range(2))
    a_t = tuple(torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1) for _ in range(2))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    got = float(attention_loss(a_s, a_t, mask))
    want = _kl_by_hand([a.double().numpy() for a in a_s], [a.double().numpy() for a in a_t], mask.numpy())
    assert math.isclose(got, want, rel_tol=1e-4)
    assert abs(float(attention_loss(a_t, a_t, mask))) < 1e-6


def test_terms_registered_and_built_by_the_recipe_mix():
    assert LOSS_TERMS.get("hidden-kd") is HiddenStateDistillation
    assert LOSS_TERMS.get("attention-kd") is AttentionDistillation
    names = [t.name for t in distillation_terms(1.0, 2.0, True, hidden=0.5, attention=2.0)]
    assert names == ["kd_loss", "hidden_kd", "attention_kd"]
    assert [t.name for t in distillation_terms(1.0, 2.0, False, hidden=0.5)] == ["task_loss"]


def test_terms_on_real_model_outputs_match_direct_computation(tiny_model_dir, tokenizer):
    """The terms read what the model returns: compare with the formula on outputs taken by hand."""
    torch.manual_seed(0)
    student = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    use_eager_attention(student, teacher)
    enc = tokenizer(["a good film", "the plot was dull and long"], padding=True, return_tensors="pt")
    kw = {"output_hidden_states": True, "output_attentions": True}
    s_out, t_out = student(**enc, **kw), teacher(**enc, **kw)
    assert s_out.attentions is not None and len(s_out.attentions) == 2
    batch = LossBatch(s_out, dict(enc), teacher_fn=lambda: t_out)
    mask = enc["attention_mask"].numpy()
    want_h = _mse_by_hand([h.detach().numpy() for h in s_out.hidden_states],
                          [h.detach().numpy() for h in t_out.hidden_states], mask)
    assert math.isclose(float(HiddenStateDistillation()(batch).detach()), want_h, rel_tol=1e-4)
    want_a = _kl_by_hand([a.detach().double().numpy() for a in s_out.attentions],
                         [a.detach().double().numpy() for a in t_out.attentions], mask)
    assert math.isclose(float(AttentionDistillation()(batch).detach()), want_a, rel_tol=1e-3)
    assert want_h > 0 and want_a > 0


def test_pipeline_trains_with_layerwise_kd(tiny_model_dir, sst2_dir, tmp_path):
    recipe = load_recipe("gmp", ["sparsity=0.5", "distillation.hidden=1.0", "distillation.attention=1.0"])
    out = str(tmp_path / "lw")
    info = train_and_prune(tiny_model_dir, DataOptions("sst2", sst2_dir, max_eval_samples=8), recipe, out,
                           teacher_path=tiny_model_dir,
                           training_overrides={"max_steps": 4, "logging_steps": 2, "use_cpu": True,
                                               "per_device_train_batch_size": 8})
    assert info["loss_terms"] == {"kd_loss": 1.0, "hidden_kd": 1.0, "attention_kd": 1.0}
    logs = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json")))["log_history"]
    logged = [h for h in logs if "hidden_kd" in h]
    assert logged and all(np.isfinite(h["attention_kd"]) and h["attention_kd"] >= 0 for h in logged)
    assert abs(info["sparsity"]["target_sparsity"] - 0.5) < 1e-3


def test_layerwise_kd_without_teacher_or_with_negative_weight_is_refused(tiny_model_dir, sst2_dir, tmp_path):
    with pytest.raises(SparseBertError, match="need a teacher"):
        train_and_prune(tiny_model_dir, DataOptions("sst2", sst2_dir),
                        load_recipe("gmp", ["distillation.hidden=1"]), str(tmp_path / "x"),
                        training_overrides={"max_steps": 1, "use_cpu": True})
    with pytest.raises(SparseBertError, match="distillation.attention is a loss weight"):
        load_recipe("gmp", ["distillation.attention=-1"])
