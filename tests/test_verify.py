"""`sparsebert verify`, checksums.json and safe loading: nothing corrupted loads silently."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert as shared_tiny_bert

from sparsebert.cli import main
from sparsebert.errors import SparseBertError
from sparsebert.export import COMPRESSED_FILE, export_model, load_any, save_compressed
from sparsebert.masks import FixedMasks
from sparsebert.report import sparsity_report
from sparsebert.safe_load import check_model_folder, safetensors_header
from sparsebert.targets import select_targets
from sparsebert.verify import CHECKSUMS_FILE, verify_path, write_checksums

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
LN_BIAS = "bert.embeddings.LayerNorm.bias"  # all zeros at initialisation, never compressed


def tiny_bert(sparsity: float | None = 0.9, seed: int = 0):
    return shared_tiny_bert(sparsity, seed, hidden=32, intermediate=64, num_labels=2)


def save_model(folder: Path, model=None, run_info: bool = True, checksums: bool = True) -> Path:
    """A saved model as the pipeline leaves it: weights, config, sparsebert.json, checksums.json."""
    model = model if model is not None else tiny_bert()
    model.save_pretrained(folder)
    if run_info:
        (folder / "sparsebert.json").write_text(json.dumps({"sparsity": sparsity_report(model)}))
    if checksums:
        write_checksums(folder)
    return folder


def save_checkpoint(folder: Path, checksums: bool = True) -> Path:
    """A training checkpoint: weights, masks.safetensors and (fake) pickled trainer state."""
    model = tiny_bert()
    model.save_pretrained(folder)
    FixedMasks.from_zeros(select_targets(model, "encoder-linears")).save(str(folder))
    (folder / "optimizer.pt").write_bytes(b"\x80\x04 not really a pickle")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    if checksums:
        write_checksums(folder)
    return folder


def save_export(tmp_path: Path) -> Path:
    src = save_model(tmp_path / "src")
    export_model(src, tmp_path / "export")
    return tmp_path / "export"


def span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``name`` in a safetensors file."""
    header, _ = safetensors_header(path)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def flip(path: Path, offset: int, xor: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= xor
    path.write_bytes(bytes(data))


def element_offset(path: Path, name: str, position: str) -> tuple[int, int]:
    """(byte offset, xor) for a one-byte flip in ``name``: ``value`` (low mantissa byte of a
    non-zero entry), ``exponent`` (top byte of a non-zero float), ``zero`` (a zero entry)."""
    t = load_file(str(path))[name].reshape(-1)
    start, _ = span(path, name)
    size = t.element_size()
    if position == "zero":
        i = int((t == 0).nonzero()[0])
        return start + i * size, 0x01
    i = int((t != 0).nonzero()[0])
    if position == "exponent":
        return start + i * size + size - 1, 0x40
    return start + i * size, 0x01


def problems_of(path: Path) -> list[str]:
    result = verify_path(path)
    return result.problems


# -- clean folders pass ---------------------------------------------------------------------------
def test_clean_model_checkpoint_and_export_pass(tmp_path, capsys):
    run = save_model(tmp_path / "run")
    save_checkpoint(run / "checkpoint-2")
    export = save_export(tmp_path)
    for folder in (run, run / "checkpoint-2", export):
        result = verify_path(folder)
        assert result.ok, result.problems
        assert not result.warnings, result.warnings
    checked = "\n".join(verify_path(run).checked)
    assert "sparsebert.json: zero counts of 12 layers match" in checked
    assert "checkpoint-2: masks.safetensors: 12 masks" in checked
    assert "checksums.json" in checked
    assert "checksums ok" in "\n".join(verify_path(export).checked)
    export_model(run, tmp_path / "fp16", fp16=True)  # fp16 may round tiny values to 0: still passes
    assert verify_path(tmp_path / "fp16").ok
    assert main(["verify", str(run)]) == 0
    assert "all checks passed" in capsys.readouterr().out
    assert main(["verify", str(export / COMPRESSED_FILE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_write_checksums_lists_every_file(tmp_path):
    folder = save_model(tmp_path / "m", checksums=False)
    path = write_checksums(folder)
    assert path == str(folder / CHECKSUMS_FILE)
    data = json.loads(Path(path).read_text())
    assert data["algorithm"] == "sha256"
    assert set(data["files"]) == {"model.safetensors", "config.json", "sparsebert.json"}
    size = (folder / "model.safetensors").stat().st_size
    assert data["files"]["model.safetensors"]["bytes"] == size
    with pytest.raises(SparseBertError, match="not a folder"):
        write_checksums(folder / "model.safetensors")


def test_the_embedded_model_verifies(capsys):
    """A real trained model has no value above the 'suspicious' magnitude: no false alarm."""
    from sparsebert.models import embedded_model_dir

    result = verify_path(embedded_model_dir())
    assert result.ok, result.problems


# -- one-byte flips ---------------------------------------------------------------------------------
FLIPS = [
    # (kind, file, tensor, position)
    ("model", "model.safetensors", QUERY, "value"),
    ("model", "model.safetensors", QUERY, "exponent"),
    ("model", "model.safetensors", QUERY, "zero"),
    ("model", "model.safetensors", LN_BIAS, "zero"),
    ("checkpoint", "model.safetensors", QUERY, "value"),
    ("checkpoint", "model.safetensors", QUERY, "exponent"),
    ("checkpoint", "model.safetensors", QUERY, "zero"),
    ("checkpoint", "masks.safetensors", QUERY, "value"),
    ("checkpoint", "masks.safetensors", QUERY, "exponent"),
    ("checkpoint", "masks.safetensors", QUERY, "zero"),
    ("export", COMPRESSED_FILE, QUERY + "::values", "value"),
    ("export", COMPRESSED_FILE, QUERY + "::values", "exponent"),
    ("export", COMPRESSED_FILE, QUERY + "::mask", "zero"),
    ("export", COMPRESSED_FILE, QUERY + "::mask", "value"),
    ("export", COMPRESSED_FILE, LN_BIAS, "zero"),
]


def make(kind: str, tmp_path: Path) -> Path:
    if kind == "model":
        return save_model(tmp_path / "m")
    if kind == "checkpoint":
        return save_checkpoint(tmp_path / "checkpoint-4")
    return save_export(tmp_path)


@pytest.mark.parametrize("kind,file,tensor,position", FLIPS)
def test_one_byte_flip_is_caught_with_checksums(tmp_path, kind, file, tensor, position):
    folder = make(kind, tmp_path)
    offset, xor = element_offset(folder / file, tensor, position)
    flip(folder / file, offset, xor)
    result = verify_path(folder)
    assert not result.ok
    assert any(p.startswith(f"{file} is corrupted: checksum mismatch") for p in result.problems), result
    if kind == "export":  # the format's own CRC-32 names the tensor
        assert any(f"checksum mismatch in tensor '{tensor}'" in p for p in result.problems), result


@pytest.mark.parametrize("kind,file,tensor,position,words", [
    ("model", "model.safetensors", QUERY, "exponent", "is suspicious: 1 value(s) with |w| > 10000"),
    ("model", "model.safetensors", QUERY, "zero", "sparsebert.json recorded"),
    ("checkpoint", "model.safetensors", QUERY, "zero", "masked-out weight(s) of"),
    ("checkpoint", "masks.safetensors", QUERY, "value", "masked-out weight(s) of"),
    ("checkpoint", "masks.safetensors", QUERY, "exponent", "values other than 0 and 1"),
    ("export", COMPRESSED_FILE, QUERY + "::values", "value", "checksum mismatch in tensor"),
    ("export", COMPRESSED_FILE, LN_BIAS, "zero", "checksum mismatch in tensor"),
])  # fmt: skip
def test_flips_caught_without_checksums_json(tmp_path, kind, file, tensor, position, words):
    """Without checksums.json the weights themselves still betray a flipped exponent or zero."""
    folder = make(kind, tmp_path)
    (folder / CHECKSUMS_FILE).unlink()
    offset, xor = element_offset(folder / file, tensor, position)
    flip(folder / file, offset, xor)
    problems = problems_of(folder)
    assert any(words in p for p in problems), problems
    assert any(tensor.split("::")[0] in p for p in problems), problems


def test_header_flip_and_truncation_are_named(tmp_path, capsys):
    folder = save_model(tmp_path / "m")
    path = folder / "model.safetensors"
    flip(path, 20, 0x20)  # inside the JSON header
    problems = problems_of(folder)
    assert any(p.startswith("model.safetensors is corrupted: checksum mismatch") for p in problems)
    folder = save_model(tmp_path / "t")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    problems = problems_of(folder)
    assert any("truncated since it was saved" in p for p in problems), problems
    assert any(p.startswith("model.safetensors is not a valid safetensors file (truncated or corrupted)")
               for p in problems), problems
    assert main(["verify", str(folder)]) == 2
    captured = capsys.readouterr()
    assert "PROBLEMS" in captured.out and "model.safetensors" in captured.out
    assert "sparsebert: error:" in captured.err and "Traceback" not in captured.err


# -- what verify checks without checksums ------------------------------------------------------------
def test_nan_inf_and_huge_values_are_named(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0, :3] = float("nan")
        model.classifier.weight[1, 0] = float("inf")
        model.bert.pooler.dense.weight[0, :2] = torch.tensor([1e35, -3e5])
    folder = save_model(tmp_path / "m", model, checksums=False)
    problems = problems_of(folder)
    assert any("'classifier.weight' has 3 NaN and 1 infinite values" in p for p in problems), problems
    assert any("'bert.pooler.dense.weight' is suspicious: 2 value(s)" in p and "1e+35" in p
               for p in problems), problems


def test_masks_must_agree_with_the_model(tmp_path):
    folder = save_checkpoint(tmp_path / "checkpoint-2", checksums=False)
    masks = load_file(str(folder / "masks.safetensors"))
    masks["bert.encoder.layer.9.output.dense.weight"] = torch.ones(4, 4, dtype=torch.uint8)
    masks[QUERY] = masks[QUERY][:, :-1].contiguous()
    save_file(masks, str(folder / "masks.safetensors"))
    problems = problems_of(folder)
    assert any("mask for 'bert.encoder.layer.9.output.dense.weight', which is not a tensor of the model" in p
               for p in problems), problems
    assert any(f"mask of '{QUERY}' has shape [32, 31], the weight [32, 32]" in p for p in problems), problems
    nested = problems_of(tmp_path)  # a run folder: each checkpoint's problems carry its name
    assert nested and all(p.startswith("checkpoint-2: ") for p in nested), nested

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "masks.safetensors").write_bytes((folder / "masks.safetensors").read_bytes())
    assert any("no model weights beside it" in p for p in problems_of(alone))


def test_run_info_zero_counts_and_layers(tmp_path):
    model = tiny_bert()
    folder = save_model(tmp_path / "m", model, checksums=False)
    info = json.loads((folder / "sparsebert.json").read_text())
    info["sparsity"]["layers"][0]["zeros"] += 1
    info["sparsity"]["layers"].append({"name": "bert.encoder.layer.7.output.dense.weight", "zeros": 1})
    (folder / "sparsebert.json").write_text(json.dumps(info))
    problems = problems_of(folder)
    name = info["sparsity"]["layers"][0]["name"]
    assert any(f"'{name}' has" in p and "sparsebert.json recorded" in p for p in problems), problems
    assert any("layer 'bert.encoder.layer.7.output.dense.weight', which the weights do not have" in p
               for p in problems), problems


def test_json_config_and_checksum_list_problems(tmp_path):
    folder = save_model(tmp_path / "m")
    (folder / "config.json").write_text('{"hidden_size": 32,')
    (folder / "sparsebert.json").unlink()
    problems = problems_of(folder)
    assert any(p.startswith("config.json is not valid JSON") for p in problems), problems
    assert any(p.startswith("config.json is corrupted") for p in problems), problems
    assert any(p.startswith("sparsebert.json is missing (checksums.json lists it)") for p in problems)
    (folder / CHECKSUMS_FILE).write_text("{garbage")
    assert any(p.startswith("checksums.json is corrupted") for p in problems_of(folder))
    (folder / CHECKSUMS_FILE).unlink()
    (folder / "config.json").unlink()
    assert any("no config.json beside the weights" in p for p in problems_of(folder))


def test_unlisted_files_and_pickles_are_warnings(tmp_path):
    folder = save_checkpoint(tmp_path / "c")
    (folder / "rng_state.pth").write_bytes(b"late")
    result = verify_path(folder)
    assert result.ok
    assert any("not covered by checksums.json" in w and "rng_state.pth" in w for w in result.warnings)
    assert any("optimizer.pt" in c and "checked only against checksums.json" in c for c in result.checked)
    (folder / CHECKSUMS_FILE).unlink()
    warnings = verify_path(folder).warnings
    assert any(w.startswith("no checksums.json") for w in warnings)
    assert any("optimizer.pt" in w and "not verified" in w for w in warnings)


def test_verify_path_errors(tmp_path, capsys):
    with pytest.raises(SparseBertError, match="does not exist"):
        verify_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparseBertError, match="nothing to verify"):
        verify_path(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SparseBertError, match="cannot verify"):
        verify_path(tmp_path / "notes.txt")
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "sparsebert: error:" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    assert any("holds only pickled weights (pytorch_model.bin)" in p for p in problems_of(pickled))
    (pickled / "pytorch_model.bin").unlink()
    assert any("no weights in" in p for p in problems_of(pickled))


def test_verify_a_version_1_export_warns(tmp_path):
    from test_export import write_version_1

    folder = tmp_path / "v1"
    folder.mkdir()
    tiny_bert().config.save_pretrained(folder)
    write_version_1(tiny_bert(), folder / COMPRESSED_FILE)
    result = verify_path(folder)
    assert result.ok, result.problems
    assert any("version 1, without checksums" in w for w in result.warnings)


# -- safe loading --------------------------------------------------------------------------------
def test_pickled_only_folder_is_refused_with_a_working_command(tmp_path):
    folder = tmp_path / "legacy"
    model = tiny_bert()
    model.save_pretrained(folder)  # as transformers < 4.35 saved it: config + pytorch_model.bin
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(SparseBertError) as err:
        check_model_folder(folder, what="teacher")
    msg = str(err.value)
    assert "teacher folder" in msg and "holds only pickled weights (pytorch_model.bin)" in msg
    assert "sparsebert loads safetensors only (pickle can run code)" in msg
    assert "trusted environment" in msg
    command = msg[msg.index("`") + 1 : msg.rindex("`")]
    argv = shlex.split(command)
    assert argv[0] == "python"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, *argv[1:]], check=True, env=env, timeout=300)
    check_model_folder(folder)  # now it has model.safetensors
    loaded = load_any(folder)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_check_model_folder_cases(tmp_path):
    check_model_folder(tmp_path / "not-here")  # maybe a hub name: left to the caller
    only_config = tmp_path / "only-config"
    tiny_bert().config.save_pretrained(only_config)
    with pytest.raises(SparseBertError, match="no weights in model folder"):
        check_model_folder(only_config)
    (only_config / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(SparseBertError, match=r"holds only pickled weights \(weights.ckpt\)"):
        check_model_folder(only_config)

    folder = save_model(tmp_path / "m")
    check_model_folder(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparseBertError, match=r"model.safetensors is not a valid safetensors file "
                                              r"\(truncated or corrupted\): .*truncated"):
        check_model_folder(folder)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SparseBertError, match=r"is not a valid safetensors file \(truncated or corrupted\)"):
        check_model_folder(folder)
    weights.write_bytes(data)
    (folder / "config.json").write_text("{")
    with pytest.raises(SparseBertError, match="config.json is not valid JSON"):
        check_model_folder(folder)
    with pytest.raises(SparseBertError, match="is a file"):
        check_model_folder(weights)

    checkpoint = save_checkpoint(tmp_path / "checkpoint-2")
    check_model_folder(checkpoint)  # optimizer.pt beside model.safetensors is fine

    export = save_export(tmp_path)
    with pytest.raises(SparseBertError, match="compressed export.*load_any"):
        check_model_folder(export)
    check_model_folder(export, allow_compressed=True)


