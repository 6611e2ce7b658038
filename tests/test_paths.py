"""Paths: exact derivatives, conditional paths, conversions, and the exact Gaussian-mixture fields."""
import itertools
import math

import pytest
import torch

from flowsde.paths import EDM, PREDICTIONS, CondOT, GaussianMixture, Schedule, VPCosine, VPLinear
from flowsde.paths.grids import noise_to_signal, time_grid

PATHS = [CondOT(), VPCosine(), VPLinear(), EDM(sigma_min=0.01, sigma_max=20.0),
         Schedule(lambda t: t * t, lambda t: 1 - t * t)]
F64 = torch.float64


def mixture():
    return GaussianMixture([0.3, 0.5, 0.2], [[-2.0, 0.0], [1.0, 1.0], [0.5, -1.5]],
                           [[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.5]], [[0.2, -0.05], [-0.05, 0.1]]])


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_derivatives_match_finite_differences(path):
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    h = 1e-6
    for f, df in [(path.alpha, path.dalpha), (path.beta, path.dbeta)]:
        fd = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), fd, rtol=1e-6, atol=1e-7)
    assert torch.allclose(path.beta_dbeta(t), path.beta(t) * path.dbeta(t), rtol=1e-12)


def test_endpoints_and_named_schedules():
    for p in (CondOT(), VPCosine()):
        assert float(p.alpha(0.0)) == 0.0 and float(p.beta(0.0)) == 1.0
        assert float(p.alpha(1.0)) == 1.0 and float(p.beta(1.0)) == 0.0
    vp = VPLinear()
    t = torch.linspace(0, 1, 11, dtype=F64)
    assert torch.allclose(vp.alpha(t) ** 2 + vp.beta(t) ** 2, torch.ones_like(t))
    assert math.isfinite(float(vp.beta_dbeta(1.0)))  # beta' alone is infinite there
    edm = EDM()
    assert float(edm.beta(0.0)) == pytest.approx(80.0) and float(edm.beta(1.0)) == pytest.approx(0.002)
    gen = Schedule(lambda t: torch.sin(0.5 * math.pi * t), lambda t: torch.cos(0.5 * math.pi * t))
    assert torch.allclose(gen.dalpha(t), VPCosine().dalpha(t)) and torch.allclose(gen.dbeta(t), VPCosine().dbeta(t))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_conditional_velocity_is_the_time_derivative_of_the_path(path):
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(6, 2, dtype=F64, generator=g), torch.randn(6, 2, dtype=F64, generator=g)
    t, h = torch.rand(6, dtype=F64, generator=g) * 0.8 + 0.1, 1e-6
    dx = (path.sample_conditional(z, t + h, eps) - path.sample_conditional(z, t - h, eps)) / (2 * h)
    x = path.sample_conditional(z, t, eps)
    assert torch.allclose(path.conditional_velocity(x, z, t), dx, rtol=1e-6, atol=1e-6)
    assert torch.allclose(path.target(z, eps, t, "velocity"), dx, rtol=1e-6, atol=1e-6)
    assert torch.allclose(path.conditional_score(x, z, t), -eps / path.beta(t)[:, None])


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_conversions_round_trip_and_agree_with_targets(path):
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(8, 3, dtype=F64, generator=g), torch.randn(8, 3, dtype=F64, generator=g)
    t = torch.rand(8, dtype=F64, generator=g) * 0.9 + 0.05
    x = path.sample_conditional(z, t, eps)
    targets = {p: path.target(z, eps, t, p) for p in PREDICTIONS}
    for src, dst in itertools.permutations(PREDICTIONS, 2):
        out = path.convert(targets[src], x, t, src, dst)
        assert torch.allclose(out, targets[dst], rtol=1e-10, atol=1e-10), (src, dst)
        back = path.convert(out, x, t, dst, src)
        assert float((back - targets[src]).abs().max()) <= 1e-10 * float(targets[src].abs().max()), (src, dst)


