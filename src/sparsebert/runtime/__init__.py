"""Fast sparse inference on the CPU.

`sparsify_for_inference` swaps sparse kernels (`SparseLinear`, and fused `SparseFFN` /
shared-input groups; native AVX-512 or AVX2 kernels, numba where those cannot be built) into
a model wherever calibration shows they are faster than the dense kernels; with
``dtype="int8"`` sparse INT8 ones (`SparseLinearInt8`, `SparseFFNInt8`: int8 weights per
output row, activations quantised per token, int32 sums; AVX512-VNNI / AVX-512 / AVX2).
`benchmark_model` (in `sparsebert.runtime.bench`) measures the result against PyTorch and
ONNX Runtime (and their dynamic INT8 quantisation with ``int8=True``).
`keep_freed_memory` stops glibc from handing freed tensors back to the OS between ops.
"""

from sparsebert.runtime.activation import FastGELU
from sparsebert.runtime.allocator import keep_freed_memory
from sparsebert.runtime.fused import GroupSlice, SharedInputGroup, SparseFFN
from sparsebert.runtime.quantized import SparseFFNInt8, SparseLinearInt8
from sparsebert.runtime.sparse_linear import SparseLinear
from sparsebert.runtime.sparsify import Decision, SparsifyReport, sparsify_for_inference

__all__ = [
    "Decision",
    "FastGELU",
    "GroupSlice",
    "SharedInputGroup",
    "SparseFFN",
    "SparseFFNInt8",
    "SparseLinear",
    "SparseLinearInt8",
    "SparsifyReport",
    "keep_freed_memory",
    "sparsify_for_inference",
]
