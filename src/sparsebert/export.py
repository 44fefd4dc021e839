"""Ship a sparse model: a compressed checkpoint (bitmask + non-zeros) or ONNX.

Why a compressed format: a 90%-sparse checkpoint saved densely is as big as the dense
model. Storing each pruned matrix as a bitmask (1 bit per weight) plus its non-zero
values (in row-major order) makes it ~7x smaller in fp32 and ~12x in fp16, while staying
one plain safetensors file: the tensors ``NAME::mask`` (uint8, ``np.packbits`` with
little bit order) and ``NAME::values``; the metadata records the format version, every
tensor's original shape and dtype, and which tensors are compressed. All other tensors
are stored unchanged. Loading gives back the same weights: fp32 values bit for bit
(a pruned ``-0.0`` comes back as ``+0.0``); fp16 values rounded once.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import nn

from sparsebert.errors import SparseBertError, check_sparsity

FORMAT_NAME = "sparsebert-compressed"
FORMAT_VERSION = 1
COMPRESSED_FILE = "model.sparse.safetensors"
ONNX_FILE = "model.onnx"
REPORT_FILE = "sparsebert_export.json"
FORMATS = ("compressed", "onnx")
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

DEFAULT_MIN_SPARSITY = 0.25
"""A 2-D tensor at least this sparse counts as pruned and is compressed: trained dense
weights have almost no exact zeros, and below this the bitmask saves little."""

MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
_SKIP_FILES = ("README.md", ".gitattributes", REPORT_FILE)


# --------------------------------------------------------------------------- compressed


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict:
    if isinstance(model_or_state_dict, nn.Module):
        return dict(model_or_state_dict.state_dict())
    if isinstance(model_or_state_dict, Mapping):
        return dict(model_or_state_dict)
    raise SparseBertError(
        f"expected a torch model or a state dict, got {type(model_or_state_dict).__name__}"
    )


def _is_pruned(t: torch.Tensor, min_sparsity: float) -> bool:
    if t.dim() != 2 or not t.is_floating_point() or t.numel() == 0:
        return False
    return float((t == 0).sum()) / t.numel() >= min_sparsity


def compress_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    value_dtype: str = "fp32",
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata `save_compressed` writes (no file involved)."""
    if value_dtype not in VALUE_DTYPES:
        raise SparseBertError(
            f"unknown value dtype '{value_dtype}': use one of {', '.join(VALUE_DTYPES)}"
        )
    min_sparsity = check_sparsity(min_sparsity, "min_sparsity")
    state = _state_dict(model_or_state_dict)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, t in state.items():
        if MASK_SUFFIX in name or VALUES_SUFFIX in name:
            raise SparseBertError(f"tensor name '{name}' clashes with the compressed format")
        t = t.detach().cpu()
        entry: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
        if _is_pruned(t, min_sparsity):
            mask = (t != 0).numpy().reshape(-1)
            values = t.reshape(-1)[torch.from_numpy(mask)].to(VALUE_DTYPES[value_dtype])
            if not torch.isfinite(values).all() and torch.isfinite(t).all():
                raise SparseBertError(
                    f"{name} has values outside the {value_dtype} range: use value_dtype='fp32'"
                )
            tensors[name + MASK_SUFFIX] = torch.from_numpy(np.packbits(mask, bitorder="little"))
            tensors[name + VALUES_SUFFIX] = values.contiguous()
            entry.update(compressed=True, nnz=int(mask.sum()), value_dtype=value_dtype)
        else:
            t = t.contiguous()
            if t.numel() and t.data_ptr() in seen:  # tied weights: safetensors needs copies
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
            entry["compressed"] = False
        info[name] = entry
    if not any(e["compressed"] for e in info.values()):
        raise SparseBertError(
            f"nothing to compress: no 2-D tensor is at least {min_sparsity:.0%} zeros. "
            "Prune the model first (e.g. `sparsebert prune`), or lower min_sparsity"
        )
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "value_dtype": value_dtype,
        "tensors": json.dumps(info),
    }
    return tensors, metadata


