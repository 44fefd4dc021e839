"""Benchmark (issue 11): sparse and robust subnetworks (SRNets) of the embedded MiniLM, on CPU.

MNLI proxy (`mnli-dev-split`: MNLI dev-matched split 80/20 by promptID) -> HANS, and
MRPC -> PAWS-QQP. Arms, all on the same fixed training subsets, step budgets and evaluation
subsets:

1. dense fine-tuning with standard cross-entropy and with each debiasing loss (product of
   experts, example reweighting, confidence regularisation; the bias-only model is the
   library's lexical-overlap model, out-of-fold probabilities); the best debiasing loss is
   the one with the highest HANS non-entailment accuracy among the dense runs (chosen by
   this script, not by hand);
2. setting 1: mask training (`mask-train`) on the dense model fine-tuned with the same loss,
   at 50 / 70 / 90% sparsity, standard and best debiasing loss;
3. setting 3: mask training on the pretrained model (`mask-train-pretrained`), same grid;
4. setting 2 at 70%: the setting-3 mask, weights rewound to the pretrained model, the
   subnetwork fine-tuned with the mask locked (`srnet-rewind`);
5. MRPC -> PAWS-QQP: dense vs setting 1 at 70%, standard and the best loss.

Finished runs (their sparsebert.json exists) are skipped; an interrupted run resumes from its
last checkpoint. The json / md / png under bench/results are rewritten after every run.

    OMP_NUM_THREADS=1 python bench/robustness.py            # the full benchmark
    OMP_NUM_THREADS=1 python bench/robustness.py --quick    # plumbing check, a few steps per arm
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEBIAS = ("poe", "reweight", "conf-reg")
SPARSITIES = (0.5, 0.7, 0.9)


# -- the library ------------------------------------------------------------------------------------------
def use_library_snapshot(work: str) -> str:
    """Import sparsebert from a snapshot of the committed tree (git HEAD), not the work tree:
    the benchmark runs for over an hour while others edit the library, and a module that is
    half-edited when it is first imported would break a run. Returns the commit."""
    import sys

    root = os.path.abspath(os.path.join(HERE, ".."))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dst = os.path.join(work, f"lib-{commit[:12]}")
    if not os.path.isdir(os.path.join(dst, "src", "sparsebert")):
        os.makedirs(dst, exist_ok=True)
        archive = subprocess.run(["git", "-C", root, "archive", commit, "src/sparsebert"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=archive, check=True)
    sys.path.insert(0, os.path.join(dst, "src"))
    import sparsebert

    assert os.path.abspath(sparsebert.__file__).startswith(dst), sparsebert.__file__
    return commit


# -- data -----------------------------------------------------------------------------------------------
def build_data_dir(src: str, dst: str, hans_per_cell: int, seed: int = 0) -> dict:
    """A data folder for the runs: links to the real task folders and a fixed stratified HANS
    subset (``hans_per_cell`` pairs per heuristic x label, shuffled with a fixed seed)."""
    os.makedirs(os.path.join(dst, "hans"), exist_ok=True)
    for name in ("mnli", "mrpc", "paws"):
        link = os.path.join(dst, name)
        if not os.path.islink(link):
            os.symlink(os.path.abspath(os.path.join(src, name)), link)
    with open(os.path.join(src, "hans", "hans_evaluation_derived.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    li, hi = header.index("label"), header.index("heuristic")
    cells: dict[tuple[str, str], list] = {}
    for r in body:  # file order (the source copy is already shuffled): the first n of each cell
        cell = cells.setdefault((r[hi], r[li]), [])
        if len(cell) < hans_per_cell:
            cell.append(r)
    subset = [r for key in sorted(cells) for r in cells[key]]
    random.Random(seed).shuffle(subset)
    out = os.path.join(dst, "hans", "hans_evaluation_derived.tsv")
    text = "\n".join("\t".join(r) for r in [header, *subset]) + "\n"
    if not os.path.isfile(out) or open(out, encoding="utf-8").read() != text:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    counts = {f"{h}/{lab}": len(v) for (h, lab), v in sorted(cells.items())}
    return {"hans_examples": len(subset), "hans_cells": counts}


def bias_model(task: str, data_dir: str, out: str, train_samples: int | None) -> dict:
    from sparsebert.bias_models import build_bias_model

    report_path = out + ".report.json"
    if os.path.isfile(out) and os.path.isfile(report_path):
        with open(report_path) as f:
            return json.load(f)
    report = build_bias_model(task, data_dir, "overlap", out, folds=5, seed=0,
                              max_train_samples=train_samples, log=lambda m: print(m, flush=True))
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    return report


# -- one run -------------------------------------------------------------------------------------------
def measured_sparsity(model_dir: str) -> float:
    from transformers import AutoModelForSequenceClassification

    from sparsebert.report import sparsity_report

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return sparsity_report(model, "encoder-linears")["target_sparsity"]


def run_one(spec: dict, args, data_opts: dict, bias_files: dict) -> dict:
    from sparsebert.debias import DebiasOptions
    from sparsebert.pipeline import DataOptions, train_run
    from sparsebert.recipe import load_recipe

    out = spec["out"]
    info_path = os.path.join(out, "sparsebert.json")
    if not os.path.isfile(info_path):
        overrides = list(spec.get("overrides", ()))
        if spec["sparsity"] and spec["recipe"] != "srnet-rewind":
            overrides.insert(0, f"sparsity={spec['sparsity']}")
        recipe = load_recipe(spec["recipe"], overrides)
        started = os.path.isdir(out) and any(d.startswith("checkpoint-") for d in os.listdir(out))
        debias = None if spec["debias"] == "standard" else \
            DebiasOptions(spec["debias"], bias_files[spec["task"]])
        training = {**args.training, "max_steps": spec["steps"], **spec.get("training", {})}
        train_run(spec["model"], DataOptions(**data_opts[spec["task"]]), recipe, out,
                  teacher_path=spec.get("teacher"), training_overrides=training,
                  resume="auto" if started else None, debias=debias)
    with open(info_path) as f:
        info = json.load(f)
    ev = info["eval_sets"]
    id_set = next(iter(ev))
    ood_set = "hans" if "hans" in ev else "paws_qqp"
    ood = ev.get(ood_set, {})
    pre = f"eval_{ood_set}_"
    row = {
        "task": spec["task"],
        "setting": spec["setting"],
        "method": spec["method"],
        "debias": spec["debias"],
        "sparsity": spec["sparsity"],
        "measured_sparsity": round(measured_sparsity(out), 6),
        "id_metric": round(ev[id_set]["eval_accuracy"], 4),
        "id_metric_name": "accuracy (mnli-dev-split validation)" if spec["task"] == "mnli-dev-split"
        else "accuracy (MRPC dev)",
        "ood_set": "HANS" if ood_set == "hans" else "PAWS-QQP",
        "ood_metric": round(ood.get(pre + "accuracy", float("nan")), 4),
        "train_steps": info["train_steps"],
        "wall_seconds": round(info["wall_seconds"], 1),
        "start": spec["start_desc"],
        "run_dir": os.path.relpath(out, os.path.join(HERE, "..")),
    }
    if ood_set == "hans":
        row["hans_by_heuristic"] = {
            k[len(pre):].replace("_accuracy", ""): round(v, 4) for k, v in ood.items()
            if k.startswith(pre) and k.endswith("_accuracy") and k != pre + "accuracy"}
        row["hans_non_entailment"] = row["hans_by_heuristic"].get("non_entailment")
        # share of HANS pairs predicted 'entailment' (1.0 = the always-entailment shortcut)
        ent, non = row["hans_by_heuristic"].get("entailment"), row["hans_non_entailment"]
        if ent is not None and non is not None:
            row["hans_pred_entailment_share"] = round((ent + (1.0 - non)) / 2, 4)
    else:
        row["id_f1"] = round(ev[id_set].get("eval_f1", float("nan")), 4)
        row["ood_f1"] = round(ood.get(pre + "f1", float("nan")), 4)
    return row


# -- reporting ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _fmt(v, pct=True):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{100 * v:.1f}" if pct else str(v)


def write_results(rows: list[dict], meta: dict, args) -> None:
    """The json, md and png; a reporting failure is printed, never fatal (rewritten next run)."""
    try:
        _write_results(rows, meta, args)
    except Exception:
        import traceback

        traceback.print_exc()


def _write_results(rows: list[dict], meta: dict, args) -> None:
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, args.name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    write_md(rows, meta, base + ".md")
    try:
        write_plot(rows, base + ".png")
    except Exception as err:  # a plot failure must not stop the benchmark
        print(f"plot failed: {err}", flush=True)


def claim_check(rows: list[dict]) -> list[str]:
    mnli = [r for r in rows if r["task"] == "mnli-dev-split"]
    dense = next((r for r in mnli if r["setting"] == "dense" and r["debias"] == "standard"), None)
    if dense is None:
        return ["Dense standard fine-tuning has not finished yet: no claim check."]
    lines = [f"Dense standard: in-distribution {_fmt(dense['id_metric'])}, HANS {_fmt(dense['ood_metric'])} "
             f"(entailment {_fmt(dense['hans_by_heuristic'].get('entailment'))}, non-entailment "
             f"{_fmt(dense['hans_non_entailment'])}; it predicts 'entailment' for "
             f"{_fmt(dense.get('hans_pred_entailment_share'))}% of HANS pairs).", ""]
    sparse_deb = [r for r in mnli if r["sparsity"] > 0 and r["debias"] != "standard"]
    winners = [r for r in sparse_deb if r["hans_non_entailment"] > dense["hans_non_entailment"]
               and r["id_metric"] >= dense["id_metric"] - 0.02]
    sparse_std = [r for r in mnli if r["sparsity"] > 0 and r["debias"] == "standard"]
    std_winners = [r for r in sparse_std if r["hans_non_entailment"] > dense["hans_non_entailment"]
                   and r["id_metric"] >= dense["id_metric"] - 0.02]
    if not sparse_deb:
        lines.append("No sparse debiased run has finished yet.")
    elif winners:
        lines.append("**Yes, on this proxy**: these sparse debiased subnetworks beat dense standard on HANS "
                     "non-entailment while staying within 2 points in distribution:")
        lines.append("")
        for r in winners:
            lines.append(f"- setting {r['setting']} {r['debias']} {r['sparsity']:.0%}: "
                         f"ID {_fmt(r['id_metric'])} "
                         f"({100 * (r['id_metric'] - dense['id_metric']):+.1f}), HANS non-entailment "
                         f"{_fmt(r['hans_non_entailment'])} "
                         f"({100 * (r['hans_non_entailment'] - dense['hans_non_entailment']):+.1f}), HANS "
                         f"overall {_fmt(r['ood_metric'])}")
    else:
        lines.append("**No**: no sparse debiased subnetwork beats dense standard on HANS non-entailment "
                     "while staying within 2 points in distribution on this proxy.")
    if sparse_std:
        lines += ["", f"For comparison, sparse *standard* (not debiased) runs that pass the same test: "
                  f"{len(std_winners)} of {len(sparse_std)} (if these pass too, the gain comes from pruning "
                  "or from the noise of one seed, not from the debiasing loss)."]
    lines.append("")
    near = [r for r in mnli if (r.get("hans_pred_entailment_share") or 0) >= 0.9]
    lines.append(f"Runs that predict 'entailment' for >= 90% of HANS pairs (the always-entailment shortcut): "
                 f"{len(near)} of {len(mnli)}. HANS is half entailment, half non-entailment, so a model "
                 "that always says 'entailment' scores 50% overall, 100% entailment, 0% non-entailment; "
                 "non-entailment gains of a few points over a near-0 baseline mean little.")
    mrpc = [r for r in rows if r["task"] == "mrpc"]
    if mrpc:
        d = next((r for r in mrpc if r["setting"] == "dense" and r["debias"] == "standard"), None)
        lines += ["", "PAWS-QQP (677 pairs, 72% non-paraphrase: always 'not paraphrase' scores 71.8%):"]
        for r in mrpc:
            delta = "" if d is None else (
                f" (ID {100 * (r['id_metric'] - d['id_metric']):+.1f}, "
                f"PAWS {100 * (r['ood_metric'] - d['ood_metric']):+.1f} vs dense standard)")
            lines.append(f"- {r['setting']} {r['debias']} {r['sparsity']:.0%}: "
                         f"MRPC dev {_fmt(r['id_metric'])}, PAWS-QQP {_fmt(r['ood_metric'])}{delta}")
    return lines


def write_md(rows: list[dict], meta: dict, path: str) -> None:
    lines = ["# Sparse and robust subnetworks: all-MiniLM-L6-v2, MNLI proxy -> HANS, MRPC -> PAWS-QQP", "",
             f"Generated by `bench/robustness.py` ({meta['status']}; {len(rows)} of "
             f"{meta['planned_runs']} runs finished).", "",
             "## MNLI proxy (`mnli-dev-split`) -> HANS", "",
             "| setting | method | loss | target | measured | ID acc | HANS acc | HANS ent | HANS non-ent | "
             "lex. overlap non-ent | subseq. non-ent | constituent non-ent | % HANS predicted ent | steps | "
             "wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["task"] != "mnli-dev-split":
            continue
        h = r["hans_by_heuristic"]
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['debias']} | {r['sparsity']:.0%} | "
            f"{r['measured_sparsity']:.1%} | "
            f"{_fmt(r['id_metric'])} | {_fmt(r['ood_metric'])} | {_fmt(h.get('entailment'))} | "
            f"{_fmt(h.get('non_entailment'))} | {_fmt(h.get('lexical_overlap_non_entailment'))} | "
            f"{_fmt(h.get('subsequence_non_entailment'))} | {_fmt(h.get('constituent_non_entailment'))} | "
            f"{_fmt(r.get('hans_pred_entailment_share'))} | {r['train_steps']} | {r['wall_seconds']:.0f} |")
    lines += ["", "## MRPC -> PAWS-QQP", "",
              "| setting | method | loss | target | measured | MRPC dev acc | MRPC dev F1 | PAWS-QQP acc | "
              "PAWS-QQP F1 | steps | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["task"] != "mrpc":
            continue
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['debias']} | {r['sparsity']:.0%} | "
            f"{r['measured_sparsity']:.1%} | {_fmt(r['id_metric'])} | {_fmt(r.get('id_f1'))} | "
            f"{_fmt(r['ood_metric'])} | {_fmt(r.get('ood_f1'))} | {r['train_steps']} | "
            f"{r['wall_seconds']:.0f} |")
    lines += ["", "## Claim check", "", *claim_check(rows), "", "## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta["setup"].items()]
    lines += ["", "## Limits of the proxy", "", *[f"- {x}" for x in meta["limits"]], ""]
    if meta.get("failed"):
        lines += ["## Failed runs", "", *[f"- {x}" for x in meta["failed"]], ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    mnli = [r for r in rows if r["task"] == "mnli-dev-split"]
    dense = {r["debias"]: r for r in mnli if r["setting"] == "dense"}
    styles = {"1": "-", "2": ":", "3": "--"}
    colors = {"standard": "tab:blue", "poe": "tab:red", "reweight": "tab:green", "conf-reg": "tab:purple"}
    panels = [(axes[0], "id_metric", "MNLI proxy: in-distribution accuracy"),
              (axes[1], "hans_non_entailment", "HANS non-entailment accuracy")]
    for ax, key, title in panels:
        for loss, r in dense.items():
            ax.scatter([0], [100 * r[key]], color=colors.get(loss, "k"), marker="*", s=120,
                       label=f"dense {loss}", zorder=3)
        for setting in ("1", "2", "3"):
            for loss in colors:
                pts = sorted((r["sparsity"], r[key]) for r in mnli
                             if r["setting"] == setting and r["debias"] == loss)
                if not pts:
                    continue
                # setting 1 starts from the dense model of the same loss; 2 and 3 from the pretrained one
                start = setting == "1" and loss in dense
                xs = ([0.0] if start else []) + [p[0] for p in pts]
                ys = ([dense[loss][key]] if start else []) + [p[1] for p in pts]
                ax.plot([100 * x for x in xs], [100 * y for y in ys], styles[setting], marker="o",
                        color=colors[loss], label=f"setting {setting} {loss}")
        ax.set_xlabel("target sparsity (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7, loc="lower left")
    ax = axes[2]
    for r in rows:
        if r["task"] != "mrpc":
            continue
        c = colors.get(r["debias"], "k")
        m = "*" if r["setting"] == "dense" else "o"
        ax.scatter(100 * r["id_metric"], 100 * r["ood_metric"], color=c, marker=m, s=120,
                   label=f"{r['setting']} {r['debias']} {r['sparsity']:.0%}")
    ax.axhline(100 * 486 / 677, color="grey", ls="--", lw=0.8, label="PAWS majority (71.8%)")
    ax.set_xlabel("MRPC dev accuracy (%)")
    ax.set_ylabel("PAWS-QQP accuracy (%)")
    ax.set_title("MRPC -> PAWS-QQP (dense * / 70% sparse o)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the plan ----------------------------------------------------------------------------------------------
def best_debias(rows: list[dict]) -> str:
    """The dense debiasing loss with the highest HANS non-entailment accuracy (ties: ID accuracy)."""
    dense = [r for r in rows if r["task"] == "mnli-dev-split" and r["setting"] == "dense"
             and r["debias"] in DEBIAS]
    if not dense:
        raise RuntimeError("no dense debiased run finished: no best debiasing loss")
    return max(dense, key=lambda r: (r["hans_non_entailment"], r["id_metric"]))["debias"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--work", default=os.path.join(HERE, "work", "robustness"))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="robustness", help="results file stem")
    p.add_argument("--quick", action="store_true", help="plumbing check: tiny subsets, a few steps per arm")
    p.add_argument("--mnli-train", type=int, default=None,
                   help="MNLI-proxy training examples (first N of the train part; default all 7,858)")
    p.add_argument("--mrpc-train", type=int, default=None, help="MRPC training examples (default all 3,668)")
    p.add_argument("--hans-per-cell", type=int, default=160, help="HANS pairs per heuristic x label")
    p.add_argument("--max-eval-samples", type=int, default=1000)
    p.add_argument("--dense-steps", type=int, default=200)
    p.add_argument("--sparse-steps", type=int, default=80)
    p.add_argument("--mrpc-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4, help="weight LR of dense fine-tuning and setting 2")
    p.add_argument("--score-lr", type=float, default=1e-3, help="mask-score LR (0: the recipes')")
    p.add_argument("--head-lr", type=float, default=2e-3,
                   help="LR of the new head in setting 3 (default: the recipe's learning_rate)")
    p.add_argument("--worktree-library", action="store_true",
                   help="import sparsebert from the work tree (default: a snapshot of git HEAD)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the md and png from the existing json (no training)")
    args = p.parse_args()
    if args.report_only:
        with open(os.path.join(args.results, args.name + ".json")) as f:
            saved = json.load(f)
        write_results(saved["rows"], saved["meta"], args)
        return

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.quick:
        args.work = os.path.join(args.work, "quick")
        args.name = "robustness_quick"
        args.results = os.path.join(args.work, "results")
        args.mnli_train, args.mrpc_train, args.hans_per_cell, args.max_eval_samples = 96, 64, 8, 48
        args.dense_steps = args.sparse_steps = args.mrpc_steps = 3
    os.makedirs(args.work, exist_ok=True)
    commit = "work tree" if args.worktree_library else use_library_snapshot(args.work)
    print(f"sparsebert from: {commit}", flush=True)
    data_dir = os.path.join(args.work, "data")
    hans_info = build_data_dir(args.data_dir, data_dir, args.hans_per_cell)
    data_opts = {
        "mnli-dev-split": dict(task="mnli-dev-split", data_dir=data_dir, max_train_samples=args.mnli_train,
                               max_eval_samples=args.max_eval_samples, max_seq_length=args.max_seq_length),
        "mrpc": dict(task="mrpc", data_dir=data_dir, max_train_samples=args.mrpc_train,
                     max_eval_samples=args.max_eval_samples, max_seq_length=args.max_seq_length),
    }
    print(f"HANS subset: {hans_info}", flush=True)
    bias_files = {t: os.path.join(args.work, f"bias-{t}.safetensors") for t in data_opts}
    bias_reports = {t: bias_model(t, data_dir, bias_files[t], data_opts[t]["max_train_samples"])
                    for t in data_opts}
    args.training = {"per_device_train_batch_size": args.batch_size, "per_device_eval_batch_size": 32,
                     "logging_steps": 25, "save_steps": 100, "save_total_limit": 1, "learning_rate": args.lr}

    w = args.work
    dense_mnli = os.path.join(w, "mnli-dense-standard")
    no_kd = ["distillation.enabled=false"]
    # SRNets' magnitude-hard init, which this benchmark's md describes (the shipped recipes have
    # since moved to magnitude-soft)
    mask_over = ["masks.init=magnitude-hard"] + ([f"masks.score_lr={args.score_lr}"] if args.score_lr else [])
    s3_training = {"learning_rate": args.head_lr} if args.head_lr else {}

    def dense(task, loss):
        d = os.path.join(w, f"{'mnli' if task == 'mnli-dev-split' else 'mrpc'}-dense-{loss}")
        teacher = os.path.join(w, f"{'mnli' if task == 'mnli-dev-split' else 'mrpc'}-dense-standard")
        return dict(task=task, setting="dense", method="fine-tuning", debias=loss, sparsity=0.0,
                    recipe="finetune", model=None, out=d, overrides=no_kd,
                    teacher=teacher if loss == "conf-reg" else None,
                    steps=args.dense_steps if task == "mnli-dev-split" else args.mrpc_steps,
                    start_desc="pretrained")

    def setting1(task, loss, s):
        t = "mnli" if task == "mnli-dev-split" else "mrpc"
        return dict(task=task, setting="1", method="mask training (fine-tuned)", debias=loss, sparsity=s,
                    recipe="mask-train", model=os.path.join(w, f"{t}-dense-{loss}"),
                    out=os.path.join(w, f"{t}-s1-{loss}-{int(100 * s)}"), overrides=no_kd + mask_over,
                    teacher=os.path.join(w, f"{t}-dense-standard") if loss == "conf-reg" else None,
                    steps=args.sparse_steps if task == "mnli-dev-split" else args.mrpc_steps,
                    start_desc=f"dense fine-tuned with {loss}")

    def setting3(loss, s):
        return dict(task="mnli-dev-split", setting="3", method="mask training (pretrained)", debias=loss,
                    sparsity=s, recipe="mask-train-pretrained", model=None,
                    out=os.path.join(w, f"mnli-s3-{loss}-{int(100 * s)}"), overrides=no_kd + mask_over,
                    teacher=dense_mnli if loss == "conf-reg" else None, steps=args.sparse_steps,
                    training=s3_training, start_desc="pretrained (weights frozen, new head trains)")

    def setting2(loss, s):
        return dict(task="mnli-dev-split", setting="2", method="mask on pretrained + rewind + fine-tune",
                    debias=loss, sparsity=s, recipe="srnet-rewind",
                    model=os.path.join(w, f"mnli-s3-{loss}-{int(100 * s)}"),
                    out=os.path.join(w, f"mnli-s2-{loss}-{int(100 * s)}"), overrides=no_kd,
                    teacher=dense_mnli if loss == "conf-reg" else None, steps=args.sparse_steps,
                    start_desc=f"setting-3 mask ({loss}), pretrained weights")

    rows: list[dict] = []
    planned = 4 + 2 + 6 + 6 + 2 + 2
    setup = {
        "model": "all-MiniLM-L6-v2 (embedded; 6 layers, hidden 384)",
        "library": f"sparsebert at commit {commit} (imported from a snapshot of that commit)",
        "CPU": f"{cpu_model()}, torch threads {torch.get_num_threads()} (OMP_NUM_THREADS=1), a shared "
               "2-core machine: wall times are indicative only",
        "MNLI proxy": "`mnli-dev-split`: MNLI dev-matched (9,815 labelled) split by promptID, 80% train "
                      "(7,858) / 20% in-distribution test (1,957); training on "
                      f"{'all 7,858' if args.mnli_train is None else f'the first {args.mnli_train}'} "
                      "train examples; ID accuracy on "
                      + ("all 1,957" if args.max_eval_samples is None
                         else f"the first {args.max_eval_samples}")
                      + " test examples (fixed, the same for every arm)",
        "HANS": "fixed stratified subset of the 30,000-pair evaluation set: "
                f"{hans_info['hans_examples']} pairs, {args.hans_per_cell} per heuristic x label (the first "
                "of each cell in the shuffled "
                "derived file); 3-way predictions mapped to entailment / non-entailment",
        "MRPC": f"train {'all 3,668' if args.mrpc_train is None else f'first {args.mrpc_train}'}, ID = MRPC "
                "dev (408); OOD = PAWS-QQP dev+test (677)",
        "bias-only model": "library `overlap` model (logistic regression on lexical-overlap / subsequence / "
                           "negation / length features), 5-fold out-of-fold probabilities on the training "
                           "subset; report: " + json.dumps({t: {"oof_accuracy": round(b["oof_accuracy"], 4),
                                                               **{k: round(v.get("accuracy", float('nan')), 4)
                                                                  for k, v in b["eval_sets"].items()}}
                                                           for t, b in bias_reports.items()}),
        "budgets": f"dense fine-tuning {args.dense_steps} optimizer steps (MNLI) / {args.mrpc_steps} (MRPC); "
                   f"every sparse run {args.sparse_steps} steps (MNLI) / {args.mrpc_steps} (MRPC); batch "
                   f"{args.batch_size}, max_seq_length {args.max_seq_length}, seed 42, weight LR {args.lr:g} "
                   "(linear decay; dense: 10% warm-up)"
                   + (f", mask-score LR {args.score_lr:g}" if args.score_lr
                      else ", mask-score LR: the recipes'")
                   + (f", setting-3 head LR {args.head_lr:g}" if args.head_lr else ""),
        "why these learning rates": "the recipes' mask-score LR (5e-5) is sized for epochs of MNLI; with "
                   "Adam a score moves about one LR per step, so in a few dozen steps it moves far less "
                   "than the 0.01 margin of the magnitude-hard init and the 50% / 70% masks (one-shot: "
                   "init_sparsity 0.7 >= target) would stay exactly the magnitude masks, the standard "
                   "and debiased subnetworks identical. The score LR is raised so that the masks can "
                   "move within the budget; the setting-3 head (new classifier + pooler on a frozen "
                   "encoder) gets a linear-probe-sized LR for the same reason.",
        "settings": "1 = `mask-train` (frozen weights, mask scores trained, magnitude-hard init, 70% -> "
                    "target cubic over 70% of training, exact top-k at the end) on the dense model "
                    "fine-tuned with the same loss; 3 = `mask-train-pretrained` on the pretrained model (new "
                    "classifier trains, "
                    "encoder frozen); 2 = the setting-3 mask of the same loss, all weights rewound to the "
                    "pretrained model, then `srnet-rewind` fine-tuning with the mask locked. No "
                    "distillation anywhere (distillation.enabled=false): the loss is standard CE or the "
                    "debiasing loss alone. conf-reg's teacher is the dense standard model of the task.",
        "best debiasing loss": "chosen by the script: the dense debiased run with the highest HANS "
                               "non-entailment accuracy",
        "measured sparsity": "zeros in the encoder linears of the saved weights (plain transformers loading, "
                             "`sparsity_report`); setting-1/2/3 masks also cover the pooler (setting 1: the "
                             "classifier too)",
    }
    limits = [
        "MNLI has no train split here: the proxy trains on 80% of MNLI dev-matched (7,858 pairs, ~2% of real "
        "MNLI train) and tests on the other 20% (no premise shared). Real SRNets numbers are on 393k MNLI "
        "training pairs with BERT-base; a small model trained on a few thousand pairs may not even learn the "
        "lexical-overlap shortcut that HANS probes, or may learn nothing else.",
        "Budgets are one to two hundred optimizer steps per run (one thread, the whole benchmark in about "
        "95 minutes); SRNets trains for epochs of MNLI (tens of thousands of steps). The masks of settings "
        "1 and 3 start from magnitude masks and can move only a little in this budget, so they are close to "
        "magnitude pruning (setting 1: of the fine-tuned model, nothing else trains; setting 3: of the "
        "pretrained model, plus a head trained on the frozen encoder).",
        "HANS is evaluated on a stratified subset (see HANS above), not all 30,000 pairs; per-subcase scores "
        "are impossible (the local copy has no subcase column).",
        "One seed per arm: differences of 1-2 points are within noise.",
    ]
    meta = {"status": "running", "planned_runs": planned, "setup": setup, "limits": limits,
            "bias_models": bias_reports, "args": {k: v for k, v in vars(args).items() if k != "training"}}

    bench_start = time.time()

    def do(spec):
        t = time.time()
        print(f"=== [{(t - bench_start) / 60:.1f} min] {spec['task']} setting {spec['setting']} "
              f"{spec['debias']} {spec['sparsity']:.0%} -> {spec['out']}", flush=True)
        try:
            row = run_one(spec, args, data_opts, bias_files)
        except Exception as err:  # one failed arm must not stop the others: recorded in the md
            import traceback

            traceback.print_exc()
            meta.setdefault("failed", []).append(
                f"{spec['task']} setting {spec['setting']} {spec['debias']} {spec['sparsity']:.0%}: "
                f"{type(err).__name__}: {str(err)[:300]}")
            write_results(rows, meta, args)
            return None
        rows.append(row)
        print(f"=== done in {time.time() - t:.0f}s: " + json.dumps({k: row[k] for k in (
            "id_metric", "ood_metric", "measured_sparsity", "train_steps", "wall_seconds")}
            | {"hans_non_entailment": row.get("hans_non_entailment")}), flush=True)
        write_results(rows, meta, args)
        return row

    # most informative arms first, so that a cut-short benchmark still answers the question
    do(dense("mnli-dev-split", "standard"))
    for loss in DEBIAS:
        do(dense("mnli-dev-split", loss))
    best = best_debias(rows)
    meta["setup"]["best debiasing loss"] += f": **{best}**"
    print(f"best dense debiasing loss (HANS non-entailment): {best}", flush=True)
    do(dense("mrpc", "standard"))
    do(dense("mrpc", best))
    for loss in ("standard", best):
        do(setting1("mnli-dev-split", loss, 0.7))
        do(setting3(loss, 0.7))
        do(setting2(loss, 0.7))
    for loss in ("standard", best):
        do(setting1("mrpc", loss, 0.7))
    for s in (0.5, 0.9):
        for loss in ("standard", best):
            do(setting1("mnli-dev-split", loss, s))
            do(setting3(loss, s))
    order = {"dense": 0, "1": 1, "2": 2, "3": 3}
    rows.sort(key=lambda r: (r["task"] != "mnli-dev-split", order[r["setting"]], r["sparsity"],
                             r["debias"] != "standard"))
    meta["status"] = "complete" if not meta.get("failed") else "complete, with failed runs"
    meta["benchmark_wall_minutes"] = round((time.time() - bench_start) / 60, 1)
    write_results(rows, meta, args)
    print("benchmark complete", flush=True)


if __name__ == "__main__":
    main()
