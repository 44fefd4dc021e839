"""ONNX export of a (dense-format) transformers encoder, checked against PyTorch."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsebert.errors import SparseBertError

ONNX_FILE = "model.onnx"


class _TupleOutputs(nn.Module):
    """Positional inputs in, a tuple of named outputs out: what the ONNX tracer needs."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, inputs, strict=True)), return_dict=True)
        return tuple(out[k] for k in self.output_names)


def onnx_opset_range() -> tuple[int, int]:
    """The lowest and highest ONNX opset this torch.onnx can export to."""
    try:
        from torch.onnx import _constants as constants

        return int(constants.ONNX_MIN_OPSET), int(constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # a torch without these private constants
        return 7, 17


def check_opset(opset: Any) -> int:
    """``opset`` as an int, or `SparseBertError` naming the range torch.onnx supports."""
    low, high = onnx_opset_range()
    try:
        value = int(opset)
    except (TypeError, ValueError):
        value = None
    if isinstance(opset, bool) or (isinstance(opset, float) and opset != value):
        value = None
    if value is None or not low <= value <= high:
        raise SparseBertError(
            f"ONNX opset {opset!r} is not supported: torch {torch.__version__} exports opsets "
            f"{low} to {high} (17, the default, suits BERT-family encoders)"
        )
    return value


def model_input_names(model: nn.Module) -> list[str]:
    """The text inputs (of input_ids, attention_mask, token_type_ids) the model accepts."""
    params = inspect.signature(model.forward).parameters
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]


def _dummy_inputs(
    model: nn.Module, names: list[str], tokenizer_or_seq_info: Any, batch: int, seq: int
) -> dict[str, torch.Tensor]:
    if tokenizer_or_seq_info is not None and callable(tokenizer_or_seq_info):
        enc = tokenizer_or_seq_info(
            ["sparse models export to onnx"] * batch,
            padding="max_length",
            max_length=seq,
            truncation=True,
            return_tensors="pt",
        )
        feeds = {n: enc[n] for n in names if n in enc}
    else:
        vocab = int(getattr(model.config, "vocab_size", 1000))
        gen = torch.Generator().manual_seed(0)
        feeds = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}
    feeds.setdefault("attention_mask", torch.ones(batch, seq, dtype=torch.long))
    feeds.setdefault("token_type_ids", torch.zeros(batch, seq, dtype=torch.long))
    feeds["attention_mask"][-1, seq // 2 :] = 0  # exercise padding
    return {n: feeds[n].long() for n in names}


def export_onnx(
    model: nn.Module,
    tokenizer_or_seq_info: Any,
    path: str | os.PathLike,
    opset: int = 17,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export a (dense-format) transformers model to ONNX and check it against PyTorch.

    tokenizer_or_seq_info: a tokenizer (used to build the example input) or a mapping
        with optional ``batch`` / ``seq`` sizes (random token ids are used), or None.
    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (those the model takes)
    and all outputs get dynamic batch and sequence axes. Attention is exported in its
    eager form, which traces exactly. ONNX Runtime must reproduce the PyTorch outputs
    within ``atol`` on two different shapes, or `SparseBertError` is raised.
    Returns ``{"path", "inputs", "outputs", "max_abs_diff", "opset"}``; ``inputs`` are the
    graph's inputs, without one the model takes but ignores (DeBERTa's ``token_type_ids``
    when it has no token type embeddings), which the exporter leaves out of the graph.
    """
    import onnxruntime as ort

    opset = check_opset(opset)
    if any(type(m).__module__.startswith("sparsebert.runtime") for m in model.modules()):
        raise SparseBertError(
            "this model contains sparsebert runtime kernels, which ONNX cannot trace: "
            "export the model as loaded from its checkpoint, before sparsify_for_inference"
        )
    info = tokenizer_or_seq_info if isinstance(tokenizer_or_seq_info, Mapping) else {}
    tokenizer = None if isinstance(tokenizer_or_seq_info, Mapping) else tokenizer_or_seq_info
    batch, seq = int(info.get("batch", 2)), int(info.get("seq", 16))
    names = model_input_names(model)
    if "input_ids" not in names:
        raise SparseBertError(f"{type(model).__name__} takes no input_ids: not a text encoder")
    model = model.eval()
    feeds = _dummy_inputs(model, names, tokenizer, batch, seq)
    old_attn = getattr(model.config, "_attn_implementation", None)
    if old_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            first = model(**feeds, return_dict=True)
        outputs = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
        # eval() on the wrapper too: the exporter restores the wrapper's training flag
        # afterwards, which would otherwise switch the model's dropout on.
        wrapper = _TupleOutputs(model, names, outputs).eval()
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        for k in outputs:
            axes[k] = {0: "batch", 1: "sequence"} if first[k].dim() >= 3 else {0: "batch"}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about shape arithmetic in transformers' mask code; the
            # result is checked against PyTorch below on two other shapes instead.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    wrapper,
                    tuple(feeds[n] for n in names),
                    str(path),
                    input_names=names,
                    output_names=outputs,
                    dynamic_axes=axes,
                    opset_version=opset,
                    dynamo=False,
                )
            except Exception as err:  # an operator this opset cannot express, ...
                raise SparseBertError(
                    f"ONNX export of {type(model).__name__} at opset {opset} failed: "
                    f"{str(err).splitlines()[0][:300]}. Try a newer opset (e.g. 17, the default)"
                ) from None
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise SparseBertError(
                f"ONNX Runtime {ort.__version__} cannot load the exported {path} (opset {opset}): "
                f"{str(err).splitlines()[0][:300]}. Try opset 17"
            ) from None
        graph_inputs = [i.name for i in session.get_inputs()]
        worst = 0.0
        limit = getattr(model.config, "max_position_embeddings", None)
        other = seq * 2 + 3 if limit is None else max(1, min(seq * 2 + 3, int(limit) - 2))
        for b, s in ((batch, seq), (batch + 1, other)):
            check = _dummy_inputs(model, names, None, b, s)
            with torch.no_grad():
                ref = wrapper(*(check[n] for n in names))
            got = session.run(outputs, {n: check[n].numpy() for n in graph_inputs})
            for r, g in zip(ref, got, strict=True):
                worst = max(worst, float(np.abs(r.numpy() - g).max()))
    finally:
        if old_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(old_attn)
    if worst > atol:
        raise SparseBertError(
            f"ONNX export of {type(model).__name__} differs from PyTorch by {worst:.2e} "
            f"(> {atol:g}); try another opset (now {opset})"
        )
    return {"path": str(path), "inputs": graph_inputs, "outputs": outputs, "max_abs_diff": worst,
            "opset": opset}  # fmt: skip


__all__ = ["ONNX_FILE", "check_opset", "export_onnx", "model_input_names", "onnx_opset_range"]
