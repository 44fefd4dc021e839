"""Fast sparse inference on the CPU.

`sparsify_for_inference` swaps numba sparse kernels (`SparseLinear`, and fused
`SparseFFN` / shared-input groups) into a model wherever calibration shows they are faster
than the dense kernels; `benchmark_model` (in `sparsebert.runtime.bench`) measures the
result against PyTorch and ONNX Runtime.
"""

from sparsebert.runtime.activation import FastGELU
from sparsebert.runtime.fused import GroupSlice, SharedInputGroup, SparseFFN
from sparsebert.runtime.sparse_linear import SparseLinear
from sparsebert.runtime.sparsify import Decision, SparsifyReport, sparsify_for_inference

__all__ = [
    "Decision",
    "FastGELU",
    "GroupSlice",
    "SharedInputGroup",
    "SparseFFN",
    "SparseLinear",
    "SparsifyReport",
    "sparsify_for_inference",
]
