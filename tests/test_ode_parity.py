"""flowsde.odeint against torchdiffeq.odeint: same grid, same method, same outputs."""
import numpy as np
import pytest
import torch
import torchdiffeq

import flowsde
from flowsde.problems import LinearODE

METHODS = ["euler", "midpoint", "heun2", "heun3", "rk4"]


def nonlinear(t, y):
    return torch.stack([torch.sin(y[..., 1]) * t, -y[..., 0] * torch.cos(3 * t) + 0.1 * y[..., 1] ** 2], -1)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("t", [
    torch.linspace(0.0, 2.0, 7, dtype=torch.float64),                         # forwards
    torch.tensor([1.5, 1.2, 0.3, -0.4, -1.0], dtype=torch.float64),           # backwards, uneven
])
@pytest.mark.parametrize("options", [None, dict(step_size=0.13), dict(step_size=0.05, interp="cubic")])
@pytest.mark.parametrize("func", [LinearODE(), nonlinear], ids=["linear", "nonlinear"])
def test_odeint_matches_torchdiffeq(method, t, options, func):
    y0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = flowsde.odeint(func, y0, t, method=method, options=options)
    ref = torchdiffeq.odeint(func, y0, t, method=method, options=options)
    assert ours.shape == ref.shape == (len(t), 6, 2)
    assert rel(ours, ref) <= 1e-10


def test_heun_alias_and_grid_constructor():
    y0 = torch.randn(3, 2, dtype=torch.float64)
    t = torch.linspace(1.0, 0.0, 4, dtype=torch.float64)

    def gc(func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), 11, dtype=t.dtype) ** 1.0

    a = flowsde.odeint(nonlinear, y0, t, method="heun", options=dict(grid_constructor=gc))
    b = torchdiffeq.odeint(nonlinear, y0, t, method="heun2", options=dict(grid_constructor=gc))
    assert rel(a, b) <= 1e-10


