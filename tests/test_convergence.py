"""Empirical orders of convergence on problems with exact solutions, within +-0.12 of theory.

Strong and weak studies drive every step size with one shared Brownian path (refined, never redrawn).
"""
import math

import pytest
import torch

import flowsde
from flowsde.problems import BrownianMotionProblem, GeometricBrownianMotion, LinearODE, OrnsteinUhlenbeck
from flowsde.studies import ode_convergence, sde_convergence, shared_path

TOL = 0.12
T = 1.0
STEPS = [8, 16, 32, 64, 128]


def logistic(t, y):  # exact solution: y(t) = 1 / (1 + (1/y0 - 1) e^{-t})
    return y * (1.0 - y)


@pytest.mark.parametrize("method,order,steps", [
    ("euler", 1, [16, 32, 64, 128, 256]), ("midpoint", 2, STEPS), ("heun", 2, STEPS),
    ("heun3", 3, STEPS), ("rk4", 4, [4, 8, 16, 32, 64]), ("rk4_classic", 4, [4, 8, 16, 32, 64]),
])
def test_ode_orders(method, order, steps):
    lin = LinearODE()
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    r = ode_convergence(method, lin, y0, 2.0, lin.exact(y0, [2.0])[0], steps, order)
    assert abs(r.order - order) <= TOL, r
    y0 = torch.tensor([[0.1], [0.4]], dtype=torch.float64)
    r = ode_convergence(method, logistic, y0, 2.0, 1.0 / (1.0 + (1.0 / y0 - 1.0) * math.exp(-2.0)), steps, order)
    assert abs(r.order - order) <= TOL, r


@pytest.fixture(scope="module")
def path():
    B = 4000
    return shared_path(T, 1024, (B, 1), seed=20261122), torch.ones(B, 1, dtype=torch.float64)


def test_euler_maruyama_strong_half_on_gbm(path):
    bm, y0 = path
    gbm = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    r = sde_convergence("euler", gbm, y0, T, bm, gbm.exact(y0, T, bm(0.0, T)), STEPS, 0.5)
    assert abs(r.order - 0.5) <= TOL, r


@pytest.mark.parametrize("grad_free", [False, True])
def test_milstein_strong_one_on_gbm(path, grad_free):
    bm, y0 = path
    gbm = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    r = sde_convergence("milstein", gbm, y0, T, bm, gbm.exact(y0, T, bm(0.0, T)), STEPS, 1.0,
                        options=dict(grad_free=grad_free))
    assert abs(r.order - 1.0) <= TOL, r


def test_stratonovich_heun_strong_one_on_gbm(path):
    bm, y0 = path
    gbm = GeometricBrownianMotion(mu=0.5, sigma=0.5, sde_type="stratonovich")
    r = sde_convergence("heun", gbm, y0, T, bm, gbm.exact(y0, T, bm(0.0, T)), STEPS, 1.0)
    assert abs(r.order - 1.0) <= TOL, r


@pytest.mark.parametrize("noise_type", ["diagonal", "scalar"])
def test_srk_strong_one_and_a_half_on_gbm(path, noise_type):
    """Rößler's SRI2 on the shared path, given each fine step's space-time area (a SampledPath with areas)."""
    from flowsde.brownian import SampledPath
    bm, y0 = path
    sp = SampledPath(bm.grid, bm.path(), bm.areas())
    gbm = GeometricBrownianMotion(mu=0.5, sigma=0.5, noise_type=noise_type)
    r = sde_convergence("srk", gbm, y0, T, sp, gbm.exact(y0, T, sp(0.0, T)), [4, 8, 16, 32, 64], 1.5)
    assert abs(r.order - 1.5) <= TOL, r


@pytest.mark.parametrize("noise_type", ["diagonal", "additive"])
def test_euler_maruyama_strong_one_on_additive_ou(path, noise_type):
    bm, y0 = path
    ou = OrnsteinUhlenbeck(theta=1.0, sigma=1.0, noise_type=noise_type)
    r = sde_convergence("euler", ou, y0, T, bm, ou.pathwise(y0, bm.grid, bm.path()), STEPS, 1.0)
    assert abs(r.order - 1.0) <= TOL, r


def test_euler_maruyama_weak_one_on_ou(path):
    bm, y0 = path
    ou = OrnsteinUhlenbeck(theta=1.0, sigma=1.0)
    r = sde_convergence("euler", ou, y0, T, bm, ou.pathwise(y0, bm.grid, bm.path()), [4, 8, 16, 32, 64], 1.0,
                        kind="weak")
    assert abs(r.order - 1.0) <= TOL, r


