"""The peers of `bench/peers.py` (issue 12, item 7) on a tiny random BERT: torch.ao's
WeightNormSparsifier + CubicSL reaches the sparsity exactly on the encoder linears and saves a
model plain transformers loads; llm-compressor only where its own venv has been built."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from sparsebert.report import sparsity_report
from sparsebert.targets import select_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", os.path.join(ROOT, "bench", "peers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def test_pruning_events_follow_the_schedule():
    assert peers.pruning_events(100) == [10, 20, 30, 40, 50, 60, 70]
    assert peers.pruning_events(5) == [1, 2, 3, 4]
    assert peers.pruning_events(1) == [1]


def test_sparsifier_config_is_the_encoder_linears(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    config = peers.encoder_linear_config(model)
    assert [c["tensor_fqn"] for c in config] == list(select_targets(model, "encoder-linears"))
    assert len(config) == 6 * model.config.num_hidden_layers


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_torch_ao_peer_reaches_the_sparsity_and_saves_a_plain_model(tiny_model_dir, sst2_dir, tmp_path,
                                                                    sparsity):
    out = str(tmp_path / "ao")
    row = peers.run_torch_ao(tiny_model_dir, "sst2", sparsity, steps=6, batch_size=16, lr=1e-3,
                             data_dir=sst2_dir, out_dir=out, max_seq_length=16)
    assert row["method"] == "torch.ao-wns-cubic" and row["train_steps"] == 6
    assert row["metric"] == "accuracy" and 0.0 <= row["value"] <= 1.0
    assert row["peer"]["levels"][-1][1] == pytest.approx(sparsity)
    model = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers, no parametrizations
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    report = sparsity_report(model, "encoder-linears")
    for layer in report["layers"]:  # every matrix exactly round(S * numel) zeros (random weights: no ties)
        assert layer["zeros"] == round(sparsity * layer["numel"]), layer["name"]
    assert row["measured_sparsity"] == pytest.approx(report["target_sparsity"])
    assert row["measured_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert sparsity_report(model, ["pooler", "classifier"])["target_zeros"] == 0  # the head stays dense


def test_torch_ao_peer_distils_from_a_teacher(tiny_model_dir, sst2_dir, tmp_path):
    row = peers.run_torch_ao(tiny_model_dir, "sst2", 0.5, steps=3, batch_size=16, lr=1e-3, data_dir=sst2_dir,
                             out_dir=str(tmp_path / "ao-kd"), teacher=tiny_model_dir, max_seq_length=16)
    assert row["peer"]["kd"] == {"hardness": 1.0, "temperature": 2.0}
    assert row["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_calibration_file_is_sparsebert_sample(tiny_model_dir, sst2_dir, tmp_path):
    path = str(tmp_path / "calib.pt")
    n = peers.write_calibration(tiny_model_dir, "sst2", sst2_dir, path, samples=8, max_seq_length=16)
    batches = torch.load(path, weights_only=True)
    assert n == len(batches) == 8
    assert all(b["input_ids"].shape[0] == 1 and b["attention_mask"].all() for b in batches)  # no padding


@pytest.mark.skipif(peers.llmc_python() is None,
                    reason="llm-compressor venv not built (bench/work/peers/llmc-venv: "
                           "`python bench/peers.py build-venv`); CI does not build it")
@pytest.mark.parametrize(("method", "pattern"), [("sparsegpt", None), ("wanda", None), ("sparsegpt", "2:4")])
def test_llmcompressor_peer_prunes_the_encoder_linears(tiny_model_dir, sst2_dir, tmp_path, method, pattern):
    out = str(tmp_path / method)
    row = peers.run_llmcompressor(tiny_model_dir, "sst2", method, 0.5, sst2_dir, out, pattern=pattern,
                                  calibration_samples=8, max_seq_length=16, timeout=600)
    assert "error" not in row, row.get("output_tail")
    assert row["peer"]["pipeline"] == "sequential" and row["calibration_examples"] == 8
    model = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers
    report = sparsity_report(model, "encoder-linears")
    assert report["target_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(row["peer"]["pruned_linears"]) == 6 * model.config.num_hidden_layers
    assert sparsity_report(model, ["pooler", "classifier"])["target_zeros"] == 0
    assert ("2:4" in row["measured_nm"]) == (pattern == "2:4")
    assert 0.0 <= row["value"] <= 1.0
