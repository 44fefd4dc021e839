"""Sparse CPU runtime: kernel exactness, fused modules, the model swap, the benchmark."""

from __future__ import annotations

import copy
import json
import shutil

import numba
import numpy as np
import pytest
import torch
from tiny_models import tiny_bert
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.runtime import (
    FastGELU,
    GroupSlice,
    SharedInputGroup,
    SparseFFN,
    SparseLinear,
    native,
    sparsify_for_inference,
)
from sparsebert.runtime.bench import benchmark_model, markdown_table, write_json, write_markdown
from sparsebert.runtime.sparse_format import (
    default_panel,
    row_panels_to_dense,
    to_dense,
    to_grouped,
    to_row_panels,
)

RTOL = 1e-4


def require_isa(name: str) -> None:
    """Skip (saying why) unless the native kernels of ``name`` can run here; fail if they
    should but did not build."""
    if native.library() is None:
        if native._cpu_ok() and shutil.which("cc"):
            pytest.fail("AVX2 CPU and a C compiler, but the native kernels did not build")
        pytest.skip("no AVX2 CPU or no C compiler: only the numba kernels can run here")
    if name == "avx512" and "avx512" not in native.available_isas():
        if native.cpu_has_avx512() and shutil.which("cc"):
            pytest.fail("AVX-512 CPU and a C compiler, but the AVX-512 kernels did not build")
        flags = ", ".join(f for f in native.AVX512_FLAGS if f not in native.cpu_flags())
        pytest.skip(f"this CPU lacks {flags or 'x86-64'}: the AVX-512 kernels cannot run here")


@pytest.fixture(params=["native", "native-avx2", "numba"])
def backend(request, monkeypatch):
    """Run a test on the best native kernels of this CPU (AVX-512 where it has it, else
    AVX2), on the AVX2 kernels forced where the best are AVX-512, and on the numba kernels."""
    if request.param == "numba":
        monkeypatch.setattr(native, "_library", None)
    elif request.param == "native-avx2":
        require_isa("avx512")  # else "native" already runs the AVX2 kernels
        monkeypatch.setattr(native, "_isa", "avx2")
    else:
        require_isa("avx2")
    return request.param


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, monkeypatch):
    """Run a test on each native instruction set this CPU has (skipped, saying why, else)."""
    require_isa(request.param)
    monkeypatch.setattr(native, "_isa", request.param)
    return request.param


