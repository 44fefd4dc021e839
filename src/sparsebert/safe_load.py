"""Check a local model folder before transformers loads it: safetensors only, never pickle.

`check_model_folder` runs before any ``from_pretrained`` on a local folder. It refuses a
folder whose weights exist only as pickles (``pytorch_model.bin``, ``*.pt`` ...: unpickling
can run arbitrary code) with a one-line conversion command, a folder without weights, and a
safetensors file that is truncated or not safetensors at all, each with a message that
names the file, instead of a traceback from deep inside safetensors or torch.

`safetensors_header` is the structural check behind it (also used by `sparsebert.verify`):
it reads only the header and compares it with the file size, so it costs nothing even for
a large model.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any

from sparsebert.errors import SparseBertError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
COMPRESSED_WEIGHTS = "model.sparse.safetensors"  # sparsebert.export.compressed.COMPRESSED_FILE

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
"""Pickled weights. Trainer state in a checkpoint folder (`TRAINER_PICKLES`) is not weights."""
TRAINER_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin")
OTHER_WEIGHTS = ("tf_model*.h5", "flax_model*.msgpack")

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit

CONVERT_COMMAND = (
    "python -c \"import sys, transformers as t; p = sys.argv[1]; "
    "c = t.AutoConfig.from_pretrained(p); "
    "m = getattr(t, (c.architectures or ['AutoModel'])[0]).from_pretrained(p, use_safetensors=False); "
    "m.save_pretrained(p, safe_serialization=True)\" {path}"
)
"""Rewrites a folder's pickled weights as model.safetensors (run it only on a trusted folder)."""


class InvalidSafetensorsError(SparseBertError):
    """A file that is not safetensors, or a truncated or corrupted one; ``detail`` says how."""

    def __init__(self, path: Path | str, detail: str):
        super().__init__(f"{path} is not a valid safetensors file (truncated or corrupted): {detail}")
        self.path, self.detail = str(path), detail


def _invalid(path: Path | str, detail: str) -> InvalidSafetensorsError:
    return InvalidSafetensorsError(path, detail)


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor entries and ``__metadata__`` of a safetensors file, checked against its size.

    Raises `SparseBertError` ("... is not a valid safetensors file (truncated or corrupted)")
    when the header does not parse, a tensor's byte range does not fit its dtype and shape,
    the ranges leave gaps or overlap, or the file is shorter or longer than the header says.
    """
    path = Path(path)
    if not path.is_file():
        raise SparseBertError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _invalid(path, f"the file has {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise _invalid(path, f"the header claims {n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _invalid(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _invalid(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _invalid(path, "__metadata__ is not a JSON object")
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = math.prod(int(d) for d in shape)
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise _invalid(path, f"tensor '{name}' has a malformed header entry") from None
        if dtype not in DTYPE_BYTES:
            raise _invalid(path, f"tensor '{name}' has unknown dtype {dtype!r}")
        if end - start != numel * DTYPE_BYTES[dtype] or start < 0:
            raise _invalid(
                path, f"tensor '{name}' ({dtype} {list(shape)}) has byte range [{start}, {end})"
            )
        spans.append((start, end, name))
    data = size - 8 - n
    pos = 0
    for start, end, name in sorted(spans):
        if start != pos:
            raise _invalid(path, f"tensor '{name}' starts at byte {start}, expected {pos}")
        pos = end
    if pos > data:
        raise _invalid(path, f"the tensors need {pos} data bytes but the file holds {data} (truncated)")
    if pos < data:
        raise _invalid(path, f"{data - pos} bytes follow the last tensor")
    return header, metadata


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def pickled_weight_files(folder: str | os.PathLike) -> list[str]:
    """Names of the pickled weight files in ``folder`` (not a checkpoint's optimizer/rng state)."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and _matches(p.name, PICKLE_PATTERNS) and not _matches(p.name, TRAINER_PICKLES)
    )


def safetensors_weight_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files transformers would load: model.safetensors or the index's shards."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        return [SAFE_WEIGHTS]
    index = folder / SAFE_INDEX
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise SparseBertError(
            f"{index} is not a valid safetensors index (corrupted?): {err}"
        ) from None


def check_model_folder(
    path: str | os.PathLike, what: str = "model", allow_compressed: bool = False
) -> None:
    """Refuse a local model folder that transformers would load unsafely or fail on.

    Raises `SparseBertError` when ``path`` is a file; has no (or an unparsable) config.json;
    holds only pickled weights (with a conversion one-liner); holds no weights at all; or
    one of its safetensors weight files is truncated or not safetensors. A folder holding
    only a sparsebert compressed export (``model.sparse.safetensors``) passes only with
    ``allow_compressed`` (`sparsebert.export.load_any` reads it; ``from_pretrained`` cannot).
    A path that does not exist is left alone (it may be a hub name). ``what`` names the
    folder in the messages ("teacher", "checkpoint", ...).
    """
    folder = Path(os.path.expanduser(str(path)))
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SparseBertError(f"{what} path {folder} is a file: give the folder save_pretrained wrote")
    config = folder / "config.json"
    if not config.is_file():
        raise SparseBertError(
            f"{what} folder {folder} has no config.json: give the folder save_pretrained wrote"
        )
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SparseBertError(f"{config} is not valid JSON (corrupted?): {err}") from None
    safe = safetensors_weight_files(folder)
    if not safe:
        if allow_compressed and (folder / COMPRESSED_WEIGHTS).is_file():
            safetensors_header(folder / COMPRESSED_WEIGHTS)
            return
        pickled = pickled_weight_files(folder)
        if pickled:
            raise SparseBertError(
                f"{what} folder {folder} holds only pickled weights ({', '.join(pickled)}); sparsebert "
                "loads safetensors only (pickle can run code): convert it in a trusted environment "
                f"with `{CONVERT_COMMAND.format(path=shlex.quote(str(folder)))}`"
            )
        if (folder / COMPRESSED_WEIGHTS).is_file():
            raise SparseBertError(
                f"{what} folder {folder} holds a sparsebert compressed export ({COMPRESSED_WEIGHTS}), "
                "which transformers cannot load: load it with sparsebert.export.load_any, or give "
                "the model folder it was exported from"
            )
        others = sorted(p.name for p in folder.iterdir() if _matches(p.name, OTHER_WEIGHTS))
        if others:
            raise SparseBertError(
                f"{what} folder {folder} holds only {', '.join(others)}; sparsebert loads PyTorch "
                "safetensors weights (model.safetensors) only"
            )
        raise SparseBertError(
            f"no weights in {what} folder {folder}: expected {SAFE_WEIGHTS} (it holds only "
            f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'})"
        )
    for name in safe:
        file = folder / name
        if not file.is_file():
            raise SparseBertError(f"{folder / SAFE_INDEX} lists {name}, which is missing from {folder}")
        safetensors_header(file)


__all__ = [
    "CONVERT_COMMAND",
    "InvalidSafetensorsError",
    "check_model_folder",
    "pickled_weight_files",
    "safetensors_header",
    "safetensors_weight_files",
]
