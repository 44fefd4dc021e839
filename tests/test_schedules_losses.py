"""The cubic schedule, LR re-warming and the KD loss against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsebert.errors import SparseBertError
from sparsebert.losses import kd_loss
from sparsebert.schedules import GradualSchedule, cubic_ramp, cubic_sparsity, rewarm_lr_lambda


def test_cubic_formula_values():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3
    assert cubic_sparsity(0, 0, 100, 0.7, 0.9) == pytest.approx(0.7)
    assert cubic_sparsity(50, 0, 100, 0.7, 0.9) == pytest.approx(0.9 + (0.7 - 0.9) * 0.125)
    assert cubic_sparsity(25, 0, 100, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.75**3))
    assert cubic_sparsity(100, 0, 100, 0.7, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(150, 0, 100, 0.7, 0.9) == pytest.approx(0.9)


def test_gradual_schedule_steps_and_hold():
    sch = GradualSchedule(0.9, init_sparsity=0.7, start=0.0, end=0.7, frequency=0.1)
    steps = sch.pruning_steps(1000)
    assert steps == [0, 100, 200, 300, 400, 500, 600, 700]
    assert sch.sparsity_at(0, 1000) == pytest.approx(0.7)
    assert sch.sparsity_at(150, 1000) == pytest.approx(0.9 - 0.2 * (1 - 100 / 700) ** 3)  # held
    assert sch.sparsity_at(700, 1000) == pytest.approx(0.9)
    assert sch.sparsity_at(999, 1000) == pytest.approx(0.9)
    # the fractions scale with the run: twice the steps, twice the spacing, same values
    assert sch.pruning_steps(2000) == [2 * s for s in steps]
    assert sch.sparsity_at(300, 1000) == pytest.approx(sch.sparsity_at(600, 2000))
    # a first step never overshoots a lower target
    assert GradualSchedule(0.5, init_sparsity=0.7).sparsity_at(0, 100) == pytest.approx(0.5)


def test_schedule_validation():
    with pytest.raises(SparseBertError, match="start <= end"):
        GradualSchedule(0.9, start=0.8, end=0.5)
    with pytest.raises(SparseBertError, match=r"\[0, 1\)"):
        GradualSchedule(1.2)


def test_lr_rewarm_jumps_to_peak_at_each_pruning_step():
    f = rewarm_lr_lambda([0, 10, 20], total_steps=40, final_ratio=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(1 - 0.9 * 0.5)
    assert f(9) == pytest.approx(1 - 0.9 * 0.9)
    assert f(10) == pytest.approx(1.0)  # re-warmed
    assert f(20) == pytest.approx(1.0)
    assert f(30) == pytest.approx(1 - 0.9 * 0.5)  # last segment decays to the end
    g = rewarm_lr_lambda([0, 10], total_steps=20, warmup_steps=4, final_ratio=0.1)
    assert g(1) == pytest.approx((1 - 0.09) * 0.5)


def test_cubic_ramp():
    assert cubic_ramp(0, 0, 10, 400) == 0
    assert cubic_ramp(5, 0, 10, 400) == pytest.approx(400 * (1 - 0.5**3))
    assert cubic_ramp(11, 0, 10, 400) == 400


def _reference_kd(zs, zt, y, h, T):
    ps = torch.softmax(zs / T, -1)
    pt = torch.softmax(zt / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = -torch.log_softmax(zs, -1)[torch.arange(len(y)), y].mean()
    return (1 - h) * ce + h * T**2 * kl


@pytest.mark.parametrize("h,T", [(1.0, 2.0), (0.5, 2.0), (0.0, 1.0), (0.3, 5.5)])
def test_kd_loss_equals_formula(h, T):
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) * 2
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert kd_loss(zs, zt, y, h, T).item() == pytest.approx(_reference_kd(zs, zt, y, h, T).item(), rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_has_t2_scale():
    # seeded, float64: unseeded float32 logits made the 1e-5 check fail on rounding now and then
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 2, generator=g, dtype=torch.float64)
    assert kd_loss(z, z.clone(), None, 1.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    zs = torch.randn(4, 2, generator=g, dtype=torch.float64)
    zt = torch.randn(4, 2, generator=g, dtype=torch.float64)
    manual = F.kl_div(F.log_softmax(zs / 4, -1), F.softmax(zt / 4, -1), reduction="batchmean") * 16
    assert kd_loss(zs, zt, None, 1.0, 4.0).item() == pytest.approx(manual.item(), rel=1e-5)
    assert math.isfinite(kd_loss(zs, zt, torch.tensor([0, 1, 0, 1]), 0.5, 2.0).item())


def test_kd_loss_regression_and_shape_check():
    zs, zt, y = torch.randn(5, 1), torch.randn(5, 1), torch.randn(5)
    expected = 0.5 * F.mse_loss(zs.squeeze(-1), y) + 0.5 * F.mse_loss(zs, zt)
    assert kd_loss(zs, zt, y, 0.5, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same task head"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 2), None)