def test_euler_maruyama_realises_its_own_law_on_ou():
    """Sample mean and variance of EM equal (1 - theta h)^n x0 and sigma^2 h (1-q^2n)/(1-q^2), to MC error."""
    ou = OrnsteinUhlenbeck(theta=2.0, sigma=0.7)
    B, x0 = 40000, 1.5
    y0 = torch.full((B, 1), x0, dtype=torch.float64)
    for n in (2, 5, 20):
        h = 1.0 / n
        ys = flowsde.sdeint(ou, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), dt=h, seed=n)[-1]
        mean, var = float(ys.mean()), float(ys.var())
        em_m, em_v = ou.em_mean(x0, h, n), ou.em_variance(h, n)
        assert abs(mean - em_m) < 4.5 * math.sqrt(em_v / B)
        assert abs(var - em_v) < 4.5 * em_v * math.sqrt(2.0 / (B - 1))
    # ... and the exact law is different at coarse steps: the test can tell the two apart
    assert abs(ou.em_variance(0.5, 2) - ou.variance(1.0)) > 0.05


def test_euler_maruyama_is_exact_for_brownian_motion():
    bm = shared_path(T, 64, (50, 2), seed=3)
    prob = BrownianMotionProblem(sigma=1.3)
    y0 = torch.randn(50, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 9, dtype=torch.float64)
    ys = flowsde.sdeint(prob, y0, ts, bm=bm, dt=1 / 16)
    for i, t in enumerate(ts.tolist()):
        w = bm(0.0, t) if t > 0 else torch.zeros_like(y0)
        assert float((ys[i] - prob.exact(y0, w)).abs().max()) < 1e-12


class _Skew:
    """Scalar noise whose diffusion has a non-symmetric Jacobian."""
    noise_type, sde_type = "scalar", "ito"
    K = torch.tensor([[0.3, 0.2], [-0.1, 0.1]], dtype=torch.float64)

    def f(self, t, y):
        return -0.5 * y

    def g(self, t, y):
        return torch.sin(y @ self.K.T).unsqueeze(-1)


def test_scalar_noise_milstein_step_uses_the_jacobian_vector_product():
    """One Milstein step equals y + f h + g dW + (dg/dy g)(dW^2 - h)/2 with the Jacobian from autograd
    (not its transpose, which differs here)."""
    sde, h = _Skew(), 0.1
    y0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    bm = flowsde.GridBrownian(t0=0.0, t1=h, steps=1, shape=(6, 1), seed=1, dtype=torch.float64)
    y1 = flowsde.sdeint(sde, y0, torch.tensor([0.0, h], dtype=torch.float64), bm=bm, method="milstein", dt=h)[-1]
    dw = bm(0.0, h)
    expected = []
    for i in range(6):
        gi = sde.g(0.0, y0[i:i + 1])[0, :, 0]
        J = torch.autograd.functional.jacobian(lambda y: sde.g(0.0, y[None])[0, :, 0], y0[i])
        assert float((J - J.T).abs().max()) > 0.05  # the transpose would give another answer
        expected.append(y0[i] + h * sde.f(0.0, y0[i]) + gi * dw[i] + 0.5 * (J @ gi) * (dw[i] ** 2 - h))
    assert float((y1 - torch.stack(expected)).abs().max()) < 1e-12


def test_scalar_noise_milstein_converges_at_order_one():
    sde = _Skew()
    y0 = torch.full((2000, 2), 0.8, dtype=torch.float64)
    bm = shared_path(T, 1024, (2000, 1), seed=9)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    fine = flowsde.sdeint(sde, y0, ts, bm=bm, method="milstein", dt=1 / 1024)[-1]
    for gf in (False, True):
        r = sde_convergence("milstein", sde, y0, T, bm, fine, [8, 16, 32, 64], 1.0, options=dict(grad_free=gf))
        assert abs(r.order - 1.0) <= TOL, r


@pytest.mark.parametrize("problem,moment", [("ou", 1), ("ou", 2), ("gbm", 2)])
def test_monte_carlo_weak_study_on_the_whole_trajectory_kernel_measures_order_one(problem, moment):
    """Plain Monte Carlo, independent paths per step count, against the exact moment: the weak error of
    Euler–Maruyama falls as h (the Monte Carlo standard error, ~1e-3 at 2^20 paths, is below the smallest
    error, ~5e-3); a problem or moment the study does not know is refused by name."""
    from flowsde.studies import monte_carlo_weak
    r = monte_carlo_weak(problem, moment=moment, backend="torch")
    assert r.kind == "weak" and r.expected == 1.0 and min(r.errors) > 4e-3
    assert abs(r.order - 1.0) < 0.25, r
    if problem == "ou" and moment == 1 and flowsde.kernels.HAS_TRITON:  # the kernel draws the same paths
        a = monte_carlo_weak(problem, steps=(2, 4), paths=4096, backend="triton")
        b = monte_carlo_weak(problem, steps=(2, 4), paths=4096, backend="torch")
        assert max(abs(x - y) for x, y in zip(a.errors, b.errors)) < 1e-6
    with pytest.raises(ValueError, match="unknown linear problem"):
        monte_carlo_weak("bm")
    with pytest.raises(ValueError, match="moment"):
        monte_carlo_weak("ou", moment=3)
