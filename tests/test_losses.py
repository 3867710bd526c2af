"""Losses against direct (loop) formulas on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapkit.errors import GapkitError
from gapkit.losses import (
    GapLoss,
    alignment_loss,
    alpha_schedule,
    atp_loss,
    beta_schedule,
    clip_loss,
    cu_loss,
    gather_features,
    parse_loss,
    uniformity_loss,
)


def _unit_np(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _clip_direct(x: np.ndarray, y: np.ndarray, s: float) -> float:
    x, y = _unit_np(x), _unit_np(y)
    b = len(x)
    i2t = t2i = 0.0
    for i in range(b):
        li = [s * float(x[i] @ y[j]) for j in range(b)]
        i2t += -(li[i] - math.log(sum(math.exp(v) for v in li)))
        lt = [s * float(y[i] @ x[j]) for j in range(b)]
        t2i += -(lt[i] - math.log(sum(math.exp(v) for v in lt)))
    return 0.5 * (i2t / b + t2i / b)


def _unif_direct(z: np.ndarray) -> float:
    b = len(z)
    vals = [math.exp(-2 * float(((z[i] - z[j]) ** 2).sum())) for i in range(b) for j in range(i + 1, b)]
    return math.log(sum(vals) / len(vals))


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(7, 5, generator=g, dtype=torch.float64) * 3, torch.randn(7, 5, generator=g, dtype=torch.float64) + 1


def test_clip_matches_direct_formula(xy):
    x, y = xy
    for s in (1.0, 1 / 0.07, 100.0):
        assert float(clip_loss(x, y, s)) == pytest.approx(_clip_direct(x.numpy(), y.numpy(), s), rel=1e-9)


def test_atp_and_alignment_match_direct_formula(xy):
    x, y = xy
    xn, yn = _unit_np(x.numpy()), _unit_np(y.numpy())
    direct = np.mean([((xn[i] - yn[i]) ** 2).sum() for i in range(len(xn))])
    assert float(atp_loss(x, y)) == pytest.approx(direct, rel=1e-12)
    assert float(alignment_loss(x, y)) == pytest.approx(direct, rel=1e-12)
    # ‖x−y‖² = 2 − 2cos on the sphere
    cos = np.mean([(xn[i] * yn[i]).sum() for i in range(len(xn))])
    assert float(atp_loss(x, y)) == pytest.approx(2 - 2 * cos, rel=1e-12)
    d1 = np.mean([np.linalg.norm(xn[i] - yn[i]) for i in range(len(xn))])
    assert float(alignment_loss(x, y, alpha=1.0)) == pytest.approx(d1, rel=1e-12)


def test_cu_matches_direct_formula(xy):
    x, y = xy
    xn, yn = _unit_np(x.numpy()), _unit_np(y.numpy())
    mu = _unit_np((xn + yn) / 2)
    assert float(cu_loss(x, y)) == pytest.approx(_unif_direct(mu), rel=1e-10)


def test_uniformity_matches_direct_formula(xy):
    x, _ = xy
    assert float(uniformity_loss(x)) == pytest.approx(_unif_direct(_unit_np(x.numpy())), rel=1e-10)


def test_losses_scale_invariant_and_normalise_inside(xy):
    x, y = xy
    assert float(cu_loss(5 * x, 0.1 * y)) == pytest.approx(float(cu_loss(x, y)), rel=1e-10)
    assert float(clip_loss(5 * x, 0.1 * y, 10.0)) == pytest.approx(float(clip_loss(x, y, 10.0)), rel=1e-10)


def test_cu_zero_when_all_centroids_coincide():
    x = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
    y = torch.tensor([[0.0, 1.0, 0.0]]).repeat(4, 1)
    assert float(cu_loss(x, y)) == pytest.approx(0.0, abs=1e-6)


def test_cu_gradient_is_correct():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(cu_loss, (x, y))
    assert torch.autograd.gradcheck(lambda a, b: clip_loss(a, b, 3.0), (x, y))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(2, 6), st.integers(0, 10_000))
def test_cu_and_uniformity_bounds(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    # ‖μ_i − μ_j‖² ∈ [0, 4], so log mean exp(−2·) ∈ [−8, 0]
    for v in (float(cu_loss(x, y)), float(uniformity_loss(x))):
        assert -8.0 - 1e-4 <= v <= 1e-5
    # permuting the pairs changes nothing
    p = torch.randperm(b, generator=g)
    assert float(cu_loss(x[p], y[p])) == pytest.approx(float(cu_loss(x, y)), abs=1e-5)


def test_schedules():
    assert [alpha_schedule(t) for t in (0.0, 0.3, 0.5, 0.75, 1.0)] == pytest.approx([1, 1, 1, 1.5, 2])
    assert [beta_schedule(t) for t in (0.0, 0.2, 0.45, 0.7, 0.9, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0, 0])


def test_gaploss_sum_weights_and_schedule(xy):
    x, y = xy
    x, y = x.float(), y.float()
    s = 1 / 0.05
    c, a, u = float(clip_loss(x, y, s)), float(atp_loss(x, y)), float(cu_loss(x, y))
    loss = GapLoss("clip+atp+cu", atp_weight=0.5, cu_weight=2.0, temperature=0.05, learn_temperature=False)
    total, parts = loss(x, y)
    assert float(total) == pytest.approx(c + 0.5 * a + 2.0 * u, rel=1e-5)
    assert parts == pytest.approx({"clip": c, "atp": a, "cu": u}, rel=1e-5)
    sched = GapLoss("clip+atp+cu", schedule=True, temperature=0.05, learn_temperature=False)
    total, _ = sched(x, y, progress=0.75)  # α = 1.5, β = 0
    assert float(total) == pytest.approx(c + 1.5 * a, rel=1e-5)
    total, _ = sched(x, y, progress=0.45)  # α = 1, β = 0.5
    assert float(total) == pytest.approx(c + a + 0.5 * u, rel=1e-5)


def test_fahim_loss(xy):
    x, y = xy
    loss = GapLoss("fahim", temperature=0.1, learn_temperature=False)
    assert loss.terms == ["clip", "align", "unif"]
    total, _ = loss(x.float(), y.float())
    expect = float(clip_loss(x, y, 10.0)) + float(alignment_loss(x, y)) + 0.5 * (
        float(uniformity_loss(x)) + float(uniformity_loss(y))
    )
    assert float(total) == pytest.approx(expect, rel=1e-5)


def test_temperature_learnable_and_clamped(xy):
    x, y = xy
    learn = GapLoss("clip")
    params = dict(learn.named_parameters())
    assert set(params) == {"logit_scale"}
    assert float(params["logit_scale"].detach()) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    total, _ = learn(x.float(), y.float())
    total.backward()
    assert params["logit_scale"].grad is not None and float(params["logit_scale"].grad) != 0.0
    with torch.no_grad():
        learn.logit_scale.fill_(math.log(1000.0))
    assert float(learn.scale().detach()) == pytest.approx(100.0, rel=1e-5)
    learn.clamp_()
    assert float(learn.logit_scale.detach()) == pytest.approx(math.log(100.0), rel=1e-6)
    fixed = GapLoss("clip", temperature=0.02, learn_temperature=False)
    assert list(fixed.parameters()) == []
    assert fixed.temperature == pytest.approx(0.02, rel=1e-6)


def test_parse_loss_errors():
    assert parse_loss("CLIP + ATP + CU") == ["clip", "atp", "cu"]
    assert parse_loss("clip+alignment+uniformity") == ["clip", "align", "unif"]
    with pytest.raises(GapkitError, match="unknown loss term 'foo'"):
        parse_loss("clip+foo")
    with pytest.raises(GapkitError, match="repeated"):
        parse_loss("clip+clip")
    with pytest.raises(GapkitError):
        GapLoss("clip", temperature=0.0)


def test_gather_is_identity_without_process_group(xy):
    x, _ = xy
    assert gather_features(x) is x


@pytest.mark.parametrize("b", [600, 1030])
def test_blocked_kernel_matches_brute_force_value_and_gradient(b):
    # large batches take the blocked (upper-triangular) path of the uniformity kernel
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(b, 4, dtype=torch.float64, generator=g)
    got = cu_loss(x, y)
    (gx,) = torch.autograd.grad(got, x)
    xn = torch.nn.functional.normalize(x, dim=1)
    mu = torch.nn.functional.normalize(xn + torch.nn.functional.normalize(y, dim=1), dim=1)
    sq = (mu[:, None, :] - mu[None, :, :]).pow(2).sum(-1)
    off = ~torch.eye(b, dtype=torch.bool)
    ref = torch.log(torch.exp(-2 * sq[off]).mean())
    (rx,) = torch.autograd.grad(ref, x)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-12)
