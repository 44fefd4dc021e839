"""The seams: a new task and a new criterion each in one small file, registered and used from
the CLI; sparse transfer with a locked mask; a sparse model stays sparse under `finetune`;
extra per-example columns reach a loss term; the package's import graph has no cycle."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from sparsebert.cli import main
from sparsebert.losses import LossTerm
from sparsebert.pipeline import DataOptions, train_run
from sparsebert.recipe import load_recipe
from sparsebert.targets import select_targets

TRAIN = {"per_device_train_batch_size": 8, "logging_steps": 2, "use_cpu": True, "save_strategy": "no"}


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex('{\n  "') :])


def test_toy_task_and_toy_criterion_prune_from_the_cli(tiny_model_dir, tmp_path, capsys):
    """tests/toy_tagging_task.py and tests/toy_random_criterion.py are all it takes."""
    out = str(tmp_path / "toy")
    rc = main(
        [
            "prune",
            "--plugin",
            "toy_tagging_task",
            "--plugin",
            "toy_random_criterion",
            "--task",
            "toy-tags",
            "--model",
            tiny_model_dir,
            "--output-dir",
            out,
            "--sparsity",
            "0.6",
            "--set",
            "criterion=random",
            "--set",
            "schedule.frequency=0.25",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--use_cpu",
            "true",
            "--save_strategy",
            "no",
        ]
    )
    assert rc == 0
    summary = _summary(capsys.readouterr().out)
    assert summary["task"] == "toy-tags" and summary["measured_sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert 0.0 <= summary["metrics"]["eval_accuracy"] <= 1.0
    info = json.load(open(os.path.join(out, "sparsebert.json")))
    assert info["method"]["criterion"] == "random"
    model = AutoModelForTokenClassification.from_pretrained(out)  # a plain token classifier
    assert model.config.id2label == {0: "O", 1: "POS", 2: "NEG"}
    # random scores, not magnitude: the kept weights are not the largest ones
    w = model.bert.encoder.layer[0].attention.self.query.weight.detach()
    kept, pruned_mag = (
        w[w != 0].abs(),
        AutoModelForTokenClassification.from_pretrained(
            tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True
        )
        .bert.encoder.layer[0]
        .attention.self.query.weight.detach()
        .abs()[w == 0],
    )
    assert kept.min() < pruned_mag.max()


def _pruned_on(task: str, model_dir: str, out: str, sst2_dir: str) -> None:
    data = DataOptions(task, sst2_dir, max_eval_samples=8)
    train_run(
        model_dir,
        data,
        load_recipe("gmp", ["sparsity=0.9", "schedule.frequency=0.25"]),
        out,
        training_overrides={**TRAIN, "max_steps": 4},
    )


@pytest.fixture(scope="module")
def sst2_pruned_dir(tiny_model_dir, sst2_dir, tmp_path_factory) -> str:
    """A tiny BERT pruned to 90% while fine-tuned on SST-2."""
    out = str(tmp_path_factory.mktemp("sst2-90"))
    _pruned_on("sst2", tiny_model_dir, out, sst2_dir)
    return out


@pytest.fixture(scope="module")
def stsb_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("stsb")
    (root / "STS-B").mkdir()
    for split, n in (("train", 48), ("dev", 16)):
        with open(root / "STS-B" / f"{split}.tsv", "w") as f:
            f.write("index\tsentence1\tsentence2\tscore\n")
            for i in range(n):
                f.write(f"{i}\ta good film {i}\tthe film was fine {i % 5}\t{(i % 6) * 0.9:.1f}\n")
    return str(root)


def _zeros(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() == 0 for n, p in select_targets(model, "encoder-linears").items()}


def test_transfer_keeps_the_mask_of_a_model_pruned_on_another_task(sst2_pruned_dir, stsb_dir, tmp_path):
    start = AutoModelForSequenceClassification.from_pretrained(sst2_pruned_dir)
    before = _zeros(start)
    n = sum(z.numel() for z in before.values())
    assert sum(int(z.sum()) for z in before.values()) == round(0.9 * n)
    out = str(tmp_path / "transfer")
    run = train_run(
        sst2_pruned_dir,
        DataOptions("stsb", stsb_dir, max_eval_samples=8),
        load_recipe("transfer"),
        out,
        training_overrides={**TRAIN, "max_steps": 4, "learning_rate": 1e-2},
    )
    after = AutoModelForSequenceClassification.from_pretrained(out)
    assert after.config.num_labels == 1 and after.config.problem_type == "regression"  # a new head
    for name, zeros in _zeros(after).items():
        assert torch.equal(zeros, before[name]), name  # the same zero positions, exactly
    assert run.info["sparsity"]["target_zeros"] == round(0.9 * n)
    assert run.info["method"]["name"] == "transfer" and run.info["command"] == "transfer"
    # the weights that were kept did train
    moved = [
        not torch.equal(a, b)
        for a, b in zip(
            select_targets(start, "encoder-linears").values(),
            select_targets(after, "encoder-linears").values(),
            strict=True,
        )
    ]
    assert all(moved)


def test_finetune_of_a_sparse_model_stays_sparse_unless_unlocked(
    sst2_pruned_dir, sst2_dir, tmp_path, capsys, caplog
):
    before = _zeros(AutoModelForSequenceClassification.from_pretrained(sst2_pruned_dir))
    out = str(tmp_path / "ft")
    argv = [
        "finetune",
        "--task",
        "sst2",
        "--data-dir",
        sst2_dir,
        "--model",
        sst2_pruned_dir,
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-2",
        "--use_cpu",
        "true",
        "--save_strategy",
        "no",
    ]
    with caplog.at_level("WARNING", logger="sparsebert"):
        assert main([*argv, "--output-dir", out]) == 0
    assert "already 90.0% sparse: fine-tuning with its mask locked" in caplog.text
    assert _summary(capsys.readouterr().out)["method"] == "transfer"
    after = _zeros(AutoModelForSequenceClassification.from_pretrained(out))
    assert all(torch.equal(after[n], before[n]) for n in before)
    unlocked = str(tmp_path / "unlocked")
    assert main([*argv, "--output-dir", unlocked, "--unlock-mask"]) == 0
    dense = _zeros(AutoModelForSequenceClassification.from_pretrained(unlocked))
    assert sum(int(z.sum()) for z in dense.values()) < 0.01 * sum(z.numel() for z in dense.values())


class _ExampleWeighted(LossTerm):
    """A loss term reading an extra per-example column (like a debiasing loss's bias probs)."""

    name = "weighted_ce"
    columns = ("example_weight",)
    seen: list[torch.Tensor] = []

    def __call__(self, batch):
        w = batch.extras["example_weight"].float()
        _ExampleWeighted.seen.append(w.clone())
        assert "example_weight" not in batch.inputs  # taken out of the model's inputs
        ce = torch.nn.functional.cross_entropy(batch.outputs.logits, batch.inputs["labels"], reduction="none")
        return (w * ce).sum() / w.sum()


def test_an_extra_column_survives_column_removal_and_reaches_its_loss_term(
    tiny_model_dir, sst2_dir, tmp_path, monkeypatch
):
    from sparsebert.tasks import get_task

    task = get_task("sst2")
    original = type(task).encode

    def encode_with_weights(self, ds, tokenizer, max_seq_length):
        enc = original(self, ds, tokenizer, max_seq_length)
        return enc.add_column("example_weight", [float(i % 3) + 0.5 for i in range(len(enc))])

    monkeypatch.setattr(type(task), "encode", encode_with_weights)
    _ExampleWeighted.seen.clear()
    run = train_run(
        tiny_model_dir,
        DataOptions("sst2", sst2_dir, max_eval_samples=8),
        load_recipe("finetune"),
        str(tmp_path / "w"),
        training_overrides={**TRAIN, "max_steps": 2, "train_sampling_strategy": "sequential"},
        extra_loss_terms=[_ExampleWeighted(0.5)],
    )
    assert len(_ExampleWeighted.seen) == 2
    assert _ExampleWeighted.seen[0].tolist() == [0.5, 1.5, 2.5, 0.5, 1.5, 2.5, 0.5, 1.5]
    assert run.info["loss_terms"] == {"task_loss": 1.0, "weighted_ce": 0.5}


def _imports(path: Path, package_root: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (module level or inside a
    function: a lazy import still makes a cycle). ``from pkg import submodule`` depends on
    the submodule."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsebert"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (package_root / (sub.replace(".", "/") + ".py")).exists() or (
                    package_root / sub.replace(".", "/") / "__init__.py"
                ).exists()
                found.add(sub if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sparsebert"))
    return found


def test_the_import_graph_has_no_cycle():
    root = Path(__file__).resolve().parents[1] / "src"
    modules = {}
    for path in (root / "sparsebert").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        modules[name] = _imports(path, root)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(modules.get(node, ())):
            if dep not in modules or dep == node:
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert "sparsebert.methods.base" in modules and "sparsebert.tasks.base" in modules


def test_evaluation_keeps_the_order_of_the_features(tiny_model_dir, sst2_dir, tmp_path):
    """With length-grouped training batches the Trainer used to group evaluation batches too:
    predictions then came back in another order than the features they are scored against
    (QA spans, NER words)."""
    run = train_run(
        tiny_model_dir,
        DataOptions("sst2", sst2_dir, max_eval_samples=32),
        load_recipe("finetune"),
        str(tmp_path / "order"),
        training_overrides={
            **TRAIN,
            "max_steps": 1,
            "train_sampling_strategy": "group_by_length",
            "per_device_eval_batch_size": 4,
        },
    )
    from sparsebert.tasks import get_task

    task = get_task("sst2")
    tok = run.trainer.processing_class
    raw = task.load_split("validation", sst2_dir, 32)
    raw = raw.map(lambda row, i: {"text_a": row["text_a"] + " very" * (i % 7)}, with_indices=True)
    features = task.encode(raw, tok, 64)
    pred = run.trainer.predict(features)
    assert pred.label_ids.tolist() == features["label"]


@pytest.mark.parametrize(
    "kind", ["token-classification", "masked-lm", "question-answering", "sequence-classification"]
)
def test_distillation_compares_what_the_task_names(kind):
    """KD over labelled tokens / masked positions only, start and end logits for QA, sequence
    logits otherwise: checked against T^2 KL written out by hand."""
    from types import SimpleNamespace

    from sparsebert.losses import Distillation, LossBatch
    from sparsebert.tasks.base import distillation_logits

    g = torch.Generator().manual_seed(0)
    T = 2.0

    def kl(s, t):  # mean over rows of T^2 sum_c p_t (log p_t - log p_s)
        ls, lt = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean() * T**2

    labels = torch.tensor([[-100, 1, 2, -100], [0, -100, -100, 1]])
    if kind == "question-answering":
        s = SimpleNamespace(
            start_logits=torch.randn(2, 4, generator=g), end_logits=torch.randn(2, 4, generator=g)
        )
        t = SimpleNamespace(
            start_logits=torch.randn(2, 4, generator=g), end_logits=torch.randn(2, 4, generator=g)
        )
        expected = (kl(s.start_logits, t.start_logits) + kl(s.end_logits, t.end_logits)) / 2
        inputs = {}
    elif kind == "sequence-classification":
        s, t = (SimpleNamespace(logits=torch.randn(2, 3, generator=g)) for _ in range(2))
        expected, inputs = kl(s.logits, t.logits), {"labels": torch.tensor([0, 2])}
    else:
        s, t = (SimpleNamespace(logits=torch.randn(2, 4, 5, generator=g)) for _ in range(2))
        keep = labels != -100
        expected, inputs = kl(s.logits[keep], t.logits[keep]), {"labels": labels}
    task = SimpleNamespace(distillation_logits=lambda out, inp: distillation_logits(kind, out, inp))
    value = Distillation(1.0, T)(LossBatch(s, inputs, task=task, teacher_fn=lambda: t))
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
