"""Benchmark: Sparse*BERT on the embedded all-MiniLM-L6-v2 — upstream pruning, sparse transfer,
domain transfer (issue 10, item 8).

The chain, every step a library call equal to a CLI command (given in ``--help`` of each stage):

A. ``mlm-head``   : add a BERT masked-LM head to the embedded model (it has none) and train it with
                    the body frozen (``finetune --recipe mlm-head --task mlm-general``), then
   ``mlm-dense``  : train the whole masked-LM model briefly (``finetune --task mlm-general``).
                    This is the dense upstream model and the teacher of everything below.
B. ``upstream-80/90``: GMP* during masked-LM training, KD from ``mlm-dense`` over the masked
                    positions, T = 5.5 (``pretrain --recipe gmp-upstream --sparsity S``).
C. transfer at 90% on SST-2, a SQuAD subset and BC5CDR-chem, same fine-tuning budget per task:
   ``dense``      : fine-tune ``mlm-dense`` (also the KD teacher of the two sparse arms);
   ``upstream``   : fine-tune ``upstream-90`` with its mask locked (``finetune`` of a sparse model
                    = recipe ``transfer``), KD from ``dense``: no pruning hyper-parameters;
   ``downstream`` : GMP*+KD to 90% from ``mlm-dense`` during fine-tuning (``prune --recipe gmp``).
D. domain: further masked-LM training on ``mlm-pubmed`` of ``upstream-90`` (mask locked:
   ``bio-sparse``) and of ``mlm-dense`` (``dense-bio``), same steps; then the four models
   (general-sparse, bio-sparse, dense, dense-bio) fine-tuned on NCBI-disease and BC5CDR-disease
   (sparse ones with the mask locked, no KD).
E. SMP-L on SST-2 through the MLM head with label words (``--model mlm-head``: nothing but masks
   learned, weights bit-identical to the model's, checked here) next to SMP-L on the embedded
   model without an MLM head (a trained classifier head: "trained-head SMP").

Finished runs (their ``sparsebert.json`` exists) are not repeated; an interrupted run resumes
from its last checkpoint. Results are rewritten after every run:
``bench/results/transfer.{json,md,png}``.

    OMP_NUM_THREADS=1 python bench/transfer.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field

import torch

from sparsebert.pipeline import DataOptions, evaluate_saved, train_and_prune
from sparsebert.recipe import load_recipe

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TaskBudget:
    """The shared budget of one downstream task: every arm gets the same subset and steps."""

    task: str
    metric: str
    max_seq_length: int
    steps: int
    batch_size: int
    learning_rate: float
    max_train_samples: int | None
    max_eval_samples: int | None
    extra_metrics: tuple[str, ...] = field(default_factory=tuple)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx", "fma")))
    except OSError:
        pass
    return []


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.saved_meta: dict | None = None  # --report-only: the run's own setup

    # -- running ---------------------------------------------------------------------------------
    def run(self, name: str, recipe_name: str, model: str | None, data: DataOptions, training: dict,
            teacher: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
        out = os.path.join(self.args.work, name)
        info_path = os.path.join(out, "sparsebert.json")
        if not os.path.isfile(info_path):
            print(f"=== {name}: {recipe_name} on {data.task} from {model}", flush=True)
            recipe = load_recipe(recipe_name, list(overrides))
            started = os.path.isdir(out) and any(d.startswith("checkpoint-") for d in os.listdir(out))
            train_and_prune(model, data, recipe, out, teacher_path=teacher,
                            training_overrides={"save_steps": 10_000, "logging_steps": 25, **training},
                            resume="auto" if started else None,
                            overwrite=os.path.isdir(out) and not started)
        with open(info_path) as f:
            info = json.load(f)
        print(f"=== {name}: {info['metrics']} in {info['wall_seconds']:.0f}s", flush=True)
        return info

    def evaluate(self, name: str, model: str, data: DataOptions) -> dict:
        """Evaluate a saved model without training (cached), in the shape of a run's info."""
        path = os.path.join(self.args.work, f"{name}.json")
        if not os.path.isfile(path):
            started = time.time()
            result = evaluate_saved(model, data, batch_size=32)
            measured = result["encoder_linear_sparsity"]
            info = {"target_sparsity": round(measured, 2), "sparsity": {"target_sparsity": measured},
                    "metrics": result["metrics"], "train_steps": 0, "wall_seconds": time.time() - started}
            with open(path, "w") as f:
                json.dump(info, f, indent=2)
        with open(path) as f:
            return json.load(f)

    def add(self, stage: str, model: str, task: str, info: dict, metrics: tuple[str, ...], **extra) -> None:
        scale = 0.01 if task == "squad" else 1.0  # the official SQuAD script reports percentages
        for metric in metrics:
            self.rows.append({
                "stage": stage, "model": model, "task": task,
                "sparsity": info["target_sparsity"],
                "measured_sparsity": round(info["sparsity"]["target_sparsity"], 6),
                "metric": metric, "value": round(scale * float(metric_of(info, metric)), 4),
                "train_steps": info["train_steps"], "wall_seconds": round(info["wall_seconds"], 1),
                **extra,
            })
        self.write()

    # -- results ---------------------------------------------------------------------------------
    def meta(self) -> dict:
        if self.saved_meta is not None:
            return self.saved_meta
        a = self.args
        return {
            "model": "all-MiniLM-L6-v2 (embedded; no MLM head: one is added in stage A)",
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "mlm": {"max_seq_length": a.mlm_seq, "batch_size": a.mlm_batch, "head_steps": a.head_steps,
                    "dense_steps": a.dense_steps, "upstream_steps": a.upstream_steps,
                    "bio_steps": a.bio_steps,
                    "eval": "held-out split of mlm-general / mlm-pubmed (hash rule, ~2% of passages), "
                            "each block masked once with a fixed seed"},
            "tasks": {b.task: vars(b) for b in budgets(a)},
        }

    def write(self) -> None:
        os.makedirs(self.args.results, exist_ok=True)
        base = os.path.join(self.args.results, "transfer")
        with open(base + ".json", "w") as f:
            json.dump({"meta": self.meta(), "rows": self.rows}, f, indent=2)
        with open(base + ".md", "w") as f:
            f.write(markdown(self.rows, self.meta(), self.notes))
        plot(self.rows, base + ".png")


