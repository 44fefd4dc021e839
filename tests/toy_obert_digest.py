"""oBERT (and gradual SparseGPT) that write, per process, a digest of their statistics and of
the updated weights at every pruning step (to the folder in ``OBERT_DIGEST_DIR``): distributed
tests compare the ranks."""

from __future__ import annotations

import hashlib
import os

import torch

from sparsebert.criteria import CRITERIA
from sparsebert.gradual_sparsegpt import GradualSparseGPT
from sparsebert.obert import OBert


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class DigestOBert(OBert):
    name = "obert-digest"

    def _write(self, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        path = os.path.join(os.environ["OBERT_DIGEST_DIR"], f"rank{os.environ.get('RANK', '0')}.txt")
        with open(path, "a") as f:
            f.write(f"{kind} {self.num_observed} {_digest(tensors)}\n")

    def scores(self, params, masks):
        observed = self.num_observed
        out = super().scores(params, masks)
        self.num_observed = observed
        self._write("scores", out)
        self.num_observed = 0
        return out

    def update_weights(self, params, masks):
        super().update_weights(params, masks)
        self._write("updated", dict(params))


CRITERIA.register("obert-digest", DigestOBert, replace=True)


class DigestSparseGPT(GradualSparseGPT):
    """Gradual SparseGPT that writes, per process, a digest of the Hessians it prunes from and
    of the weights and masks it returns."""

    name = "sparsegpt-digest"

    def solve_masks(self, params, masks, sparsity, allocation, pattern):
        hessians = {n: self._hooks.hessian(n) for n in params}
        out = super().solve_masks(params, masks, sparsity, allocation, pattern)
        path = os.path.join(os.environ["OBERT_DIGEST_DIR"], f"rank{os.environ.get('RANK', '0')}.txt")
        with open(path, "a") as f:
            f.write(f"hessians {sparsity:.4f} {_digest(hessians)}\n")
            solved = {**dict(params), **{k + "#": v for k, v in out.items()}}
            f.write(f"solved {sparsity:.4f} {_digest(solved)}\n")
        return out


CRITERIA.register("sparsegpt-digest", DigestSparseGPT, replace=True)
