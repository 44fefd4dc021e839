"""Sparse INT8 runtime: the format, every INT8 kernel on every instruction set this CPU has
(against an exact integer reference and against the fp32 product), error bounds on random
and real weights, whole models, and `sparsebert evaluate --runtime`."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_runtime import random_batch, require_isa
from tiny_models import tiny_bert
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.runtime import (
    SparseFFNInt8,
    SparseLinearInt8,
    native,
    sparsify_for_inference,
)
from sparsebert.runtime.kernels import ACT_GELU, ACT_NONE
from sparsebert.runtime.quantized import int8_reference, quantize_tokens
from sparsebert.runtime.sparse_format import (
    int8_row_groups_to_dense,
    quantize_rows,
    to_int8_row_groups,
)


@pytest.fixture(params=["avx512-vnni", "avx512", "avx2"])
def int8_isa(request, monkeypatch):
    """Each INT8 kernel family this CPU can run: AVX512-VNNI, AVX-512 with VPDPBUSD emulated
    (the AVX-512 library rebuilt without -mavx512vnni) and AVX2; skipped, saying why, else."""
    name = request.param
    require_isa("avx512" if name.startswith("avx512") else "avx2")
    if name == "avx512-vnni" and not native.cpu_has_vnni():
        pytest.skip("this CPU lacks avx512_vnni: the VNNI kernels cannot run here")
    if name == "avx512" and native.cpu_has_vnni():
        monkeypatch.setattr(native, "cpu_has_vnni", lambda: False)
        monkeypatch.setattr(native, "_library_avx512", native._UNSET)
    monkeypatch.setattr(native, "_isa", name.split("-")[0])
    assert native.int8_isa() == name
    return name


def awkward_weight(n_out: int, n_in: int, panel: int, seed: int = 0) -> np.ndarray:
    """Rows of every length 0..2 panels + 5 (runs of every remainder mod 4 in every panel),
    one dense row, one empty row, values spanning orders of magnitude."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n_out, n_in), np.float32)
    for r in range(n_out):
        k = r % (2 * panel + 6) if r != 1 else n_in
        cols = rng.choice(n_in, size=min(k, n_in), replace=False)
        w[r, cols] = rng.standard_normal(cols.size) * 10.0 ** rng.uniform(-2, 1, cols.size)
    w[2] = 0.0
    return w


def test_int8_format_round_trip_and_padding():
    w = awkward_weight(40, 50, panel=12)
    m = to_int8_row_groups(w, panel=12)
    q, scale = quantize_rows(w)
    assert m.ptr.shape == (5, 41) and m.panel == 12
    assert np.array_equal(int8_row_groups_to_dense(m, dequantize=False), q)
    np.testing.assert_allclose(int8_row_groups_to_dense(m), q * scale[:, None], rtol=0, atol=0)
    assert np.array_equal(m.comp, 128 * q.astype(np.int64).sum(axis=1))
    assert m.nnz == np.count_nonzero(q) and m.values.size % 4 == 0 and m.padding < 0.5
    assert np.all(np.abs(q).max(axis=1)[np.abs(w).max(axis=1) > 0] == 127)  # symmetric per row
    # within a panel a row's groups hold only that panel's columns, ascending
    groups = np.diff(m.ptr.astype(np.int64), axis=1)
    assert groups.sum() == m.n_groups
    with pytest.raises(ValueError, match="2-D"):
        to_int8_row_groups(np.zeros(3, np.float32))


def run_kernel(x: torch.Tensor, m, bias: np.ndarray, act: int) -> np.ndarray:
    out = torch.full((x.shape[0], m.shape[0]), float("nan"))
    native.spmm_int8(x, m, bias, act, out, 2)
    return out.numpy()


