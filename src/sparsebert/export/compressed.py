"""The compressed checkpoint format: pruned matrices as bitmask + non-zero values.

Why: a 90%-sparse checkpoint saved densely is as big as the dense model. Storing each
pruned matrix as a bitmask (1 bit per weight) plus its non-zero values (in row-major order)
makes it ~7x smaller in fp32 and ~12x in fp16, while staying one plain safetensors file:
the tensors ``NAME::mask`` (uint8, ``np.packbits`` with little bit order) and
``NAME::values``; the metadata records the format version, every tensor's original shape
and dtype, and which tensors are compressed. All other tensors are stored unchanged.
Loading gives back the same weights: fp32 values bit for bit (a pruned ``-0.0`` comes back
as ``+0.0``); fp16 values rounded once.

Integrity (format version 2): the metadata also holds a CRC-32 of every stored tensor's raw
bytes (``checksums``) and of the ``tensors`` description itself. `load_compressed` checks
them all, and that each mask's popcount equals its number of values, its padding bits are
zero and every shape and dtype agrees with the description, so a damaged file raises
`SparseBertError` naming the file and the tensor instead of loading wrong weights.
CRC-32 rather than SHA-256: this guards against accidental damage (disk, copy, transfer),
not tampering; a CRC-32 detects *every* error burst up to 32 bits long (any flipped byte,
two swapped bits) with certainty, and zlib computes it ~2.5x faster than SHA-256 here.
Version-1 files (no checksums) still load, with a warning that they cannot be verified.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import nn

from sparsebert.errors import SparseBertError, check_sparsity
from sparsebert.safe_load import InvalidSafetensorsError, safetensors_header

logger = logging.getLogger("sparsebert")

FORMAT_NAME = "sparsebert-compressed"
FORMAT_VERSION = 2
"""1: bitmask + values; 2: + a CRC-32 per stored tensor and of the description."""
CHECKSUM_ALGORITHM = "crc32"
COMPRESSED_FILE = "model.sparse.safetensors"
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

COMPRESS_MIN_SPARSITY = 0.25
"""A 2-D tensor at least this sparse is stored as bitmask+values: trained dense weights
have almost no exact zeros, and below this the bitmask saves little."""

MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"


def tensor_checksum(t: torch.Tensor) -> str:
    """CRC-32 (8 hex digits) of a tensor's raw bytes, as safetensors stores them."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return _crc(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _crc(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


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
    min_sparsity: float = COMPRESS_MIN_SPARSITY,
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
    description = json.dumps(info)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "value_dtype": value_dtype,
        "tensors": description,
        "checksum": CHECKSUM_ALGORITHM,
        "checksums": json.dumps({n: tensor_checksum(t) for n, t in tensors.items()}),
        "tensors_checksum": _crc(description.encode()),
    }
    return tensors, metadata


