"""Defects of the training loop found by an audit, each pinned by a test that failed before
the method interface landed: stale learned masks under fused optimizers, gradient
accumulation and DDP loss scaling, headless or permuted teachers and models, the SMP
teacher's input format."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_classifier
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
)

from sparsebert.cli import main
from sparsebert.learned_masks import ScoreMask, binary_mask
from sparsebert.models import embedded_model_dir, load_model
from sparsebert.pipeline import DataOptions, evaluate_saved, train_run
from sparsebert.recipe import load_recipe
from sparsebert.tasks import get_task
from sparsebert.tasks.glue import load_split

TRAIN = {"per_device_train_batch_size": 8, "logging_steps": 1, "use_cpu": True, "save_strategy": "no"}


class _MaskFollowsScores(TrainerCallback):
    """After every optimizer step: the mask the forward pass uses is the binarised scores."""

    def __init__(self):
        self.checks = 0
        self.changes = 0
        self.previous: dict[int, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for m in model.modules():
            if isinstance(m, ScoreMask) and m.fixed is None:
                expected = binary_mask(m.scores, m.binarizer, m.keep, m.threshold)
                assert torch.equal(m.current_mask(), expected), f"stale mask at step {state.global_step}"
                if id(m) in self.previous and not torch.equal(self.previous[id(m)], expected):
                    self.changes += 1
                self.previous[id(m)] = expected.clone()
                self.checks += 1


@pytest.mark.parametrize(
    "optim", ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"]
)
def test_learned_masks_follow_their_scores_under_every_optimizer(optim, tiny_model_dir, sst2_dir, tmp_path):
    check = _MaskFollowsScores()
    recipe = load_recipe(
        "smp-l", ["sparsity=0.5", "masks.penalty.lambda=0", "schedule.end=0.2", "masks.score_lr=0.05"]
    )
    train_run(
        tiny_model_dir,
        DataOptions("sst2", sst2_dir, max_eval_samples=8),
        recipe,
        str(tmp_path / optim),
        training_overrides={**TRAIN, "max_steps": 8, "optim": optim},
        callbacks=[check],
    )
    assert check.checks == 8 * 12
    assert check.changes > 0  # the scores did move the masks during the hold phase


@pytest.fixture(scope="module")
def no_dropout_dir(tmp_path_factory) -> str:
    """A tiny BERT classifier without dropout, so that two runs see the same function."""
    path = str(tmp_path_factory.mktemp("no-dropout"))
    return save_tiny_classifier(path, seed=3, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_gradient_accumulation_gives_the_same_step(
    with_teacher, no_dropout_dir, tiny_model_dir, sst2_dir, tmp_path
):
    """One SGD step of lr 1 on 32 examples, as 1 x 32 and as 4 x 8 accumulated."""
    args = {
        "use_cpu": True,
        "save_strategy": "no",
        "max_steps": 1,
        "optim": "sgd",
        "learning_rate": 1.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "train_sampling_strategy": "sequential",
    }
    teacher = tiny_model_dir if with_teacher else None
    recipe = load_recipe("finetune", ["distillation.temperature=3.0"])
    data = DataOptions("sst2", sst2_dir, max_train_samples=32, max_eval_samples=8)
    one = train_run(
        no_dropout_dir,
        data,
        recipe,
        str(tmp_path / "one"),
        teacher_path=teacher,
        training_overrides={**args, "per_device_train_batch_size": 32},
    ).model
    four = train_run(
        no_dropout_dir,
        data,
        recipe,
        str(tmp_path / "four"),
        teacher_path=teacher,
        training_overrides={**args, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4},
    ).model
    start = AutoModelForSequenceClassification.from_pretrained(no_dropout_dir)
    moved = 0.0
    for (name, a), (_, b), (_, s) in zip(
        one.named_parameters(), four.named_parameters(), start.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, float((a - s).detach().abs().max()))
    assert moved > 1e-4  # the step did something


def test_ddp_scales_task_loss_and_penalty_alike(no_dropout_dir, sst2_dir, tmp_path):
    """2 processes x 4 examples = 1 process x 8: the same scores after two steps of SMP-L with
    its penalty on (the task loss was multiplied by the world size, the penalty was not)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = [
        "prune",
        "--recipe",
        "smp-l",
        "--task",
        "sst2",
        "--data-dir",
        sst2_dir,
        "--model",
        no_dropout_dir,
        "--sparsity",
        "0.5",
        "--set",
        "masks.penalty.lambda=50",
        "--set",
        "masks.score_lr=0.1",
        "--max_steps",
        "2",
        "--optim",
        "sgd",
        "--use_cpu",
        "true",
        "--save_steps",
        "2",
        "--train_sampling_strategy",
        "sequential",
        "--max-eval-samples",
        "8",
    ]
    ddp = str(tmp_path / "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29541",
        "-m",
        "sparsebert.cli",
        *common,
        "--output-dir",
        ddp,
        "--per_device_train_batch_size",
        "4",
        "--ddp_backend",
        "gloo",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = str(tmp_path / "single")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsebert.cli",
            *common,
            "--output-dir",
            single,
            "--per_device_train_batch_size",
            "8",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(os.path.join(ddp, "checkpoint-2", "model.safetensors"))
    b = load_file(os.path.join(single, "checkpoint-2", "model.safetensors"))
    scores = [k for k in a if k.endswith(".scores")]
    assert len(scores) == 12 and any(float(a[k].abs().max()) > 0 for k in scores)
    for k in scores:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-9, msg=k)


