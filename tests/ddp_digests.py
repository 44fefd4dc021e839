"""A two-process (gloo) `sparsebert prune` run with the digest criteria of `toy_obert_digest`
loaded as a plugin: each rank writes what it pruned from; the tests compare the ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def two_process_prune(model_dir: str, sst2_dir: str, tmp_path: Path, recipe: str, sparsity: float,
                      settings: list[str], port: int) -> tuple[str, list[list[str]]]:
    """Run the prune and return its output folder and each rank's digest lines."""
    out, digests = str(tmp_path / f"ddp-{recipe}"), tmp_path / "digests"
    digests.mkdir()
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "OBERT_DIGEST_DIR": str(digests),
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    sets = [x for s in settings for x in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sparsebert.cli", "prune", "--plugin", "toy_obert_digest", "--recipe", recipe,
           "--task", "sst2", "--data-dir", sst2_dir, "--model", model_dir, "--sparsity", str(sparsity),
           *sets, "--set", "schedule.start=0.2", "--set", "schedule.frequency=0.2", "--output-dir", out,
           "--max_steps", "6", "--per_device_train_batch_size", "8", "--use_cpu", "true",
           "--ddp_backend", "gloo", "--save_strategy", "no", "--max-eval-samples", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [(digests / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