def test_tuple_state_matches_torchdiffeq():
    def f(t, state):
        x, v = state
        return v, -x - 0.1 * v
    y0 = (torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    t = torch.linspace(0, 3, 5, dtype=torch.float64)
    a = flowsde.odeint(f, y0, t, method="rk4", options=dict(step_size=0.1))
    b = torchdiffeq.odeint(f, y0, t, method="rk4", options=dict(step_size=0.1))
    assert isinstance(a, tuple) and len(a) == 2
    for x, y in zip(a, b):
        assert x.shape == y.shape and rel(x, y) <= 1e-10


def test_gradients_match_torchdiffeq():
    A = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    f = lambda t, y: y @ A.T  # noqa: E731
    ga = torch.autograd.grad(flowsde.odeint(f, y0, t, method="rk4", options=dict(step_size=0.1)).sum(), (A, y0))
    gb = torch.autograd.grad(torchdiffeq.odeint(f, y0, t, method="rk4", options=dict(step_size=0.1)).sum(), (A, y0))
    for x, y in zip(ga, gb):
        assert rel(x, y) <= 1e-10


def test_float32_state_float64_times():
    y0 = torch.randn(8, 2)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ys = flowsde.odeint(LinearODE(), y0, t, method="rk4", options=dict(step_size=0.01))
    assert ys.dtype == torch.float32
    exact = LinearODE().exact(y0.double(), t)
    assert float((ys.double() - exact).abs().max()) < 1e-5


def test_rk4_classic_is_fourth_order_and_differs_from_38_rule():
    y0 = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a = flowsde.odeint(nonlinear, y0, t, method="rk4", options=dict(step_size=0.25))
    b = flowsde.odeint(nonlinear, y0, t, method="rk4_classic", options=dict(step_size=0.25))
    assert 0 < float((a - b).abs().max()) < 1e-3


def test_stats_count_evaluations_and_steps():
    y0 = torch.randn(2, 2, dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    for method, stages in [("euler", 1), ("midpoint", 2), ("heun", 2), ("heun3", 3), ("rk4", 4)]:
        ys, stats = flowsde.odeint(LinearODE(), y0, t, method=method,
                                   options=dict(step_size=0.1, return_stats=True))
        assert stats == {"nfe": 10 * stages, "steps": 10, "accepted": 10, "rejected": 0, "status": "success"}


def test_step_size_grid_has_no_sliver_step():
    # 1 / 0.1 rounds to just above 10 in floating point division for some spans: never 11 steps
    y0 = torch.randn(2, 2, dtype=torch.float64)
    for t1, h, n in [(1.0, 0.1, 10), (0.3, 0.1, 3), (0.7, 0.1, 7), (1.0, 0.3, 4), (0.9, 0.03, 30), (0.45, 0.03, 15)]:
        _, stats = flowsde.odeint(LinearODE(), y0, torch.tensor([0.0, t1], dtype=torch.float64), method="euler",
                                  options=dict(step_size=h, return_stats=True))
        assert stats["steps"] == n


def test_float32_times_leave_no_sliver_step_and_take_torchdiffeqs_steps():
    """float32 0.3 is 0.30000001192: 0.3 / 0.1 in float64 is 3.0000001, which made a 4th step of 1.2e-8
    (odeint, sdeint with bm=None, solve_linear_sde); the tolerance now follows the times' dtype, and
    torchdiffeq, which builds its grid in float32, takes the same 3 steps."""
    from flowsde.problems import OrnsteinUhlenbeck
    y0 = torch.randn(2, 2)
    for t1, h in [(0.3, 0.1), (0.7, 0.1), (2.9, 0.1), (0.45, 0.03)]:
        t = torch.tensor([0.0, t1])
        n = [0]

        def counted(t, y):
            n[0] += 1
            return LinearODE()(t, y)
        ref = torchdiffeq.odeint(counted, y0, t, method="euler", options=dict(step_size=h))
        ys, stats = flowsde.odeint(LinearODE(), y0, t, method="euler", options=dict(step_size=h, return_stats=True))
        assert stats["steps"] == n[0] == round(t1 / h)
        assert torch.allclose(ys, ref, rtol=1e-6, atol=1e-6)
        _, st = flowsde.sdeint(OrnsteinUhlenbeck(), y0, t, dt=h, seed=0, options=dict(return_stats=True))
        assert st["steps"] == round(t1 / h)
        # float64 times keep the tight tolerance: float64(float32(0.3)) / 0.1 is a 4th step, as in torchdiffeq
        _, st64 = flowsde.odeint(LinearODE(), y0.double(), t.double(), method="euler",
                                 options=dict(step_size=h, return_stats=True))
        assert st64["steps"] == round(t1 / h) + (float(t[1].double()) / h - round(t1 / h) > 1e-10)
    assert flowsde.solvers.fixed.uniform_grid(0.0, float(torch.tensor(0.3)), 0.1, torch.float32).size == 4
    # the tolerance is the ends' own rounding (an ulp each), not a fixed floor: a real last fraction of a step,
    # a few ulps long or at small times, is kept, as torchdiffeq's float32 grid keeps it
    for t0, t1, h, n in [(0.0, 0.0010004, 1e-6, 1001), (1000.0, 1000.3502, 1e-3, 351), (-2.0, 1.05, 0.1, 31)]:
        _, st = flowsde.odeint(LinearODE(), y0, torch.tensor([t0, t1]), method="euler",
                               options=dict(step_size=h, return_stats=True))
        grid = flowsde.solvers.fixed.uniform_grid(*torch.tensor([t0, t1]).double().tolist(), h, torch.float32)
        assert st["steps"] == n and np.diff(grid).max() <= h * (1 + 1e-9)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "heun_euler"])
def test_adaptive_tuple_states_use_torchdiffeqs_mixed_norm(method):
    """A small fast part next to a large quiet one: the error norm is the largest of the parts' RMS norms
    (torchdiffeq's mixed norm), not one RMS over everything, so both take the same steps."""
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    y0 = (torch.tensor([1.0, 0.5], dtype=torch.float64), torch.zeros(99, dtype=torch.float64))
    calls = [0, 0]

    def field(i):
        def f(t, y):
            calls[i] += 1
            return -3.0 * y[0], 0.01 * torch.cos(t) * torch.ones_like(y[1])
        return f
    a = flowsde.odeint(field(0), y0, t, rtol=1e-6, atol=1e-9, method=method)
    b = torchdiffeq.odeint(field(1), y0, t, rtol=1e-6, atol=1e-9,
                           method="adaptive_heun" if method == "heun_euler" else method)
    assert calls[0] == calls[1]
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,options", [("rk4", None), ("rk4", dict(step_size=0.1)), ("dopri5", None),
                                            ("dopri5", dict(per_sample=True))])