def test_sharded_index_is_checked(tmp_path):
    folder = save_model(tmp_path / "m", checksums=False)
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    save_file({n: state[n] for n in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: state[n] for n in names[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors").unlink()
    weight_map = {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    check_model_folder(folder)
    assert verify_path(folder).ok
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SparseBertError, match="lists model-00002-of-00002.safetensors, which is missing"):
        check_model_folder(folder)
    assert any("which is missing" in p for p in problems_of(folder))


def test_load_any_plain_and_compressed(tmp_path):
    model = tiny_bert()
    plain = save_model(tmp_path / "m", model)
    export = save_export(tmp_path)
    for folder in (plain, export):
        loaded = load_any(folder)
        assert type(loaded).__name__ == "BertForSequenceClassification" and not loaded.training
        for name, t in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], t), name
    save_compressed(model, tmp_path / "x.safetensors")
    with pytest.raises(SparseBertError, match="does not exist"):
        load_any(tmp_path / "missing")
    broken = save_model(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"1234")
    with pytest.raises(SparseBertError, match="not a valid safetensors file"):
        load_any(broken)


def test_load_any_the_embedded_model():
    model = load_any("embedded:all-MiniLM-L6-v2")
    assert type(model).__name__ == "BertModel" and not model.training


def test_export_of_a_compressed_export_via_cli(tmp_path, capsys):
    export = save_export(tmp_path)
    assert main(["export", str(export), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / COMPRESSED_FILE).is_file()
    assert not (tmp_path / "again" / "model.safetensors").exists()
    assert verify_path(tmp_path / "again").ok
    capsys.readouterr()