def save_compressed(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    value_dtype: str = "fp32",
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
) -> dict[str, int]:
    """Write one safetensors file with pruned matrices as bitmask + non-zero values.

    value_dtype: ``fp32`` (exact) or ``fp16`` (half the bytes for the values).
    min_sparsity: fraction of zeros from which a 2-D tensor is stored compressed.
    Returns the `size_report` of what was written.
    """
    tensors, metadata = compress_state_dict(model_or_state_dict, value_dtype, min_sparsity)
    path = Path(path)
    if path.is_dir():
        raise SparseBertError(
            f"{path} is a directory: give a file path such as {path / COMPRESSED_FILE}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return size_report(
        model_or_state_dict, compressed=(tensors, metadata), file_bytes=path.stat().st_size
    )


def _read_metadata(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    if not path.is_file():
        raise SparseBertError(f"no compressed checkpoint at {path}: check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # any parse failure means "not our format"
        raise SparseBertError(f"{path} is not a safetensors file: {err}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise SparseBertError(
            f"{path} is not a sparsebert compressed checkpoint (no '{FORMAT_NAME}' metadata): "
            "load it with safetensors / from_pretrained instead"
        )
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise SparseBertError(
            f"{path} uses compressed format version {version}, newer than this sparsebert "
            f"({FORMAT_VERSION}): upgrade sparsebert"
        )
    return metadata, json.loads(metadata["tensors"])


def load_compressed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by `save_compressed` back into an ordinary state dict.

    ``path`` may also be a directory written by `export_model`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / COMPRESSED_FILE
    _, info = _read_metadata(path)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name, entry in info.items():
            dtype = getattr(torch, entry["dtype"])
            if not entry["compressed"]:
                state[name] = f.get_tensor(name)
                continue
            shape = tuple(entry["shape"])
            numel = int(np.prod(shape))
            bits = f.get_tensor(name + MASK_SUFFIX).numpy()
            mask = np.unpackbits(bits, count=numel, bitorder="little").astype(bool)
            values = f.get_tensor(name + VALUES_SUFFIX)
            if values.numel() != int(mask.sum()):
                raise SparseBertError(f"{path} is corrupt: {name} has a mask/values mismatch")
            dense = torch.zeros(numel, dtype=dtype)
            dense[torch.from_numpy(mask)] = values.to(dtype)
            state[name] = dense.reshape(shape)
    return state


def load_compressed_into(
    model: nn.Module, path: str | os.PathLike, strict: bool = True
) -> nn.Module:
    """Load a compressed checkpoint into ``model`` (in place) and return it."""
    model.load_state_dict(load_compressed(path), strict=strict)
    return model


# --------------------------------------------------------------------------- sizes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_report(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    value_dtype: str = "fp32",
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    compressed: tuple[dict, dict] | None = None,
    file_bytes: int | None = None,
) -> dict[str, int]:
    """Bytes dense vs compressed: whole safetensors files, and the pruned tensors alone.

    Keys: ``dense_bytes`` / ``compressed_bytes`` (whole files, headers included),
    ``pruned_dense_bytes`` / ``pruned_compressed_bytes`` (the compressed tensors only:
    their dense size vs bitmask + values), ``n_compressed`` (how many tensors).
    """
    state = _state_dict(model_or_state_dict)
    tensors, metadata = compressed or compress_state_dict(state, value_dtype, min_sparsity)
    info = json.loads(metadata["tensors"])
    dense_state = {}
    seen: set[int] = set()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        dense_state[name] = t
    pruned = [n for n, e in info.items() if e["compressed"]]
    return {
        "dense_bytes": len(save(dense_state)),
        "compressed_bytes": file_bytes or len(save(tensors, metadata=metadata)),
        "pruned_dense_bytes": sum(_nbytes(state[n]) for n in pruned),
        "pruned_compressed_bytes": sum(
            _nbytes(tensors[n + MASK_SUFFIX]) + _nbytes(tensors[n + VALUES_SUFFIX]) for n in pruned
        ),
        "n_compressed": len(pruned),
    }


# --------------------------------------------------------------------------- ONNX


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
    Returns ``{"path", "inputs", "outputs", "max_abs_diff", "opset"}``.
    """
    import onnxruntime as ort

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
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        limit = getattr(model.config, "max_position_embeddings", None)
        other = seq * 2 + 3 if limit is None else max(1, min(seq * 2 + 3, int(limit) - 2))
        for b, s in ((batch, seq), (batch + 1, other)):
            check = _dummy_inputs(model, names, None, b, s)
            with torch.no_grad():
                ref = wrapper(*(check[n] for n in names))
            got = session.run(outputs, {n: check[n].numpy() for n in names})
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
    return {"path": str(path), "inputs": names, "outputs": outputs, "max_abs_diff": worst,
            "opset": opset}  # fmt: skip


# --------------------------------------------------------------------------- directories


def load_pretrained(model_dir: str | os.PathLike) -> nn.Module:
    """The model in ``model_dir`` with its own head (class from config.architectures)."""
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SparseBertError(
            f"{model_dir} is not a model directory (no config.json): give the directory "
            "that save_pretrained wrote"
        )
    if (model_dir / COMPRESSED_FILE).is_file() and not _has_dense_weights(model_dir):
        return from_compressed(model_dir)
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    return _model_class(config).from_pretrained(str(model_dir)).eval()


def _model_class(config: Any) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _has_dense_weights(model_dir: Path) -> bool:
    return any(
        p.suffix in _WEIGHT_SUFFIXES and p.name != COMPRESSED_FILE for p in model_dir.iterdir()
    )


def copy_model_files(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy config, tokenizer and other small top-level files (never weights)."""
    copied = []
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name not in _SKIP_FILES:
            shutil.copy2(p, Path(out_dir) / p.name)
            copied.append(p.name)
    return copied


def from_compressed(model_dir: str | os.PathLike) -> nn.Module:
    """A transformers model (class from the saved config) with compressed weights loaded."""
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / COMPRESSED_FILE).is_file():
        raise SparseBertError(
            f"no {COMPRESSED_FILE} in {model_dir}: write one with "
            "`sparsebert export MODEL --format compressed --out DIR`"
        )
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    cls = _model_class(config)
    model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    state = load_compressed(model_dir / COMPRESSED_FILE)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str = "compressed",
    fp16: bool = False,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    opset: int = 17,
) -> dict[str, Any]:
    """Export the model in ``model_dir`` to ``out_dir``: the CLI's `sparsebert export`.

    format: ``compressed`` (bitmask + values safetensors, values in fp16 with ``fp16``;
        reload with `from_compressed`) or ``onnx`` (dense ONNX, verified against PyTorch).
    Config and tokenizer files are copied so ``out_dir`` is self-describing. Writes
    `REPORT_FILE` and returns the same dict (files, sizes or ONNX check).
    """
    if format not in FORMATS:
        raise SparseBertError(f"unknown export format '{format}': use one of {', '.join(FORMATS)}")
    if fp16 and format != "compressed":
        raise SparseBertError("--fp16 applies to the compressed format only")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise SparseBertError(f"model directory {model_dir} does not exist")
    if out_dir.resolve() == model_dir.resolve():
        raise SparseBertError("the output directory must differ from the model directory")
    model = load_pretrained(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"format": format, "source": str(model_dir)}
    if format == "compressed":
        value_dtype = "fp16" if fp16 else "fp32"
        report["value_dtype"] = value_dtype
        report["sizes"] = save_compressed(
            model, out_dir / COMPRESSED_FILE, value_dtype=value_dtype, min_sparsity=min_sparsity
        )
        report["file"] = str(out_dir / COMPRESSED_FILE)
    else:
        tokenizer = _load_tokenizer(model_dir)
        report["onnx"] = export_onnx(model, tokenizer, out_dir / ONNX_FILE, opset=opset)
        report["file"] = str(out_dir / ONNX_FILE)
    report["copied"] = copy_model_files(model_dir, out_dir)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _load_tokenizer(model_dir: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # no tokenizer files: random ids will do for tracing
        return None


__all__ = [
    "COMPRESSED_FILE",
    "FORMATS",
    "compress_state_dict",
    "copy_model_files",
    "export_model",
    "export_onnx",
    "from_compressed",
    "load_compressed",
    "load_compressed_into",
    "load_pretrained",
    "model_input_names",
    "save_compressed",
    "size_report",
]
