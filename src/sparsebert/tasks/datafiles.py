"""File helpers shared by the non-GLUE tasks: find a task's folder under ``--data-dir``, pick the
first file of a split that exists, open plain or gzipped text, load a hub split with an
error that says what to do offline, and take a deterministic prefix (``max_samples``).

Every failure is a `SparseBertError` naming the file or folder, what was expected and the fix.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Mapping, Sequence
from typing import IO

from sparsebert.errors import SparseBertError


def task_dir(task_name: str, data_dir: str, folders: Sequence[str], marker_files: Sequence[str]) -> str:
    """The folder holding a task's files: one of ``folders`` under ``data_dir`` (the shared root,
    e.g. ``../shared/data``), or ``data_dir`` itself when it holds one of ``marker_files``."""
    if not os.path.isdir(data_dir):
        raise SparseBertError(f"data directory '{data_dir}' does not exist")
    for folder in folders:
        path = os.path.join(data_dir, folder)
        if os.path.isdir(path):
            return path
    if any(os.path.isfile(os.path.join(data_dir, f)) for f in marker_files):
        return data_dir
    raise SparseBertError(
        f"no {task_name} data in '{data_dir}': expected a subfolder named {' or '.join(folders)} "
        f"(or '{data_dir}' itself) holding {' or '.join(marker_files)}"
    )


def find_file(folder: str, candidates: Sequence[str], task_name: str, split: str) -> str:
    """The first of ``candidates`` that exists in ``folder``, or a clear error listing what is there."""
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    present = ", ".join(sorted(os.listdir(folder))) or "nothing"
    raise SparseBertError(
        f"{task_name} has no '{split}' split in '{folder}': expected {' or '.join(candidates)}, "
        f"found {present}. Point --data-dir at a folder that has it, or load the task from the hub"
    )


def check_split(task_name: str, split: str, split_files: Mapping[str, Sequence[str]]) -> None:
    """A clear error for a split the task does not have."""
    if split not in split_files:
        raise SparseBertError(f"{task_name} has no split '{split}'; splits: {', '.join(split_files)}")


def split_path(
    task_name: str, split: str, data_dir: str, folders: Sequence[str],
    split_files: Mapping[str, Sequence[str]],
) -> str:
    """The local file of ``split``: the task's folder is the one holding its train or
    validation files, the file the first of the split's candidates that exists."""
    check_split(task_name, split, split_files)
    folder = task_dir(task_name, data_dir, folders, [*split_files["train"], *split_files["validation"]])
    return find_file(folder, split_files[split], task_name, split)


def open_text(path: str) -> IO[str]:
    """Open a UTF-8 text file, gunzipping ``*.gz``."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def load_hub(task_name: str, hub_name: str | None, split: str, config: str | None = None):
    """One split of a hub dataset, or an error that says to use local files."""
    if hub_name is None:
        raise SparseBertError(
            f"{task_name} has no hub copy: pass --data-dir pointing at the shared data root "
            "(or a folder holding the task's files)"
        )
    import datasets

    try:
        return datasets.load_dataset(hub_name, config, split=split)
    except Exception as err:  # network, unknown name, missing split
        what = f"{hub_name}" + (f" ({config})" if config else "")
        raise SparseBertError(
            f"could not load {task_name} '{split}' from the hub dataset '{what}': {err}. "
            "Without internet, pass --data-dir with the task's local files"
        ) from None


def take(ds, max_samples: int | None):
    """The first ``max_samples`` rows of a `datasets.Dataset` (a deterministic proxy subset)."""
    if max_samples is None:
        return ds
    if max_samples <= 0:
        raise SparseBertError(f"max samples must be positive, got {max_samples}")
    return ds.select(range(min(max_samples, len(ds))))


def require_columns(columns: Sequence[str], needed: Sequence[str], source: str, expected: str) -> None:
    """Raise when ``source`` lacks any of ``needed``; ``expected`` describes the format."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SparseBertError(
            f"{source} has no {', '.join(repr(c) for c in missing)} column (columns: {list(columns)}); "
            f"expected {expected}"
        )


__all__ = ["find_file", "load_hub", "open_text", "require_columns", "take", "task_dir"]
