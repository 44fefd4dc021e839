"""Compressed checkpoints (bitmask + values), ONNX export and the export entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_bert as shared_tiny_bert
from transformers import BertForSequenceClassification

from sparsebert.errors import SparseBertError
from sparsebert.export import (
    COMPRESSED_FILE,
    export_model,
    export_onnx,
    from_compressed,
    load_compressed,
    load_compressed_into,
    save_compressed,
    size_report,
)
from sparsebert.targets import select_targets


def tiny_bert(sparsity: float | None, seed: int = 0) -> BertForSequenceClassification:
    return shared_tiny_bert(sparsity, seed, hidden=32, intermediate=64, num_labels=2)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": torch.randint(0, 100, (2, 12), generator=gen), "attention_mask": mask}


def test_round_trip_is_bit_exact_in_fp32(tmp_path):
    model = tiny_bert(0.9)
    state = model.state_dict()
    sizes = save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(tmp_path / "m.safetensors")
    assert list(loaded) == list(state)
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(bits(loaded[name]), bits(t)), name
    assert sizes["n_compressed"] == 12  # 6 encoder linears x 2 layers
    assert sizes["compressed_bytes"] == (tmp_path / "m.safetensors").stat().st_size


def test_fp16_values_are_close_and_smaller(tmp_path):
    model = tiny_bert(0.8)
    s32 = save_compressed(model, tmp_path / "a.safetensors")
    s16 = save_compressed(model, tmp_path / "b.safetensors", value_dtype="fp16")
    assert s16["pruned_compressed_bytes"] < s32["pruned_compressed_bytes"]
    loaded = load_compressed(tmp_path / "b.safetensors")
    for name, t in model.state_dict().items():
        assert loaded[name].dtype == t.dtype
        torch.testing.assert_close(loaded[name], t, rtol=1e-3, atol=1e-4)
        assert torch.equal(loaded[name] == 0, t == 0)


def test_size_report_counts_mask_and_values():
    model = tiny_bert(0.9)
    report = size_report(model)
    pruned = [p for p in select_targets(model, "encoder-linears").values()]
    dense = sum(p.numel() * 4 for p in pruned)
    packed = sum(-(-p.numel() // 8) + int((p != 0).sum()) * 4 for p in pruned)
    assert report["pruned_dense_bytes"] == dense
    assert report["pruned_compressed_bytes"] == packed
    assert report["compressed_bytes"] < report["dense_bytes"]


def test_negative_zero_and_untouched_tensors(tmp_path):
    w = torch.tensor([[0.0, -0.0, 1.5, 0.0], [0.0, 0.0, 0.0, -2.25]])
    state = {"w": w, "bias": torch.tensor([0.0, -0.0, 3.0]), "ids": torch.arange(4)}
    save_compressed(state, tmp_path / "s.safetensors", min_sparsity=0.5)
    loaded = load_compressed(tmp_path / "s.safetensors")
    assert torch.equal(loaded["w"], w)  # -0.0 comes back as +0.0: equal, not bit-equal
    assert torch.equal(bits(loaded["bias"]), bits(state["bias"]))  # not compressed: exact
    assert torch.equal(loaded["ids"], state["ids"])


def test_load_into_model(tmp_path):
    model = tiny_bert(0.9)
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = load_compressed_into(tiny_bert(None, seed=1), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(**batch()).logits, model(**batch()).logits)


def test_compressed_errors(tmp_path):
    with pytest.raises(SparseBertError, match="nothing to compress"):
        save_compressed(tiny_bert(None), tmp_path / "d.safetensors")
    with pytest.raises(SparseBertError, match="unknown value dtype"):
        save_compressed(tiny_bert(0.9), tmp_path / "d.safetensors", value_dtype="int8")
    with pytest.raises(SparseBertError, match="no compressed checkpoint"):
        load_compressed(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SparseBertError, match="not a sparsebert compressed checkpoint"):
        load_compressed(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SparseBertError, match="not a safetensors file"):
        load_compressed(tmp_path / "junk.safetensors")


def test_export_model_compressed_directory(tmp_path):
    model = tiny_bert(0.9)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    report = export_model(tmp_path / "src", tmp_path / "out", format="compressed", fp16=True)
    out = tmp_path / "out"
    assert (out / COMPRESSED_FILE).is_file() and (out / "config.json").is_file()
    assert "vocab.txt" in report["copied"] and report["value_dtype"] == "fp16"
    assert json.loads((out / "sparsebert_export.json").read_text())["format"] == "compressed"
    assert not any(p.name == "model.safetensors" for p in out.iterdir())
    reloaded = from_compressed(out)
    assert type(reloaded) is BertForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch()).logits, model(**batch()).logits, rtol=1e-3, atol=1e-3
        )


def test_export_onnx_matches_pytorch(tmp_path):
    import onnxruntime as ort

    model = tiny_bert(0.9)
    info = export_onnx(model, {"batch": 2, "seq": 8}, tmp_path / "m.onnx")
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert info["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feeds = batch()
    feeds["token_type_ids"] = torch.zeros_like(feeds["input_ids"])
    got = session.run(["logits"], {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        ref = model(**feeds).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-4
    assert not model.training


def test_export_model_errors(tmp_path):
    with pytest.raises(SparseBertError, match="does not exist"):
        export_model(tmp_path / "nope", tmp_path / "out")
    model = tiny_bert(0.9)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(SparseBertError, match="unknown export format"):
        export_model(tmp_path / "src", tmp_path / "out", format="tflite")
    with pytest.raises(SparseBertError, match="compressed format only"):
        export_model(tmp_path / "src", tmp_path / "out", format="onnx", fp16=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparseBertError, match="no config.json"):
        export_model(tmp_path / "empty", tmp_path / "out")
