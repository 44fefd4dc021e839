"""llm-compressor's one-shot SparseGPT / Wanda on a Hugging Face sequence-classification model.

Runs INSIDE llm-compressor's own venv (``bench/work/peers/llmc-venv``, built by
``bench/peers.py``): llm-compressor 0.14 pins transformers <= 5.17, which sparsebert's
environment does not have. Imports nothing from sparsebert. Called by
`bench/peers.py::run_llmcompressor`:

    llmc-venv/bin/python bench/peers_llmcompressor.py --model TEACHER --out DIR \\
        --calibration calib.pt --method sparsegpt|wanda --sparsity 0.5 [--pattern 2:4] --report r.json

- calibration: a `torch.save`d list of batches (dicts of ``input_ids``, ``attention_mask``,
  ``token_type_ids`` tensors; sparsebert's sample, one example per batch), passed to
  ``oneshot`` as a ready `DataLoader` (``batch_size=None``: every item is a batch);
- targets: the prunable linears inside every encoder layer (``targets`` = the layer class,
  e.g. ``BertLayer``, as llm-compressor's sparsity modifiers read it: "layers containing
  targets"), i.e. Q, K, V, attention output, FFN in and out — sparsebert's
  ``encoder-linears``; the pooler and the classifier stay dense;
- ``--pipeline``: ``sequential`` (llm-compressor's default: the model traced with torch.fx
  and cut at each encoder layer, each layer calibrated on the outputs of the already pruned
  ones) and/or ``basic`` (one calibration pass through the whole model, then pruning), tried
  in the given order (``sequential,basic``) until one succeeds; every failure is reported;
- the pruned weights are copied into a freshly loaded model and saved as a plain HF folder
  (no compressed-tensors config), with the tokenizer.

The report (``--report``, JSON) has ``ok``, ``oneshot_seconds``, versions and, per attempt,
the error with the innermost llm-compressor / transformers source line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _where(err: BaseException) -> list[str]:
    """The innermost frames of the traceback that lie in llm-compressor, compressed-tensors,
    transformers or torch: file:line function."""
    frames = traceback.extract_tb(err.__traceback__)
    keep = [f for f in frames if any(k in f.filename for k in ("llmcompressor", "compressed_tensors",
                                                              "transformers", "torch"))]
    return [f"{f.filename}:{f.lineno} {f.name}: {f.line}" for f in (keep or frames)[-4:]]


def _layer_class(model) -> str:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise SystemExit(f"{type(model).__name__}: no encoder.layer stack found; pass --layer-class")
    return type(layers[0]).__name__


def _modifier(method: str, sparsity: float, pattern: str | None, layer_class: str, block_size: int,
              dampening: float):
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    common = {"sparsity": sparsity, "mask_structure": pattern or "0:0", "targets": [layer_class]}
    if method == "sparsegpt":
        return SparseGPTModifier(**common, block_size=block_size, dampening_frac=dampening)
    return WandaPruningModifier(**common)


def prune(a) -> dict:
    import torch
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    batches = torch.load(a.calibration, weights_only=True)
    report: dict = {"ok": False, "versions": _versions(), "method": a.method, "sparsity": a.sparsity,
                    "pattern": a.pattern, "calibration_batches": len(batches), "attempts": []}
    for pipeline in a.pipeline.split(","):
        model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=torch.float32).eval()
        layer_class = a.layer_class or _layer_class(model)
        modifier = _modifier(a.method, a.sparsity, a.pattern, layer_class, a.block_size, a.dampening)
        loader = DataLoader(batches, batch_size=None, shuffle=False)
        attempt = {"pipeline": pipeline, "targets": [layer_class], "sequential_targets": [layer_class]}
        started = time.time()
        try:
            oneshot(model=model, processor=tokenizer, recipe=modifier, dataset=loader, pipeline=pipeline,
                    sequential_targets=[layer_class])
        except Exception as err:  # noqa: BLE001 - every failure is a result to report
            error = f"{type(err).__name__}: {err}"[:2000]
            attempt.update(ok=False, seconds=time.time() - started, error=error, where=_where(err))
            report["attempts"].append(attempt)
            print(f"[peers_llmcompressor] {pipeline} failed: {attempt['error'][:500]}", file=sys.stderr)
            traceback.print_exc()
            continue
        seconds = time.time() - started
        attempt.update(ok=True, seconds=seconds)
        report["attempts"].append(attempt)
        fresh = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=torch.float32)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "position_ids" not in m]:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        os.makedirs(a.out, exist_ok=True)
        fresh.save_pretrained(a.out)
        tokenizer.save_pretrained(a.out)
        pruned = [n for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)
                  and float((m.weight == 0).float().mean()) > 0.01]
        report.update(ok=True, pipeline=pipeline, oneshot_seconds=seconds, pruned_linears=pruned,
                      layer_class=layer_class)
        break
    else:
        report["error"] = "; ".join(f"{t['pipeline']}: {t['error']}" for t in report["attempts"])
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a fine-tuned HF sequence-classification folder")
    p.add_argument("--out", required=True, help="where the pruned plain HF model goes")
    p.add_argument("--calibration", required=True, help="torch.save'd list of input batches")
    p.add_argument("--method", choices=sorted(MODIFIERS), required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--pattern", default=None, help="N:M mask structure, e.g. 2:4")
    p.add_argument("--pipeline", default="sequential",
                   help="comma-separated, tried in order, e.g. sequential,basic")
    p.add_argument("--layer-class", default=None, help="encoder layer class (default: from the model)")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT block size")
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening fraction")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", required=True, help="JSON report path")
    a = p.parse_args(argv)
    try:
        report = prune(a)
    except Exception as err:  # noqa: BLE001 - reported, not raised: the parent reads the report
        traceback.print_exc()
        report = {"ok": False, "versions": _versions(), "error": f"{type(err).__name__}: {err}"[:2000],
                  "where": _where(err)}
    with open(a.report, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
