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


# -- integrity: checksums in the compressed format (version 2) --------------------------------------
QUERY = "bert.encoder.layer.0.attention.self.query.weight"


def write_version_1(model, path) -> None:
    """A compressed file as sparsebert wrote it before checksums (format version 1)."""
    from sparsebert.export import compress_state_dict

    tensors, metadata = compress_state_dict(model)
    metadata = {k: metadata[k] for k in ("format", "value_dtype", "tensors")}
    metadata["format_version"] = "1"
    save_file(tensors, str(path), metadata=metadata)


def rewrite(path, change_tensors=None, change_metadata=None, fix_checksums=True) -> None:
    """Rewrite a compressed file with changed tensors/metadata (checksums recomputed)."""
    from safetensors import safe_open

    from sparsebert.export import tensor_checksum
    from sparsebert.export.compressed import _crc

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    if change_tensors:
        change_tensors(tensors)
    if change_metadata:
        change_metadata(metadata)
    if fix_checksums:
        metadata["checksums"] = json.dumps({n: tensor_checksum(t) for n, t in tensors.items()})
        metadata["tensors_checksum"] = _crc(metadata["tensors"].encode())
    save_file(tensors, str(path), metadata=metadata)


def tensor_offset(path, name) -> int:
    from sparsebert.safe_load import safetensors_header

    header, _ = safetensors_header(path)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return 8 + n + header[name]["data_offsets"][0]


def test_every_stored_tensor_has_a_checksum(tmp_path):
    from safetensors import safe_open

    from sparsebert.export import CHECKSUM_ALGORITHM, FORMAT_VERSION, tensor_checksum

    assert FORMAT_VERSION == 2 and CHECKSUM_ALGORITHM == "crc32"
    save_compressed(tiny_bert(0.9), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        sums = json.loads(meta["checksums"])
        assert meta["format_version"] == "2" and meta["checksum"] == "crc32"
        assert set(sums) == set(f.keys())
        for name in f.keys():
            assert sums[name] == tensor_checksum(f.get_tensor(name))


@pytest.mark.parametrize("tensor,byte,xor", [
    (QUERY + "::values", 0, 0x01),  # a mantissa bit of a kept weight
    (QUERY + "::values", 3, 0x40),  # its exponent
    (QUERY + "::mask", 0, 0xFF),  # eight mask bits
    ("bert.embeddings.LayerNorm.bias", 0, 0x01),  # a zero of a dense tensor
])  # fmt: skip
def test_load_compressed_detects_a_flipped_byte(tmp_path, tensor, byte, xor):
    path = tmp_path / "m.safetensors"
    save_compressed(tiny_bert(0.9), path)
    data = bytearray(path.read_bytes())
    data[tensor_offset(path, tensor) + byte] ^= xor
    path.write_bytes(bytes(data))
    with pytest.raises(SparseBertError) as err:
        load_compressed(path)
    msg = str(err.value)
    assert str(path) in msg and "is corrupted: checksum mismatch in tensor" in msg
    assert f"'{tensor}'" in msg and "re-export it" in msg


def test_two_swapped_mask_bits_are_detected(tmp_path):
    """Same popcount, same number of values: only the checksum can tell."""
    path = tmp_path / "m.safetensors"
    save_compressed(tiny_bert(0.9), path)
    start = tensor_offset(path, QUERY + "::mask")
    data = bytearray(path.read_bytes())
    for i in range(start, start + 128):
        b = data[i]
        if (b & 1) != ((b >> 1) & 1):  # bits 0 and 1 differ: swap them
            data[i] = b ^ 0b11
            break
    else:
        pytest.fail("no byte with two different adjacent bits")
    path.write_bytes(bytes(data))
    with pytest.raises(SparseBertError, match=rf"corrupted: checksum mismatch in tensor '{QUERY}::mask'"):
        load_compressed(path)


def test_popcount_shape_and_description_checks(tmp_path):
    path = tmp_path / "m.safetensors"
    save_compressed(tiny_bert(0.9), path)
    good = path.read_bytes()

    def drop_value(t):
        t[QUERY + "::values"] = t[QUERY + "::values"][:-1].clone()

    rewrite(path, drop_value)
    with pytest.raises(SparseBertError, match=rf"mask of '{QUERY}' has \d+ bits set but \d+ values"):
        load_compressed(path)

    def bad_shape(meta):
        info = json.loads(meta["tensors"])
        info[QUERY]["shape"] = [32, 40]
        info["classifier.bias"]["shape"] = [3]
        meta["tensors"] = json.dumps(info)

    path.write_bytes(good)
    rewrite(path, change_metadata=bad_shape)
    with pytest.raises(SparseBertError) as err:
        load_compressed(path)
    assert f"mask of '{QUERY}' is uint8 [128], expected uint8 [160]" in str(err.value)
    assert "and 1 more problem" in str(err.value)

    path.write_bytes(good)
    rewrite(path, change_metadata=bad_shape, fix_checksums=False)  # description changed after save
    with pytest.raises(SparseBertError, match=r"checksum mismatch in the tensor description"):
        load_compressed(path)

    def extra_tensor(t):
        t["intruder"] = torch.zeros(2)

    path.write_bytes(good)
    rewrite(path, extra_tensor)
    with pytest.raises(SparseBertError, match="tensor 'intruder' is not in the tensor description"):
        load_compressed(path)


def test_mask_padding_bits_must_be_zero(tmp_path):
    path = tmp_path / "s.safetensors"
    save_compressed({"w": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])}, path)

    def set_padding_bit(t):
        bits = t["w::mask"].clone()
        bits[1] |= 0x80  # bit 15 of 16: beyond the 9 weights
        t["w::mask"] = bits

    rewrite(path, set_padding_bit)
    with pytest.raises(SparseBertError, match="mask of 'w' has bits set beyond its 9 weights"):
        load_compressed(path)


