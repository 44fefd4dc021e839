"""End-to-end runs on a tiny random BERT: prune, save, load with plain transformers, resume,
and a 2-process distributed prune."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sparsebert.cli import main
from sparsebert.masks import FixedMasks
from sparsebert.methods.gradual import GradualPruner as GradualMagnitudePruner
from sparsebert.pipeline import DataOptions, train_and_prune, train_run
from sparsebert.recipe import load_recipe
from sparsebert.report import sparsity_report
from sparsebert.targets import select_targets

TRAIN = {"per_device_train_batch_size": 8, "logging_steps": 2, "use_cpu": True,
         "dataloader_pin_memory": False}


def _last_json(stdout: str) -> dict:
    """The CLI's summary: the last top-level JSON object printed (the Trainer logs before it)."""
    return json.loads(stdout[stdout.rindex('{\n  "'):])


def test_prune_save_and_plain_load_give_same_logits(tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = str(tmp_path / "pruned")
    rc = main(["prune", "--task", "sst2", "--data-dir", sst2_dir, "--model", tiny_model_dir,
               "--teacher", tiny_model_dir, "--sparsity", "0.9", "--output-dir", out,
               "--max_steps", "6", "--per_device_train_batch_size", "8", "--use_cpu", "true",
               "--set", "schedule.frequency=0.2"])
    assert rc == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["measured_sparsity"] == pytest.approx(0.9, abs=1e-4)
    info = json.load(open(os.path.join(out, "sparsebert.json")))
    assert info["teacher"] == tiny_model_dir and info["recipe"]["name"] == "gmp"
    assert os.path.isfile(os.path.join(out, "sparsity.txt"))

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert sparsity_report(model)["target_sparsity"] == pytest.approx(0.9, abs=1e-4)


def _dev_accuracy(model_dir: str, sst2_dir: str, n: int, max_length: int = 128) -> float:
    """Accuracy of a saved classifier on the first n rows of the SST-2 fixture's dev.tsv, read and
    scored here with plain transformers (independent of sparsebert's evaluation)."""
    with open(os.path.join(sst2_dir, "SST-2", "dev.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:n + 1]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tok([r[0] for r in rows], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    return float((pred == torch.tensor([int(r[1]) for r in rows])).float().mean())


def test_a_distilled_run_reports_its_teacher_side_by_side(tiny_model_dir, sst2_dir, tmp_path, capsys):
    """`prune --teacher` puts the teacher's dev metrics beside the student's, measured on the
    same evaluation set (the teacher's accuracy recomputed here with plain transformers)."""
    out = str(tmp_path / "pruned")
    assert main(["prune", "--task", "sst2", "--data-dir", sst2_dir, "--max-eval-samples", "16",
                 "--model", tiny_model_dir, "--teacher", tiny_model_dir, "--sparsity", "0.5",
                 "--output-dir", out, "--max_steps", "2", "--per_device_train_batch_size", "8",
                 "--use_cpu", "true"]) == 0
    captured = capsys.readouterr()
    summary = _last_json(captured.out)
    teacher = _dev_accuracy(tiny_model_dir, sst2_dir, 16)
    assert summary["teacher_metrics"]["eval_accuracy"] == pytest.approx(teacher)
    student = _dev_accuracy(out, sst2_dir, 16)
    assert summary["metrics"]["eval_accuracy"] == pytest.approx(student)
    t, s = 100 * teacher, 100 * student
    assert f"accuracy: teacher {t:.2f} | this model {s:.2f} ({s - t:+.2f} points)" in captured.err


def test_teacher_metrics_reuse_the_teachers_own_evaluation_only_on_the_same_data(tiny_model_dir, sst2_dir,
                                                                                   tmp_path):
    """A teacher evaluated on the same task, eval subset and sequence length is not evaluated
    again (its sparsebert.json is read); on other data it is."""
    from sparsebert.pipeline import teacher_metrics

    teacher = str(tmp_path / "teacher")
    shutil.copytree(tiny_model_dir, teacher)
    data = DataOptions("sst2", sst2_dir, max_eval_samples=16)
    saved = {"data": {"task": "sst2", "max_eval_samples": 16, "max_seq_length": 128,
                      "eval_split": "validation"}, "metrics": {"eval_accuracy": 0.123}}
    with open(os.path.join(teacher, "sparsebert.json"), "w") as f:
        json.dump(saved, f)
    assert teacher_metrics(teacher, data) == {"eval_accuracy": 0.123}
    other = DataOptions("sst2", sst2_dir, max_eval_samples=12)
    measured = teacher_metrics(teacher, other)["eval_accuracy"]
    assert measured == pytest.approx(_dev_accuracy(tiny_model_dir, sst2_dir, 12))


def test_the_saved_model_is_the_trained_one(tiny_model_dir, sst2_dir, tmp_path):
    """Plain transformers loading gives back the model that was trained in memory: same
    parameters, same logits (compared with the trained model, not with another reload)."""
    out = str(tmp_path / "pruned")
    run = train_run(tiny_model_dir, DataOptions("sst2", sst2_dir, max_eval_samples=8),
                    load_recipe("gmp", ["sparsity=0.9", "schedule.frequency=0.2"]), out,
                    teacher_path=tiny_model_dir, training_overrides={**TRAIN, "max_steps": 6})
    trained = run.model.eval()
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    start = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.classifier.weight, start.classifier.weight)  # it did train
    for (name, a), (_, b) in zip(trained.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach()), name
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["a good film", "an awful boring plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(trained(**batch).logits, loaded(**batch).logits)


def test_finetune_then_evaluate_and_sparsity_cli(tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = str(tmp_path / "dense")
    assert main(["finetune", "--task", "sst2", "--data-dir", sst2_dir, "--model", tiny_model_dir,
                 "--output-dir", out, "--max_steps", "2", "--use_cpu", "true"]) == 0
    capsys.readouterr()
    assert main(["evaluate", out, "--task", "sst2", "--data-dir", sst2_dir]) == 0
    res = _last_json(capsys.readouterr().out)
    assert 0.0 <= res["metrics"]["eval_accuracy"] <= 1.0 and res["encoder_linear_sparsity"] < 0.01
    assert main(["sparsity", out, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["target_numel"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)


def test_resume_restores_masks_and_schedule(tiny_model_dir, sst2_dir, tmp_path):
    recipe = load_recipe("gmp", ["sparsity=0.8", "schedule.frequency=0.25", "schedule.end=0.75",
                                 "schedule.init_sparsity=0.5"])
    data = DataOptions("sst2", sst2_dir, max_eval_samples=8)
    args = {**TRAIN, "max_steps": 8, "save_steps": 4, "save_total_limit": None}
    full = str(tmp_path / "full")
    info = train_and_prune(tiny_model_dir, data, recipe, full, training_overrides=args)
    prunes_full = [h for h in json.load(open(os.path.join(full, "checkpoint-8", "trainer_state.json")))
                   ["log_history"] if "pruned_to_sparsity" in h]
    assert [h["step"] for h in prunes_full] == [0, 2, 4, 6]
    final = AutoModelForSequenceClassification.from_pretrained(full)
    final_masks = FixedMasks.from_zeros(select_targets(final, recipe.targets))

    # "interrupt" after step 4: keep only checkpoint-4, resume in a fresh process state
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    ckpt_masks = FixedMasks(select_targets(AutoModelForSequenceClassification.from_pretrained(
        os.path.join(resumed, "checkpoint-4")), recipe.targets))
    ckpt_masks.load(os.path.join(resumed, "checkpoint-4"))
    assert 0.5 < ckpt_masks.sparsity() < 0.8  # mid-schedule masks were saved with the checkpoint
    info2 = train_and_prune(tiny_model_dir, data, recipe, resumed, training_overrides=args, resume="auto")
    assert info2["train_steps"] == info["train_steps"] == 8
    again = AutoModelForSequenceClassification.from_pretrained(resumed)
    again_masks = FixedMasks.from_zeros(select_targets(again, recipe.targets))
    assert again_masks.digest() == final_masks.digest()
    assert info2["sparsity"]["target_sparsity"] == pytest.approx(0.8, abs=1e-4)
    for (n, a), (_, b) in zip(final.named_parameters(), again.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_pruner_follows_schedule_exactly(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    recipe = load_recipe("gmp", ["sparsity=0.9"])
    pruner = GradualMagnitudePruner(select_targets(model, "encoder-linears"),
                                    recipe.gradual_schedule(), "uniform")
    total = 100
    for step in range(total):
        pruner.maybe_prune(step, total)
        expected = recipe.gradual_schedule().sparsity_at(step, total)
        assert pruner.masks.sparsity() == pytest.approx(expected, abs=2e-3)
    for m in pruner.masks.masks.values():  # uniform: every matrix exactly 90%
        assert int((~m).sum()) == round(0.9 * m.numel())


def test_two_process_prune_has_identical_masks(tiny_model_dir, sst2_dir, tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "sparsebert.cli", "prune", "--task", "sst2",
           "--data-dir", sst2_dir, "--model", tiny_model_dir, "--sparsity", "0.9",
           "--output-dir", out, "--max_steps", "6", "--per_device_train_batch_size", "8",
           "--use_cpu", "true", "--ddp_backend", "gloo", "--set", "schedule.frequency=0.2",
           "--save_strategy", "no"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [json.load(open(os.path.join(out, f"mask_digest_rank{r}.json"))) for r in (0, 1)]
    assert digests[0]["digest"] == digests[1]["digest"]
    n = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert digests[0]["sparsity"] == pytest.approx(round(0.9 * n) / n, abs=1e-9)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    rep = sparsity_report(model)
    assert rep["target_zeros"] == round(0.9 * rep["target_numel"])


def _params(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_same_command_and_seed_give_bit_identical_models(tiny_model_dir, sst2_dir, tmp_path):
    recipe = load_recipe("gmp", ["sparsity=0.8", "schedule.frequency=0.25"])
    data = DataOptions("sst2", sst2_dir, max_eval_samples=8)
    args = {**TRAIN, "max_steps": 6, "save_strategy": "no"}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_and_prune(tiny_model_dir, data, recipe, a, training_overrides=args)
    train_and_prune(tiny_model_dir, data, recipe, b, training_overrides=args)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_a_new_head_is_created_from_the_run_seed(tiny_model_dir, tmp_path):
    """STS-B needs a 1-output head, so the 2-label checkpoint gets a new one: two runs of the
    same command give the same model only if the head is created after the seed is set."""
    root = tmp_path / "glue"
    (root / "STS-B").mkdir(parents=True)
    rows = "index\tsentence1\tsentence2\tscore\n" + "".join(
        f"{i}\ta good film {i}\tthe film was fine {i % 5}\t{(i % 6) * 0.9:.1f}\n" for i in range(24))
    for split in ("train", "dev"):
        (root / "STS-B" / f"{split}.tsv").write_text(rows)
    data = DataOptions("stsb", str(root))
    outs = [str(tmp_path / name) for name in ("a", "b")]
    for out in outs:
        train_and_prune(tiny_model_dir, data, load_recipe("finetune"), out,
                        training_overrides={**TRAIN, "max_steps": 2, "save_strategy": "no"})
    pa, pb = _params(outs[0]), _params(outs[1])
    assert pa["classifier.weight"].shape == (1, 32)  # a new head
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_resume_mid_epoch_is_bit_identical_to_an_uninterrupted_run(tiny_model_dir, sst2_dir, tmp_path):
    """Killed at checkpoint 15 of 20 (mid second epoch: 96 examples = 12 batches of 8),
    resumed: the same final model, bit for bit, with length-grouped batches and dropout on."""
    recipe = load_recipe("gmp", ["sparsity=0.8", "schedule.frequency=0.25"])
    data = DataOptions("sst2", sst2_dir, max_eval_samples=8)
    args = {**TRAIN, "max_steps": 20, "save_steps": 15, "save_total_limit": None,
            "train_sampling_strategy": "group_by_length"}
    full = str(tmp_path / "full")
    train_and_prune(tiny_model_dir, data, recipe, full, training_overrides=args)
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-15"), os.path.join(resumed, "checkpoint-15"))
    train_and_prune(tiny_model_dir, data, recipe, resumed, training_overrides=args, resume="auto")
    pa, pb = _params(full), _params(resumed)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
