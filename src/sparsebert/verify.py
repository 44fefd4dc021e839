"""``sparsebert verify``: is a saved model, training checkpoint or export intact?

`verify_path` checks a folder (and the ``checkpoint-*`` folders in it) or a single file:

- every ``*.safetensors`` file parses and its size matches its header (a truncated file is
  named, not a safetensors traceback); every float tensor is finite, and one with values
  above `SUSPICIOUS_MAGNITUDE` is flagged as suspicious (a flipped exponent byte turns a
  weight of 0.02 into ~1e35);
- a compressed export (``model.sparse.safetensors``) passes its own CRC-32 checks, popcount
  and shape checks (`sparsebert.export.compressed.read_compressed`);
- a checkpoint's ``masks.safetensors`` holds only 0/1 masks of tensors of the model, with
  their shapes, and every masked-out weight is exactly zero;
- ``sparsebert.json``'s per-layer zero counts (``sparsity.layers[*].zeros``) match the
  weights (a flipped byte that makes a pruned weight non-zero is caught);
- every ``*.json`` parses, config.json exists beside weights, a sharded model's index
  points at tensors that exist, an ``*.onnx`` file passes the ONNX checker;
- ``checksums.json`` (written by `write_checksums` at the end of every save), when present:
  every file listed has its recorded size and SHA-256. Only this catches a flipped byte
  that touches neither a zero nor an exponent in a plain ``model.safetensors``.

Pickled files (a checkpoint's optimizer.pt, rng_state.pth, ...) are never opened (pickle
can run code); only checksums.json covers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsebert.errors import SparseBertError
from sparsebert.safe_load import (
    CONVERT_COMMAND,
    SAFE_INDEX,
    InvalidSafetensorsError,
    pickled_weight_files,
    safetensors_header,
    safetensors_weight_files,
)

CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_ALGORITHM = "sha256"
MASKS_FILE = "masks.safetensors"  # sparsebert.masks.MASKS_FILE
RUN_INFO_FILE = "sparsebert.json"  # sparsebert.models.RUN_INFO_FILE
SUSPICIOUS_MAGNITUDE = 1e4
"""No weight of a trained BERT-family model comes near this; a corrupted exponent does."""

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CHUNK = 1 << 22


# -- checksums.json -------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str | os.PathLike) -> str:
    """Write ``folder/checksums.json``: size and SHA-256 of every file directly in ``folder``.

    Call it last, once everything in the folder is written: a file changed afterwards is
    reported by `verify_path` as a checksum mismatch. Subfolders (``checkpoint-*``) are not
    included; each gets its own when it is saved. Returns the path written.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SparseBertError(f"cannot write {CHECKSUMS_FILE}: {folder} is not a folder")
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != CHECKSUMS_FILE and not p.name.endswith(".partial"):
            files[p.name] = {"bytes": p.stat().st_size, CHECKSUMS_ALGORITHM: file_sha256(p)}
    out = folder / CHECKSUMS_FILE
    partial = folder / (CHECKSUMS_FILE + ".partial")
    partial.write_text(json.dumps({"algorithm": CHECKSUMS_ALGORITHM, "files": files}, indent=1) + "\n")
    os.replace(partial, out)
    return str(out)


# -- the result ----------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    """What `verify_path` found: ``checked`` (one line per thing that passed), ``problems``
    (exit 2) and ``warnings`` (things that could not be verified)."""

    path: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "checked": self.checked, "problems": self.problems,
                "warnings": self.warnings}  # fmt: skip

    def format(self) -> str:
        lines = [f"sparsebert verify {self.path}"]
        lines += [f"  ok  {c}" for c in self.checked]
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            lines += [f"  - {w}" for w in self.warnings]
        if self.problems:
            lines.append(f"PROBLEMS ({len(self.problems)}):")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("all checks passed")
        return "\n".join(lines)


class _Scope:
    """Adds results for one folder, prefixing file names with the folder's label."""

    def __init__(self, result: VerifyResult, label: str):
        self.result, self.label = result, label

    def name(self, file: str) -> str:
        return f"{self.label}{file}"

    def ok(self, msg: str) -> None:
        self.result.checked.append(f"{self.label}{msg}")

    def problem(self, msg: str) -> None:
        self.result.problems.append(f"{self.label}{msg}")

    def warn(self, msg: str) -> None:
        self.result.warnings.append(f"{self.label}{msg}")