@pytest.mark.parametrize("tokens", [1, 31, 64, 97, 200])
@pytest.mark.parametrize("act", [ACT_NONE, ACT_GELU])
def test_int8_product_matches_exact_reference(int8_isa, tokens, act):
    panel = 16
    w = awkward_weight(70, 48, panel)
    m = to_int8_row_groups(w, panel=panel)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 48, generator=gen) * torch.logspace(-2, 1, tokens)[:, None]
    x[0, :] = 0.0  # an all-zero token (scale 0)
    bias = np.linspace(-1, 1, 70).astype(np.float32)
    got = run_kernel(x, m, bias, act)
    want = int8_reference(x.numpy(), m, bias, act)
    # the integer sums are exact; what differs is float32 rounding of the epilogue
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))


def test_int8_product_large_shapes_and_streamed_output(int8_isa):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1536, 384)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    m = to_int8_row_groups(w)
    x = torch.randn(700, 384)
    bias = rng.standard_normal(1536).astype(np.float32)
    got = run_kernel(x, m, bias, ACT_NONE)
    np.testing.assert_allclose(got, int8_reference(x.numpy(), m, bias), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("tokens", [5, 64, 130])
def test_int8_ffn_and_add_norm_match_the_module_steps(int8_isa, tokens):
    torch.manual_seed(tokens)
    first, second = nn.Linear(40, 72), nn.Linear(72, 40)
    with torch.no_grad():
        for lin in (first, second):
            lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.8, 0.0)
    ffn = SparseFFNInt8(first, second)
    x = torch.randn(tokens, 40)
    with torch.inference_mode():
        got = ffn(x).numpy()
        hidden = int8_reference(x.numpy(), ffn.first.groups, ffn.first.bias_natural, ACT_GELU)
        want = int8_reference(hidden, ffn.second.groups, ffn.second.bias_natural)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        norm = nn.LayerNorm(40)
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
        residual = torch.randn(tokens, 40)
        fused = ffn.forward_add_norm(x, residual, norm)
        torch.testing.assert_close(fused, norm(torch.from_numpy(want) + residual), rtol=1e-3, atol=1e-3)
        lin = SparseLinearInt8.from_linear(second)
        h = torch.from_numpy(hidden)
        torch.testing.assert_close(lin.forward_add_norm(h, residual, norm), norm(lin(h) + residual),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_int8_error_against_fp32_on_random_weights(int8_isa, sparsity):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 384)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    x = rng.standard_normal((128, 384)).astype(np.float32)
    bias = np.zeros(256, np.float32)
    got = run_kernel(torch.from_numpy(x), to_int8_row_groups(w), bias, ACT_NONE)
    want = x @ w.T
    # per-row and per-token int8 steps: ~0.4% of each scale, adding up over the dot product
    assert relative_error(got, want) < 0.02
    assert float(np.abs(got - want).mean() / np.abs(want).mean()) < 0.01


@pytest.mark.slow
def test_int8_error_against_fp32_on_real_minilm_weights(int8_isa):
    from transformers import AutoModel, AutoTokenizer

    from sparsebert.models import embedded_model_dir

    path = embedded_model_dir()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a gripping, funny and thoroughly humane film", "the plot is dull and the acting worse"],
                return_tensors="pt", padding=True)  # fmt: skip
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    for layer_index in (0, 3, 5):
        layer = model.encoder.layer[layer_index]
        x = hidden[layer_index].reshape(-1, hidden[layer_index].shape[-1]).contiguous()
        for lin in (layer.attention.self.query, layer.intermediate.dense):
            w = lin.weight.detach().numpy().copy()
            w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0.0  # 90% magnitude pruning
            b = lin.bias.detach().numpy()
            got = run_kernel(x, to_int8_row_groups(w), b, ACT_NONE)
            want = x.numpy() @ w.T + b
            # BERT's hidden states have outlier features (max / rms ~14-18 here), which cost
            # per-token int8 about 2 of its 8 bits: measured 0.5-3.1% of max, 1.2-2.5% mean
            assert relative_error(got, want) < 0.05, (layer_index, lin)
            assert float(np.abs(got - want).mean() / np.abs(want).mean()) < 0.035, (layer_index, lin)


