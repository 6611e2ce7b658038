"""Event handling (torchdiffeq's ``event_fn`` / ``odeint_event``): the same event times and states as
torchdiffeq, the exact event time of a falling ball, gradients through the event time against their closed
form, few host reads, and clear errors."""
import math

import pytest
import torch
import torchdiffeq

import flowsde

F64 = torch.float64
G = 9.8


def ball(t, y):  # y = (height, velocity)
    return torch.stack([y[..., 1], -G * torch.ones_like(y[..., 1])], dim=-1)


def ground(t, y):
    return y[..., 0]


def fall_time(h0, v0, floor=0.0):
    return (v0 + math.sqrt(v0 ** 2 + 2 * G * (h0 - floor))) / G


def rel(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


CASES = [("dopri5", None), ("bosh3", None), ("adaptive_heun", None), ("euler", dict(step_size=0.01)),
         ("midpoint", dict(step_size=0.05)), ("rk4", dict(step_size=0.1)),
         ("rk4", dict(step_size=0.1, interp="cubic")), ("heun2", dict(step_size=0.05, interp="cubic"))]


@pytest.mark.parametrize("method,opts", CASES)
@pytest.mark.parametrize("backwards", [False, True])
def test_event_time_and_state_equal_torchdiffeq(method, opts, backwards):
    y0 = torch.tensor([10.0, 3.0 if backwards else 1.0], dtype=F64)
    t = torch.tensor([0.5, -1.0 if backwards else 2.0], dtype=F64)
    tol = dict(rtol=1e-6, atol=1e-8)
    te_ref, sol_ref = torchdiffeq.odeint(ball, y0, t, method=method, options=opts, event_fn=ground, **tol)
    te, sol = flowsde.odeint(ball, y0, t, method=method, options=opts, event_fn=ground, **tol)
    assert te.dtype == t.dtype and te.shape == te_ref.shape and sol.shape == (2, 2)
    assert abs(float(te - te_ref)) <= 1e-10 * max(1.0, abs(float(te_ref))), (float(te), float(te_ref))
    assert rel(sol, sol_ref) <= 1e-10
    assert torch.equal(sol[0], y0)
    exact = 0.5 + (-1 if backwards else 1) * fall_time(10.0, -3.0 if backwards else 1.0)
    if method != "bosh3":  # (bosh3's interpolant, torchdiffeq's, is second order: its steps are exact here,
        # so they grow to the whole fall, and the event inside the last one is ~0.4 off, in both libraries)
        assert abs(float(te) - exact) < (1e-2 if method == "euler" else 1e-3)  # the ground, not a sliver


def test_event_time_is_exact_to_the_tolerances():
    y0 = torch.tensor([[10.0, 1.0], [3.0, -2.0]], dtype=F64)  # a batch: the event is the first row to land

    def both(t, y):
        return y[:, 0]
    te, sol = flowsde.odeint(ball, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=both, rtol=1e-10, atol=1e-12)
    want = min(fall_time(10.0, 1.0), fall_time(3.0, -2.0))
    assert abs(float(te) - want) < 1e-9
    assert abs(float(sol[1, 1, 0])) < 1e-8  # the second ball is on the ground


def test_tuple_state_and_several_event_outputs_equal_torchdiffeq():
    def f(t, y):
        return y[1], -G * torch.ones_like(y[0])

    def ev(t, y):  # the first of: falls to 5, reaches speed 20
        return torch.stack([y[0] - 5.0, y[1] + 20.0])
    y0 = (torch.tensor(10.0, dtype=F64), torch.tensor(0.0, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    te_ref, sol_ref = torchdiffeq.odeint(f, y0, t, event_fn=ev)
    te, sol = flowsde.odeint(f, y0, t, event_fn=ev)
    assert abs(float(te - te_ref)) < 1e-10 and isinstance(sol, tuple) and len(sol) == 2
    assert all(p.shape == (2,) and rel(p, q) < 1e-10 for p, q in zip(sol, sol_ref))
    assert abs(float(te) - math.sqrt(2 * 5.0 / G)) < 1e-6


@pytest.mark.parametrize("method,opts", [("dopri5", {}), ("rk4", dict(step_size=0.01))])
def test_check_every_reads_less_often_with_the_same_event(sync_counter, method, opts):
    y0 = torch.tensor([10.0, 1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    te, sol, st = flowsde.odeint(ball, y0, t, method=method, options=dict(opts, return_stats=True), event_fn=ground)
    with sync_counter() as c:
        te8, sol8, st8 = flowsde.odeint(ball, y0, t, method=method, event_fn=ground,
                                        options=dict(opts, return_stats=True, check_every=8))
    assert float(te8) == float(te) and torch.equal(sol8, sol)
    assert st["steps"] <= st8["steps"] < st["steps"] + 8
    assert len(c.calls) <= st8["steps"] // 8 + 8, c.calls  # loop reads, plus a few before and after it


def test_odeint_event_gradients_match_the_closed_form_and_torchdiffeq():
    class Fall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = torch.nn.Parameter(torch.tensor(G, dtype=F64))

        def forward(self, t, y):
            return torch.stack([y[1], -self.g * torch.ones_like(y[1])])
    h0, v0, floor = 10.0, 1.0, 2.0

    def grads(lib, with_floor):
        f = Fall()
        y0 = torch.tensor([h0, v0], dtype=F64, requires_grad=True)
        c = torch.tensor(floor, dtype=F64, requires_grad=True)
        te, sol = lib.odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0] - c,
                                   rtol=1e-10, atol=1e-12)
        loss = te + sol[-1, 1] ** 2  # the landing time and the speed at it
        wrt = [y0, f.g] + ([c] if with_floor else [])
        return te, torch.autograd.grad(loss, wrt, allow_unused=True)
    te, (gy0, gg, gc) = grads(flowsde, True)
    disc = math.sqrt(v0 ** 2 + 2 * G * (h0 - floor))
    ts, vs = (v0 + disc) / G, -disc  # landing time and velocity
    # t* solves h0 + v0 t - g t^2 / 2 = floor; implicit derivatives (the total time derivative is v*)
    dt = dict(h0=-1 / vs, v0=-ts / vs, g=ts * ts / (2 * vs), c=1 / vs)
    dv = dict(h0=-G * dt["h0"], v0=1 - G * dt["v0"], g=-ts - G * dt["g"], c=-G * dt["c"])  # v* = v0 - g t*
    dloss = {k: dt[k] + 2 * vs * dv[k] for k in dt}  # loss = t* + v*^2
    assert abs(float(te.detach()) - ts) < 1e-9
    assert abs(float(gy0[0]) - dloss["h0"]) < 1e-6 and abs(float(gy0[1]) - dloss["v0"]) < 1e-6
    assert abs(float(gg) - dloss["g"]) < 1e-6 and abs(float(gc) - dloss["c"]) < 1e-6
    _, ref = grads(torchdiffeq, False)  # torchdiffeq links the same gradients (none to the event's parameters)
    assert all(rel(a, b) < 1e-8 for a, b in zip((gy0, gg), ref))


def test_odeint_event_keeps_the_solver_values_and_runs_backwards():
    y0 = torch.tensor([10.0, 4.0], dtype=F64, requires_grad=True)
    te, sol = flowsde.odeint_event(ball, y0, torch.tensor(1.0, dtype=F64), event_fn=ground, reverse_time=True)
    te_plain, sol_plain = flowsde.odeint(ball, y0.detach(), torch.tensor([1.0, 0.0], dtype=F64), event_fn=ground)
    assert float(te.detach()) == float(te_plain) and torch.equal(sol.detach(), sol_plain)
    assert abs(float(te.detach()) - (1.0 - fall_time(10.0, -4.0))) < 1e-6
    gh0 = torch.autograd.grad(te, y0)[0]  # backwards in time the ball "lands" earlier the higher it starts
    assert abs(float(gh0[0]) + 1 / math.sqrt(16.0 + 2 * G * 10.0)) < 1e-6


def test_event_at_the_start_and_budget_status():
    y0 = torch.tensor([0.0, 1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    te, sol = flowsde.odeint(ball, y0, t, event_fn=ground)
    assert float(te) == 0.0 and torch.equal(sol, torch.stack([y0, y0]))
    high = torch.tensor([1e6, 0.0], dtype=F64)
    with pytest.raises(RuntimeError, match="max_num_steps"):
        flowsde.odeint(ball, high, t, method="rk4", options=dict(step_size=0.1, max_num_steps=30), event_fn=ground)
    te, sol, st = flowsde.odeint(ball, high, t, method="rk4", event_fn=ground,
                                 options=dict(step_size=0.1, max_num_steps=30, return_stats=True))
    assert st["status"] == "max_num_steps" and st["steps"] == 30 and abs(float(te) - 3.0) < 1e-12
    assert abs(float(sol[1, 0]) - (1e6 - G * 9 / 2)) < 1e-6
    _, _, st = flowsde.odeint(ball, high, t, event_fn=ground, options=dict(max_num_steps=5, return_stats=True))
    assert st["status"] == "max_num_steps"


def test_event_errors_name_the_problem():
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    t2 = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="two times"):
        flowsde.odeint(ball, y0, torch.linspace(0, 1, 3, dtype=F64), event_fn=ground)
    with pytest.raises(ValueError, match="step_size"):
        flowsde.odeint(ball, y0, t2, method="rk4", event_fn=ground)
    with pytest.raises(ValueError, match="grid_constructor"):
        flowsde.odeint(ball, y0, t2, method="rk4", event_fn=ground,
                       options=dict(grid_constructor=lambda f, y, t: t))
    with pytest.raises(TypeError, match="floating-point tensor"):
        flowsde.odeint(ball, y0, t2, event_fn=lambda t, y: 1.0)
    with pytest.raises(TypeError, match="callable"):
        flowsde.odeint(ball, y0, t2, event_fn=3)
    with pytest.raises(ValueError, match="per_sample"):
        flowsde.odeint(ball, y0, t2, event_fn=ground, options=dict(per_sample=True))
    with pytest.raises(ValueError, match="NaN"):
        flowsde.odeint(ball, y0, t2, event_fn=lambda t, y: y[0] * float("nan"))
    with pytest.raises(ValueError, match="unknown option"):  # the event options are not the fixed grid's
        flowsde.odeint(ball, y0, t2, method="rk4", options=dict(step_size=0.1, max_num_steps=3))
    with pytest.raises(ValueError, match="t0"):
        flowsde.odeint_event(ball, y0, torch.tensor(0.0, dtype=F64, requires_grad=True), event_fn=ground)
    y_in = y0.clone()
    flowsde.odeint(ball, y_in, t2, event_fn=ground)
    assert torch.equal(y_in, y0)  # inputs untouched


def test_event_on_the_triton_backend_equals_the_torch_backend():
    y0 = torch.tensor([[10.0, 1.0]] * 3, dtype=torch.float32)
    t = torch.tensor([0.0, 1.0])
    for method, opts in (("dopri5", {}), ("rk4", dict(step_size=0.1))):
        a = flowsde.odeint(ball, y0, t, method=method, options=dict(opts, backend="torch"), event_fn=ground)
        b = flowsde.odeint(ball, y0, t, method=method, options=dict(opts, backend="triton"), event_fn=ground)
        assert float((a[0] - b[0]).abs()) < 1e-6 and float((a[1] - b[1]).abs().max()) < 1e-5


def test_odeint_event_at_the_start_and_without_a_gradient_path():
    """An event holding at t0 gives t0 and y0 with y0's own gradient (the rerouting divided 0 by 0: NaN);
    an event function with no autograd path to (t, y) (a threshold, a detached state) leaves the solve's
    gradient as it is, as torchdiffeq's (it crashed)."""
    def decay(t, y):
        return -y
    for kw in (dict(), dict(method="rk4", options=dict(step_size=0.1))):
        y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
        te, sol = flowsde.odeint_event(decay, y0, torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0] - 1.0, **kw)
        assert float(te.detach()) == 0.0 and torch.equal(sol[-1].detach(), y0.detach())
        assert torch.equal(torch.autograd.grad(te + sol[-1].sum(), y0)[0], torch.ones(2, dtype=F64))
    for ev in (lambda t, y: (y[0] > 0.5).to(y.dtype) - 0.5, lambda t, y: y[0].detach() - 0.5):
        res = []
        for lib in (flowsde, torchdiffeq):
            y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
            te, sol = lib.odeint_event(decay, y0, torch.tensor(0.0, dtype=F64), event_fn=ev, atol=1e-10)
            res.append((float(te.detach()), float(torch.autograd.grad(te + sol[-1].sum(), y0)[0])))
        assert abs(res[0][0] - math.log(2)) < 1e-8 and abs(res[0][1] - res[1][1]) < 1e-8


def test_fixed_steps_after_a_crossing_stay_before_the_event_until_the_host_reads():
    """With check_every > 1 (CUDA's default is 8) the steps after the crossing step, before the host sees
    it, keep the state before the event: a field undefined past the event is not asked there (it raised
    with check_every=50), and ``accepted`` counts the steps up to the crossing."""
    def field(t, y):
        if bool((y < 0.3).any()):
            raise RuntimeError("the field is not defined below 0.3")
        return -torch.ones_like(y)
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    runs = [flowsde.odeint(field, y0, t, event_fn=lambda t, y: y[0] - 0.5, method="rk4",
                           options=dict(step_size=0.05, check_every=c, return_stats=True)) for c in (1, 50)]
    assert float(runs[0][0]) == float(runs[1][0]) and abs(float(runs[0][0]) - 0.5) < 1e-8
    assert runs[0][2]["accepted"] == runs[1][2]["accepted"] == 10 and runs[1][2]["steps"] == 50


def test_float64_times_locate_a_float32_states_event_to_float64_resolution():
    """The event function sees times in t's dtype (torchdiffeq's): a float32 state with float64 t finds its
    event to the bisection's tolerance, not to float32 rounding of the time (1.5e-8 off at atol=1e-10)."""
    y0 = torch.tensor([1.0])
    te, _ = flowsde.odeint(lambda t, y: -torch.ones_like(y), y0, torch.tensor([0.0, 1.0], dtype=F64),
                           event_fn=lambda t, y: (1.0 - 3.0 * t) * torch.ones_like(y[0], dtype=t.dtype), atol=1e-10)
    assert te.dtype == F64 and abs(float(te) - 1 / 3) < 1e-9
