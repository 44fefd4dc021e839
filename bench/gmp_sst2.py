"""Benchmark: GMP* + KD vs the "Sparsity May Cry" GMP baseline, MiniLM on SST-2.

1. dense fine-tune of the embedded all-MiniLM-L6-v2 on the full SST-2 train set (the teacher);
2. GMP* + KD (recipe `gmp`) to 80% and 90% encoder-linear sparsity, starting from the dense
   fine-tuned model and distilling from it;
3. `gmp-smc` to 90% (all 2-D tensors, no KD, no LR re-warming), same start, same step budget.
Evaluated on the GLUE SST-2 dev set (alps_test.tsv in ../shared/data). Sparsity is counted
from the saved weights, loaded with plain transformers. Runs already finished (their
sparsebert.json exists) are not repeated and an interrupted run resumes from its last
checkpoint, so the script can be restarted after a stop.

    python bench/gmp_sst2.py --data-dir ../shared/data --work bench/work/gmp_sst2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForSequenceClassification

from sparsebert.pipeline import DataOptions, train_and_prune
from sparsebert.recipe import load_recipe
from sparsebert.report import sparsity_report

HERE = os.path.dirname(os.path.abspath(__file__))


def measured_sparsity(model_dir: str) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return sparsity_report(model, "encoder-linears")["target_sparsity"]


def run(name, recipe_name, sparsity, model, teacher, out, data, training, overrides=()):
    info_path = os.path.join(out, "sparsebert.json")
    if not os.path.isfile(info_path):
        recipe = load_recipe(recipe_name, [f"sparsity={sparsity}", *overrides])
        started = os.path.isdir(out) and any(d.startswith("checkpoint-") for d in os.listdir(out))
        resume = "auto" if started else None
        train_and_prune(model, data, recipe, out, teacher_path=teacher, training_overrides=training,
                        resume=resume)
    with open(info_path) as f:
        info = json.load(f)
    return {
        "method": name,
        "recipe": recipe_name,
        "target_sparsity": sparsity,
        "measured_sparsity": round(measured_sparsity(out), 6),
        "accuracy": round(info["metrics"]["eval_accuracy"], 4),
        "train_steps": info["train_steps"],
        "wall_seconds": round(info["wall_seconds"], 1),
        "kd": info["teacher"] is not None,
    }


def write(rows, args, schedule_note):
    os.makedirs(args.results, exist_ok=True)
    meta = {"model": "all-MiniLM-L6-v2 (embedded)", "task": "sst2",
            "train": "full SST-2 train (alps_train + alps_dev = 67,349)",
            "eval": "GLUE SST-2 dev (alps_test, 872)", "threads": torch.get_num_threads(),
            "epochs_per_pruning_run": args.epochs, "dense_epochs": args.dense_epochs,
            "learning_rate": args.lr, "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length}
    with open(os.path.join(args.results, "gmp_sst2.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(args.results, "gmp_sst2_meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    dense = next((r["accuracy"] for r in rows if r["method"] == "dense"), None)
    lines = ["# GMP* + KD vs gmp-smc: all-MiniLM-L6-v2 on SST-2", "",
             f"Setup: {json.dumps(meta)}", "",
             "| method | target | measured (encoder linears) | accuracy | Δ vs dense | steps | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if dense is None else f"{100 * (r['accuracy'] - dense):+.2f}"
        lines.append(f"| {r['method']} | {r['target_sparsity']:.0%} | {r['measured_sparsity']:.4%} | "
                     f"{100 * r['accuracy']:.2f} | {delta} | {r['train_steps']} | {r['wall_seconds']:.0f} |")
    lines += ["", "## Schedule", "", schedule_note, "", "## Notes", "",
              "- `measured` counts zeros in the encoder linears of the saved model (plain "
              "`AutoModelForSequenceClassification`). `gmp-smc` ranks all 2-D tensors together, so "
              "its 90% is spread over embeddings, pooler and head too and its encoder linears end "
              "below 90%.",
              "- `wall s` was measured on a shared 2-core machine while other jobs ran: indicative only.",
              "- `steps` are optimizer steps of 32 sentences."]
    with open(os.path.join(args.results, "gmp_sst2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--work", default=os.path.join(HERE, "work", "gmp_sst2"))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per pruning run (same for all)")
    p.add_argument("--dense-epochs", type=float, default=1.0, help="epochs of the dense teacher")
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    args = p.parse_args()

    data = DataOptions("sst2", args.data_dir, args.max_train_samples, args.max_eval_samples,
                       args.max_seq_length)
    training = {"learning_rate": args.lr,
                "per_device_train_batch_size": args.batch_size, "logging_steps": 100, "save_steps": 500}
    teacher = os.path.join(args.work, "dense")
    gmp = load_recipe("gmp").schedule
    smc = load_recipe("gmp-smc").schedule
    note = (f"Dense teacher: {args.dense_epochs:g} epoch(s); each pruning run: {args.epochs:g} "
            f"epoch(s) of the full train set at batch {args.batch_size} (same step budget for all "
            f"pruning runs), peak LR {args.lr:g}. Pruned runs start from the dense "
            "fine-tuned model. `gmp` (GMP*): global magnitude over the encoder linears, first step "
            f"to {gmp.init_sparsity:.0%} at {gmp.start:.0%} of training, cubic to the target, pruning "
            f"every {gmp.frequency:.0%} of training until {gmp.end:.0%}, then hold; LR re-warmed to "
            "its peak at every pruning step and decayed linearly to 10% of it; KD from the dense "
            "model, hardness 1.0, T = 2. `gmp-smc`: all 2-D tensors (embeddings, pooler, classifier "
            f"too) ranked globally, cubic from 0% at {smc.start:.0%} to the target at {smc.end:.0%}, "
            "every 10%, one linear LR decay, no KD. Accuracy is on the 872-sentence GLUE dev set.")
    rows: list[dict] = []
    plan = [
        ("dense", "finetune", 0.0, None, None),
        ("gmp*+kd", "gmp", 0.8, teacher, teacher),
        ("gmp*+kd", "gmp", 0.9, teacher, teacher),
        ("gmp-smc", "gmp-smc", 0.9, teacher, None),
    ]
    for name, recipe, s, start, kd_teacher in plan:
        out = os.path.join(args.work, "dense" if name == "dense" else f"{recipe}-{int(s * 100)}")
        t = time.time()
        print(f"=== {name} {s:.0%} -> {out}", flush=True)
        epochs = args.dense_epochs if name == "dense" else args.epochs
        rows.append(run(name, recipe, s, start, kd_teacher, out, data,
                        {**training, "num_train_epochs": epochs}))
        print(f"=== done in {time.time() - t:.0f}s: {rows[-1]}", flush=True)
        write(rows, args, note)


if __name__ == "__main__":
    main()
