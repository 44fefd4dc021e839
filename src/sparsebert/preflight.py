"""Checks before a run trains anything: the output directory, what ``--resume`` would resume,
and the numbers the Trainer would only choke on later.

Why up front: a run that fails at its final save, after all the training, or that silently
overwrites or resumes another run's output, costs hours. Every check raises
`SparseBertError` naming the path or argument and the fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sparsebert.errors import SparseBertError
from sparsebert.verify import check_saved_files

logger = logging.getLogger("sparsebert")

RUN_FILE = "sparsebert_run.json"
"""What a run is (task, model, recipe, data): written into its output directory and every
checkpoint, compared on ``--resume``."""
IDENTITY_KEYS = ("task", "model", "recipe", "method", "targets", "sparsity", "max_seq_length")
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checksums.json"
"""Written last into every checkpoint (`trainer.ChecksumCallback`): a checkpoint without it
was interrupted while it was being written."""
OWN_FILES = ("sparsebert.json", "sparsity.txt", RUN_FILE, COMPLETE_MARKER, "masks.safetensors")


def run_identity(task: str, model: str | None, recipe: Any, max_seq_length: int) -> dict[str, Any]:
    return {
        "task": task,
        "model": model or "embedded:all-MiniLM-L6-v2",
        "recipe": recipe.name,
        "method": recipe.method,
        "targets": list(recipe.targets),
        "sparsity": recipe.sparsity,
        "max_seq_length": max_seq_length,
    }


def check_positive(name: str, value: Any, minimum: int = 1) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise SparseBertError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_training_numbers(args: Any) -> None:
    """Batch sizes, accumulation, steps and epochs the Trainer would fail on deep inside."""
    check_positive("--per_device_train_batch_size", args.per_device_train_batch_size)
    check_positive("--per_device_eval_batch_size", args.per_device_eval_batch_size)
    check_positive("--gradient_accumulation_steps", args.gradient_accumulation_steps)
    if args.max_steps is not None and args.max_steps == 0:
        raise SparseBertError("--max_steps 0 trains nothing: give a positive number (or -1 for epochs)")
    if args.max_steps is not None and args.max_steps < 0 and not args.num_train_epochs > 0:
        raise SparseBertError(f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    if not args.learning_rate >= 0:
        raise SparseBertError(f"--learning_rate must be >= 0, got {args.learning_rate}")


def _holds_a_run(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    found = [p.name for p in path.iterdir()
             if p.name in OWN_FILES or p.name.startswith(CHECKPOINT_PREFIX) or p.suffix == ".safetensors"]
    return sorted(found)


def _writable(path: Path) -> None:
    """Create ``path`` (and parents) and write a probe file, turning OS errors into a message."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == path else f"is under a file ({parent})"
            raise SparseBertError(f"output directory {path} {what}: give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sparsebert-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise SparseBertError(f"cannot write to output directory {path}: {describe_os_error(err)}") from None


def describe_os_error(err: OSError) -> str:
    """A short reason and fix for the OS errors a save can meet."""
    reasons = {
        errno.ENOSPC: "the disk is full; free space or choose another --output-dir",
        errno.EROFS: "the file system is read-only; choose another --output-dir",
        errno.EACCES: "permission denied; choose a directory you can write to",
        errno.EDQUOT: "the disk quota is exceeded; free space or choose another --output-dir",
    }
    return reasons.get(err.errno, err.strerror or str(err))


def check_free_space(path: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise SparseBertError(
            f"output directory {path} has {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{needed_bytes / 2**20:.0f} MiB (model, optimizer state, masks): free space or choose "
            "another --output-dir"
        )


def checkpoint_bytes(model: Any) -> int:
    """Model + Adam's two moments + masks, for the free-space check (with 20% headroom)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(params * 3.2)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints whose writing finished (the marker written last exists), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
            found.append((int(step), p))
    complete = []
    for _step, p in sorted(found):
        if (p / COMPLETE_MARKER).is_file():
            complete.append(p)
        else:
            logger.warning("%s is incomplete (interrupted while it was written): skipped", p)
    return complete


def check_checkpoint(path: Path, output_dir: str) -> None:
    """An explicit ``--resume PATH`` must be a complete checkpoint."""
    if not path.is_dir():
        raise SparseBertError(f"checkpoint to resume from '{path}' does not exist")
    if not (path / COMPLETE_MARKER).is_file():
        complete = [p.name for p in complete_checkpoints(output_dir)]
        hint = f"complete ones: {', '.join(complete)}" if complete else "there is no complete one"
        raise SparseBertError(
            f"checkpoint '{path}' is incomplete (it was interrupted while being written); {hint}"
        )


def check_identity(saved_in: Path, identity: dict[str, Any]) -> None:
    """``--resume`` of another task, model or recipe is refused, naming what differs."""
    stored = saved_in / RUN_FILE
    if not stored.is_file():
        logger.warning("%s has no %s: cannot check that it is this run's", saved_in, RUN_FILE)
        return
    try:
        theirs = json.loads(stored.read_text())
    except (OSError, ValueError) as err:
        raise SparseBertError(f"{stored} is unreadable ({err}): it is not a checkpoint of this run") from None
    diff = [f"{k}: {theirs.get(k)!r} there, {identity[k]!r} now" for k in IDENTITY_KEYS
            if k in theirs and theirs.get(k) != identity[k]]
    if diff:
        raise SparseBertError(
            f"--resume: {saved_in} belongs to another run ({'; '.join(diff)}); resume it with the same "
            "command, or start this one in a new --output-dir"
        )


def _same_run_started(path: Path, held: list[str], identity: dict[str, Any]) -> bool:
    """Only this run's identity file is there (the same command, stopped before its first
    checkpoint): starting it again replaces nothing."""
    if held != [RUN_FILE]:
        return False
    try:
        return json.loads((path / RUN_FILE).read_text()) == identity
    except (OSError, ValueError):
        return False


def prepare_output_dir(
    output_dir: str, identity: dict[str, Any], resume: str | bool | None, overwrite: bool
) -> str | None:
    """Check and prepare ``output_dir``; return the checkpoint to resume from (or None).

    A directory holding another run is refused unless ``overwrite`` (its checkpoints and our
    files are removed) or ``resume``. ``resume`` ("auto"/True: the last complete checkpoint;
    a path: that one) must be a checkpoint of the same task, model and recipe.
    """
    path = Path(output_dir)
    primary = int(os.environ.get("RANK", "0")) == 0  # under DDP one process checks and writes
    if primary:
        _writable(path)
    held = _holds_a_run(path) if primary else []
    checkpoint: str | None = None
    if resume:
        if resume == "auto" or resume is True:
            complete = complete_checkpoints(path)
            if complete:
                checkpoint = str(complete[-1])
            else:
                logger.warning("no complete checkpoint in %s: starting from scratch", output_dir)
        else:
            check_checkpoint(Path(resume), output_dir)
            checkpoint = str(resume)
        if checkpoint is not None:
            check_identity(Path(checkpoint), identity)
            check_saved_files(checkpoint, "checkpoint")  # a truncated or damaged file: say so now
    elif held and not _same_run_started(path, held, identity):
        if not overwrite:
            raise SparseBertError(
                f"output directory {path} already holds a run ({', '.join(held[:4])}"
                f"{', ...' if len(held) > 4 else ''}): pass --overwrite to replace it, --resume to "
                "continue it, or choose another --output-dir"
            )
        for name in held:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(held), path)
    if primary:
        (path / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    return checkpoint


__all__ = [
    "RUN_FILE",
    "check_free_space",
    "check_positive",
    "check_training_numbers",
    "checkpoint_bytes",
    "complete_checkpoints",
    "describe_os_error",
    "prepare_output_dir",
    "run_identity",
]