def metric_of(info: dict, metric: str) -> float:
    metrics = info["metrics"]
    return metrics[f"eval_{metric}"] if f"eval_{metric}" in metrics else metrics[metric]


def value(rows, stage, model, task, metric):
    for r in rows:
        if (r["stage"], r["model"], r["task"], r["metric"]) == (stage, model, task, metric):
            return r["value"]
    return None


def markdown(rows: list[dict], meta: dict, notes: list[str]) -> str:
    lines = ["# Sparse*BERT on the embedded all-MiniLM-L6-v2: upstream pruning, sparse transfer, domain",
             "", f"Machine: {meta['cpu']} ({', '.join(meta['cpu_flags'])}), {meta['threads']} thread(s), "
             f"torch {meta['torch']}. Produced by `bench/transfer.py`.", "",
             "| stage | model | task | target | measured | metric | value | steps | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['model']} | {r['task']} | {r['sparsity']:.0%} | "
                     f"{r['measured_sparsity']:.2%} | {r['metric']} | {100 * r['value']:.2f} | "
                     f"{r['train_steps']} | {r['wall_seconds']:.0f} |"
                     if r["metric"] not in ("perplexity",) else
                     f"| {r['stage']} | {r['model']} | {r['task']} | {r['sparsity']:.0%} | "
                     f"{r['measured_sparsity']:.2%} | {r['metric']} | {r['value']:.1f} | "
                     f"{r['train_steps']} | {r['wall_seconds']:.0f} |")
    smp = [r for r in rows if r["stage"] == "smp"]
    if smp:
        lines += ["", "### SMP-L through the MLM head vs with a trained head (SST-2, 70%)", "",
                  "| run | head | label words | accuracy | kept encoder weights | of them bit-identical "
                  "to the starting model |", "|---|---|---|---|---|---|"]
        for r in smp:
            words = ", ".join(r.get("label_words") or []) or "-"
            lines.append(f"| {r['model']} | {r.get('head')} | {words} | {100 * r['value']:.2f} | "
                         f"{r.get('kept_weights', 0):,} | {r.get('kept_weights_bit_identical', 0):,} |")
    lines += ["", "Values are percentages except perplexity. `measured` = zeros in the encoder "
              "linears of the saved model.", "", "## Claims", ""]
    lines += claims(rows) + ["", "## Setup", "", "```json", json.dumps(meta, indent=2), "```", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


FLOORS = {"sst2": 0.5092, "squad": 0.0, "bc5cdr_chem": 0.0, "ncbi_disease": 0.0, "bc5cdr_disease": 0.0}
"""What a model that learned nothing scores: SST-2 dev majority class (50.92%), entity / span F1 0."""


def verdict(holds: bool, arms: tuple[float, ...], dense: float | None, task: str) -> str:
    """A claim is judged only when some arm learned: at least a quarter of the dense model's gain
    over the floor. Two arms both at the floor "agree" without saying anything about the method."""
    floor = FLOORS.get(task, 0.0)
    if dense is not None and max(arms) - floor < 0.25 * (dense - floor):
        return "not testable at this budget: the sparse arms stay at the floor (nothing learned)"
    return "holds" if holds else "does not hold"


def claims(rows: list[dict]) -> list[str]:
    out = []
    for task, metric in (("sst2", "accuracy"), ("squad", "f1"), ("bc5cdr_chem", "f1")):
        d, u, g = (value(rows, "transfer", m, task, metric)
                   for m in ("dense", "upstream-90", "downstream-gmp-90"))
        if None in (u, g):
            continue
        gap = 100 * (u - g)
        out.append(f"- {task} {metric}: upstream-sparse transfer {100 * u:.2f} vs downstream GMP* "
                   f"{100 * g:.2f} ({gap:+.2f}; claim 'within 2 points': "
                   f"{verdict(gap >= -2, (u, g), d, task)}); dense {100 * d:.2f}.")
    for task in ("ncbi_disease", "bc5cdr_disease"):
        gs, bs = (value(rows, "domain", m, task, "f1") for m in ("general-sparse-90", "bio-sparse-90"))
        dd, db = (value(rows, "domain", m, task, "f1") for m in ("dense", "dense-bio"))
        if None in (gs, bs):
            continue
        dense = "" if None in (dd, db) else f"; dense {100 * dd:.2f}, dense-bio {100 * db:.2f}"
        out.append(f"- {task} entity F1: bio-sparse {100 * bs:.2f} vs general-sparse {100 * gs:.2f} "
                   f"(claim 'bio-sparse beats general-sparse': "
                   f"{verdict(bs > gs, (gs, bs), dd, task)}){dense}.")
    return out or ["- (not yet measured)"]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("upstream", "accuracy", "masked-token accuracy (held-out)"),
              ("transfer", None, "transfer at 90%"), ("domain", "f1", "domain transfer (entity F1)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (stage, metric, title) in zip(axes, panels, strict=True):
        sel = [r for r in rows if r["stage"] == stage and (metric is None or r["metric"] == metric)
               and r["metric"] not in ("perplexity", "exact_match")]
        tasks = sorted({r["task"] for r in sel})
        models = list(dict.fromkeys(r["model"] for r in sel))
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            xs, ys = [], []
            for j, t in enumerate(tasks):
                v = next((r["value"] for r in sel if r["model"] == m and r["task"] == t), None)
                if v is not None:
                    xs.append(j + i * width)
                    ys.append(100 * v)
            ax.bar(xs, ys, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
        ax.set_xticklabels(tasks)
        ax.set_title(title)
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budgets(a) -> list[TaskBudget]:
    return [
        TaskBudget("sst2", "accuracy", 64, a.task_steps, 32, 8e-5, a.task_steps * 32, None),
        TaskBudget("squad", "f1", a.squad_seq, a.squad_steps, 16, 1e-4, a.squad_steps * 12,
                   a.squad_eval, ("exact_match",)),
        TaskBudget("bc5cdr_chem", "f1", 128, a.task_steps, 32, 1e-4, a.task_steps * 32, a.ner_eval),
        TaskBudget("ncbi_disease", "f1", 128, a.ner_steps, 32, 1e-4, a.ner_steps * 32, a.ner_eval),
        TaskBudget("bc5cdr_disease", "f1", 128, a.ner_steps, 32, 1e-4, a.ner_steps * 32, a.ner_eval),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--work", default=os.path.join(HERE, "work", "transfer"))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--mlm-seq", type=int, default=128)
    p.add_argument("--mlm-batch", type=int, default=8)
    p.add_argument("--head-steps", type=int, default=150)
    p.add_argument("--dense-steps", type=int, default=250)
    p.add_argument("--upstream-steps", type=int, default=200)
    p.add_argument("--bio-steps", type=int, default=200)
    p.add_argument("--mlm-eval", type=int, default=None, help="held-out passages (default: all)")
    p.add_argument("--task-steps", type=int, default=150, help="SST-2 and BC5CDR-chem")
    p.add_argument("--squad-steps", type=int, default=100)
    p.add_argument("--squad-seq", type=int, default=192)
    p.add_argument("--squad-eval", type=int, default=300, help="SQuAD dev questions (first N)")
    p.add_argument("--ner-steps", type=int, default=120, help="NCBI-disease and BC5CDR-disease")
    p.add_argument("--ner-eval", type=int, default=1000, help="NER dev sentences (first N)")
    p.add_argument("--smp-steps", type=int, default=150)
    p.add_argument("--stages", default="ABCDE")
    p.add_argument("--domain-tasks", nargs="+", default=["ncbi_disease", "bc5cdr_disease"],
                   choices=["ncbi_disease", "bc5cdr_disease"], help="stage D's NER tasks")
    p.add_argument("--note", action="append", default=[], help="a line for the md's notes (repeatable)")
    p.add_argument("--report-only", action="store_true", help="rewrite md and png from the json")
    a = p.parse_args()
    b = Bench(a)
    b.notes += a.note
    if a.report_only:
        with open(os.path.join(a.results, "transfer.json")) as f:
            saved = json.load(f)
        b.rows, b.saved_meta = saved["rows"], saved["meta"]
        b.write()
        return
    w = a.work
    started = time.time()

    def mlm(task: str, steps: int, lr: float) -> tuple[DataOptions, dict]:
        return (DataOptions(task, a.data_dir, None, a.mlm_eval, a.mlm_seq),
                {"max_steps": steps, "per_device_train_batch_size": a.mlm_batch,
                 "per_device_eval_batch_size": 32, "learning_rate": lr})

    # A. MLM head, then the dense masked-LM model (the upstream teacher)
    data, tr = mlm("mlm-general", a.head_steps, 1e-3)
    head = b.run("mlm-head", "mlm-head", None, data, tr)
    b.add("upstream", "mlm-head (body frozen)", "mlm-general", head, ("accuracy", "perplexity"))
    data, tr = mlm("mlm-general", a.dense_steps, 1e-4)
    dense_mlm = b.run("mlm-dense", "finetune", os.path.join(w, "mlm-head"), data,
                      {**tr, "warmup_steps": 0.1})
    b.add("upstream", "dense", "mlm-general", dense_mlm, ("accuracy", "perplexity"))
    mlm_dense = os.path.join(w, "mlm-dense")

    # B. upstream GMP* at 80% and 90%
    if "B" in a.stages:
        for s in (0.8, 0.9):
            data, tr = mlm("mlm-general", a.upstream_steps, 1e-4)
            info = b.run(f"upstream-{int(s * 100)}", "gmp-upstream", mlm_dense, data, tr, teacher=mlm_dense,
                         overrides=(f"sparsity={s}",))
            b.add("upstream", f"upstream-{int(s * 100)}", "mlm-general", info, ("accuracy", "perplexity"))
    upstream90 = os.path.join(w, "upstream-90")

    tasks = {t.task: t for t in budgets(a)}

    def task_run(name: str, recipe: str, model: str, t: TaskBudget, teacher: str | None = None,
                 overrides: tuple[str, ...] = ()) -> dict:
        data = DataOptions(t.task, a.data_dir, t.max_train_samples, t.max_eval_samples, t.max_seq_length)
        return b.run(name, recipe, model, data,
                     {"max_steps": t.steps, "per_device_train_batch_size": t.batch_size,
                      "learning_rate": t.learning_rate, "warmup_steps": 0.1,
                      "per_device_eval_batch_size": 64},
                     teacher=teacher, overrides=overrides)

    # C. transfer at 90%: dense vs upstream-sparse (mask locked) vs downstream GMP*+KD
    if "C" in a.stages:
        for t in (tasks["sst2"], tasks["squad"], tasks["bc5cdr_chem"]):
            metrics = (t.metric, *t.extra_metrics)
            teacher = os.path.join(w, f"{t.task}-dense")
            info = task_run(f"{t.task}-dense", "finetune", mlm_dense, t)
            b.add("transfer", "dense", t.task, info, metrics)
            info = task_run(f"{t.task}-upstream-90", "transfer", upstream90, t, teacher=teacher)
            b.add("transfer", "upstream-90", t.task, info, metrics)
            info = task_run(f"{t.task}-downstream-gmp-90", "gmp", mlm_dense, t, teacher=teacher,
                            overrides=("sparsity=0.9",))
            b.add("transfer", "downstream-gmp-90", t.task, info, metrics)

    # D. domain: masked-LM on PubMed text, mask locked for the sparse model; then bio NER
    if "D" in a.stages:
        data, tr = mlm("mlm-pubmed", a.bio_steps, 1e-4)
        starts = {"general-sparse-90": upstream90, "dense": mlm_dense}
        for name, start in (("bio-sparse-90", upstream90), ("dense-bio", mlm_dense)):
            recipe = "transfer" if "sparse" in name else "finetune"
            before = b.evaluate(f"{name}-mlm-before", start, data)
            b.add("domain-mlm", f"{name} (before)", "mlm-pubmed", before, ("accuracy", "perplexity"))
            info = b.run(name, recipe, start, data, {**tr, "warmup_steps": 0.1})
            b.add("domain-mlm", name, "mlm-pubmed", info, ("accuracy", "perplexity"))
            starts[name] = os.path.join(w, name)
        for tname in a.domain_tasks:
            t = tasks[tname]
            for name in ("general-sparse-90", "bio-sparse-90", "dense", "dense-bio"):
                info = task_run(f"{tname}-{name}", "finetune", starts[name], t)
                b.add("domain", name, tname, info, ("f1",))

    # E. SMP-L through the MLM head (label words) vs with a trained classifier head
    if "E" in a.stages:
        t = tasks["sst2"]
        data = DataOptions("sst2", a.data_dir, a.smp_steps * 32, None, 64)
        tr = {"max_steps": a.smp_steps, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64}
        for name, model in (("smp-l-mlm-head", os.path.join(w, "mlm-head")), ("smp-l-trained-head", None)):
            info = b.run(f"sst2-{name}", "smp-l", model, data, tr, overrides=("sparsity=0.7",))
            check = weights_unchanged(model, os.path.join(w, f"sst2-{name}"))
            b.add("smp", name, "sst2", info, ("accuracy",), head=info.get("head"),
                  label_words=(info.get("prompt") or {}).get("label_words"), **check)
    b.notes.append(f"total wall time of this invocation: {time.time() - started:.0f} s")
    b.write()


def weights_unchanged(start: str | None, out: str) -> dict:
    """Whether every kept encoder-linear weight of an SMP result equals the starting model's
    bit for bit (SMP learns only masks)."""
    from transformers import AutoModel

    from sparsebert.models import resolve_model_path
    from sparsebert.targets import select_targets

    src = AutoModel.from_pretrained(resolve_model_path(start))
    dst = AutoModel.from_pretrained(out)
    kept = equal = 0
    src_params = dict(src.named_parameters())
    for name, param in select_targets(dst, "encoder-linears").items():
        w = param.detach()
        ref = src_params[name].detach()
        nz = w != 0
        kept += int(nz.sum())
        equal += int((w[nz] == ref[nz]).sum())
    return {"kept_weights": kept, "kept_weights_bit_identical": equal}


if __name__ == "__main__":
    main()