def test_a_teacher_without_a_trained_head_is_refused(tiny_model_dir, sst2_dir, tmp_path, capsys):
    argv = [
        "prune",
        "--task",
        "sst2",
        "--data-dir",
        sst2_dir,
        "--model",
        tiny_model_dir,
        "--output-dir",
        str(tmp_path / "o"),
        "--teacher",
        embedded_model_dir(),
        "--max_steps",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "teacher" in err and "no trained sequence-classification head" in err and "sparsebert finetune" in err
    )


def test_a_teacher_fine_tuned_on_another_task_is_refused(tmp_path):
    path = str(tmp_path / "stsb-teacher")
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    config.id2label = {0: "entailment", 1: "neutral", 2: "contradiction"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    BertForSequenceClassification(config).save_pretrained(path)
    from sparsebert.errors import SparseBertError

    with pytest.raises(SparseBertError, match="fine-tuned for another task .* not for rte"):
        load_model(path, get_task("rte"), role="teacher")


@pytest.fixture
def biased_pair(tmp_path, tiny_model_dir):
    """The same classifier saved twice: labels in the task's order, and reversed (head rows
    swapped, id2label saying so). Its head always says 'negative'."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([8.0, -8.0]))
    model.config.id2label, model.config.label2id = (
        {0: "negative", 1: "positive"},
        {"negative": 0, "positive": 1},
    )
    straight = str(tmp_path / "straight")
    model.save_pretrained(straight)
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label, model.config.label2id = (
        {0: "positive", 1: "negative"},
        {"positive": 0, "negative": 1},
    )
    reversed_ = str(tmp_path / "reversed")
    model.save_pretrained(reversed_)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for path in (straight, reversed_):
        tok.save_pretrained(path)
    return straight, reversed_


def test_labels_in_another_order_are_reordered_not_permuted(biased_pair, sst2_dir):
    straight, reversed_ = biased_pair
    labels = load_split("sst2", "validation", sst2_dir)["label"]
    negatives = labels.count(0) / len(labels)
    assert negatives != 0.5  # otherwise a permutation would go unnoticed
    data = DataOptions("sst2", sst2_dir)
    a = evaluate_saved(straight, data)["metrics"]["eval_accuracy"]
    b = evaluate_saved(reversed_, data)["metrics"]["eval_accuracy"]
    assert a == pytest.approx(negatives) and b == pytest.approx(negatives)
    tok = AutoTokenizer.from_pretrained(straight)
    batch = tok(["a good film", "an awful plot"], return_tensors="pt", padding=True)
    task = get_task("sst2")
    with torch.no_grad():
        za = load_model(straight, task, role="teacher").eval()(**batch).logits
        zb = load_model(reversed_, task, role="teacher").eval()(**batch).logits
    torch.testing.assert_close(za, zb)


def test_smp_teacher_sees_its_own_input_format(tiny_mlm_dir, tiny_model_dir, sst2_dir, tmp_path, monkeypatch):
    """SMP through the MLM head reads prompts; its sequence-classification teacher must read the
    plain sentences, as it was trained."""
    import sparsebert.pipeline as pipeline

    seen: list[torch.Tensor] = []
    original = pipeline.load_model

    def load_and_watch(path, task, role="student"):
        model = original(path, task, role)
        if role == "teacher":
            model.register_forward_pre_hook(
                lambda m, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
            )
        return model

    monkeypatch.setattr(pipeline, "load_model", load_and_watch)
    train_run(
        tiny_mlm_dir,
        DataOptions("sst2", sst2_dir, max_eval_samples=8),
        load_recipe("smp-s", ["sparsity=0.5"]),
        str(tmp_path / "smp"),
        teacher_path=tiny_model_dir,
        training_overrides={**TRAIN, "max_steps": 2, "train_sampling_strategy": "sequential"},
    )
    assert len(seen) == 2
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = {tuple(tok(t)["input_ids"]) for t in load_split("sst2", "train", sst2_dir)["text_a"]}
    for ids in seen:
        assert not bool((ids == tok.mask_token_id).any())
        for row in ids.tolist():
            while row and row[-1] == tok.pad_token_id:
                row.pop()
            assert tuple(row) in plain