def test_int8_quantize_tokens_is_symmetric_per_token():
    x = np.array([[0.0, 0.0], [1.0, -2.0], [1e-3, 5e-4]], np.float32)
    q, s = quantize_tokens(x)
    assert np.array_equal(q, [[0, 0], [64, -127], [127, 64]])
    np.testing.assert_allclose(s, [0.0, 2.0 / 127, 1e-3 / 127], rtol=1e-6)


@pytest.fixture(params=["native", "reference"])
def int8_backend(request, monkeypatch):
    """The best native INT8 kernels of this CPU, and the torch reference (no native build)."""
    if request.param == "reference":
        monkeypatch.setattr(native, "_library", None)
    else:
        require_isa("avx2")
    return request.param


def test_sparsified_tiny_bert_int8_logits_close_to_fp32(int8_backend):
    model = tiny_bert(0.9)
    sparse = copy.deepcopy(model)
    report = sparsify_for_inference(sparse, min_sparsity=0.5, calibrate=False, dtype="int8")
    assert report.dtype == "int8" and "sparse int8" in report.summary()
    layer = sparse.bert.encoder.layer[0]
    assert isinstance(layer.output.dense, SparseFFNInt8)
    assert isinstance(layer.attention.self.query.group.linear, SparseLinearInt8)
    assert isinstance(layer.attention.output.dense, SparseLinearInt8)
    clone = copy.deepcopy(sparse)
    for batch in (random_batch(), random_batch(batch=1, seq=64, seed=2), random_batch(5, 60, 3)):
        with torch.inference_mode():
            want = model(**batch).logits
            for m in (sparse, clone):
                got = m(**batch).logits
                assert (got - want).abs().max() < 0.05 * want.abs().max() + 1e-3


def test_sparsify_rejects_unknown_dtype():
    with pytest.raises(SparseBertError, match="dtype must be one of float32, int8"):
        sparsify_for_inference(tiny_bert(0.9), calibrate=False, dtype="int4")


def test_prepare_for_runtime_reports_and_refuses():
    from sparsebert.runtime.sparsify import prepare_for_runtime

    model = tiny_bert(0.9)
    assert prepare_for_runtime(copy.deepcopy(model), "torch") == {"runtime": "torch"}
    info = prepare_for_runtime(copy.deepcopy(model), "sparse-int8")
    assert info["runtime"] == "sparse-int8" and info["kernels"] == native.int8_isa()
    assert info["sparse_units"] == 6  # 2 layers x (qkv, attention output, ffn)
    with pytest.raises(SparseBertError, match="no linear layer .* is at least 60% sparse"):
        prepare_for_runtime(tiny_bert(None), "sparse")
    with pytest.raises(SparseBertError, match="cannot run this model: .*float32"):
        prepare_for_runtime(tiny_bert(0.9).double(), "sparse")
    with pytest.raises(SparseBertError, match="unknown runtime"):
        prepare_for_runtime(model, "tensorrt")


def _last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex('{\n  "') :])