def test_a_single_time_returns_y0_as_torchdiffeq(method, options):
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5], dtype=torch.float64)
    ours = flowsde.odeint(nonlinear, y0, t, method=method, options=options)
    ref = torchdiffeq.odeint(nonlinear, y0, t, method=method if options is None else method,
                             options={k: v for k, v in (options or {}).items() if k != "per_sample"})
    assert ours.shape == ref.shape == (1, 3, 2) and torch.equal(ours, ref.detach())
    assert ours.data_ptr() != y0.data_ptr()  # a copy, never y0 itself
    ours.sum().backward()
    assert torch.equal(y0.grad, torch.ones_like(y0))


def test_tuple_states_whose_field_returns_a_list_as_torchdiffeq():
    y0 = (torch.ones(2, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64))
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    f = lambda t, y: [-y[0], 0.5 * y[1]]  # noqa: E731
    ours, ref = flowsde.odeint(f, y0, t, method="rk4"), torchdiffeq.odeint(f, y0, t, method="rk4")
    assert all(torch.allclose(a, b, rtol=1e-14, atol=0) for a, b in zip(ours, ref))


def test_numpy_step_sizes_count_as_numbers():
    import numpy as np
    y0, t = torch.ones(2, 1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    a = flowsde.odeint(nonlinear, y0.repeat(1, 2), t, method="rk4", options=dict(step_size=np.float32(0.125)))
    b = flowsde.odeint(nonlinear, y0.repeat(1, 2), t, method="rk4", options=dict(step_size=0.125))
    assert torch.equal(a, b)
    flowsde.odeint(nonlinear, y0.repeat(1, 2), t, options=dict(first_step=np.float32(0.01)))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_perturb_evaluates_one_sided_at_grid_points_as_torchdiffeq(method, dtype):
    """A field that jumps at t = 0.5, a grid point: with perturb=True each step sees its own side of the
    jump (a stage at a step's start just after it, at its end just before it), as torchdiffeq's option."""
    def f(t, y):
        return torch.where(t < 0.5, torch.ones_like(y), -torch.ones_like(y)) * (1 + y)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=dtype)
    y0 = torch.ones(3, dtype=dtype)
    ref_method = "rk4" if method == "rk4_classic" else method
    for perturb in (False, True):
        ours = flowsde.odeint(f, y0, t, method=method, options=dict(perturb=perturb))
        if method != "rk4_classic":
            ref = torchdiffeq.odeint(f, y0, t, method=ref_method, options=dict(perturb=perturb))
            assert torch.allclose(ours, ref, rtol=4 * torch.finfo(dtype).eps, atol=0), perturb
        if perturb and method in ("heun2", "rk4", "rk4_classic"):  # a stage at the step's end: the left value
            left = flowsde.odeint(f, y0, torch.tensor([0.0, 0.25, 0.5], dtype=dtype), method=method)
            smooth = flowsde.odeint(lambda t, y: 1 + y, y0, torch.tensor([0.0, 0.25, 0.5], dtype=dtype),
                                    method=method)
            assert not torch.equal(left[-1], smooth[-1]) and torch.equal(ours[2], smooth[-1])


def test_single_time_stats_are_those_of_the_mode():
    y0, t = torch.ones(3, 2, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    _, st = flowsde.odeint(nonlinear, y0, t, options=dict(per_sample=True, return_stats=True))
    assert st["status"] == ["success"] * 3
    _, st = flowsde.odeint(nonlinear, y0, t, options=dict(capturable=True, max_num_steps=4, return_stats=True))
    assert st["status"] == "budget" and bool(st["finished"]) and not bool(st["dt_underflow"])
    with pytest.raises(ValueError, match="max_num_steps"):
        flowsde.odeint(nonlinear, y0, t, options=dict(capturable=True))
