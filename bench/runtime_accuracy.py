"""Benchmark: the accuracy of what you deploy — one sparse model evaluated through PyTorch, the
sparse fp32 runtime and the sparse INT8 runtime (issue 14: INT8 within 0.5 points of fp32).

Each runtime is `sparsebert evaluate MODEL --task T --runtime R` (`pipeline.evaluate_saved`),
on the task's full dev set. The model is any fine-tuned sparse model, e.g. the 90% SST-2 model
of `bench/transfer.py` (``bench/work/transfer/sst2-downstream-gmp-90``).

    python bench/runtime_accuracy.py MODEL --task sst2 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sparsebert.pipeline import DataOptions, evaluate_saved

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIMES = ("torch", "sparse", "sparse-int8")


def cpu_line() -> str:
    model, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]
    return f"{model} ({', '.join(isa)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="fine-tuned sparse model folders")
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--note", action="append", default=[], help="how the models were made (repeatable)")
    a = p.parse_args()
    records = [evaluate_model(m, a) for m in a.models]
    meta = {"task": a.task, "cpu": cpu_line(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "goal": "sparse-int8 within 0.5 points of sparse fp32"}
    os.makedirs(a.results, exist_ok=True)
    base = os.path.join(a.results, "runtime_accuracy")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "models": records}, f, indent=2, default=str)
    lines = ["# Accuracy of the deployed runtime: PyTorch vs sparse fp32 vs sparse INT8", "",
             f"Task {a.task} (full dev set), CPU {meta['cpu']}, {meta['threads']} threads, torch "
             f"{meta['torch']}. Produced by `bench/runtime_accuracy.py`: each model is evaluated with "
             "`sparsebert evaluate --runtime torch|sparse|sparse-int8`.", "",
             "| model | encoder-linear sparsity | metric | torch | sparse fp32 | sparse INT8 | INT8 - fp32 | "
             "goal (within 0.5) |", "|---|---|---|---|---|---|---|---|"]
    for rec in records:
        v = rec["values"]
        lines.append(f"| `{rec['model']}` | {rec['encoder_linear_sparsity']:.2%} | {rec['metric']} | "
                     f"{v['torch']:.2f} | {v['sparse']:.2f} | {v['sparse-int8']:.2f} | {rec['gap']:+.2f} | "
                     f"{'met' if abs(rec['gap']) <= 0.5 else 'not met'} |")
    lines += ["", "Kernels used: " + "; ".join(
        f"{r['runtime']}: {r['runtime_info']}" for r in records[0]["rows"] if r["runtime"] != "torch"), ""]
    lines += [f"- {n}" for n in a.note] + ([""] if a.note else [])
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    plot(records, base + ".png", a.task)


def evaluate_model(model: str, a) -> dict:
    rows = []
    for runtime in RUNTIMES:
        started = time.time()
        res = evaluate_saved(model, DataOptions(a.task, a.data_dir, None, None, a.max_seq_length),
                             batch_size=32, runtime=runtime)
        metrics = {k.removeprefix("eval_"): v for k, v in res["metrics"].items()
                   if k.removeprefix("eval_") not in ("runtime", "samples_per_second", "steps_per_second",
                                                      "loss", "model_preparation_time", "epoch")}
        rows.append({"runtime": runtime, "metrics": metrics, "runtime_info": res.get("runtime"),
                     "encoder_linear_sparsity": res["encoder_linear_sparsity"],
                     "wall_seconds": round(time.time() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    metric = "accuracy" if "accuracy" in rows[0]["metrics"] else next(iter(rows[0]["metrics"]))
    values = {r["runtime"]: 100 * r["metrics"][metric] for r in rows}
    return {"model": os.path.relpath(os.path.abspath(model), os.path.join(HERE, "..")), "metric": metric,
            "encoder_linear_sparsity": rows[0]["encoder_linear_sparsity"], "values": values,
            "gap": round(values["sparse-int8"] - values["sparse"], 2), "rows": rows}


def plot(records: list[dict], path: str, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    width = 0.8 / len(RUNTIMES)
    for i, runtime in enumerate(RUNTIMES):
        ax.bar([j + i * width for j in range(len(records))], [r["values"][runtime] for r in records], width,
               label=runtime)
    ax.set_xticks([j + width for j in range(len(records))])
    ax.set_xticklabels([f"{r['encoder_linear_sparsity']:.0%} sparse" for r in records])
    ax.set_ylabel(f"{task} {records[0]['metric']} (%)")
    ax.set_title("same model, three runtimes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

if __name__ == "__main__":
    main()
