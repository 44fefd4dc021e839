"""Per-layer sparsity reports (text and JSON) of any model, counted from its weights, with
whether each matrix (and all of them) has an N:M semi-structured pattern (2:4, 4:8: at most
N non-zeros in every M consecutive weights along the input dimension)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from sparsebert.allocation import is_nm
from sparsebert.targets import select_targets

NM_PATTERNS = ((2, 4), (4, 8))


def sparsity_report(model: nn.Module, targets: str | Iterable[str] = "encoder-linears") -> dict:
    """Zeros per targeted parameter and in total, counted from the tensors themselves."""
    layers = []
    total = zeros = 0
    for name, p in select_targets(model, targets).items():
        n, z = p.numel(), int((p.detach() == 0).sum())
        nm = {f"{a}:{b}": is_nm(p, a, b) for a, b in NM_PATTERNS}
        layers.append({"name": name, "shape": list(p.shape), "numel": n, "zeros": z, "sparsity": z / n,
                       "nm": nm})
        total += n
        zeros += z
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p.detach() == 0).sum()) for p in model.parameters())
    return {
        "targets": [targets] if isinstance(targets, str) else list(targets),
        "target_numel": total,
        "target_zeros": zeros,
        "target_sparsity": zeros / total if total else 0.0,
        "model_numel": all_params,
        "model_sparsity": all_zeros / all_params if all_params else 0.0,
        "nm": {f"{a}:{b}": bool(layers) and all(r["nm"][f"{a}:{b}"] for r in layers) for a, b in NM_PATTERNS},
        "layers": layers,
    }


def format_report(report: dict) -> str:
    """A fixed-width table of a `sparsity_report`."""
    width = max([len(r["name"]) for r in report["layers"]] + [9])
    lines = [f"{'parameter':<{width}}  {'shape':>12}  {'zeros':>10}  {'sparsity':>8}"]
    for r in report["layers"]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<{width}}  {shape:>12}  {r['zeros']:>10}  {r['sparsity']:>8.2%}")
    lines.append(
        f"targets {', '.join(report['targets'])}: {report['target_zeros']}/{report['target_numel']} "
        f"zero = {report['target_sparsity']:.2%}; whole model {report['model_sparsity']:.2%} zero"
    )
    if "nm" in report:
        parts = []
        for key, whole in report["nm"].items():
            count = sum(1 for r in report["layers"] if r.get("nm", {}).get(key))
            parts.append(f"{key} {'yes' if whole else 'no'} ({count}/{len(report['layers'])} matrices)")
        lines.append("N:M pattern (at most N non-zeros in every M consecutive input weights): "
                     + ", ".join(parts))
    return "\n".join(lines)
