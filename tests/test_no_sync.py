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