# -- tensors ---------------------------------------------------------------------------------------
def _float_checks(scope: _Scope, file: str, name: str, t: torch.Tensor) -> None:
    if not (t.is_floating_point() and t.numel()):
        return
    t = t.float()
    finite = torch.isfinite(t)
    bad = int((~finite).sum())
    if bad:
        nan = int(torch.isnan(t).sum())
        scope.problem(f"{file}: tensor '{name}' has {nan} NaN and {bad - nan} infinite values")
    big = finite & (t.abs() > SUSPICIOUS_MAGNITUDE)
    n_big = int(big.sum())
    if n_big:
        worst = float(t[big].abs().max())
        scope.problem(
            f"{file}: tensor '{name}' is suspicious: {n_big} value(s) with |w| > {SUSPICIOUS_MAGNITUDE:g} "
            f"(largest {worst:.3g}), which no trained weight has: a corrupted exponent byte?"
        )


def _read_tensors(scope: _Scope, folder: Path, file: str) -> dict[str, torch.Tensor] | None:
    """All tensors of a (structurally valid) safetensors file, or None after a problem."""
    from safetensors import safe_open

    try:
        header, _ = safetensors_header(folder / file)
    except InvalidSafetensorsError as err:
        scope.problem(f"{file} is not a valid safetensors file (truncated or corrupted): {err.detail}")
        return None
    tensors = {}
    try:
        with safe_open(str(folder / file), framework="pt") as f:
            for name in header:
                tensors[name] = f.get_tensor(name)
    except Exception as err:  # a dtype this torch cannot hold, ...
        scope.problem(f"{file} cannot be read: {str(err).splitlines()[0]}")
        return None
    return tensors


def _find(name: str, keys: dict[str, Any]) -> str | None:
    """``name`` in ``keys``, allowing for a task model's prefix on either side (bert., mlm.)."""
    if name in keys:
        return name
    hits = [k for k in keys if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


# -- the checks of one folder ------------------------------------------------------------------------
def _check_checksums(scope: _Scope, folder: Path) -> set[str]:
    """Compare the files with checksums.json; returns the names that do not match."""
    path = folder / CHECKSUMS_FILE
    try:
        data = json.loads(path.read_text())
        algorithm = data.get("algorithm", CHECKSUMS_ALGORITHM)
        files = data["files"]
        if algorithm != CHECKSUMS_ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"algorithm {algorithm!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, AttributeError) as err:
        scope.problem(f"{CHECKSUMS_FILE} is corrupted ({err}): it cannot be checked")
        return set()
    bad = set()
    for name, entry in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            scope.problem(f"{name} is missing ({CHECKSUMS_FILE} lists it)")
            bad.add(name)
            continue
        try:
            want_size, want_hash = int(entry["bytes"]), str(entry[CHECKSUMS_ALGORITHM])
        except (KeyError, TypeError, ValueError):
            scope.problem(f"{CHECKSUMS_FILE} has a malformed entry for {name}")
            continue
        size = p.stat().st_size
        if size != want_size:
            scope.problem(
                f"{name} is corrupted: it has {size} bytes, {CHECKSUMS_FILE} recorded {want_size} "
                f"({'truncated' if size < want_size else 'grown'} since it was saved)"
            )
            bad.add(name)
        elif file_sha256(p) != want_hash:
            scope.problem(
                f"{name} is corrupted: checksum mismatch ({CHECKSUMS_ALGORITHM} differs from "
                f"{CHECKSUMS_FILE}): the file changed after it was saved"
            )
            bad.add(name)
    unlisted = sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and p.name != CHECKSUMS_FILE and p.name not in files
    )  # fmt: skip
    if unlisted:
        scope.warn(f"not covered by {CHECKSUMS_FILE} (written after it?): {', '.join(unlisted)}")
    good = len(files) - len(bad)
    scope.ok(f"{CHECKSUMS_FILE}: {good}/{len(files)} files match their {CHECKSUMS_ALGORITHM}")
    return bad