def test_singular_conversions_raise_and_finite_limits_hold():
    p = CondOT()
    x, out = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    t0 = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="epsilon -> velocity on the CondOT path is singular where alpha = 0"):
        p.convert(out, x, t0, "epsilon", "velocity")
    with pytest.raises(ValueError, match="epsilon -> data on the CondOT path is singular where alpha = 0"):
        p.convert(out, x, 0.0, "epsilon", "data")
    with pytest.raises(ValueError, match="singular where beta = 0"):
        p.convert(out, x, torch.ones(4, dtype=F64), "velocity", "score")
    with pytest.raises(ValueError, match="singular where beta = 0"):
        p.convert(out, x, 1.0, "data", "epsilon")
    eps = p.convert(out, x, t0, "velocity", "epsilon")  # finite at t=0: x_0 is the noise itself
    assert torch.allclose(eps, x)
    with pytest.raises(ValueError, match="prediction|dst must be one of"):
        p.convert(out, x, 0.5, "velocity", "noise")


def test_mixture_moments_and_sampling():
    mix = mixture()
    s = mix.sample(200000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.mean(0), mix.mean(), atol=0.01)
    assert torch.allclose(s.T.cov(), mix.covariance(), atol=0.02)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])


@pytest.mark.parametrize("path", [CondOT(), VPCosine(), VPLinear()], ids=lambda p: p.name)
def test_mixture_score_is_grad_log_density(path):
    mix = mixture()
    x = torch.randn(10, 2, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    t = torch.linspace(0.05, 0.95, 10, dtype=F64)
    (grad,) = torch.autograd.grad(mix.log_prob_t(x, t, path).sum(), x)
    assert torch.allclose(mix.score(x.detach(), t, path), grad, atol=1e-12)


@pytest.mark.parametrize("path", [CondOT(), VPCosine(), VPLinear(beta_min=0.1, beta_max=5.0)], ids=lambda p: p.name)
def test_mixture_velocity_satisfies_the_continuity_equation(path):
    """d/dt p_t + div(p_t u_t) = 0, by central finite differences in t and x."""
    mix = mixture()
    x = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    for t in (0.2, 0.5, 0.8):
        h = 1e-5
        dpdt = (mix.log_prob_t(x, t + h, path).exp() - mix.log_prob_t(x, t - h, path).exp()) / (2 * h)
        div = torch.zeros(12, dtype=F64)
        for i in range(2):
            e = torch.zeros(2, dtype=F64)
            e[i] = h
            flux = lambda y: mix.log_prob_t(y, t, path).exp() * mix.velocity(y, t, path)[:, i]  # noqa: E731
            div += (flux(x + e) - flux(x - e)) / (2 * h)
        scale = float(dpdt.abs().max())
        assert float((dpdt + div).abs().max()) < 1e-5 * max(scale, 1.0)


def test_mixture_velocity_finite_at_both_ends():
    mix = mixture()
    x = torch.randn(5, 2, dtype=F64)
    for path in (CondOT(), VPCosine(), VPLinear()):
        for t in (0.0, 1.0):
            assert torch.isfinite(mix.velocity(x, t, path)).all()
    # at t=0 the CondOT marginal field is E[z] - x
    assert torch.allclose(mix.velocity(x, 0.0, CondOT()), mix.mean() - x)


def test_time_grids():
    g = time_grid(CondOT(), 10, 0.0, 1.0)
    assert g[0] == 0.0 and g[-1] == 1.0 and len(g) == 11
    k = time_grid(VPLinear(), 20, 0.0, 1.0, spacing="karras")
    s = noise_to_signal(VPLinear(), k) ** (1 / 7)
    assert abs(s[0] - s[1] - (s[1] - s[2])) < 1e-8 * s[0]  # equal steps in sigma^(1/rho)
    with pytest.raises(ValueError, match="t_start > 0"):
        time_grid(CondOT(), 10, 0.0, 1.0, spacing="karras")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        time_grid(CondOT(), 0)


def test_review_edge_cases_of_conversions_and_schedules():
    """score -> velocity on VPLinear at t = 1 (beta' infinite, beta beta' finite); a Schedule coefficient that
    is a constant tensor; data-prediction DDIM / SDE samplers ending at t = 1 (beta = 0 at the last grid
    time, which no step divides by)."""
    import flowsde
    from flowsde.paths import CondOT, Schedule, VPCosine, VPLinear
    from flowsde.problems import reference_mixture
    mix = reference_mixture()
    p = VPLinear()
    t = torch.ones(5, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = p.convert(mix.score(x, t, p), x, t, "score", "velocity")
    assert torch.allclose(got, mix.velocity(x, t, p), atol=1e-12)
    s = Schedule(lambda t: torch.ones_like(t), lambda t: 80 * (1 - t) + 0.01)
    assert torch.equal(s.dalpha(torch.tensor([0.2], dtype=torch.float64)), torch.zeros(1, dtype=torch.float64))
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    for path in (CondOT(), VPCosine()):
        for kw in (dict(method="ddim"), dict(method="ddim", eta=1.0), dict(method="euler", sigma=0.5)):
            out = flowsde.sample(lambda x, t: mu.expand_as(x), torch.randn(4, 2, dtype=torch.float64), path=path,
                                 prediction="data", steps=20, t_start=1e-3, seed=0, **kw)
            assert bool(torch.isfinite(out).all())
            if kw["method"] == "ddim":  # the last DDIM step lands on the predicted data exactly
                assert torch.allclose(out, mu.expand_as(out), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_states_take_their_coefficients_from_a_float32_time(dtype):
    """A host time beside a half state is held in float32, not rounded to the half type (0.9999 is 1.0 in
    float16, where VP conversions are singular): the result is the float32 conversion, rounded."""
    path = VPCosine()
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    for t, src in itertools.product((0.9999, 0.5, 1e-4), ("epsilon", "data")):  # (data at 0.9999 raised)
        want = path.convert(out.to(dtype).float(), x.to(dtype).float(), t, src, "velocity")
        got = path.convert(out.to(dtype), x.to(dtype), t, src, "velocity")
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert float((got.float() - want).abs().max()) <= 4 * torch.finfo(dtype).eps * float(want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_and_targets_are_float32_ones_rounded_once(dtype):
    """Every conversion, target and conditional field of half tensors is computed in float32 from the
    coefficients and rounded once (rounding each coefficient to 8 bits first cost bfloat16 40x the error of
    velocity -> data near t = 1): bit for bit the float32 result of the same inputs, rounded."""
    g = torch.Generator().manual_seed(1)
    x, out, z = (torch.randn(32, 3, generator=g).to(dtype) for _ in range(3))
    tt = torch.rand(32, generator=g).clamp(0.05, 0.95)
    for path in (CondOT(), VPCosine(), VPLinear(), EDM()):
        for t in (0.9999, 0.3, tt.to(dtype)):
            tw = t.float() if isinstance(t, torch.Tensor) else t
            for src, dst in itertools.permutations(PREDICTIONS, 2):
                try:
                    want = path.convert(out.float(), x.float(), tw, src, dst)
                except ValueError:  # singular there (e.g. on EDM at t = 1 - 1e-4)
                    continue
                got = path.convert(out, x, t, src, dst)
                assert got.dtype == dtype and torch.equal(got, want.to(dtype)), (path, t, src, dst)
            for pred in PREDICTIONS:
                assert torch.equal(path.target(z, out, t, pred), path.target(z.float(), out.float(), tw, pred).to(dtype))
            assert torch.equal(path.sample_conditional(z, t, out), path.sample_conditional(z.float(), tw, out.float()).to(dtype))
    ref = VPCosine().convert(out.double(), x.double(), 0.9999, "velocity", "data")
    got = VPCosine().convert(out, x, 0.9999, "velocity", "data")
    assert float(((got.double() - ref) / ref.abs().clamp_min(1e-3)).abs().max()) <= torch.finfo(dtype).eps
