"""Bad input gets a clear error naming the problem and the fix (via the CLI, exit code 2)."""

from __future__ import annotations

import pytest

from sparsebert.cli import main
from sparsebert.errors import SparseBertError
from sparsebert.recipe import load_recipe
from sparsebert.targets import select_targets
from sparsebert.tasks import get_task
from sparsebert.tasks.glue import load_split


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_model_path(capsys, sst2_dir, tmp_path):
    err = _cli_error(capsys, ["prune", "--task", "sst2", "--data-dir", sst2_dir, "--output-dir",
                              str(tmp_path / "o"), "--model", "./no/such/model"])
    assert "model path './no/such/model' does not exist" in err


def test_sparsity_out_of_range(capsys, sst2_dir, tiny_model_dir, tmp_path):
    for bad in ("1.0", "-0.1", "90"):
        err = _cli_error(capsys, ["prune", "--task", "sst2", "--data-dir", sst2_dir, "--output-dir",
                                  str(tmp_path / "o"), "--model", tiny_model_dir, "--sparsity", bad])
        assert "[0, 1)" in err
    assert "did you mean 0.9" in err


def test_unknown_task(capsys, tmp_path):
    err = _cli_error(capsys, ["finetune", "--task", "sst", "--output-dir", str(tmp_path)])
    assert "unknown task 'sst'" in err and "sst2" in err


def test_unknown_training_argument(capsys, sst2_dir, tmp_path):
    err = _cli_error(capsys, ["finetune", "--task", "sst2", "--data-dir", sst2_dir,
                              "--output-dir", str(tmp_path), "--learning_rat", "1e-4"])
    assert "--learning_rat" in err


def test_data_file_without_expected_columns(tmp_path):
    folder = tmp_path / "RTE"
    folder.mkdir()
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
    with pytest.raises(SparseBertError, match="no label column for rte"):
        load_split("rte", "train", str(tmp_path))


def test_missing_split_names_the_folder(tmp_path):
    (tmp_path / "qnli").mkdir()
    (tmp_path / "qnli" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\ta?\tb\tentailment\n")
    with pytest.raises(SparseBertError, match="no 'train' split") as e:
        load_split("qnli", "train", str(tmp_path))
    assert "dev.tsv" in str(e.value)


def test_recipe_unknown_key(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("method: gmp\nschedul:\n  end: 0.5\n")
    with pytest.raises(SparseBertError, match=r"unknown key 'schedul' \(did you mean 'schedule'\?\)"):
        load_recipe(str(bad))
    with pytest.raises(SparseBertError, match="unknown key 'ends'"):
        load_recipe("gmp", ["schedule.ends=0.5"])
    with pytest.raises(SparseBertError, match="unknown recipe 'gmq'"):
        load_recipe("gmq")
    with pytest.raises(SparseBertError, match="must be true or false"):
        load_recipe("gmp", ["lr.rewarm=maybe"])
    with pytest.raises(SparseBertError, match="TrainingArguments"):
        load_recipe("gmp", ["training.learning_rat=1"])


def test_recipe_overrides_apply():
    r = load_recipe("gmp", ["schedule.end=0.8", "sparsity=0.95", "targets=[encoder-linears, embeddings]"])
    assert r.schedule.end == 0.8 and r.sparsity == 0.95 and r.targets == ["encoder-linears", "embeddings"]
    # YAML 1.1 reads 1e-4 (no dot) as a string: numbers in that form must still work
    assert load_recipe("movement", ["masks.score_lr=1e-4"]).masks.score_lr == 1e-4
    smc = load_recipe("gmp-smc")
    assert smc.targets == ["all-2d"] and not smc.lr.rewarm and not smc.distillation.enabled


def test_unknown_target_pattern(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with pytest.raises(SparseBertError, match="matches no prunable") as e:
        select_targets(model, "decoder\\.layers")
    assert "encoder-linears" in str(e.value)
    names = select_targets(model, "encoder-linears")
    assert len(names) == 2 * 6 and all(n.startswith("bert.encoder.layer.") for n in names)
    assert set(select_targets(model, "classifier")) == {"classifier.weight"}
    assert set(select_targets(model, "embeddings")) == {
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight"}
    assert "bert.embeddings.token_type_embeddings.weight" in select_targets(model, "all-2d")


def test_get_task_aliases():
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").is_regression


def test_evaluate_refuses_a_model_without_a_trained_head(capsys, sst2_dir):
    # the embedded MiniLM has no classifier: evaluating it would report a random head's accuracy
    argv = ["evaluate", "embedded:all-MiniLM-L6-v2", "--task", "sst2", "--data-dir", sst2_dir]
    err = _cli_error(capsys, argv)
    assert "no trained sequence-classification head" in err and "sparsebert finetune" in err
