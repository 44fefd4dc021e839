"""Bad inputs and faults: each gets one clear `error:` line naming the problem and the fix,
exit code 2, and no traceback — never a silently wrong result. One parametrised case per
item of the reliability sweep, so the list cannot rot."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_models import save_tiny_classifier
from transformers import AutoTokenizer

from sparsebert.cli import main
from sparsebert.models import embedded_model_dir

FAST = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--use_cpu",
    "true",
    "--save_strategy",
    "no",
]


def _sst2(root: Path, train_text: str, dev_text: str | None = None, folder: str = "SST-2") -> str:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "train.tsv").write_bytes(
        train_text.encode() if isinstance(train_text, str) else train_text
    )
    (root / folder / "dev.tsv").write_text(dev_text or "sentence\tlabel\na good film \t1\nbad \t0\n")
    return str(root)


GOOD = "sentence\tlabel\n" + "".join(
    f"{'a good film' if i % 2 else 'an awful plot'} {i} \t{i % 2}\n" for i in range(24)
)
STSB_HEAD = "index\tsentence1\tsentence2\tscore\n"


def _train(ctx, data_dir: str, *extra: str, task: str = "sst2", out: str = "out") -> list[str]:
    return [
        "prune",
        "--task",
        task,
        "--data-dir",
        data_dir,
        "--model",
        ctx["model"],
        "--output-dir",
        str(ctx["tmp"] / out),
        "--sparsity",
        "0.5",
        *FAST,
        *extra,
    ]


def _finished_run(ctx) -> str:
    """A finished run in tmp/out (with a checkpoint), for the cases that reuse its folder."""
    out = ctx["tmp"] / "out"
    argv = _train(ctx, ctx["sst2"])
    argv[argv.index("--save_strategy") + 1] = "steps"
    assert main([*argv, "--save_steps", "1"]) == 0
    return str(out)


def _tiny_dir(path: Path, vocab: int = 30522) -> str:
    return save_tiny_classifier(path, vocab_size=vocab)


# each case: (setup returning argv, words the error must contain)
def c_output_holds_another_run(ctx):
    _finished_run(ctx)
    return _train(ctx, ctx["sst2"])


def c_resume_of_another_task(ctx):
    _finished_run(ctx)
    stsb = ctx["tmp"] / "stsb"
    (stsb / "STS-B").mkdir(parents=True)
    rows = STSB_HEAD + "".join(f"{i}\ta film {i}\tthe film {i}\t{i % 5}.0\n" for i in range(16))
    for split in ("train", "dev"):
        (stsb / "STS-B" / f"{split}.tsv").write_text(rows)
    return _train(ctx, str(stsb), "--resume", task="stsb")


def c_output_is_a_file(ctx):
    (ctx["tmp"] / "out").write_text("x")
    return _train(ctx, ctx["sst2"])


def c_output_under_a_file(ctx):
    (ctx["tmp"] / "afile").write_text("x")
    return _train(ctx, ctx["sst2"], out="afile/run")


def c_training_string_number(ctx):
    return _train(ctx, ctx["sst2"], "--set", "training.learning_rate=abc")


def c_utf16_recipe(ctx):
    recipe = ctx["tmp"] / "r.yaml"
    recipe.write_bytes("method: gmp\nsparsity: 0.5\n".encode("utf-16"))
    return _train(ctx, ctx["sst2"], "--recipe", str(recipe))


def c_non_utf8_data(ctx):
    data = _sst2(ctx["tmp"] / "d", b"sentence\tlabel\na good film \t1\ncaf\xe9 au lait \t0\n")
    return _train(ctx, data)


def _stsb(ctx, label: str) -> str:
    root = ctx["tmp"] / "stsb"
    (root / "STS-B").mkdir(parents=True)
    (root / "STS-B" / "train.tsv").write_text(STSB_HEAD + "0\ta\tb\t3.0\n" + f"1\tc\td\t{label}\n")
    (root / "STS-B" / "dev.tsv").write_text(STSB_HEAD + "0\ta\tb\t3.0\n")
    return str(root)


def c_stsb_word_label(ctx):
    return _train(ctx, _stsb(ctx, "high"), task="stsb")


def c_stsb_out_of_range(ctx):
    return _train(ctx, _stsb(ctx, "7.5"), task="stsb")


def c_empty_label(ctx):
    return _train(ctx, _sst2(ctx["tmp"] / "d", "sentence\tlabel\na good film \t1\nbad \t\nfine \t1\n"))


def c_no_label_column(ctx):
    return _train(ctx, _sst2(ctx["tmp"] / "d", "sentence\tscorez\na good film \t1\n"))


def c_header_only(ctx):
    return _train(ctx, _sst2(ctx["tmp"] / "d", "sentence\tlabel\n"))


def c_short_row(ctx):
    root = ctx["tmp"] / "d"
    (root / "RTE").mkdir(parents=True)
    (root / "RTE" / "train.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tjust one cell\n"
    )
    (root / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    return _train(ctx, str(root), task="rte")


def c_seq_length_zero(ctx):
    return _train(ctx, ctx["sst2"], "--max-seq-length", "0")


def c_seq_length_negative(ctx):
    return _train(ctx, ctx["sst2"], "--max-seq-length", "-1")


def c_train_batch_zero(ctx):
    return [*_train(ctx, ctx["sst2"]), "--per_device_train_batch_size", "0"]


def c_eval_batch_zero(ctx):
    return ["evaluate", ctx["model"], "--task", "sst2", "--data-dir", ctx["sst2"], "--batch-size", "0"]


def c_bench_batch_zero(ctx):
    return ["bench", ctx["model"], "--batches", "0"]


def c_config_only_folder(ctx):
    folder = ctx["tmp"] / "cfg"
    folder.mkdir()
    shutil.copy(Path(ctx["model"]) / "config.json", folder / "config.json")
    return ["sparsity", str(folder)]


def c_config_only_evaluate(ctx):
    folder = ctx["tmp"] / "cfg"
    folder.mkdir()
    shutil.copy(Path(ctx["model"]) / "config.json", folder / "config.json")
    return ["evaluate", str(folder), "--task", "sst2", "--data-dir", ctx["sst2"]]


def c_truncated_weights(ctx):
    folder = ctx["tmp"] / "trunc"
    shutil.copytree(ctx["model"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["sparsity", str(folder)]


def c_export_out_is_a_file(ctx):
    (ctx["tmp"] / "exists").write_text("x")
    return ["export", ctx["model"], "--out", str(ctx["tmp"] / "exists")]


def c_onnx_opset_3(ctx):
    return ["export", ctx["model"], "--format", "onnx", "--opset", "3", "--out", str(ctx["tmp"] / "onnx")]


def c_teacher_vocab_smaller(ctx):
    return _train(ctx, ctx["sst2"], "--teacher", _tiny_dir(ctx["tmp"] / "small", vocab=100))


def c_encoder_decoder_model(ctx):
    from transformers import T5Config, T5ForSequenceClassification

    path = ctx["tmp"] / "t5"
    T5ForSequenceClassification(
        T5Config(
            vocab_size=30522, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0
        )
    ).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return _train(ctx, ctx["sst2"], "--set", r"targets=[encoder\.block]", "--model", str(path))


def c_decoder_only_finetune(ctx):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    path = ctx["tmp"] / "gpt2"
    GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=30522,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return [
        "finetune",
        "--task",
        "sst2",
        "--data-dir",
        ctx["sst2"],
        "--model",
        str(path),
        "--output-dir",
        str(ctx["tmp"] / "o"),
        *FAST,
    ]


def c_resume_incomplete_checkpoint(ctx):
    out = Path(_finished_run(ctx))
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    (ckpt / "checksums.json").unlink()  # killed while it was being written
    return [*_train(ctx, ctx["sst2"]), "--resume", str(ckpt)]


def c_pickled_weights_only(ctx):
    folder = ctx["tmp"] / "pickled"
    folder.mkdir()
    shutil.copy(Path(ctx["model"]) / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return ["sparsity", str(folder)]


def c_checkpoint_without_masks(ctx):
    out = Path(_finished_run(ctx))
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    (ckpt / "masks.safetensors").unlink()
    from sparsebert.verify import write_checksums

    write_checksums(ckpt)  # complete, just without masks
    return [*_train(ctx, ctx["sst2"]), "--resume", str(ckpt)]


CASES: list[tuple[str, Callable, tuple[str, ...]]] = [
    (
        "output holds another run",
        c_output_holds_another_run,
        ("already holds a run", "--overwrite", "--resume"),
    ),
    ("resume of another task", c_resume_of_another_task, ("belongs to another run", "task", "'sst2'")),
    ("output is a file", c_output_is_a_file, ("is a file",)),
    ("output under a file", c_output_under_a_file, ("is under a file",)),
    ("string learning rate", c_training_string_number, ("training.learning_rate must be a number", "'abc'")),
    ("UTF-16 recipe", c_utf16_recipe, ("not UTF-8",)),
    ("non-UTF-8 data", c_non_utf8_data, ("train.tsv, line 3", "not UTF-8")),
    ("STS-B label 'high'", c_stsb_word_label, ("line 3", "'high' is not a number")),
    ("STS-B score 7.5", c_stsb_out_of_range, ("line 3", "outside", "[0, 5]")),
    ("empty label", c_empty_label, ("line 3", "empty label")),
    ("no label column", c_no_label_column, ("no label column", "scorez")),
    ("header only", c_header_only, ("header", "but no rows")),
    ("short row", c_short_row, ("line 3", "cells", "4")),
    ("max-seq-length 0", c_seq_length_zero, ("--max-seq-length must be an integer >= 8",)),
    ("max-seq-length -1", c_seq_length_negative, ("--max-seq-length must be an integer >= 8",)),
    ("train batch size 0", c_train_batch_zero, ("--per_device_train_batch_size must be an integer >= 1",)),
    ("eval batch size 0", c_eval_batch_zero, ("--batch-size must be an integer >= 1",)),
    ("bench batch 0", c_bench_batch_zero, ("--batches must be an integer >= 1",)),
    ("sparsity of a config-only folder", c_config_only_folder, ("no weights",)),
    ("evaluate a config-only folder", c_config_only_evaluate, ("no weights",)),
    ("truncated model.safetensors", c_truncated_weights, ("model.safetensors", "truncated or corrupted")),
    ("export --out an existing file", c_export_out_is_a_file, ("is an existing file",)),
    ("ONNX opset 3", c_onnx_opset_3, ("opset 3",)),
    ("teacher with a smaller vocabulary", c_teacher_vocab_smaller, ("30522 tokens", "embeddings only 100")),
    ("T5 with a regex target", c_encoder_decoder_model, ("encoder-decoder", "encoders")),
    ("finetune of GPT-2", c_decoder_only_finetune, ("decoder-only", "encoders")),
    (
        "resume from an incomplete checkpoint",
        c_resume_incomplete_checkpoint,
        ("is incomplete", "complete ones"),
    ),
    ("pickled weights only", c_pickled_weights_only, ("pickled", "safetensors")),
    ("checkpoint without masks", c_checkpoint_without_masks, ("no masks.safetensors", "checkpoint-")),
]


@pytest.mark.parametrize("setup,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(setup, words, tiny_model_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    argv = setup(ctx)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sparsebert: error:")]
    assert len(lines) == 1, err[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


def test_a_full_disk_at_the_final_save_names_the_problem(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from sparsebert.trainer import SparseTrainer

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SparseTrainer, "save_model", no_space)
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    assert main(_train(ctx, ctx["sst2"])) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "Traceback" not in err


def test_overwrite_replaces_the_previous_run(tiny_model_dir, tmp_path):
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    out = Path(_finished_run(ctx))
    assert list(out.glob("checkpoint-*"))
    assert main([*_train(ctx, ctx["sst2"]), "--overwrite"]) == 0
    assert not list(out.glob("checkpoint-*"))  # the old run's checkpoints are gone, not left behind


def test_resume_skips_a_checkpoint_interrupted_while_written(tiny_model_dir, tmp_path, caplog):
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    out = Path(_finished_run(ctx))
    last = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    (last / "checksums.json").unlink()
    with caplog.at_level("WARNING", logger="sparsebert"):
        assert main([*_train(ctx, ctx["sst2"]), "--resume"]) == 0
    assert f"{last} is incomplete" in caplog.text


def test_init_sparsity_above_the_target_is_recorded_as_run(tiny_model_dir, tmp_path):
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    assert main(_train(ctx, ctx["sst2"], "--set", "schedule.init_sparsity=0.9")) == 0
    info = json.loads((tmp_path / "out" / "sparsebert.json").read_text())
    # what ran, not the 0.9 asked for: a first step at or above the target would be one-shot
    # pruning, so the schedule starts from 0 (cubic to the target)
    assert info["recipe"]["schedule"]["init_sparsity"] == 0.0


def test_eval_loss_is_the_task_loss_with_a_teacher(tiny_model_dir, tmp_path):
    from sparsebert.pipeline import DataOptions, evaluate_saved, train_run
    from sparsebert.recipe import load_recipe

    data_dir = _sst2(tmp_path / "glue", GOOD)
    data = DataOptions("sst2", data_dir)
    teacher = _tiny_dir(tmp_path / "teacher")
    run = train_run(
        tiny_model_dir,
        data,
        load_recipe("gmp", ["sparsity=0.5"]),
        str(tmp_path / "kd"),
        teacher_path=teacher,
        training_overrides={"max_steps": 2, "use_cpu": True, "save_strategy": "no"},
    )
    alone = evaluate_saved(str(tmp_path / "kd"), data)["metrics"]["eval_loss"]
    assert run.info["metrics"]["eval_loss"] == pytest.approx(alone, rel=1e-5)
    assert os.path.isfile(tmp_path / "kd" / "checksums.json")


def test_a_flipped_byte_in_saved_weights_is_caught_before_evaluation(tiny_model_dir, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    assert main(_train(ctx, ctx["sst2"])) == 0
    weights = tmp_path / "out" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit of one byte, somewhere in the tensors
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "out"), "--task", "sst2", "--data-dir", ctx["sst2"]]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupted: checksum mismatch" in err and "Traceback" not in err


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(tiny_model_dir, tmp_path, capsys, monkeypatch):
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    out = Path(_finished_run(ctx))
    last = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    from sparsebert.trainer import SparseTrainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SparseTrainer, "train", interrupted)
    capsys.readouterr()
    assert main([*_train(ctx, ctx["sst2"]), "--resume"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == f"sparsebert: interrupted; the last complete checkpoint is {last} (continue with --resume)"
    )
    assert not any("Traceback" in line for line in err)


def test_resume_from_a_checkpoint_with_a_truncated_file_names_it(tiny_model_dir, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    out = Path(_finished_run(ctx))
    last = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    masks = last / "masks.safetensors"
    masks.write_bytes(masks.read_bytes()[:100])
    capsys.readouterr()
    assert main([*_train(ctx, ctx["sst2"]), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint folder {last} is damaged" in err and "masks.safetensors" in err and "truncated" in err


def test_torch_save_on_a_full_disk_names_the_problem(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from sparsebert.trainer import SparseTrainer

    def iostream(self, *args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: iostream error"
        )

    monkeypatch.setattr(SparseTrainer, "save_model", iostream)
    ctx = {"tmp": tmp_path, "model": tiny_model_dir, "sst2": _sst2(tmp_path / "glue", GOOD)}
    assert main(_train(ctx, ctx["sst2"])) == 2
    err = capsys.readouterr().err
    assert "is the disk full?" in err and "Traceback" not in err


def test_the_same_command_stopped_before_its_first_checkpoint_starts_again(tiny_model_dir, tmp_path):
    from sparsebert.preflight import RUN_FILE, prepare_output_dir

    identity = {"task": "sst2", "model": "m", "recipe": "gmp"}
    out = tmp_path / "run"
    assert prepare_output_dir(str(out), identity, None, False) is None  # writes the identity
    assert prepare_output_dir(str(out), identity, None, False) is None  # the same run: fine
    from sparsebert.errors import SparseBertError

    with pytest.raises(SparseBertError, match="already holds a run"):
        prepare_output_dir(str(out), {**identity, "task": "mrpc"}, None, False)
    assert (out / RUN_FILE).is_file()
