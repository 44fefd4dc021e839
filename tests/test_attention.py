"""Native CPU attention: exact against torch's sdpa, masks, fallbacks, and the model switch."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from tiny_models import tiny_bert

from sparsebert.runtime import native, sparsify_for_inference
from sparsebert.runtime.attention import NAME, cpu_attention, use_native_attention


@pytest.fixture(autouse=True, params=["best", "avx2"])
def native_kernels(request, monkeypatch):
    """Every test on the best native kernels of this CPU (AVX-512 where it has it: head
    widths not a multiple of 16 still go to the AVX2 kernel) and, on an AVX-512 CPU, on
    the AVX2 kernels forced."""
    if native.library() is None:
        if native._cpu_ok() and shutil.which("cc"):
            pytest.fail("AVX2 CPU and a C compiler, but the native kernels did not build")
        pytest.skip("no AVX2 CPU or no C compiler: the native attention cannot run here")
    if request.param == "avx2":
        if native.isa() != "avx512":
            pytest.skip("the best kernels here are the AVX2 ones: covered by the 'best' run")
        monkeypatch.setattr(native, "_isa", "avx2")
    return request.param


def projections(b: int, s: int, h: int, d: int, seed: int = 0):
    """q, k, v as the model makes them: (B, H, S, D) transposed views of one (B, S, 3HD) tensor."""
    x = torch.randn(b, s, 3 * h * d, generator=torch.Generator().manual_seed(seed))
    return [x[..., i * h * d:(i + 1) * h * d].view(b, s, h, d).transpose(1, 2) for i in range(3)]


def reference(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


class _Module(torch.nn.Module):
    is_causal = False


@pytest.mark.parametrize(("b", "s", "h", "d"), [(3, 37, 4, 16), (2, 128, 2, 32), (1, 5, 1, 64)])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "full-bool", "float"])
def test_matches_sdpa(b, s, h, d, mask_kind):
    q, k, v = projections(b, s, h, d)
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool)
    keep[-1, ..., s // 2 + 1:] = False
    mask = {
        "none": None,
        "padding": keep,
        "full-bool": (keep.expand(b, 1, s, s) & (torch.rand(b, 1, s, s) > 0.3))
        | torch.eye(s, dtype=torch.bool),
        "float": torch.randn(b, 1, s, s),
    }[mask_kind]
    with torch.inference_mode():
        got, weights = cpu_attention(_Module(), q, k, v, mask, scaling=d**-0.5)
        ref = reference(q, k, v, mask)
    assert weights is None and got.shape == (b, s, h, d) and got.is_contiguous()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize(("s", "d"), [(1, 8), (7, 24), (13, 40), (20, 48), (9, 96), (5, 136), (300, 32)])
def test_every_head_width_and_chunking_path(s, d):
    # head widths: register-blocked specialisations (8 .. 96) and the generic path (40, 136);
    # 300 queries: the score rows are processed in two chunks
    q, k, v = projections(2, s, 3, d, seed=s)
    keep = torch.ones(2, 1, 1, s, dtype=torch.bool)
    keep[0, ..., s // 2 + 1:] = False
    with torch.inference_mode():
        got, _ = cpu_attention(_Module(), q, k, v, keep, scaling=d**-0.5)
        ref = reference(q, k, v, keep)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_fewer_keys_than_queries():
    q = projections(2, 11, 2, 16, seed=1)[0]
    _, k, v = projections(2, 5, 2, 16, seed=2)
    with torch.inference_mode():
        got = native.attention(q, k, v, None, 0.25, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_scaling_is_applied():
    q, k, v = projections(2, 20, 2, 8)
    with torch.inference_mode():
        got, _ = cpu_attention(_Module(), q, k, v, None, scaling=0.3)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2)
    assert float((got - ref).abs().max()) < 1e-5


def test_a_row_masked_everywhere_gives_zeros_not_nan():
    q, k, v = projections(1, 9, 1, 8)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    mask[0, 0, 4] = False
    with torch.inference_mode():
        got, _ = cpu_attention(_Module(), q, k, v, mask)
    assert torch.all(got[0, 4] == 0) and not torch.isnan(got).any()


def test_falls_back_to_sdpa_when_autograd_or_odd_head_width_needs_it():
    q, k, v = projections(2, 10, 2, 8)
    q.requires_grad_(True)
    out, _ = cpu_attention(_Module(), q, k, v, None)
    assert out.grad_fn is not None  # sdpa ran: the native kernel gives no gradient
    q6, k6, v6 = projections(2, 10, 2, 6)
    with torch.inference_mode():
        got, _ = cpu_attention(_Module(), q6, k6, v6, None)
    assert torch.allclose(got, reference(q6, k6, v6, None), atol=1e-6)
    q0 = projections(1, 4, 1, 8)[0]
    k0, v0 = torch.zeros(1, 1, 0, 8), torch.zeros(1, 1, 0, 8)  # no keys at all: sdpa's answer
    with torch.inference_mode():
        got, _ = cpu_attention(_Module(), q0, k0, v0, None)
    assert torch.equal(got.isnan(), reference(q0, k0, v0, None).isnan()) and got.shape == (1, 4, 1, 8)


def test_model_switch_gives_the_same_logits():
    model = tiny_bert(intermediate=128, num_labels=2)
    fast = copy.deepcopy(model)
    assert use_native_attention(fast) and fast.config._attn_implementation == NAME
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, 11:] = 0
    batch = {"input_ids": torch.randint(0, 100, (3, 30)), "attention_mask": mask}
    with torch.inference_mode():
        ref, got = model(**batch).logits, fast(**batch).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_sparsify_reports_the_attention_decision():
    model = tiny_bert(intermediate=128, num_labels=2)
    report = sparsify_for_inference(model, calibrate=False)
    decision = [d for d in report.decisions if d.kind == "attention"]
    assert len(decision) == 1 and decision[0].sparse
    assert model.config._attn_implementation == NAME
    assert "[attention]: native kernel" in report.summary()


@pytest.mark.parametrize("d", [16, 24, 32])
def test_head_widths_go_to_the_kernel_that_serves_them(native_kernels, d):
    # AVX-512: head widths that are a multiple of 16; any other multiple of 8 goes to AVX2;
    # without AVX-512 (or with AVX2 forced) every width goes to AVX2
    q, k, v = projections(2, 19, 3, d, seed=d)

    def direct(lib):
        out = torch.empty(2, 19, 3, d)
        strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
        rc = lib.sb_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), 2, 3, 19, 19, d,
                              *(s.data_ptr() for s in strides), None, 0, 0, 0.3,
                              out.data_ptr(), 2)  # fmt: skip
        return rc, out

    with torch.inference_mode():
        got = native.attention(q, k, v, None, 0.3, 2)
        rc2, out2 = direct(native.library())
        if native.isa() == "avx512":
            rc512, out512 = direct(native.library_avx512())
    assert rc2 == 0
    if native.isa() == "avx512":
        assert rc512 == (0 if d % 16 == 0 else -2)
        assert torch.equal(got, out512 if d % 16 == 0 else out2)
    else:
        assert torch.equal(got, out2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
