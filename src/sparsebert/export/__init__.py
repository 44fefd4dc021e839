"""Ship a sparse model: a compressed checkpoint (bitmask + non-zeros) or ONNX.

- `sparsebert.export.compressed`: the bitmask + values safetensors format
  (`save_compressed`, `load_compressed`, `size_report`, ...);
- `sparsebert.export.onnx`: `export_onnx`, a dense ONNX graph checked against PyTorch;
- here: model directories, what ``sparsebert export`` works on (`export_model`,
  `load_any`, `load_pretrained`, `from_compressed`, `copy_model_files`), and every name of
  the two modules above, so ``from sparsebert.export import X`` works for all of them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.export.compressed import (
    CHECKSUM_ALGORITHM,
    COMPRESS_MIN_SPARSITY,
    COMPRESSED_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MASK_SUFFIX,
    VALUE_DTYPES,
    VALUES_SUFFIX,
    compress_state_dict,
    load_compressed,
    load_compressed_into,
    read_compressed,
    save_compressed,
    size_report,
    tensor_checksum,
)
from sparsebert.export.onnx import (
    ONNX_FILE,
    check_opset,
    export_onnx,
    model_input_names,
    onnx_opset_range,
)
from sparsebert.safe_load import check_model_folder, safetensors_weight_files

REPORT_FILE = "sparsebert_export.json"
FORMATS = ("compressed", "onnx")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
_SKIP_FILES = ("README.md", ".gitattributes", REPORT_FILE, "checksums.json")


def load_pretrained(model_dir: str | os.PathLike) -> nn.Module:
    """The model in ``model_dir`` with its own head (class from config.architectures).

    ``model_dir`` is a folder save_pretrained wrote (safetensors weights only: see
    `sparsebert.safe_load.check_model_folder`) or a compressed export (`from_compressed`).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SparseBertError(
            f"{model_dir} is not a model directory (no config.json): give the directory "
            "that save_pretrained wrote"
        )
    check_model_folder(model_dir, allow_compressed=True)
    if not safetensors_weight_files(model_dir):
        return from_compressed(model_dir)
    cls = _model_class(_load_config(model_dir))
    try:
        return cls.from_pretrained(str(model_dir), use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise SparseBertError(f"could not load the model in {model_dir}: {_first_line(err)}") from None


def load_any(path: str | os.PathLike) -> nn.Module:
    """A model from a saved model folder, a compressed export, the embedded model or a hub name.

    Local folders are checked first (`check_model_folder`: safetensors only, no truncated
    files); a compressed export (``model.sparse.safetensors`` without dense weights) loads
    through `from_compressed`. The class is the saved head's (config.architectures), and
    the model is in eval mode.
    """
    from sparsebert.models import resolve_model_path

    resolved = resolve_model_path(str(path))
    if os.path.isdir(resolved):
        return load_pretrained(resolved)
    try:  # a hub name
        config = _load_config(resolved)
        return _model_class(config).from_pretrained(resolved, use_safetensors=True).eval()
    except (OSError, ValueError) as err:
        raise SparseBertError(
            f"could not load model '{resolved}' (safetensors weights only): {_first_line(err)}"
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _load_config(model_dir: str | Path) -> Any:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as err:
        raise SparseBertError(f"could not read the config of {model_dir}: {_first_line(err)}") from None


def _model_class(config: Any) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


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
    config = _load_config(model_dir)
    cls = _model_class(config)
    model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    state = load_compressed(model_dir / COMPRESSED_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SparseBertError(
            f"{model_dir / COMPRESSED_FILE} does not match the config.json beside it "
            f"({cls.__name__}): {_first_line(err)}"
        ) from None
    return model.eval()


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str = "compressed",
    fp16: bool = False,
    min_sparsity: float = COMPRESS_MIN_SPARSITY,
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
    _check_out_dir(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise SparseBertError("the output directory must differ from the model directory")
    if format == "onnx":
        opset = check_opset(opset)
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
    from sparsebert.verify import write_checksums

    write_checksums(out_dir)
    return report


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` is or can become a folder: no file in the way (checked before any work)."""
    for p in (out_dir, *out_dir.parents):
        if p.exists():
            if not p.is_dir():
                what = "--out" if p == out_dir else f"--out {out_dir}: its parent"
                raise SparseBertError(
                    f"{what} {p} is an existing file, not a directory: give a directory for the "
                    f"export (it is created if missing), e.g. {out_dir.with_suffix('')}-export"
                )
            return


def _load_tokenizer(model_dir: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # no tokenizer files: random ids will do for tracing
        return None


__all__ = [
    "CHECKSUM_ALGORITHM",
    "COMPRESSED_FILE",
    "COMPRESS_MIN_SPARSITY",
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MASK_SUFFIX",
    "ONNX_FILE",
    "REPORT_FILE",
    "VALUES_SUFFIX",
    "VALUE_DTYPES",
    "check_opset",
    "compress_state_dict",
    "copy_model_files",
    "export_model",
    "export_onnx",
    "from_compressed",
    "load_any",
    "load_compressed",
    "load_compressed_into",
    "load_pretrained",
    "model_input_names",
    "onnx_opset_range",
    "read_compressed",
    "save_compressed",
    "size_report",
    "tensor_checksum",
]