def save_compressed(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    value_dtype: str = "fp32",
    min_sparsity: float = COMPRESS_MIN_SPARSITY,
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
    partial = path.with_name(path.name + ".partial")  # an interrupted save leaves no half file
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return size_report(
        model_or_state_dict, compressed=(tensors, metadata), file_bytes=path.stat().st_size
    )


class _Problems:
    """Collects what is wrong with a compressed file; `error` reports them in one exception."""

    def __init__(self, path: Path):
        self.path = path
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def error(self) -> SparseBertError:
        more = f" (and {len(self.items) - 1} more problem(s))" if len(self.items) > 1 else ""
        return SparseBertError(
            f"{self.path} is corrupted: {self.items[0]}{more}; the file was damaged after it was "
            "written: re-export it with `sparsebert export MODEL --format compressed`"
        )


def _read_metadata(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    if not path.is_file():
        raise SparseBertError(f"no compressed checkpoint at {path}: check the path")
    try:
        _, metadata = safetensors_header(path)
    except InvalidSafetensorsError as err:
        raise SparseBertError(
            f"{path} is not a safetensors file, or it is truncated or corrupted: {err.detail}"
        ) from None
    if metadata.get("format") != FORMAT_NAME:
        raise SparseBertError(
            f"{path} is not a sparsebert compressed checkpoint (no '{FORMAT_NAME}' metadata): "
            "load it with safetensors / from_pretrained instead"
        )
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        raise SparseBertError(
            f"{path} is corrupted: format_version {metadata.get('format_version')!r} is not a number: "
            "re-export it with `sparsebert export MODEL --format compressed`"
        ) from None
    if version > FORMAT_VERSION:
        raise SparseBertError(
            f"{path} uses compressed format version {version}, newer than this sparsebert "
            f"({FORMAT_VERSION}): upgrade sparsebert"
        )
    problems = _Problems(path)
    if version >= 2 and _crc(metadata.get("tensors", "").encode()) != metadata.get("tensors_checksum"):
        problems.add("checksum mismatch in the tensor description (metadata 'tensors')")
        raise problems.error()
    try:
        info = json.loads(metadata["tensors"])
        for entry in info.values():
            entry["shape"] = [int(d) for d in entry["shape"]]
            getattr(torch, entry["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as err:
        problems.add(f"its tensor description (metadata 'tensors') does not parse ({err!r})")
        raise problems.error() from None
    return metadata, info


def _stored_checksums(path: Path, metadata: dict[str, str]) -> dict[str, str] | None:
    if int(metadata.get("format_version", "0")) < 2:
        logger.warning(
            "%s is compressed format version %s, which has no checksums: it cannot be verified. "
            "Re-export it with `sparsebert export` to add them",
            path, metadata.get("format_version", "?"),
        )  # fmt: skip
        return None
    problems = _Problems(path)
    if metadata.get("checksum") != CHECKSUM_ALGORITHM:
        problems.add(f"unknown checksum algorithm {metadata.get('checksum')!r}")
        raise problems.error()
    try:
        checksums = json.loads(metadata["checksums"])
        if not isinstance(checksums, dict):
            raise TypeError("not a JSON object")
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        problems.add(f"its checksum table (metadata 'checksums') does not parse ({err!r})")
        raise problems.error() from None
    return checksums


def _expected_tensors(info: dict[str, dict]) -> list[str]:
    names = []
    for name, entry in info.items():
        names += [name + MASK_SUFFIX, name + VALUES_SUFFIX] if entry.get("compressed") else [name]
    return names


def read_compressed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a compressed checkpoint, collecting every problem instead of raising.

    Returns ``(state, report)``; ``report`` has ``problems`` (each a sentence naming the
    tensor), ``version``, ``verified`` (checksums present and checked), ``info`` (the tensor
    description) and ``tensors`` (how many stored tensors were read). Tensors with a
    problem are left out of ``state``. Raises `SparseBertError` only when the file cannot be
    read at all (missing, not safetensors, not this format, newer version).
    """
    path = Path(path)
    if path.is_dir():
        path = path / COMPRESSED_FILE
    metadata, info = _read_metadata(path)
    checksums = _stored_checksums(path, metadata)
    problems: list[str] = []
    header, _ = safetensors_header(path)
    expected = _expected_tensors(info)
    for name in expected:
        if name not in header:
            problems.append(f"tensor '{name}' is missing")
        elif checksums is not None and name not in checksums:
            problems.append(f"tensor '{name}' has no checksum")
    for name in sorted(set(header) - set(expected)):
        problems.append(f"tensor '{name}' is not in the tensor description")
    stored: dict[str, torch.Tensor] = {}
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as err:  # e.g. a dtype this torch cannot hold
        raise SparseBertError(f"{path} cannot be read: {str(err).splitlines()[0]}") from None
    with f:
        for name in expected:
            if name not in header:
                continue
            try:
                t = f.get_tensor(name)
            except Exception as err:
                problems.append(f"tensor '{name}' cannot be read ({str(err).splitlines()[0]})")
                continue
            if checksums is not None and name in checksums:
                got = tensor_checksum(t)
                if got != checksums[name]:
                    problems.append(
                        f"checksum mismatch in tensor '{name}' (stored {CHECKSUM_ALGORITHM} "
                        f"{checksums[name]}, computed {got})"
                    )
                    continue
            stored[name] = t
    state: dict[str, torch.Tensor] = {}
    for name, entry in info.items():
        dtype, shape = getattr(torch, entry["dtype"]), tuple(entry["shape"])
        if not entry.get("compressed"):
            if name not in stored:
                continue
            t = stored[name]
            if t.dtype != dtype or tuple(t.shape) != shape:
                problems.append(
                    f"tensor '{name}' is {str(t.dtype).split('.')[-1]} {list(t.shape)}, the description "
                    f"says {entry['dtype']} {list(shape)}"
                )
                continue
            state[name] = t
            continue
        if name + MASK_SUFFIX not in stored or name + VALUES_SUFFIX not in stored:
            continue
        bits, values = stored[name + MASK_SUFFIX], stored[name + VALUES_SUFFIX]
        numel = int(np.prod(shape))
        value_dtype = VALUE_DTYPES.get(entry.get("value_dtype", ""))
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (-(-numel // 8),):
            problems.append(
                f"mask of '{name}' is {str(bits.dtype).split('.')[-1]} {list(bits.shape)}, expected "
                f"uint8 [{-(-numel // 8)}] for shape {list(shape)}"
            )
            continue
        if values.dim() != 1 or values.dtype != value_dtype:
            problems.append(
                f"values of '{name}' are {str(values.dtype).split('.')[-1]} {list(values.shape)}, "
                f"expected 1-D {entry.get('value_dtype')}"
            )
            continue
        unpacked = np.unpackbits(bits.numpy(), bitorder="little")
        mask = unpacked[:numel].astype(bool)
        popcount = int(mask.sum())
        if unpacked[numel:].any():
            problems.append(f"mask of '{name}' has bits set beyond its {numel} weights")
            continue
        if popcount != values.numel() or ("nnz" in entry and int(entry["nnz"]) != popcount):
            problems.append(
                f"mask of '{name}' has {popcount} bits set but {values.numel()} values are stored"
                + (f" (the description says {entry['nnz']})" if "nnz" in entry else "")
            )
            continue
        dense = torch.zeros(numel, dtype=dtype)
        dense[torch.from_numpy(mask)] = values.to(dtype)
        state[name] = dense.reshape(shape)
    report = {"problems": problems, "version": int(metadata.get("format_version", "0")),
              "verified": checksums is not None, "info": info, "tensors": len(stored)}  # fmt: skip
    return state, report


def load_compressed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by `save_compressed` back into an ordinary state dict.

    ``path`` may also be a directory written by `export_model`. Every tensor's checksum,
    each mask's popcount against its values, and all shapes are verified: a damaged file
    raises `SparseBertError` naming the file and the tensor. A version-1 file (written
    before checksums existed) loads with a warning that it cannot be verified.
    """
    path = Path(path)
    if path.is_dir():
        path = path / COMPRESSED_FILE
    state, report = read_compressed(path)
    if report["problems"]:
        problems = _Problems(path)
        problems.items = report["problems"]
        raise problems.error()
    return state


def load_compressed_into(
    model: nn.Module, path: str | os.PathLike, strict: bool = True
) -> nn.Module:
    """Load a compressed checkpoint into ``model`` (in place) and return it."""
    model.load_state_dict(load_compressed(path), strict=strict)
    return model


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_report(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    value_dtype: str = "fp32",
    min_sparsity: float = COMPRESS_MIN_SPARSITY,
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


__all__ = [
    "CHECKSUM_ALGORITHM",
    "COMPRESSED_FILE",
    "COMPRESS_MIN_SPARSITY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MASK_SUFFIX",
    "VALUES_SUFFIX",
    "VALUE_DTYPES",
    "compress_state_dict",
    "load_compressed",
    "load_compressed_into",
    "read_compressed",
    "save_compressed",
    "size_report",
    "tensor_checksum",
]