def check_saved_files(folder: str | os.PathLike, what: str = "model") -> None:
    """Before a saved folder is loaded: if it has ``checksums.json``, every file it lists must
    still match, or a `SparseBertError` names the damaged files (a flipped byte in a weight
    would otherwise load, and evaluate to garbage with exit 0)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS_FILE).is_file():
        return
    result = VerifyResult(str(folder))
    _check_checksums(_Scope(result, ""), folder)
    if result.problems:
        raise SparseBertError(
            f"{what} folder {folder} is damaged: {'; '.join(result.problems)}; restore it from a copy "
            f"or re-create it (`sparsebert verify {folder}` lists everything)"
        )


def _check_json(scope: _Scope, folder: Path) -> dict[str, Any]:
    parsed, ok = {}, []
    for p in sorted(folder.glob("*.json")):
        if p.name == CHECKSUMS_FILE:
            continue
        try:
            parsed[p.name] = json.loads(p.read_text())
            ok.append(p.name)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            scope.problem(f"{p.name} is not valid JSON (corrupted?): {err}")
    if ok:
        scope.ok(f"JSON files parse: {', '.join(ok)}")
    return parsed


def _check_index(scope: _Scope, folder: Path, index: Any, headers: dict[str, set[str]]) -> None:
    try:
        weight_map = index["weight_map"]
        items = list(weight_map.items())
    except (KeyError, TypeError, AttributeError):
        scope.problem(f"{SAFE_INDEX} has no weight_map")
        return
    missing = 0
    for tensor, file in items:
        if not (folder / file).is_file():
            scope.problem(f"{SAFE_INDEX} lists {file}, which is missing")
            return
        if file in headers and tensor not in headers[file]:
            missing += 1
    if missing:
        scope.problem(f"{SAFE_INDEX}: {missing} tensor(s) it lists are not in their shard")
    else:
        scope.ok(f"{SAFE_INDEX}: {len(items)} tensors found in their shards")


def _check_masks(scope: _Scope, masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    if not weights:
        scope.problem(f"{MASKS_FILE} has no model weights beside it to check against")
        return
    problems = 0
    for name, m in masks.items():
        key = _find(name, weights)
        if key is None:
            scope.problem(f"{MASKS_FILE} has a mask for '{name}', which is not a tensor of the model")
            problems += 1
            continue
        w = weights[key]
        if tuple(m.shape) != tuple(w.shape):
            scope.problem(
                f"{MASKS_FILE}: mask of '{name}' has shape {list(m.shape)}, the weight {list(w.shape)}"
            )
            problems += 1
            continue
        if m.dtype not in (torch.uint8, torch.bool) or bool(((m != 0) & (m != 1)).any()):
            scope.problem(f"{MASKS_FILE}: mask of '{name}' holds values other than 0 and 1")
            problems += 1
            continue
        leaked = int(((m == 0) & (w != 0)).sum())
        if leaked:
            scope.problem(
                f"{leaked} masked-out weight(s) of '{key}' are non-zero ({MASKS_FILE} says pruned): "
                "the weights or the masks are corrupted"
            )
            problems += 1
    if not problems:
        pruned = sum(int((m == 0).sum()) for m in masks.values())
        scope.ok(f"{MASKS_FILE}: {len(masks)} masks, all {pruned} masked-out weights are exactly zero")


def _check_run_info(scope: _Scope, folder: Path, info: Any, weights: dict[str, torch.Tensor],
                    zeros_of: dict[str, int]) -> None:  # fmt: skip
    layers = info.get("sparsity", {}).get("layers") if isinstance(info, dict) else None
    if layers is None:
        return
    if not weights:
        if not any(folder.glob("*.onnx")):
            scope.warn(f"{RUN_INFO_FILE}: no weights beside it to check its zero counts against")
        return
    problems = 0
    try:
        entries = [(str(r["name"]), int(r["zeros"]), r.get("shape")) for r in layers]
    except (KeyError, TypeError, ValueError, AttributeError):
        scope.problem(f"{RUN_INFO_FILE}: sparsity.layers is malformed")
        return
    for name, zeros, shape in entries:
        key = _find(name, weights)
        if key is None:
            scope.problem(f"{RUN_INFO_FILE} records layer '{name}', which the weights do not have")
            problems += 1
            continue
        w = weights[key]
        if shape is not None and list(shape) != list(w.shape):
            scope.problem(f"{RUN_INFO_FILE}: '{name}' has shape {list(w.shape)}, recorded {list(shape)}")
            problems += 1
            continue
        got = zeros_of.get(key, None)
        got = int((w == 0).sum()) if got is None else got
        if got != zeros:
            scope.problem(
                f"'{key}' has {got} zeros but {RUN_INFO_FILE} recorded {zeros} when it was saved: "
                "the weights changed (corrupted?)"
            )
            problems += 1
    if not problems:
        scope.ok(f"{RUN_INFO_FILE}: zero counts of {len(entries)} layers match the weights")


def _check_onnx(scope: _Scope, folder: Path, file: str) -> None:
    try:
        import onnx
    except ImportError:
        scope.warn(f"{file}: the onnx package is not installed, not checked")
        return
    try:
        onnx.checker.check_model(str(folder / file))
    except Exception as err:
        scope.problem(f"{file} is not a valid ONNX model (truncated or corrupted?): "
                      f"{str(err).splitlines()[0][:300]}")  # fmt: skip
        return
    scope.ok(f"{file}: passes the ONNX checker")


def _verify_folder(result: VerifyResult, folder: Path, label: str) -> bool:
    """Check one folder; False when it holds nothing to check."""
    from sparsebert.export.compressed import FORMAT_NAME, read_compressed

    scope = _Scope(result, label)
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if CHECKSUMS_FILE in names:
        _check_checksums(scope, folder)
    parsed = _check_json(scope, folder)
    weights: dict[str, torch.Tensor] = {}
    zeros_of: dict[str, int] = {}
    masks = None
    headers: dict[str, set[str]] = {}
    for file in sorted(n for n in names if n.endswith(".safetensors")):
        try:
            _, meta = safetensors_header(folder / file)
        except InvalidSafetensorsError as err:
            scope.problem(f"{file} is not a valid safetensors file (truncated or corrupted): {err.detail}")
            continue
        if meta.get("format") == FORMAT_NAME:
            try:
                state, report = read_compressed(folder / file)
            except SparseBertError as err:
                scope.problem(str(err))
                continue
            for p in report["problems"]:
                scope.problem(f"{file} is corrupted: {p}; re-export it")
            if not report["verified"]:
                scope.warn(f"{file} is compressed format version {report['version']}, without "
                           "checksums: it cannot be fully verified; re-export it to add them")  # fmt: skip
            for name, t in state.items():
                _float_checks(scope, file, name, t)
                if name in weights:  # dense weights beside the export come first
                    continue
                entry = report["info"][name]
                if entry.get("compressed"):  # zeros are where the mask says (fp16 may round more)
                    zeros_of[name] = t.numel() - int(entry["nnz"])
                weights[name] = t
            if not report["problems"]:
                verified = f"{report['version']}, checksums ok" if report["verified"] else "1, no checksums"
                scope.ok(f"{file}: compressed export (format {verified}), {len(state)} tensors, shapes "
                         "and mask popcounts agree, all finite")  # fmt: skip
            continue
        tensors = _read_tensors(scope, folder, file)
        if tensors is None:
            continue
        headers[file] = set(tensors)
        if file == MASKS_FILE:
            masks = tensors
            continue
        before = len(result.problems)
        for name, t in tensors.items():
            _float_checks(scope, file, name, t)
            weights.setdefault(name, t)
        if len(result.problems) == before:
            scope.ok(f"{file}: {len(tensors)} tensors, all finite, none above {SUSPICIOUS_MAGNITUDE:g}")
    if SAFE_INDEX in parsed:
        _check_index(scope, folder, parsed[SAFE_INDEX], headers)
    if masks is not None:
        _check_masks(scope, masks, weights)
    if RUN_INFO_FILE in parsed:
        _check_run_info(scope, folder, parsed[RUN_INFO_FILE], weights, zeros_of)
    onnx_files = sorted(n for n in names if n.endswith(".onnx"))
    for file in onnx_files:
        _check_onnx(scope, folder, file)
    has_weights = bool(weights) or bool(onnx_files)
    if has_weights and "config.json" not in names:
        scope.problem(f"no config.json beside the weights in {folder}")
    if not has_weights:
        try:
            safe = safetensors_weight_files(folder)
        except SparseBertError:
            safe = []
        pickled = pickled_weight_files(folder)
        if pickled and not safe:
            scope.problem(
                f"{folder} holds only pickled weights ({', '.join(pickled)}), which sparsebert does not "
                f"open (pickle can run code): convert them in a trusted environment with "
                f"`{CONVERT_COMMAND.format(path=shlex.quote(str(folder)))}`"
            )
        elif "config.json" in names and not any(n.endswith(".safetensors") for n in names):
            scope.problem(f"no weights in {folder}: expected model.safetensors")
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if pickles and CHECKSUMS_FILE in names:
        scope.ok(f"pickled files (never opened) checked only against {CHECKSUMS_FILE}: {', '.join(pickles)}")
    elif pickles:
        scope.warn(f"pickled files are never opened, and without {CHECKSUMS_FILE} not verified: "
                   f"{', '.join(pickles)}")  # fmt: skip
    if weights and CHECKSUMS_FILE not in names:
        scope.warn(f"no {CHECKSUMS_FILE}: a flipped byte that changes neither a zero nor an exponent "
                   "of a weight cannot be detected")  # fmt: skip
    return bool(names & {"config.json", CHECKSUMS_FILE, RUN_INFO_FILE, MASKS_FILE}) or any(
        n.endswith((".safetensors", ".onnx")) for n in names
    )


def _verify_file(result: VerifyResult, path: Path) -> None:
    scope = _Scope(result, "")
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
            scope.ok(f"{path.name}: valid JSON")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            scope.problem(f"{path.name} is not valid JSON (corrupted?): {err}")
        return
    if path.suffix == ".onnx":
        _check_onnx(scope, path.parent, path.name)
        return
    if path.suffix != ".safetensors":
        raise SparseBertError(
            f"cannot verify {path}: give a model folder, a checkpoint folder, a compressed export "
            "or a .safetensors / .onnx / .json file"
        )
    from sparsebert.export.compressed import FORMAT_NAME, read_compressed

    try:
        _, meta = safetensors_header(path)
    except InvalidSafetensorsError as err:
        scope.problem(f"{path.name} is not a valid safetensors file (truncated or corrupted): {err.detail}")
        return
    if meta.get("format") == FORMAT_NAME:
        state, report = read_compressed(path)
        for p in report["problems"]:
            scope.problem(f"{path.name} is corrupted: {p}; re-export it")
        if not report["verified"]:
            scope.warn(f"{path.name} is compressed format version 1, without checksums: it cannot "
                       "be fully verified")  # fmt: skip
        tensors = state
    else:
        tensors = _read_tensors(scope, path.parent, path.name) or {}
    before = len(result.problems)
    for name, t in tensors.items():
        _float_checks(scope, path.name, name, t)
    if len(result.problems) == before:
        scope.ok(f"{path.name}: {len(tensors)} tensors parse, all finite")


def _checkpoint_step(p: Path) -> int:
    m = _CHECKPOINT.match(p.name)
    return int(m.group(1)) if m else -1


def verify_path(path: str | os.PathLike) -> VerifyResult:
    """Verify a saved model folder, a training checkpoint, a compressed or ONNX export (and
    the ``checkpoint-*`` folders inside a run's output folder), or one file.

    Returns a `VerifyResult`; its ``problems`` name each file and tensor at fault. Raises
    `SparseBertError` only when ``path`` does not exist or is not something to verify.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise SparseBertError(f"{path} does not exist: give a saved model, checkpoint or export folder")
    result = VerifyResult(str(path))
    if path.is_file():
        _verify_file(result, path)
        return result
    found = _verify_folder(result, path, "")
    checkpoints = sorted((p for p in path.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)),
                         key=_checkpoint_step)  # fmt: skip
    for ckpt in checkpoints:
        found = _verify_folder(result, ckpt, f"{ckpt.name}: ") or found
    if not found:
        raise SparseBertError(
            f"nothing to verify in {path}: no config.json, *.safetensors, *.onnx or checkpoint-* "
            "folders (give the folder a model was saved to)"
        )
    return result


__all__ = [
    "CHECKSUMS_FILE",
    "SUSPICIOUS_MAGNITUDE",
    "VerifyResult",
    "file_sha256",
    "verify_path",
    "write_checksums",
]
