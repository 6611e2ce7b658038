"""The reference problems' exact solutions and laws, checked independently of the solvers."""
import math

import numpy as np
import pytest
import torch

from flowsde.brownian import GridBrownian
from flowsde.problems import BrownianMotionProblem, GeometricBrownianMotion, LinearODE, OrnsteinUhlenbeck


def test_ou_exact_transition_law_by_composition():
    ou = OrnsteinUhlenbeck(theta=1.5, sigma=0.8)
    B = 100000
    g = torch.Generator().manual_seed(0)
    x = torch.full((B,), 2.0, dtype=torch.float64)
    for _ in range(4):  # four exact steps of 0.25 = one of 1.0 (Markov property)
        x = ou.exact_step(x, 0.25, torch.randn(B, generator=g, dtype=torch.float64))
    assert abs(float(x.mean()) - ou.mean(2.0, 1.0)) < 5 * math.sqrt(ou.variance(1.0) / B)
    assert abs(float(x.var()) / ou.variance(1.0) - 1) < 5 * math.sqrt(2 / B)
    assert ou.variance(50.0) == pytest.approx(ou.stationary_variance()) == pytest.approx(0.8 ** 2 / 3.0)


def test_em_law_tends_to_the_exact_law():
    ou = OrnsteinUhlenbeck(theta=1.0, sigma=1.0)
    errs = [abs(ou.em_variance(1 / n, n) - ou.variance(1.0)) for n in (10, 100, 1000)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3
    assert ou.em_mean(1.0, 1 / 1000, 1000) == pytest.approx(math.exp(-1), rel=1e-3)


def test_ou_pathwise_reference_converges_and_has_the_exact_law():
    ou = OrnsteinUhlenbeck(theta=1.0, sigma=1.0)
    B = 20000
    bm = GridBrownian(t0=0.0, t1=1.0, steps=2048, shape=(B, 1), seed=2, dtype=torch.float64)
    x0 = torch.ones(B, 1, dtype=torch.float64)
    fine = ou.pathwise(x0, bm.grid, bm.path())
    coarse = ou.pathwise(x0, bm.grid[::64], bm.path()[::64])
    assert float((fine - coarse).abs().mean()) < 0.02
    assert abs(float(fine.mean()) - math.exp(-1)) < 5 * math.sqrt(ou.variance(1.0) / B)
    assert abs(float(fine.var()) / ou.variance(1.0) - 1) < 5 * math.sqrt(2 / B)


def test_gbm_and_brownian_exact_laws():
    B = 200000
    w = torch.randn(B, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x0 = torch.ones(B, 1, dtype=torch.float64)
    for sde_type in ("ito", "stratonovich"):
        gbm = GeometricBrownianMotion(mu=0.3, sigma=0.4, sde_type=sde_type)
        x = gbm.exact(x0, 1.0, w)
        assert float(x.mean()) == pytest.approx(gbm.mean(1.0, 1.0), rel=0.01)
    bmp = BrownianMotionProblem(sigma=2.0)
    x = bmp.exact(x0, w * math.sqrt(0.5))
    assert float(x.var()) == pytest.approx(bmp.variance(0.5), rel=0.02)


def test_linear_ode_exact_solution_solves_the_ode():
    lin = LinearODE()
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    ys = lin.exact(y0, t)
    assert torch.equal(ys[0], y0)
    h = 1e-6  # central difference of the exact solution equals the field
    d = (lin.exact(y0, [0.5 + h]) - lin.exact(y0, [0.5 - h]))[0] / (2 * h)
    assert torch.allclose(d, lin(0.5, ys[1]), atol=1e-8)
    # the damped rotation: |y| = e^{-0.1 t}
    assert float(ys[2].norm()) == pytest.approx(math.exp(-0.1), rel=1e-12)
    with pytest.raises(ValueError, match="square"):
        LinearODE(np.ones((2, 3)))


def test_constant_diffusion_follows_sigma_and_the_state_shape():
    """The cached constant diffusion is rebuilt when sigma is changed on the instance or the state's shape
    changes (a stale one simulated the old sigma, and a (4, 2) state got a cached (4, 2, 2) g)."""
    ou = OrnsteinUhlenbeck(theta=1.0, sigma=0.5)
    y = torch.zeros(4, 2)
    assert float(ou.g(0.0, y).max()) == 0.5
    ou.sigma = 1.0
    assert float(ou.g(0.0, y).max()) == 1.0
    bm = BrownianMotionProblem(sigma=2.0)
    assert bm.g(0.0, torch.zeros(4, 2, 2)).shape == (4, 2, 2)
    assert bm.g(0.0, y).shape == (4, 2)
    bm.sigma = 3.0
    assert float(bm.g(0.0, y).max()) == 3.0