def sparse_weight(out_f: int, in_f: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    return w.masked_fill(torch.rand(out_f, in_f, generator=gen) < sparsity, 0.0)


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Relative to the output's scale: 1e-4, the runtime's promise."""
    scale = ref.abs().max().clamp_min(1e-6)
    err = float((got - ref).abs().max() / scale)
    assert err <= RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize(
    ("out_f", "in_f", "tokens"),
    [(37, 53, 1), (64, 48, 16), (130, 257, 33), (5, 3, 7), (96, 700, 40), (50, 77, 100), (64, 384, 130)],
)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_sparse_linear_matches_dense(out_f, in_f, tokens, sparsity, backend):
    w = sparse_weight(out_f, in_f, sparsity, seed=out_f + tokens)
    b = torch.randn(out_f)
    x = torch.randn(tokens, in_f)
    with torch.no_grad():
        got = SparseLinear(w, b)(x)
    assert got.shape == (tokens, out_f)
    assert_close(got, x @ w.T + b)


def test_empty_and_dense_rows_no_bias_3d_input(backend):
    w = sparse_weight(50, 40, 0.9, seed=3)
    w[0] = 0.0  # empty row
    w[7] = torch.randn(40)  # fully dense row
    w[:, 5] = 0.0  # empty column
    x = torch.randn(3, 29, 40)
    with torch.no_grad():
        got = SparseLinear(w)(x)
    assert got.shape == (3, 29, 50)
    assert_close(got, x @ w.T)
    assert torch.all(got[..., 0] == 0)


def test_batch_one_and_non_contiguous_input():
    w = sparse_weight(24, 32, 0.8)
    x = torch.randn(32, 5).T  # (5, 32), not contiguous
    with torch.no_grad():
        assert_close(SparseLinear(w)(x[None]), (x @ w.T)[None])


@pytest.mark.parametrize("panel", [4, 17, 64])
def test_input_panels(panel, backend):
    w = sparse_weight(40, 100, 0.7, seed=panel)
    b = torch.randn(40)
    x = torch.randn(121, 100)
    with torch.no_grad():
        assert_close(SparseLinear(w, b, panel=panel)(x), x @ w.T + b)


@pytest.mark.parametrize(("out_f", "tokens"), [(64, 20), (50, 20), (50, 150)])
def test_fused_gelu(out_f, tokens, backend):
    # 50 outputs: the last row group is padded with a repeated row, which must not get GELU twice
    w = sparse_weight(out_f, 32, 0.85)
    b = torch.randn(out_f)
    x = torch.randn(tokens, 32) * 3
    with torch.no_grad():
        got = SparseLinear(w, b, activation="gelu")(x)
    assert_close(got, torch.nn.functional.gelu(x @ w.T + b))


def test_fast_gelu_matches_torch():
    x = torch.cat([torch.linspace(-12, 12, 2000), torch.randn(3000) * 4]).reshape(5, 1000)
    with torch.no_grad():
        got = FastGELU()(x)
    assert got.shape == x.shape
    assert float((got - torch.nn.functional.gelu(x)).abs().max()) < 1e-5


def test_grouped_format_round_trip():
    w = sparse_weight(33, 70, 0.9).numpy()
    for panel in (None, 16):
        sparse = to_grouped(w, panel=panel)
        np.testing.assert_array_equal(to_dense(sparse), w)
        assert sparse.nnz == np.count_nonzero(w)


def test_row_panel_format_round_trip():
    w = sparse_weight(33, 70, 0.9).numpy()
    w[3] = 0.0  # an empty row
    w[5] = 1.5  # a dense row
    for panel in (None, 16, 1, 70):
        sparse = to_row_panels(w, panel=panel)
        np.testing.assert_array_equal(row_panels_to_dense(sparse), w)
        assert sparse.nnz == np.count_nonzero(w) and sparse.indices.dtype == np.uint16
    wide = np.zeros((2, 70000), np.float32)
    wide[1, 69999] = 2.0
    assert to_row_panels(wide).indices.dtype == np.uint32  # too wide for uint16 indices


def test_default_panel_widens_for_very_sparse_rows():
    assert default_panel(1536, 32) == 192  # L1-sized: 192 features x 32 tokens x 4 bytes
    assert default_panel(1536, 32, density=0.03) == 512  # ~16 entries per row and panel
    assert default_panel(384, 32, density=0.5) == 192
    w = sparse_weight(64, 1536, 0.97).numpy()  # the native layout's default panels follow
    assert to_row_panels(w).panel == default_panel(1536, 32, np.count_nonzero(w) / w.size) > 192


@pytest.mark.parametrize("tokens", [40, 200])  # 16- and 32-token tiles (on up to 3 threads)
def test_rows_of_every_length_in_every_panel(tokens, backend):
    # rows with 0..8 entries per 8-feature panel: the 4-entry blocks and every tail length
    gen = np.random.default_rng(3)
    w = np.zeros((48, 32), np.float32)
    for r in range(48):
        for p in range(4):
            cols = gen.choice(8, size=min(8, (r + p) % 12), replace=False) + 8 * p
            w[r, cols] = gen.standard_normal(cols.size)
    w = torch.from_numpy(w)
    b = torch.randn(48)
    x = torch.randn(tokens, 32)
    with torch.no_grad():
        got = SparseLinear(w, b, panel=8)(x)
    assert_close(got, x @ w.T + b)


def test_to_linear_round_trip():
    lin = nn.Linear(30, 20)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.8)
    back = SparseLinear.from_linear(lin).to_linear()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)


@pytest.mark.parametrize("tokens", [3, 200])  # separate products / fused per tile
def test_sparse_ffn(tokens, backend):
    first, second = nn.Linear(32, 128), nn.Linear(128, 32)
    with torch.no_grad():
        for lin in (first, second):
            lin.weight.mul_(torch.rand_like(lin.weight) > 0.9)
    x = torch.randn(tokens, 32)
    with torch.no_grad():
        ref = second(torch.nn.functional.gelu(first(x)))
        assert_close(SparseFFN(first, second)(x), ref)


def test_shared_input_group_slices():
    lins = [nn.Linear(16, n) for n in (16, 16, 8)]
    group = SharedInputGroup(lins)
    slots = [GroupSlice(group, i) for i in range(3)]
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        outs = [s(x) for s in slots]
        mixed = [slots[0](x), slots[1](y), slots[2](x)]  # any call pattern is correct
        for out, lin in zip(outs, lins, strict=True):
            assert_close(out, lin(x))
        assert_close(mixed[1], lins[1](y))
        assert_close(mixed[2], lins[2](x))


def test_inference_only():
    lin = SparseLinear(sparse_weight(8, 8, 0.5))
    with pytest.raises(RuntimeError, match="inference-only"):
        lin(torch.randn(2, 8, requires_grad=True))


def test_threads_follow_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            SparseLinear(sparse_weight(8, 8, 0.5))(torch.randn(40, 8))
        assert numba.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # starting numba's pool must not change torch's
    finally:
        torch.set_num_threads(before)


def random_batch(batch: int = 2, seq: int = 24, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=gen), "attention_mask": mask}


def test_sparsified_tiny_bert_gives_same_logits(backend):
    model = tiny_bert(0.9)
    sparse = copy.deepcopy(model)
    report = sparsify_for_inference(sparse, min_sparsity=0.5, calibrate=False)
    kinds = {d.kind for d in report.decisions if d.sparse}
    assert kinds - {"attention", "add-norm"} == {"shared-input", "linear", "ffn"}
    layer = sparse.bert.encoder.layer[0]
    # the fused feed-forward block sits in the output block (with its add & norm when the
    # native kernels run); the intermediate block passes its input through
    assert isinstance(layer.output.dense, SparseFFN) and isinstance(layer.intermediate.dense, nn.Identity)
    assert isinstance(layer.attention.self.query, GroupSlice)
    assert isinstance(sparse.bert.pooler.dense, nn.Linear)  # dense stays dense
    clone = copy.deepcopy(sparse)  # shared-input groups survive copying
    # 48 tokens: products one by one; 64 and 300: the one-pass add & norm kernels (16/32 lanes)
    for batch in (random_batch(), random_batch(batch=1, seq=64, seed=2), random_batch(5, 60, 3)):
        with torch.inference_mode():
            assert_close(sparse(**batch).logits, model(**batch).logits)
            assert_close(clone(**batch).logits, model(**batch).logits)


def test_dense_ffn_gets_fast_gelu():
    model = tiny_bert(0.5)
    fast = copy.deepcopy(model)
    report = sparsify_for_inference(fast, min_sparsity=0.99, calibrate=False)
    assert not any(d.sparse for d in report.decisions if d.kind not in ("gelu", "attention", "add-norm"))
    assert isinstance(fast.bert.encoder.layer[0].intermediate.intermediate_act_fn, FastGELU)
    assert isinstance(fast.bert.encoder.layer[0].intermediate.dense, nn.Linear)
    batch = random_batch()
    with torch.inference_mode():
        assert_close(fast(**batch).logits, model(**batch).logits)


def test_calibration_keeps_dense_layers_dense():
    model = tiny_bert(0.9)
    with torch.no_grad():  # make layer 1's feed-forward dense again
        layer = model.bert.encoder.layer[1]
        for lin in (layer.intermediate.dense, layer.output.dense):
            lin.weight.copy_(torch.randn_like(lin.weight) * 0.02)
    sparse = copy.deepcopy(model)
    report = sparsify_for_inference(sparse, sample_tokens=64, repeats=2)
    assert "timed" in report.summary()
    assert isinstance(sparse.bert.encoder.layer[1].output.dense, nn.Linear)
    batch = random_batch()
    with torch.inference_mode():
        assert_close(sparse(**batch).logits, model(**batch).logits)


def test_sparsify_rejects_bad_input():
    with pytest.raises(SparseBertError, match="min_sparsity"):
        sparsify_for_inference(tiny_bert(0.5), min_sparsity=1.5)
    with pytest.raises(SparseBertError, match="float32 model on the CPU"):
        sparsify_for_inference(tiny_bert(0.5).half())


def test_benchmark_model_and_writers(tmp_path):
    model = tiny_bert(0.9)
    result = benchmark_model(
        model, batches=(1,), seqs=(16,), threads=1, repeats=2, warmup=1,
        runtimes=("torch", "sparse", "onnxruntime"),
    )  # fmt: skip
    rows = result["rows"]
    assert {r["runtime"] for r in rows} == {"torch", "sparse", "onnxruntime"}
    best = min(r["median_ms"] for r in rows if r["dense"])
    for r in rows:
        assert r["median_ms"] > 0 and r["throughput"] > 0
        assert r["speedup_vs_best_dense"] == pytest.approx(best / r["median_ms"])
    assert 0.85 < result["encoder_sparsity"] < 0.95
    malloc = result["settings"]["malloc"]  # glibc keeps freed memory: no page-fault noise
    assert malloc == "system default" or malloc.startswith("glibc, trim and mmap thresholds")
    data = json.loads(write_json(result, tmp_path / "r.json").read_text())
    assert data["rows"] == rows
    text = write_markdown(result, tmp_path / "r.md").read_text()
    assert markdown_table(rows).splitlines()[0] in text
    with pytest.raises(SparseBertError, match="unknown runtime"):
        benchmark_model(model, runtimes=("tensorrt",))


@pytest.mark.parametrize("kind", ["linear", "ffn"])  # attention output / feed-forward block
@pytest.mark.parametrize("tokens", [5, 70, 300])  # too few tiles / 16- / 32-token tiles
def test_sparse_output_block_adds_and_normalises_in_the_kernel(kind, tokens, backend):
    from sparsebert.runtime.add_norm import FusedAddNorm
    from sparsebert.runtime.sparse_linear import sync_threads, tiles_for_every_thread

    ln = nn.LayerNorm(77, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    h, residual = torch.randn(tokens, 50), torch.randn(tokens, 77) * 2
    if kind == "linear":
        w, b = sparse_weight(77, 50, 0.85), torch.randn(77)
        dense = SparseLinear(w, b)
        product = h @ w.T + b
    else:
        first, second = nn.Linear(50, 120), nn.Linear(120, 77)
        with torch.no_grad():
            for lin in (first, second):
                lin.weight.mul_(torch.rand_like(lin.weight) > 0.85)
        dense = SparseFFN(first, second)
        with torch.no_grad():
            product = second(torch.nn.functional.gelu(first(h)))
    block = FusedAddNorm(dense, ln)
    with torch.inference_mode():
        got = block(h.reshape(1, tokens, 50), residual.reshape(1, tokens, 77))
        ref = ln(product + residual).reshape(1, tokens, 77)
        fused = dense.forward_add_norm(h, residual, ln)
    assert_close(got, ref)
    # the one-pass kernel runs wherever the native kernels serve the product
    assert (fused is not None) == (backend != "numba" and tiles_for_every_thread(tokens, sync_threads()))
    if fused is not None:
        assert_close(fused, ref.reshape(tokens, 77))


def test_fused_add_norm_matches_torch_and_finds_output_blocks(backend):
    from sparsebert.runtime.add_norm import FusedAddNorm, is_output_block

    dense, ln = nn.Linear(50, 77), nn.LayerNorm(77)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    h, residual = torch.randn(3, 11, 50), torch.randn(3, 11, 77)
    with torch.inference_mode():
        assert_close(FusedAddNorm(dense, ln)(h, residual), ln(dense(h) + residual))
    layer = tiny_bert(0.0).bert.encoder.layer[0]
    assert is_output_block(layer.attention.output) and is_output_block(layer.output)
    assert not is_output_block(layer.intermediate) and not is_output_block(layer.attention.self)


def test_keep_freed_memory_sets_glibc_trim_and_mmap_thresholds(monkeypatch):
    # The effect (no re-faulting of freed tensors) depends on the process's address space
    # layout, so it is measured in the benchmark, not asserted here; this checks the call.
    from sparsebert.runtime import allocator

    calls = []

    class Libc:
        def __init__(self, ok):
            self.ok = ok

        def mallopt(self, param, value):
            calls.append((param, value))
            return self.ok

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc(1))
    assert allocator.keep_freed_memory() == "glibc, trim and mmap thresholds 256 MiB"
    assert calls == [(-1, 256 * 1024 * 1024), (-3, 256 * 1024 * 1024)]  # M_TRIM_, M_MMAP_THRESHOLD
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc(0))
    assert allocator.keep_freed_memory() == "system default"

    def no_libc(name):
        raise OSError(name)

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert allocator.keep_freed_memory() == "system default"


def test_time_share_counts_nested_sparse_units_once():
    import time

    from sparsebert.runtime.add_norm import FusedAddNorm
    from sparsebert.runtime.bench import sparse_time_share

    class SlowSparse(SparseLinear):  # 50 ms inside the sparse unit, run unfused
        def forward_add_norm(self, *args):
            return None

        def forward(self, x):
            time.sleep(0.05)
            return super().forward(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = FusedAddNorm(SlowSparse(sparse_weight(16, 16, 0.9)), nn.LayerNorm(16))

        def forward(self, x, r):
            time.sleep(0.01)  # outside: the rest of the model
            return self.block(x, r)

    share = sparse_time_share(Model(), {"x": torch.randn(4, 16), "r": torch.randn(4, 16)}, runs=3)
    # once, not twice (block + dense: >= 0.1 s); the margin absorbs sleep overshoot on a busy machine
    assert 0.05 <= share["sparse_kernels_ms"] / 1e3 < 0.08
    assert share["rest_ms"] / 1e3 >= 0.009
    assert share["total_ms"] == pytest.approx(share["sparse_kernels_ms"] + share["rest_ms"])


# --- the native kernels directly, on each instruction set this CPU has (AVX-512 and AVX2) ---


def awkward_weight(n_out: int, n_in: int, panel: int, seed: int = 0) -> torch.Tensor:
    """Rows with every run length 0..panel in every panel: empty runs, runs shorter than
    the kernels' 4-entry blocks, whole blocks plus every tail length, full panels; and a
    last panel narrower than the others when ``panel`` does not divide ``n_in``."""
    gen = np.random.default_rng(seed)
    w = np.zeros((n_out, n_in), np.float32)
    for r in range(n_out):
        for p0 in range(0, n_in, panel):
            width = min(panel, n_in - p0)
            count = (r + p0 // panel) % (width + 1)
            cols = gen.choice(width, size=count, replace=False) + p0
            w[r, cols] = gen.standard_normal(count)
    return torch.from_numpy(w)


TILE_TOKENS = [1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 300]
"""One token, tails of 16-, 32- and 64-token tiles (and of 8-token transpose groups),
whole tiles, many tiles."""


@pytest.mark.parametrize("tokens", TILE_TOKENS)
@pytest.mark.parametrize("lanes", [16, 32, 64])
def test_native_product_every_row_length_and_tile_tail(isa, lanes, tokens):
    # 37 inputs and 45 outputs: neither a multiple of 8 (transpose tails on both sides)
    w = awkward_weight(45, 37, panel=9, seed=tokens)
    m = to_row_panels(w.numpy(), panel=9)
    b, x = torch.randn(45), torch.randn(tokens, 37) * 2
    out = torch.full((tokens, 45), float("nan"))
    if isa == "avx2" and lanes == 64:  # 64-token tiles are the AVX-512 kernels' only
        with pytest.raises(ValueError, match="rejected its arguments"):
            native.spmm(x, m, b.numpy(), 0, out, 2, lanes)
        return
    ln = nn.LayerNorm(45, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    residual = torch.randn(tokens, 45)
    ref = torch.nn.functional.linear(x, w, b)
    with torch.no_grad():
        native.spmm(x, m, b.numpy(), 0, out, 2, lanes)
        assert_close(out, ref)
        native.spmm(x, m, b.numpy(), 1, out, 2, lanes)  # fused exact GELU
        assert_close(out, torch.nn.functional.gelu(ref))
        native.spmm(x, m, b.numpy(), 0, out, 2, lanes, add_norm=(residual, ln.weight, ln.bias, ln.eps))
        assert_close(out, ln(ref + residual))


@pytest.mark.parametrize("tokens", TILE_TOKENS)
@pytest.mark.parametrize("lanes", [16, 32, 64])
def test_native_ffn_every_row_length_and_tile_tail(isa, lanes, tokens):
    w1, w2 = awkward_weight(75, 37, panel=9, seed=1), awkward_weight(45, 75, panel=16, seed=2)
    m1, m2 = to_row_panels(w1.numpy(), panel=9), to_row_panels(w2.numpy(), panel=16)
    b1, b2, x = torch.randn(75), torch.randn(45), torch.randn(tokens, 37)
    ln = nn.LayerNorm(45)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    residual = torch.randn(tokens, 45)
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    out = torch.full((tokens, 45), float("nan"))
    if isa == "avx2" and lanes == 64:  # 64-token tiles are the AVX-512 kernels' only
        with pytest.raises(ValueError, match="rejected its arguments"):
            native.ffn(x, m1, b1.numpy(), m2, b2.numpy(), out, 2, lanes)
        return
    with torch.no_grad():
        native.ffn(x, m1, b1.numpy(), m2, b2.numpy(), out, 2, lanes)
        assert_close(out, ref)
        native.ffn(x, m1, b1.numpy(), m2, b2.numpy(), out, 2, lanes,
                   add_norm=(residual, ln.weight, ln.bias, ln.eps))  # fmt: skip
        assert_close(out, ln(ref + residual))


@pytest.mark.parametrize("n_out", [544, 552])  # whole 64-byte lines (streamed) / not
def test_native_product_many_tokens_and_a_large_output(isa, n_out):
    # 2048 x 544 floats is over 4 MiB: the AVX-512 kernel writes it with streaming stores
    w = sparse_weight(n_out, 96, 0.9, seed=n_out)
    b, x = torch.randn(n_out), torch.randn(2048, 96)
    m = to_row_panels(w.numpy())
    out = torch.full((2048, n_out), float("nan"))
    lanes = native.lanes_for(2048, 2)
    assert lanes == (64 if isa == "avx512" else 32)
    native.spmm(x, m, b.numpy(), 0, out, 2, lanes)
    assert_close(out, torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("n_cols", [1, 15, 16, 17, 77, 384])  # masked zmm tails
def test_native_add_layernorm(isa, n_cols):
    x, residual = torch.randn(9, n_cols), torch.randn(9, n_cols)
    ln = nn.LayerNorm(n_cols, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
        got = native.add_layernorm(x, residual, ln.weight, ln.bias, ln.eps, 2)
        assert_close(got, ln(x + residual))


def test_tile_width_follows_the_instruction_set(isa):
    if isa == "avx512":  # 64-token tiles when every thread gets one
        got = [native.lanes_for(n, 2) for n in (2048, 128, 127, 64, 63, 32, 5)]
        assert got == [64, 64, 32, 32, 16, 16, 16]
    else:  # unchanged: 32-token tiles when every thread gets two
        assert [native.lanes_for(n, 2) for n in (2048, 128, 127, 5)] == [32, 32, 16, 16]


def test_instruction_set_choice(monkeypatch, caplog):
    require_isa("avx2")
    best = native.available_isas()[0]
    assert native.available_isas() == (["avx512", "avx2"] if native.cpu_has_avx512() else ["avx2"])
    monkeypatch.setattr(native, "_isa", native._UNSET)
    monkeypatch.setenv("SPARSEBERT_ISA", "avx2")
    assert native.isa() == "avx2"  # forced, e.g. to compare both on an AVX-512 CPU
    monkeypatch.setattr(native, "_isa", native._UNSET)
    monkeypatch.setenv("SPARSEBERT_ISA", "sse")
    assert native.isa() == best and "not one of" in caplog.text
    with pytest.raises(ValueError, match="cannot run here"):
        native.set_isa("sse")
    assert native.set_isa("avx2") == best and native.isa() == "avx2"
    with native.using_isa(best):
        assert native.isa() == best
    assert native.isa() == "avx2"
    native.set_isa(None)
    monkeypatch.delenv("SPARSEBERT_ISA")
    assert native.isa() == best


def test_benchmark_runs_both_instruction_sets():
    require_isa("avx512")
    result = benchmark_model(tiny_bert(0.9), batches=(1,), seqs=(16,), threads=1, repeats=1,
                             warmup=0, runtimes=("sparse", "sparse-avx2"))  # fmt: skip
    assert {r["runtime"] for r in result["rows"]} == {"sparse", "sparse-avx2"}
    assert result["machine"]["kernel_isa"] == "avx512" and "avx512f" in result["machine"]["simd"]
    assert set(result["sparse_plans"]) == {"1x16", "1x16/sparse-avx2"}
    assert native.isa() == "avx512"  # the forced AVX2 runs leave the choice as it was