def test_truncated_compressed_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_compressed(tiny_bert(0.9), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SparseBertError, match=r"not a safetensors file, or it is truncated"):
        load_compressed(path)


def test_version_1_files_load_with_a_warning(tmp_path, caplog):
    model = tiny_bert(0.9)
    write_version_1(model, tmp_path / "v1.safetensors")
    with caplog.at_level("WARNING", logger="sparsebert"):
        loaded = load_compressed(tmp_path / "v1.safetensors")
    for name, t in model.state_dict().items():
        assert torch.equal(bits(loaded[name]), bits(t)), name
    assert "version 1, which has no checksums: it cannot be verified" in caplog.text


# -- export: bad --out, bad --opset, a compressed export as input -----------------------------------
def test_export_out_is_an_existing_file(tmp_path, capsys):
    from sparsebert.cli import main

    tiny_bert(0.9).save_pretrained(tmp_path / "src")
    (tmp_path / "out.onnx").write_text("")
    with pytest.raises(SparseBertError, match=r"--out .*out.onnx is an existing file, not a directory"):
        export_model(tmp_path / "src", tmp_path / "out.onnx")
    with pytest.raises(SparseBertError, match=r"its parent .*out.onnx is an existing file"):
        export_model(tmp_path / "src", tmp_path / "out.onnx" / "sub")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "sparsebert: error:" in err and "existing file" in err and "Traceback" not in err


def test_export_opset_out_of_range(tmp_path, capsys):
    from sparsebert.cli import main
    from sparsebert.export import onnx_opset_range

    low, high = onnx_opset_range()
    tiny_bert(0.9).save_pretrained(tmp_path / "src")
    expected = rf"ONNX opset 3 is not supported: .* exports opsets {low} to {high}"
    with pytest.raises(SparseBertError, match=expected):
        export_model(tmp_path / "src", tmp_path / "out", format="onnx", opset=3)
    assert not (tmp_path / "out").exists()  # checked before any work
    with pytest.raises(SparseBertError, match="opset 99 is not supported"):
        export_onnx(tiny_bert(0.9), None, tmp_path / "m.onnx", opset=99)
    assert main(["export", str(tmp_path / "src"), "--format", "onnx", "--out", str(tmp_path / "o"),
                 "--opset", "3"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"opsets {low} to {high}" in err and "Traceback" not in err


def test_export_opset_the_model_cannot_use(tmp_path):
    expected = r"ONNX export of BertForSequenceClassification at opset 7 failed: .*Try a newer opset"
    with pytest.raises(SparseBertError, match=expected):
        export_onnx(tiny_bert(0.9), {"batch": 2, "seq": 8}, tmp_path / "m.onnx", opset=7)


def test_export_of_a_compressed_export(tmp_path):
    model = tiny_bert(0.9)
    model.save_pretrained(tmp_path / "src")
    export_model(tmp_path / "src", tmp_path / "c")
    assert (tmp_path / "c" / "checksums.json").is_file()
    info = export_model(tmp_path / "c", tmp_path / "o", format="onnx")
    assert info["onnx"]["max_abs_diff"] <= 1e-4
    assert "checksums.json" not in info["copied"] and "sparsebert_export.json" not in info["copied"]
    files = json.loads((tmp_path / "o" / "checksums.json").read_text())["files"]
    assert "model.onnx" in files and COMPRESSED_FILE not in files
    export_model(tmp_path / "c", tmp_path / "c2")
    for name, t in model.state_dict().items():
        assert torch.equal(load_compressed(tmp_path / "c2")[name], t), name


def test_export_of_a_corrupted_model_is_refused(tmp_path, capsys):
    from sparsebert.cli import main

    tiny_bert(0.9).save_pretrained(tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is not a valid safetensors file (truncated or corrupted)" in err
