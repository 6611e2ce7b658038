"""Adaptive SDE solves (step doubling on a virtual Brownian tree): convergence to the exact solution on
the same Brownian path as the tolerance shrinks, against torchsde's adaptive mode, outputs, stats."""
import numpy as np
import pytest
import torch
import torchsde

import flowsde
from flowsde.brownian import SampledPath, VirtualBrownianTree
from flowsde.problems import GeometricBrownianMotion, OrnsteinUhlenbeck

B = 128
Y0 = torch.ones(B, 1, dtype=torch.float64)


def tree(seed=3, shape=(B, 1), t1=1.0):
    return VirtualBrownianTree(0.0, t1, shape, seed=seed, dtype=torch.float64)


def gbm_error(method, sde_type, rtol, seed=3):
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5, sde_type=sde_type)
    bm = tree(seed)
    ys, st = flowsde.sdeint(sde, Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), bm=bm, dt=0.1,
                            method=method, adaptive=True, rtol=rtol, atol=rtol, dt_min=1e-7,
                            options=dict(return_stats=True))
    exact = sde.exact(Y0, 1.0, bm(0.0, 1.0))
    return float((ys[-1] - exact).pow(2).mean().sqrt()), st


def test_adaptive_euler_maruyama_converges_on_gbm_as_rtol_shrinks():
    errs = [gbm_error("euler", "ito", r)[0] for r in (1e-2, 1e-3, 1e-4)]
    assert errs[1] < 0.5 * errs[0] and errs[2] < 0.5 * errs[1], errs
    assert errs[2] < 0.02


@pytest.mark.parametrize("method,sde_type", [("milstein", "ito"), ("heun", "stratonovich")])
def test_adaptive_strong_order_one_methods_converge(method, sde_type):
    (e1, s1), (e2, s2) = gbm_error(method, sde_type, 1e-2), gbm_error(method, sde_type, 1e-4)
    assert e2 < 0.15 * e1 and e2 < 0.01, (e1, e2)
    assert s2["nfe"] > s1["nfe"] and s2["status"] == "success"
    assert s2["steps"] == s2["accepted"] + s2["rejected"]


def test_adaptive_euler_against_torchsde_on_the_same_path():
    """Same problem, tolerances and Brownian tree: flowsde's error and work are torchsde's, within 1.5x
    (the figures are printed by benchmarks/adaptive_sde.py and quoted in the README)."""
    class Counted(GeometricBrownianMotion):
        calls = 0

        def f(self, t, y):
            Counted.calls += 1
            return super().f(t, y)

    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    rows = []
    for lib in ("flowsde", "torchsde"):
        Counted.calls = 0
        sde, bm = Counted(mu=0.5, sigma=0.5), tree()
        solve = flowsde.sdeint if lib == "flowsde" else torchsde.sdeint
        with pytest.warns(UserWarning) if lib == "torchsde" else _nothing():
            ys = solve(sde, Y0, ts, bm=bm, dt=0.1, adaptive=True, rtol=3e-3, atol=3e-3, dt_min=1e-7,
                       method="euler")
        rows.append((float((ys[-1] - sde.exact(Y0, 1.0, bm(0.0, 1.0))).pow(2).mean().sqrt()), Counted.calls))
    (e_f, n_f), (e_t, n_t) = rows
    assert e_f < 1.5 * e_t and n_f < 1.5 * n_t, rows


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_outputs_land_on_the_requested_times_and_match_the_exact_path():
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5, sde_type="stratonovich")
    bm = tree(7)
    ts = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    ys = flowsde.sdeint(sde, Y0, ts, bm=bm, dt=0.05, method="heun", adaptive=True, rtol=1e-4, atol=1e-4)
    assert torch.equal(ys[0], Y0) and ys.shape == (4, B, 1)
    for i, t in enumerate(ts.tolist()[1:], start=1):
        exact = sde.exact(Y0, t, bm(0.0, t))
        assert float((ys[i] - exact).abs().max()) < 0.05


def test_additive_noise_adaptive_matches_a_fine_fixed_step_solve_on_the_same_tree():
    sde = OrnsteinUhlenbeck(theta=1.0, sigma=0.5, noise_type="additive")
    y0 = torch.ones(64, 2, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = sde.g(ts[0], y0).shape[-1]
    bm = tree(11, (64, m))
    a = flowsde.sdeint(sde, y0, ts, bm=bm, dt=0.1, adaptive=True, rtol=1e-5, atol=1e-5)
    level = 13  # the tree's own path at 2**13 + 1 dyadic times, drawn at once: a fine fixed-step solve on it
    fine = SampledPath(np.linspace(0.0, 1.0, 2 ** level + 1), bm.dyadic_path(level))
    b = flowsde.sdeint(sde, y0, ts, bm=fine, dt=2.0 ** -level)
    assert float((a - b).abs().max()) < 2e-3


def test_reproducible_from_a_seed_and_torchsde_brownian_objects_accepted():
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = dict(dt=0.1, adaptive=True, rtol=1e-3, atol=1e-3)
    a, b = flowsde.sdeint(sde, Y0, ts, seed=5, **kw), flowsde.sdeint(sde, Y0, ts, seed=5, **kw)
    c = flowsde.sdeint(sde, Y0, ts, seed=6, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    bi = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(B, 1), dtype=torch.float64, entropy=1)
    ys = flowsde.sdeint(sde, Y0, ts, bm=bi, **kw)
    assert torch.isfinite(ys).all()


def test_max_num_steps_returns_the_work_done_with_its_status():
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    ts = torch.tensor([0.0, 0.01, 1.0], dtype=torch.float64)
    ys, st = flowsde.sdeint(sde, Y0, ts, seed=1, dt=0.01, adaptive=True, rtol=1e-6, atol=1e-6,
                            options=dict(return_stats=True, max_num_steps=5))
    assert st["status"] == "max_num_steps" and st["steps"] == 5
    assert torch.equal(ys[0], Y0) and torch.isnan(ys[-1]).all()
