"""Learned masks: straight-through gradients, exact TopK counts, SMP-S reallocation, schedules,
baking, resume, frozen weights, and every learned-mask recipe end to end on a tiny BERT."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForMaskedLM

from sparsebert.allocation import n_pruned
from sparsebert.cli import main
from sparsebert.learned_masks import LearnedMasks, binarize, matrix_type, smp_s_keep_ratios
from sparsebert.methods.base import build_method as build_learned_method
from sparsebert.models import embedded_model_dir
from sparsebert.pipeline import DataOptions, train_and_prune
from sparsebert.recipe import load_recipe
from sparsebert.report import sparsity_report
from sparsebert.schedules import cubic_ramp
from sparsebert.targets import select_targets

TRAIN = {"per_device_train_batch_size": 8, "logging_steps": 2, "use_cpu": True,
         "dataloader_pin_memory": False}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _tiny_model(tiny_model_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)


# -- the mechanism ------------------------------------------------------------------------------------
@pytest.mark.parametrize("binarizer,keep,threshold", [("topk", 37, 0.0), ("threshold", 0, 0.1),
                                                      ("sigmoid-threshold", 0, 0.55)])
def test_straight_through_gradient_equals_formula(binarizer, keep, threshold):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g).requires_grad_(True)
    s = torch.randn(8, 12, generator=g).requires_grad_(True)
    upstream = torch.randn(8, 12, generator=g)
    m = binarize(s, binarizer, keep, threshold)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    if binarizer == "topk":
        assert int(m.sum()) == keep
    ((w * m) * upstream).sum().backward()  # dL/d(W⊙M) = upstream
    torch.testing.assert_close(s.grad, upstream * w.detach(), rtol=0, atol=0)  # dL/dS = dL/d(W⊙M) ⊙ W
    torch.testing.assert_close(w.grad, upstream * m.detach(), rtol=0, atol=0)  # dL/dW = dL/d(W⊙M) ⊙ M


def test_parametrized_linear_gradient_is_movement_score():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    model = nn.Sequential(lin)
    w0 = lin.weight.detach().clone()
    masks = LearnedMasks(model, {"0.weight": lin.weight}, "topk", "zeros")
    masks.masks["0.weight"].scores.data.normal_()
    masks.set_keep_ratio(0.4)
    x = torch.randn(3, 6)
    model(x).pow(2).sum().backward()
    m = masks.current_masks()["0.weight"].float()
    ref = nn.Linear(6, 5)  # the same forward with W ⊙ M as a plain weight
    ref.weight.data, ref.bias.data = w0 * m, lin.bias.detach().clone()
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(masks.masks["0.weight"].scores.grad, ref.weight.grad * w0)
    torch.testing.assert_close(masks.original("0.weight").grad, ref.weight.grad * m)


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3, 0.1, 0.03])
def test_topk_keeps_exactly_round_v_n_per_matrix(tiny_model_dir, keep):
    model = _tiny_model(tiny_model_dir)
    masks = LearnedMasks(model, select_targets(model, "encoder-linears"), "topk", "zeros")  # all ties
    masks.set_keep_ratio(keep)
    for name, mask in masks.current_masks().items():
        n = mask.numel()
        assert int(mask.sum()) == n - n_pruned(n, 1.0 - keep) == round(keep * n), name


def test_global_topk_ranks_all_scores_together(tiny_model_dir):
    model = _tiny_model(tiny_model_dir)
    masks = LearnedMasks(model, select_targets(model, "encoder-linears"), "topk")
    g = torch.Generator().manual_seed(4)
    for i, m in enumerate(masks.masks.values()):
        m.scores.data = torch.randn(m.scores.shape, generator=g) * (1 + i)
    masks.set_keep_ratio(0.2, "global")
    current = masks.current_masks()
    total = sum(m.numel() for m in current.values())
    assert sum(int(m.sum()) for m in current.values()) == total - n_pruned(total, 0.8)
    kept = torch.cat([masks.masks[n].scores.detach()[current[n]] for n in current])
    pruned = torch.cat([masks.masks[n].scores.detach()[~current[n]] for n in current])
    assert kept.min() >= pruned.max()


def test_smp_s_keeps_type_average_at_v(tiny_model_dir):
    model = _tiny_model(tiny_model_dir)
    masks = LearnedMasks(model, select_targets(model, "encoder-linears"), "topk", "zeros")
    g = torch.Generator().manual_seed(3)
    for name, m in masks.masks.items():  # layer 0 and layer 1 get different score levels
        m.scores.data = torch.randn(m.scores.shape, generator=g) + (1.5 if ".0." in name else -1.0)
    v = 0.2
    ratios = smp_s_keep_ratios(masks.scores(), v, temperature=1.0)
    types: dict[str, list[str]] = {}
    for name in masks.masks:
        types.setdefault(matrix_type(name), []).append(name)
    assert len(types) == 6  # Q, K, V, AO, FFN-in, FFN-out
    for names in types.values():
        sig = {n: float(torch.sigmoid(masks.masks[n].scores.detach()).mean()) for n in names}
        for n in names:  # v_i = v · L · mean σ(S_i) / Σ_j mean σ(S_j)
            assert ratios[n] == pytest.approx(v * len(names) * sig[n] / sum(sig.values()))
        assert sum(ratios[n] for n in names) / len(names) == pytest.approx(v)
    masks.set_keep_ratio(v, "smp-s")
    current = masks.current_masks()
    for names in types.values():
        kept = sum(int(current[n].sum()) for n in names)
        assert kept == round(v * sum(current[n].numel() for n in names))
    layer0 = [n for n in masks.masks if ".0." in n]
    assert all(int(current[n].sum()) > round(v * current[n].numel()) for n in layer0)
    # a layer whose share would exceed 1 is capped and the average still is v
    capped = smp_s_keep_ratios({"l.0.q": torch.full((4, 4), 9.0), "l.1.q": torch.full((4, 4), -9.0)}, 0.6)
    assert capped["l.0.q"] == 1.0 and capped["l.1.q"] == pytest.approx(0.2)


def test_schedules_follow_their_formulas(tiny_model_dir):
    total = 200
    for name in ("movement", "smp-l", "soft-movement"):
        model = _tiny_model(tiny_model_dir)
        recipe = load_recipe(name, ["sparsity=0.9"])
        method = build_learned_method(model, select_targets(model, recipe.targets), recipe)
        sched = recipe.gradual_schedule()
        t0, t1 = round(sched.start * total), round(sched.end * total)
        for step in (0, 10, 25, 50, 80, 100, 139, 140, 150, 199):
            method.step(step, total)
            assert method.lambda_t == pytest.approx(cubic_ramp(step, t0, t1, recipe.masks.penalty.lambda_))
            if name == "soft-movement":
                if step < total - round(recipe.masks.final_hold * total):
                    tau = cubic_ramp(step, t0, t1, recipe.masks.threshold)
                    assert all(m.threshold == pytest.approx(tau) for m in method.masks.masks.values())
                continue
            s_t = sched.sparsity_at(step, total)
            for m in method.masks.masks.values():
                assert m.keep == m.numel - n_pruned(m.numel, s_t)
    assert cubic_ramp(50, 0, 100, 400) == pytest.approx(400 * (1 - 0.5**3))


def test_mask_train_inits_and_gradual_thresholds(tiny_model_dir):
    model = _tiny_model(tiny_model_dir)
    params = select_targets(model, "encoder-linears")
    w = {n: p.detach().clone() for n, p in params.items()}
    recipe = load_recipe("mask-train", ["sparsity=0.9", "targets=[encoder-linears]",
                                        "masks.init=magnitude-hard"])
    method = build_learned_method(model, params, recipe)
    for name, m in method.masks.masks.items():  # hard: 2φ on the 70% magnitude mask, else 0
        kept = m.scores > 0
        assert m.scores.unique().tolist() == pytest.approx([0.0, 0.02]) and m.threshold == 0.01
        assert int(kept.sum()) == m.numel - n_pruned(m.numel, 0.7)
        assert w[name].abs()[kept].min() >= w[name].abs()[~kept].max()
    total = 100
    for step in range(total):
        method.step(step, total)
    assert method.masks.sparsity() == pytest.approx(0.9, abs=2e-3)
    soft = build_learned_method(_tiny_model(tiny_model_dir), select_targets(_tiny_model(tiny_model_dir),
                                "encoder-linears"), load_recipe("mask-train", [
                                    "masks.init=magnitude-soft", "schedule.init_sparsity=0.9",
                                    "targets=[encoder-linears]"]))
    for m in soft.masks.masks.values():  # soft: m̂ = |W|, φ = k-th magnitude -> exactly 90%
        assert int(m.current_mask().sum()) == m.numel - n_pruned(m.numel, 0.9)


def test_magnitude_scaled_init_is_the_magnitude_ranking_at_mean_one(tiny_model_dir):
    """masks.init=magnitude-scaled: S = |W| / mean|W| per matrix (computed here directly), so
    a top-k keep ratio gives the magnitude mask of each matrix from the first step."""
    model = _tiny_model(tiny_model_dir)
    params = select_targets(model, "encoder-linears")
    w = {n: p.detach().clone() for n, p in params.items()}
    method = build_learned_method(model, params, load_recipe("movement", ["masks.init=magnitude-scaled"]))
    for name, m in method.masks.masks.items():
        a = w[name].abs()
        expected = a / (a.sum() / a.numel())
        assert torch.allclose(m.scores.detach(), expected, rtol=1e-5, atol=0)
        assert float(m.scores.mean()) == pytest.approx(1.0, abs=1e-5)
    method.masks.set_keep_ratio(0.3)
    for name, m in method.masks.masks.items():
        kept = m.current_mask()
        assert int(kept.sum()) == round(0.3 * m.numel)
        assert w[name].abs()[kept].min() >= w[name].abs()[~kept].max()


def test_bake_gives_the_masked_forward_and_a_plain_model(tiny_model_dir, tmp_path):
    model = _tiny_model(tiny_model_dir).eval()
    masks = LearnedMasks(model, select_targets(model, ["encoder-linears", "classifier"]), "topk")
    g = torch.Generator().manual_seed(5)
    for m in masks.masks.values():
        m.scores.data = torch.randn(m.scores.shape, generator=g)
    masks.set_keep_ratio(0.25)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["a good film", "an awful boring plot indeed"], return_tensors="pt", padding=True)
    with torch.no_grad():
        masked = model(**batch).logits
    report = masks.bake()
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, masked)
    model.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, masked)
    rep = sparsity_report(plain, ["encoder-linears"])
    assert rep["target_zeros"] == sum(n_pruned(layer["numel"], 0.75) for layer in rep["layers"])
    assert report["baked_sparsity"] == pytest.approx(report["binarizer_sparsity"])


def test_tied_weights_are_refused(tiny_mlm_dir):
    from sparsebert.errors import SparseBertError

    model = BertForMaskedLM.from_pretrained(tiny_mlm_dir)
    with pytest.raises(SparseBertError, match="tied"):
        LearnedMasks(model, select_targets(model, "embeddings"), "topk")


# -- training ----------------------------------------------------------------------------------------------
def test_smp_leaves_every_weight_bit_identical(tiny_mlm_dir, sst2_dir, tmp_path):
    """MLM head path: nothing but scores learn; checkpoints hold the untouched weights, the final
    model is exactly W ⊙ M of the initial weights."""
    initial = load_file(os.path.join(tiny_mlm_dir, "model.safetensors"))
    out = str(tmp_path / "smp")
    info = train_and_prune(tiny_mlm_dir, DataOptions("sst2", sst2_dir, max_eval_samples=16),
                           load_recipe("smp-s", ["sparsity=0.8"]), out, teacher_path=None,
                           training_overrides={**TRAIN, "max_steps": 4, "save_steps": 2,
                                               "save_total_limit": None})
    assert info["head"].startswith("MLM head") and info["trained_parameters"] == 0
    assert info["prompt"]["label_words"] == ["terrible", "great"]
    for step in (2, 4):
        ckpt = load_file(os.path.join(out, f"checkpoint-{step}", "model.safetensors"))
        scores = [k for k in ckpt if k.endswith(".scores")]
        assert len(scores) == 12 and any(float(ckpt[k].abs().sum()) > 0 for k in scores)
        for key, value in ckpt.items():
            if key.endswith((".scores", ".keep_count", ".threshold_value")):
                continue
            plain = key.replace(".parametrizations.weight.original", ".weight")
            assert _digest(value) == _digest(initial[plain]), key
    final = load_file(os.path.join(out, "model.safetensors"))
    for key, value in final.items():
        if key in initial:
            kept = value != 0
            assert torch.equal(value[kept], initial[key][kept]), key
            if ".encoder." not in key or not key.endswith("weight") or "LayerNorm" in key:
                assert _digest(value) == _digest(initial[key]), key
    assert info["sparsity"]["target_sparsity"] == pytest.approx(0.8, abs=1e-3)
    # evaluating the saved SMP model goes through its MLM head with the same prompt
    from sparsebert.pipeline import evaluate_saved

    res = evaluate_saved(out, DataOptions("sst2", sst2_dir, max_eval_samples=16))
    assert res["metrics"]["eval_accuracy"] == pytest.approx(info["metrics"]["eval_accuracy"])


def test_smp_without_mlm_head_trains_only_the_head(tiny_model_dir, sst2_dir, tmp_path):
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    out = str(tmp_path / "smp-cls")
    info = train_and_prune(tiny_model_dir, DataOptions("sst2", sst2_dir, max_eval_samples=8),
                           load_recipe("smp-l", ["sparsity=0.7"]), out,
                           training_overrides={**TRAIN, "max_steps": 3, "save_strategy": "no"})
    assert info["head"] == "trained classifier (model has no MLM head)"
    assert info["trained_parameters"] == 2 * 32 + 2 + 32 * 32 + 32  # classifier + pooler
    final = load_file(os.path.join(out, "model.safetensors"))
    changed = {k for k in initial if not torch.equal(final[k][final[k] != 0], initial[k][final[k] != 0])}
    assert changed == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                       "bert.pooler.dense.bias"}


def test_resume_keeps_scores_and_masks(tiny_model_dir, sst2_dir, tmp_path):
    recipe = load_recipe("movement", ["sparsity=0.8", "schedule.start=0.0", "schedule.end=0.75",
                                      "schedule.frequency=0.25"])
    data = DataOptions("sst2", sst2_dir, max_eval_samples=8)
    args = {**TRAIN, "max_steps": 8, "save_steps": 4, "save_total_limit": None}
    full = str(tmp_path / "full")
    train_and_prune(tiny_model_dir, data, recipe, full, training_overrides=args)
    ckpt = load_file(os.path.join(full, "checkpoint-4", "model.safetensors"))
    stored = {k: v for k, v in ckpt.items() if k.endswith(".scores")}
    assert len(stored) == 12 and all(float(v.abs().sum()) > 0 for v in stored.values())

    # the checkpoint restores the scores into a fresh model with the same masks attached
    model = _tiny_model(tiny_model_dir)
    method = build_learned_method(model, select_targets(model, recipe.targets), recipe)
    model.load_state_dict(ckpt, strict=False)
    for key, value in stored.items():
        assert torch.equal(model.get_parameter(key), value)
    method.step(4, 8)
    assert 0.0 < method.masks.sparsity() < 0.8

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    info = train_and_prune(tiny_model_dir, data, recipe, resumed, training_overrides=args, resume="auto")
    assert info["train_steps"] == 8
    a = AutoModelForSequenceClassification.from_pretrained(full)
    b = AutoModelForSequenceClassification.from_pretrained(resumed)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x == 0, y == 0), n  # identical masks
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=n)


def test_movement_at_zero_sparsity_trains_exactly_like_dense_finetuning(tiny_model_dir, sst2_dir, tmp_path):
    """Keep ratio 1 all along: the learned-mask machinery (parametrisation, STE, score group)
    must not change a single weight update."""
    data = DataOptions("sst2", sst2_dir, max_eval_samples=8)
    args = {**TRAIN, "max_steps": 4, "save_strategy": "no", "learning_rate": 1e-3, "warmup_steps": 0}
    train_and_prune(tiny_model_dir, data, load_recipe("finetune"), str(tmp_path / "dense"),
                    training_overrides=args)
    train_and_prune(tiny_model_dir, data, load_recipe("movement", ["sparsity=0.0"]), str(tmp_path / "mv"),
                    training_overrides=args)
    a = load_file(str(tmp_path / "dense" / "model.safetensors"))
    b = load_file(str(tmp_path / "mv" / "model.safetensors"))
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert not torch.equal(a["classifier.weight"], initial["classifier.weight"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex('{\n  "'):])


@pytest.mark.parametrize("recipe", ["movement", "soft-movement", "smp-l", "smp-s", "mask-train"])
def test_each_recipe_runs_from_the_cli(recipe, tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = str(tmp_path / recipe)
    rc = main(["prune", "--recipe", recipe, "--task", "sst2", "--data-dir", sst2_dir, "--model",
               tiny_model_dir, "--teacher", tiny_model_dir, "--sparsity", "0.9", "--output-dir", out,
               "--max_steps", "4", "--per_device_train_batch_size", "8", "--use_cpu", "true",
               "--save_strategy", "no", "--max-eval-samples", "8"])
    assert rc == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["train_steps"] == 4
    info = json.load(open(os.path.join(out, "sparsebert.json")))
    assert info["recipe"]["method"] == recipe and info["teacher"] == tiny_model_dir
    assert info["weights_trained"] == (recipe in ("movement", "soft-movement"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    rep = sparsity_report(model, info["recipe"]["targets"])
    assert rep["target_zeros"] == sum(n_pruned(layer["numel"], 0.9) for layer in rep["layers"]) \
        or recipe == "smp-s"
    assert rep["target_zeros"] == pytest.approx(0.9 * rep["target_numel"], abs=len(rep["layers"]))
    assert "raw_binarizer_sparsity" in info["learned_masks"]


def test_recipe_validation_for_learned_masks(tiny_model_dir, sst2_dir, tmp_path):
    from sparsebert.errors import SparseBertError

    with pytest.raises(SparseBertError, match="freezes the weights"):
        load_recipe("smp-l", ["masks.train_weights=true"])
    with pytest.raises(SparseBertError, match="uses topk"):
        load_recipe("movement", ["masks.binarizer=threshold"])
    with pytest.raises(SparseBertError, match=r"unknown key 'score_rl' \(did you mean 'score_lr'\?\)"):
        load_recipe("smp-s", ["masks.score_rl=0.1"])
    with pytest.raises(SparseBertError, match="unknown key 'lambd'"):
        load_recipe("smp-s", ["masks.penalty.lambd=1"])
    with pytest.raises(SparseBertError, match="only for learned-mask methods"):
        load_recipe("gmp", ["masks.binarizer=topk"])
    with pytest.raises(SparseBertError, match="allocation 'uniform' is not available"):
        load_recipe("smp-s", ["allocation=uniform"])
    with pytest.raises(SparseBertError, match="set lr.rewarm: false"):
        load_recipe("movement", ["lr.rewarm=true"])
    with pytest.raises(SparseBertError, match=r"\(0, 1\)"):
        load_recipe("soft-movement", ["masks.threshold=1.5"])
    assert load_recipe("smp-s", ["masks.penalty.lambda=10"]).to_dict()["masks"]["penalty"] == {"lambda": 10.0}
    with pytest.raises(SparseBertError, match="needs a model already fine-tuned"):
        train_and_prune(embedded_model_dir(), DataOptions("sst2", sst2_dir), load_recipe("mask-train"),
                        str(tmp_path / "x"))
    with pytest.raises(SparseBertError, match="no prompt template"):
        from sparsebert.tasks import get_task
        from sparsebert.tasks.prompts import get_prompt

        get_prompt(get_task("stsb"))


def test_prompt_encoding_and_head_read_the_mask_position(tiny_mlm_dir):
    from sparsebert.prompt_head import PromptClassifier
    from sparsebert.tasks import get_task
    from sparsebert.tasks.prompts import PROMPTS, encode_prompt, label_word_ids

    tok = AutoTokenizer.from_pretrained(tiny_mlm_dir)
    ids = encode_prompt(tok, PROMPTS["mnli"], "the cat sat " * 40, "a cat is sitting", 32)
    assert len(ids) == 32 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids.count(tok.mask_token_id) == 1
    words = label_word_ids(tok, PROMPTS["sst2"])
    assert tok.convert_ids_to_tokens(words) == ["terrible", "great"]
    mlm = BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    clf = PromptClassifier(mlm, tok.mask_token_id, words).eval()
    enc = [encode_prompt(tok, PROMPTS["sst2"], t, None, 32) for t in ("a good film", "bad")]
    width = max(map(len, enc))
    input_ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    attn = (torch.arange(width)[None] < torch.tensor([len(e) for e in enc])[:, None]).long()
    with torch.no_grad():
        logits = clf(input_ids=input_ids, attention_mask=attn).logits
        full = mlm(input_ids=input_ids, attention_mask=attn).logits
    pos = (input_ids == tok.mask_token_id).float().argmax(1)
    torch.testing.assert_close(logits, full[torch.arange(2), pos][:, words])
    assert get_task("sst2").num_labels == logits.shape[1]