def test_evaluate_cli_on_the_sparse_runtimes(tmp_path, sst2_dir, capsys):
    from transformers import AutoTokenizer

    from sparsebert.cli import main
    from sparsebert.models import embedded_model_dir

    model = tiny_bert(0.9, hidden=32, intermediate=64, num_labels=2)
    model.resize_token_embeddings(30522)
    model.config.id2label, model.config.label2id = (
        {0: "negative", 1: "positive"},
        {"negative": 0, "positive": 1},
    )
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(out)
    results = {}
    for runtime in ("torch", "sparse", "sparse-int8"):
        argv = ["evaluate", str(out), "--task", "sst2", "--data-dir", sst2_dir, "--runtime", runtime]
        assert main(argv) == 0
        results[runtime] = _last_json(capsys.readouterr().out)
    assert results["torch"]["runtime"] == {"runtime": "torch"}
    assert (
        results["sparse"]["runtime"]["runtime"] == "sparse"
        and results["sparse"]["runtime"]["sparse_units"] == 6
    )
    assert results["sparse-int8"]["runtime"]["kernels"] == native.int8_isa()
    acc = {k: r["metrics"]["eval_accuracy"] for k, r in results.items()}
    assert acc["sparse"] == acc["torch"]  # float32: the same predictions
    assert abs(acc["sparse-int8"] - acc["torch"]) <= 2 / 32  # 32 dev sentences
    assert results["sparse"]["encoder_linear_sparsity"] == pytest.approx(0.9, abs=0.01)
    # a model with nothing sparse cannot use the runtime: a clear error, exit code 2
    dense = tmp_path / "dense"
    model = tiny_bert(None, hidden=32, intermediate=64, num_labels=2)
    model.resize_token_embeddings(30522)
    model.config.id2label, model.config.label2id = (
        {0: "negative", 1: "positive"},
        {"negative": 0, "positive": 1},
    )
    model.save_pretrained(dense)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(dense)
    assert (
        main(["evaluate", str(dense), "--task", "sst2", "--data-dir", sst2_dir, "--runtime", "sparse"]) != 0
    )
    assert "no linear layer" in capsys.readouterr().err


def test_benchmark_int8_rows_and_ratios(tmp_path, tiny_model_dir, capsys):
    from sparsebert.cli import main
    from sparsebert.runtime.bench import benchmark_model, markdown_table

    result = benchmark_model(tiny_bert(0.9), batches=(2,), seqs=(16,), threads=1, repeats=1, warmup=0,
                             runtimes=("torch", "sparse"), settle_s=0.0, int8=True)  # fmt: skip
    rows = {r["runtime"]: r for r in result["rows"]}
    assert set(rows) == {"torch", "sparse", "sparse-int8", "torch-int8", "onnxruntime-int8"}
    assert [n for n, r in rows.items() if r["dense_int8"]] == ["torch-int8", "onnxruntime-int8"]
    best8 = min(rows["torch-int8"]["median_ms"], rows["onnxruntime-int8"]["median_ms"])
    assert rows["sparse-int8"]["speedup_vs_best_dense_int8"] == pytest.approx(
        best8 / rows["sparse-int8"]["median_ms"]
    )
    assert rows["sparse-int8"]["speedup_vs_best_dense"] == pytest.approx(
        rows["torch"]["median_ms"] / rows["sparse-int8"]["median_ms"])  # fmt: skip
    assert any(d["kind"] == "ffn" and d["sparse"] for d in result["sparse_plans"]["2x16/sparse-int8"])
    assert "2x16/sparse-int8" in result["sparse_time_share"]
    assert "vs best dense int8" in markdown_table(result["rows"]).splitlines()[0]
    # the CLI flag
    argv = ["bench", tiny_model_dir, "--int8", "--batches", "1", "--seqs", "8", "--threads", "1",
            "--repeats", "1", "--runtimes", "torch", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert {r["runtime"] for r in data["rows"]} == {"torch", "sparse-int8", "torch-int8", "onnxruntime-int8"}
    capsys.readouterr()


def test_int8_non_finite_tokens_give_nan_rows_only(int8_isa):
    w = awkward_weight(40, 48, panel=16)
    m = to_int8_row_groups(w, panel=16)
    x = torch.randn(70, 48)
    x[3, 5] = float("nan")
    x[66, 0] = float("inf")
    got = run_kernel(x, m, np.zeros(40, np.float32), ACT_NONE)
    bad = {3, 66}
    assert np.isnan(got[3]).all() and not np.isfinite(got[66]).any()
    ok = [t for t in range(70) if t not in bad]
    np.testing.assert_allclose(
        got[ok], int8_reference(x.numpy()[ok], m, np.zeros(40, np.float32)), rtol=2e-5, atol=1e-4
    )
