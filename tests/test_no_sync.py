"""The step loop reads nothing back from the device: the count of tensor->host reads does not grow with
the number of steps (the few there are happen once, while the grid is prepared)."""
import pytest

import torch

import flowsde
from flowsde.problems import GeometricBrownianMotion, LinearODE


def count(sync_counter, fn):
    with sync_counter() as c:
        fn()
    return c.calls


@pytest.mark.parametrize("method", sorted(flowsde.ODE_METHODS))
def test_odeint_loop_has_no_host_sync(sync_counter, method):
    y0 = torch.randn(4, 2)
    t = torch.linspace(0, 1, 5)
    few = count(sync_counter, lambda: flowsde.odeint(LinearODE(), y0, t, method=method,
                                                     options=dict(step_size=0.1)))
    many = count(sync_counter, lambda: flowsde.odeint(LinearODE(), y0, t, method=method,
                                                      options=dict(step_size=0.001)))
    assert many == few and len(few) <= 4, (few, many)


@pytest.mark.parametrize("method,sde_type,opts", [("euler", "ito", None), ("heun", "stratonovich", None),
                                                  ("milstein", "ito", None), ("milstein", "ito", {"grad_free": True})])
def test_sdeint_loop_has_no_host_sync(sync_counter, method, sde_type, opts):
    sde = GeometricBrownianMotion(sde_type=sde_type)
    y0 = torch.ones(4, 2)
    ts = torch.linspace(0, 1, 3)
    few = count(sync_counter, lambda: flowsde.sdeint(sde, y0, ts, method=method, dt=0.1, seed=0, options=opts))
    many = count(sync_counter, lambda: flowsde.sdeint(sde, y0, ts, method=method, dt=0.001, seed=0, options=opts))
    assert many == few and len(few) <= 4, (few, many)


def test_the_counter_sees_a_sync(sync_counter):
    def syncing(t, y):
        return -y * float(t)  # float(tensor): a host read every evaluation
    calls = count(sync_counter, lambda: flowsde.odeint(syncing, torch.ones(2, 2), torch.linspace(0, 1, 3),
                                                       method="euler", options=dict(step_size=0.1)))
    assert calls.count("__float__") == 10


def _sample_runs():
    """flowsde.sample's fixed-step loops: ``name -> run(steps, backend)``."""
    path = flowsde.paths.VPCosine()
    cond, uncond = torch.full((8, 1), 2.0), torch.zeros(1, 1)

    def model(x, t, c=None):
        return -x if c is None else c * (1.0 - x) + 0.1 * t[:, None] * x

    x0 = torch.randn(8, 2)
    guided = dict(cond=cond, uncond=uncond, guidance_scale=2.0)
    return {
        "heun": lambda n, b: flowsde.sample(model, x0, method="heun", steps=n, backend=b),
        "ddim eta + cfg": lambda n, b: flowsde.sample(model, x0, path, "epsilon", "ddim", steps=n, t_start=0.05,
                                                      eta=1.0, seed=1, backend=b, **guided),
        "dpmpp_2m + cfg": lambda n, b: flowsde.sample(model, x0, path, "epsilon", "dpmpp_2m", steps=n, t_start=0.05,
                                                      t_end=0.95, backend=b, **guided),
        "euler sde": lambda n, b: flowsde.sample(model, x0, path, "epsilon", "euler", steps=n, t_start=0.05,
                                                 t_end=0.95, sigma=0.5, seed=2, backend=b),
    }


@pytest.fixture
def pooled(monkeypatch):
    """Every state pooled, however small (the loops write into their StatePool's buffers)."""
    from flowsde.solvers import fixed
    monkeypatch.setattr(fixed.StatePool, "MIN_BYTES", 0)


@pytest.mark.parametrize("name", sorted(_sample_runs()))
def test_sample_loop_has_no_host_sync(sync_counter, name, pooled):
    run = _sample_runs()[name]
    few = count(sync_counter, lambda: run(4, "torch"))
    many = count(sync_counter, lambda: run(40, "torch"))
    assert many == few, (few, many)


@pytest.mark.skipif(not flowsde.kernels.HAS_TRITON, reason="triton is not installed")
def test_the_triton_backends_loops_have_no_host_sync(sync_counter, monkeypatch, pooled):
    """The same on the triton backend, with the launch itself stubbed out (Triton's interpreter reads its
    CPU tensors as numpy arrays; a compiled launch does not): what is counted is flowsde's own Python around
    each launch — its dispatch, argument preparation and the fast path's specialisation key."""
    from flowsde.kernels import combine as C, matrix_noise, norm
    from flowsde.problems import GeometricBrownianMotion, LinearODE
    for module in (C, matrix_noise, norm):
        monkeypatch.setattr(module, "_launch", lambda *a, **kw: None)
    y0, t = torch.randn(4, 2), torch.linspace(0, 1, 5)
    sde = GeometricBrownianMotion(sde_type="stratonovich")
    runs = dict(_sample_runs())
    runs["odeint rk4"] = lambda n, b: flowsde.odeint(LinearODE(), y0, t, method="rk4",
                                                     options=dict(step_size=1 / n, backend=b))
    runs["sdeint heun"] = lambda n, b: flowsde.sdeint(sde, y0, t, method="heun", dt=1 / n, seed=0,
                                                      options=dict(backend=b))
    for name, run in runs.items():
        few = count(sync_counter, lambda: run(4, "triton"))
        many = count(sync_counter, lambda: run(40, "triton"))
        assert many == few, (name, few, many)
