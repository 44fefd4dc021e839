"""`finetune --recipe mlm-head`: a masked-LM head added to a model without one, trained with
the body frozen bit for bit; the result is a plain masked-LM model that SMP's label-word head
uses (nothing but masks learned)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertModel

from sparsebert.cli import main
from sparsebert.models import embedded_model_dir
from sparsebert.prompt_head import has_mlm_head
from sparsebert.tasks.mlm import text_mlm_task


def test_mlm_head_trains_the_head_only_and_smp_uses_it(tmp_path, sst2_dir, capsys):
    body = str(tmp_path / "body")  # a sentence encoder: BertModel, no MLM head
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(body)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(body)
    text = tmp_path / "text.txt"
    text.write_text(
        "".join(f"sentence {i} is about the sea , the weather and a good film .\n" for i in range(300))
    )
    text_mlm_task("mlm-test-text", str(text))
    out = str(tmp_path / "mlm")
    assert (
        main(
            [
                "finetune",
                "--recipe",
                "mlm-head",
                "--task",
                "mlm-test-text",
                "--model",
                body,
                "--output-dir",
                out,
                "--max-seq-length",
                "32",
                "--max_steps",
                "6",
                "--per_device_train_batch_size",
                "8",
                "--use_cpu",
                "true",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    assert has_mlm_head(out)
    mlm = AutoModelForMaskedLM.from_pretrained(out)
    start = load_file(os.path.join(body, "model.safetensors"))
    saved = load_file(os.path.join(out, "model.safetensors"))
    compared = 0
    for name, value in start.items():  # the body is bit-identical (a masked LM has no pooler)
        if name.startswith("pooler."):
            continue
        assert torch.equal(saved[f"bert.{name}"], value), name
        compared += 1
    assert compared == len(start) - 2
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight  # still tied
    info = json.load(open(os.path.join(out, "sparsebert.json")))
    assert info["method"]["name"] == "head-only" and "eval_accuracy" in info["metrics"]
    assert set(info["method"]["trained"]) == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    }
    # SMP through the new MLM head: label words, weights bit-identical, nothing else learned
    smp = str(tmp_path / "smp")
    capsys.readouterr()
    assert (
        main(
            [
                "prune",
                "--recipe",
                "smp-l",
                "--task",
                "sst2",
                "--data-dir",
                sst2_dir,
                "--model",
                out,
                "--output-dir",
                smp,
                "--sparsity",
                "0.5",
                "--max_steps",
                "2",
                "--use_cpu",
                "true",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    smp_info = json.load(open(os.path.join(smp, "sparsebert.json")))
    assert smp_info["head"].startswith("MLM head") and smp_info["trained_parameters"] == 0
    assert smp_info["prompt"]["label_words"] == ["terrible", "great"]


def test_finetune_refuses_a_pruning_recipe(tmp_path, sst2_dir, capsys):
    assert (
        main(
            [
                "finetune",
                "--recipe",
                "gmp",
                "--task",
                "sst2",
                "--data-dir",
                sst2_dir,
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "run it with `sparsebert prune`" in capsys.readouterr().err


def test_upstream_pruning_then_transfer_keeps_the_mask(tmp_path, tiny_mlm_dir, sst2_dir):
    """pretrain (recipe gmp-upstream) on masked-LM text (KD from the dense MLM teacher over masked
    positions, T = 5.5) -> a plain masked LM at exactly 90% -> finetune on SST-2: the same zeros."""
    from transformers import AutoModelForSequenceClassification

    from sparsebert.targets import select_targets

    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} : the sea , the weather and a good film .\n" for i in range(300)))
    text_mlm_task("mlm-upstream-text", str(text))
    up = str(tmp_path / "up")
    assert (
        main(
            [
                "pretrain",
                "--task",
                "mlm-upstream-text",
                "--model",
                tiny_mlm_dir,
                "--teacher",
                tiny_mlm_dir,
                "--output-dir",
                up,
                "--max-seq-length",
                "32",
                "--max_steps",
                "6",
                "--per_device_train_batch_size",
                "8",
                "--use_cpu",
                "true",
                "--save_strategy",
                "no",
                "--set",
                "schedule.frequency=0.2",
            ]
        )
        == 0
    )
    info = json.load(open(os.path.join(up, "sparsebert.json")))
    assert info["recipe"]["distillation"]["temperature"] == 5.5 and "kd_loss" in info["loss_terms"]
    mlm = AutoModelForMaskedLM.from_pretrained(up)
    zeros = {
        n.removeprefix("bert."): p.detach() == 0 for n, p in select_targets(mlm, "encoder-linears").items()
    }
    total = sum(z.numel() for z in zeros.values())
    assert sum(int(z.sum()) for z in zeros.values()) == round(0.9 * total)
    down = str(tmp_path / "down")
    assert (
        main(
            [
                "finetune",
                "--task",
                "sst2",
                "--data-dir",
                sst2_dir,
                "--model",
                up,
                "--output-dir",
                down,
                "--max_steps",
                "3",
                "--learning_rate",
                "1e-2",
                "--use_cpu",
                "true",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    clf = AutoModelForSequenceClassification.from_pretrained(down)
    after = {
        n.removeprefix("bert."): p.detach() == 0 for n, p in select_targets(clf, "encoder-linears").items()
    }
    assert after.keys() == zeros.keys()
    assert all(torch.equal(after[n], zeros[n]) for n in zeros)


def test_pretrain_needs_a_masked_lm_task(tmp_path, sst2_dir, capsys):
    assert (
        main(["pretrain", "--task", "sst2", "--data-dir", sst2_dir, "--output-dir", str(tmp_path / "o")]) == 2
    )
    assert "pretrain trains a masked LM" in capsys.readouterr().err
