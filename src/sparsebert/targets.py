"""Which parameters may be pruned.

A *target spec* is a preset name or a regular expression over parameter names; a list of
specs selects the union. The default, ``encoder-linears``, is the pruned set of every paper
sparsebert implements: Q, K, V, attention-output and both FFN matrices of every layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from sparsebert.errors import SparseBertError

_LAYER_STACK = re.compile(r"(^|\.)(encoder|transformer)\.(layer|layers)\.\d+\.")
_HEAD_PREFIXES = ("classifier", "pre_classifier", "qa_outputs", "score", "cls.predictions.transform")


def _encoder_linears(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _LAYER_STACK.search(name + ".")
    ]


def _embeddings(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        and name.rsplit(".", 1)[-1] in ("word_embeddings", "position_embeddings")
    ]


def _pooler(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 2)[-2:-1] == ["pooler"]
    ]


def _head(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not _LAYER_STACK.search(name + "."):
            bare = name.split(".", 1)[1] if name.startswith("module.") else name
            if bare.startswith(_HEAD_PREFIXES):
                names.append(f"{name}.weight")
    return names


def _all_2d(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.dim() == 2]


PRESETS = {
    "encoder-linears": _encoder_linears,
    "embeddings": _embeddings,
    "pooler": _pooler,
    "classifier": _head,
    "all-2d": _all_2d,
}


def select_targets(
    model: nn.Module, specs: str | Iterable[str] = "encoder-linears"
) -> dict[str, nn.Parameter]:
    """Return ``{parameter name: parameter}`` for the union of ``specs``, in model order.

    Raises `SparseBertError` for a spec that is neither a preset nor a regex matching
    at least one 2-D parameter, listing the presets and a few real parameter names.
    """
    if isinstance(specs, str):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise SparseBertError("no pruning targets given: use e.g. 'encoder-linears'")
    params = dict(model.named_parameters())
    chosen: set[str] = set()
    for spec in specs:
        if spec in PRESETS:
            found = PRESETS[spec](model)
        else:
            try:
                pattern = re.compile(spec)
            except re.error as err:
                raise SparseBertError(
                    f"target '{spec}' is not a preset ({', '.join(PRESETS)}) "
                    f"and not a valid regular expression: {err}"
                ) from None
            found = [n for n, p in params.items() if p.dim() >= 2 and pattern.search(n)]
        if not found:
            examples = ", ".join([n for n, p in params.items() if p.dim() == 2][:4])
            raise SparseBertError(
                f"target '{spec}' matches no prunable (2-D) parameter of "
                f"{type(model).__name__}. Presets: {', '.join(PRESETS)}; or a regex over "
                f"parameter names such as: {examples}"
            )
        chosen.update(found)
    return {n: p for n, p in params.items() if n in chosen}
