"""``flowsde.odeint_adjoint``: the gradients of torchdiffeq's ``odeint_adjoint`` (same backward steps), the
gradients of backpropagation through the solve in the limit, no graph kept by the forward solve, events,
and clear errors."""
import pytest
import torch
import torchdiffeq

import flowsde

F64 = torch.float64


class Field(torch.nn.Module):
    """A small time-dependent MLP field (the time enters, so the time adjoint is not zero)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(2, 16, generator=g, dtype=F64) * 0.5)
        self.b1 = torch.nn.Parameter(torch.randn(16, generator=g, dtype=F64) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(16, 2, generator=g, dtype=F64) * 0.5)
        self.calls, self.grad_modes = 0, set()

    def forward(self, t, y):
        self.calls += 1
        self.grad_modes.add(torch.is_grad_enabled())
        return torch.tanh(y @ self.w1 + self.b1) @ self.w2 * torch.cos(t)


def grads(lib_odeint, f, y0, t, **kw):
    ys = lib_odeint(f, y0, t, **kw)
    loss = (ys ** 2).sum() + ys[1].sum()
    return torch.autograd.grad(loss, [y0] + list(f.parameters()))


def rel(a, b):
    return max(float((x - z).abs().max()) / max(1e-30, float(z.abs().max())) for x, z in zip(a, b))


@pytest.mark.parametrize("method,opts", [("dopri5", None), ("dopri8", None), ("bosh3", None), ("adaptive_heun", None),
                                         ("rk4", dict(step_size=0.05)), ("midpoint", dict(step_size=0.05))])
@pytest.mark.parametrize("backwards", [False, True])
def test_gradients_equal_torchdiffeq_odeint_adjoint(method, opts, backwards):
    f = Field()
    y0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)
    t = t.flip(0) if backwards else t
    tol = dict(rtol=1e-5, atol=1e-7) if method == "adaptive_heun" else dict(rtol=1e-8, atol=1e-10)  # (2nd order)
    kw = dict(method=method, options=opts, **tol)
    # (dopri8's steps follow torchdiffeq's up to the rounding of its error estimate, ~1e-7 relative: see
    # test_adaptive.py; its gradients then agree to the solve's tolerance)
    assert rel(grads(flowsde.odeint_adjoint, f, y0, t, **kw), grads(torchdiffeq.odeint_adjoint, f, y0, t, **kw)) < (
        1e-6 if method == "dopri8" else 1e-10)


def test_tuple_state_and_explicit_params_equal_torchdiffeq():
    f = Field()
    params = tuple(f.parameters())

    def field(t, s):  # a plain function: the parameters passed as adjoint_params
        x, v = s
        return v, f(t, x) - 0.1 * v
    x0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    v0 = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 3, dtype=F64)
    res = []
    for lib in (flowsde, torchdiffeq):
        xs, vs = lib.odeint_adjoint(field, (x0, v0), t, adjoint_params=params, rtol=1e-8, atol=1e-10)
        res.append(torch.autograd.grad((xs ** 2).sum() + vs[-1].sum(), [x0, v0, *params]))
    assert rel(*res) < 1e-10


def test_adjoint_tends_to_backpropagation_at_the_methods_order():
    """Optimise-then-discretise against discretise-then-optimise: for RK4 the gap falls ~16x per halving of
    the step; for dopri5 at tight tolerances it is below 1e-7."""
    f = Field()
    y0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    gaps = []
    for h in (0.1, 0.05):
        kw = dict(method="rk4", options=dict(step_size=h))
        gaps.append(rel(grads(flowsde.odeint_adjoint, f, y0, t, **kw), grads(flowsde.odeint, f, y0, t, **kw)))
    assert 8 < gaps[0] / gaps[1] < 32, gaps
    kw = dict(rtol=1e-11, atol=1e-12)
    assert rel(grads(flowsde.odeint_adjoint, f, y0, t, **kw), grads(flowsde.odeint, f, y0, t, **kw)) < 1e-7


def test_the_forward_solve_keeps_no_graph():
    f = Field()
    y0 = torch.randn(4, 2, dtype=F64, requires_grad=True)
    ys = flowsde.odeint_adjoint(f, y0, torch.linspace(0, 1, 3, dtype=F64), method="rk4", options=dict(step_size=0.1))
    assert f.grad_modes == {False} and ys.requires_grad  # every forward evaluation ran without autograd
    n = f.calls
    ys.sum().backward()
    assert f.calls > n and y0.grad is not None and f.w1.grad is not None  # the backward pass re-evaluates


def test_event_gradients_through_the_adjoint():
    """odeint_event with odeint_interface=odeint_adjoint: the implicit-function gradients of the event time
    on top of the adjoint's, equal to backpropagation's (same solve) and to torchdiffeq's."""
    class Fall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drag = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))

        def forward(self, t, y):
            return torch.stack([y[1], -9.8 - self.drag * y[1]])
    res = []
    for lib, interface in ((flowsde, flowsde.odeint_adjoint), (flowsde, flowsde.odeint),
                           (torchdiffeq, torchdiffeq.odeint_adjoint)):
        f = Fall()
        y0 = torch.tensor([10.0, 1.0], dtype=F64, requires_grad=True)
        te, sol = lib.odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0],
                                   odeint_interface=interface, rtol=1e-10, atol=1e-12)
        res.append((float(te.detach()), torch.autograd.grad(te + sol[-1, 1] ** 2, [y0, f.drag])))
    assert res[0][0] == res[1][0]
    assert rel(res[0][1], res[1][1]) < 1e-7 and rel(res[0][1], res[2][1]) < 1e-9


def test_stats_and_errors():
    f = Field()
    y0 = torch.randn(4, 2, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    ys, st = flowsde.odeint_adjoint(f, y0, t, options=dict(return_stats=True))
    assert st["status"] == "success" and st["nfe"] > 0 and ys.requires_grad
    with pytest.raises(ValueError, match="nn.Module"):
        flowsde.odeint_adjoint(lambda t, y: -y, y0, t)
    assert flowsde.odeint_adjoint(lambda t, y: -y, y0, t, adjoint_params=()).requires_grad
    with pytest.raises(ValueError, match="adjoint_options"):
        flowsde.odeint_adjoint(f, y0, t, method="rk4", options=dict(step_size=0.1), adjoint_method="dopri5")
    with pytest.raises(ValueError, match="per_sample"):
        flowsde.odeint_adjoint(f, y0, t, options=dict(per_sample=True))
    with pytest.raises(ValueError, match="return_stats is not an option of the backward"):
        flowsde.odeint_adjoint(f, y0, t, adjoint_options=dict(return_stats=True))
    ys = flowsde.odeint_adjoint(f, y0, t, adjoint_options=dict(max_num_steps=2))
    with pytest.raises(RuntimeError, match="odeint_adjoint, backward pass"):  # (which solve ran out)
        ys.sum().backward()
    with pytest.raises(ValueError, match="gradients with respect to t are not supported with event_fn"):
        flowsde.odeint_adjoint(f, y0, t.clone().requires_grad_(True), event_fn=lambda t, y: y[0, 0] - 0.5)
    with pytest.raises(ValueError, match="gradients with respect to t"):  # (plain odeint: the grid is on the host)
        flowsde.odeint(f, y0, t.clone().requires_grad_(True))
    with pytest.raises(TypeError, match="adjoint_params"):
        flowsde.odeint_adjoint(f, y0, t, adjoint_params=[1.0])


def test_float32_state_with_float64_parameters_and_an_event_at_the_start():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[0.1, 1.0], [-1.0, -0.2]], dtype=F64))
            self.seen = set()

        def forward(self, t, y):
            self.seen.add(y.dtype)
            return torch.tanh(y @ self.w.T.to(y.dtype))
    t = torch.linspace(0, 1, 4)
    res = []
    for lib in (flowsde, torchdiffeq):
        f = Mixed()
        y0 = torch.tensor([1.0, 0.3], requires_grad=True)
        ys = lib.odeint_adjoint(f, y0, t, rtol=1e-6, atol=1e-7)
        res.append(torch.autograd.grad(ys.square().sum(), (y0, f.w)))
        if lib is flowsde:  # the field sees its state's dtype in the backward pass too (torchdiffeq's: float64)
            assert f.seen == {torch.float32}, f.seen
    assert res[0][1].dtype == F64 and rel(*res) < 1e-5  # float32 rounding apart
    f = Field()
    y0 = torch.tensor([[1.0, 2.0]], dtype=F64, requires_grad=True)
    te, sol = flowsde.odeint_adjoint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=lambda t, y: y[0, 0] - 1.0)
    assert float(te) == 0.0
    gy, gw = torch.autograd.grad(sol[-1].sum(), (y0, f.w1))  # (the backward pass tried a zero-length interval)
    assert torch.equal(gy, torch.ones_like(y0)) and torch.equal(gw, torch.zeros_like(gw))


def _inf_norm(x):
    return max(p.abs().max() for p in x) if isinstance(x, tuple) else x.abs().max()


@pytest.mark.parametrize("case", ["seminorm", "forward_norm", "forward_norm_seminorm", "adjoint_callable"])
@pytest.mark.parametrize("tuple_state", [False, True])
def test_norm_options_take_torchdiffeqs_backward_steps(case, tuple_state):
    """options norm (the forward's, which torchdiffeq's default adjoint norm also applies to y and a_y),
    adjoint_options norm="seminorm" (the parameters' adjoints left out) and a callable adjoint norm given
    (a_t, *y, *a_y, *a_p): the same forward and backward evaluations as torchdiffeq, the same gradients."""
    f = Field(seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 2, dtype=F64, generator=g, requires_grad=True)
    v0 = torch.randn(4, 2, dtype=F64, generator=g, requires_grad=True)
    t = torch.linspace(0, 1.5, 3, dtype=F64)
    if tuple_state:
        def field(t, s):
            return s[1], f(t, s[0]) - 0.2 * s[1]
        y0, inputs = (x0, v0), [x0, v0]
    else:
        field, y0, inputs = f, x0, [x0]
    opts, aopts = None, None
    if case in ("forward_norm", "forward_norm_seminorm"):
        opts = dict(norm=_inf_norm)
    if case in ("seminorm", "forward_norm_seminorm"):
        aopts = dict(norm="seminorm")
    if case == "adjoint_callable":  # the time adjoint and the parameters' adjoints weighted out
        aopts = dict(norm=lambda s: max(p.abs().max() for p in s[1:len(s) - 3]))
    calls = {}
    results = {}
    for name, lib in (("flowsde", flowsde), ("torchdiffeq", torchdiffeq)):
        f.calls = 0
        ys = lib.odeint_adjoint(field, y0, t, rtol=1e-6, atol=1e-8, options=opts, adjoint_options=aopts,
                                adjoint_params=tuple(f.parameters()))
        fwd = f.calls
        loss = sum((y ** 2).sum() + y[1].sum() for y in (ys if tuple_state else (ys,)))
        results[name] = torch.autograd.grad(loss, inputs + list(f.parameters()))
        calls[name] = (fwd, f.calls - fwd)
    assert calls["flowsde"] == calls["torchdiffeq"]
    assert rel(results["flowsde"], results["torchdiffeq"]) < 1e-10
    if case == "seminorm":  # fewer backward steps than the default norm, the same gradients to the tolerance
        f.calls = 0
        ys = flowsde.odeint_adjoint(field, y0, t, rtol=1e-6, atol=1e-8, adjoint_params=tuple(f.parameters()))
        fwd = f.calls
        loss = sum((y ** 2).sum() + y[1].sum() for y in (ys if tuple_state else (ys,)))
        full = torch.autograd.grad(loss, inputs + list(f.parameters()))
        assert f.calls - fwd > calls["flowsde"][1]
        assert rel(results["flowsde"], full) < 1e-4


def test_norm_option_errors():
    y0 = torch.randn(4, 2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(ValueError, match="'seminorm' is an adjoint_options value"):
        flowsde.odeint(lambda t, y: -y, y0, t, options=dict(norm="seminorm"))
    with pytest.raises(TypeError, match="option norm must be a callable"):
        flowsde.odeint(lambda t, y: -y, y0, t, options=dict(norm=2))
    with pytest.raises(ValueError, match="one number"):
        flowsde.odeint(lambda t, y: -y, y0, t, options=dict(norm=lambda x: x.abs().amax(dim=1)))
    with pytest.raises(ValueError, match="per_sample"):
        flowsde.odeint(lambda t, y: -y, y0, t, options=dict(norm=_inf_norm, per_sample=True))
    with pytest.raises(ValueError, match="adjoint_options norm must be 'seminorm'"):
        flowsde.odeint_adjoint(Field(), y0.clone().requires_grad_(True), t, adjoint_options=dict(norm="semi"))
    # fixed steps take it and are unchanged by it (as torchdiffeq's); a host number is accepted
    a = flowsde.odeint(lambda t, y: -y, y0, t, method="rk4", options=dict(step_size=0.1, norm=_inf_norm))
    b = flowsde.odeint(lambda t, y: -y, y0, t, method="rk4", options=dict(step_size=0.1))
    assert torch.equal(a, b)
    c = flowsde.odeint(lambda t, y: -y, y0, t, options=dict(norm=lambda x: float(x.abs().max())))
    assert torch.allclose(c[-1], y0 * torch.exp(torch.tensor(-1.0, dtype=F64)), atol=1e-7)


@pytest.mark.parametrize("method,opts", [("dopri5", None), ("rk4", dict(step_size=0.05))])
@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("tuple_state", [False, True])
def test_time_gradients_equal_torchdiffeq(method, opts, backwards, tuple_state):
    """A t that requires grad: dL/dt_i = f(t_i, y_i) . dL/dy_i at the outputs, dL/dt_0 from the time adjoint,
    as torchdiffeq computes them (one more evaluation per output time, as there)."""
    f = Field()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(5, 2, dtype=F64, generator=g, requires_grad=True)
    v0 = torch.randn(5, 2, dtype=F64, generator=g, requires_grad=True)
    if tuple_state:
        def field(t, s):
            return s[1], f(t, s[0]) - 0.3 * s[1]
        y0, inputs = (x0, v0), [x0, v0]
    else:
        field, y0, inputs = f, x0, [x0]
    res, extra = {}, {}
    for name, lib in (("flowsde", flowsde), ("torchdiffeq", torchdiffeq)):
        counts = []
        for tg in (False, True):
            t = torch.tensor([0.0, 0.4, 1.0, 1.3], dtype=F64)
            t = (t.flip(0) if backwards else t).requires_grad_(tg)
            f.calls = 0
            ys = lib.odeint_adjoint(field, y0, t, method=method, options=opts, rtol=1e-8, atol=1e-10,
                                    adjoint_params=tuple(f.parameters()))
            loss = sum((y ** 2).sum() + y[1].sum() for y in (ys if tuple_state else (ys,)))
            out = torch.autograd.grad(loss, inputs + list(f.parameters()) + ([t] if tg else []))
            counts.append(f.calls)
        res[name], extra[name] = out, counts
    assert rel(res["flowsde"], res["torchdiffeq"]) < 1e-10
    if method == "dopri5":  # the time adjoint, now not zero, steers the backward steps: torchdiffeq's steps
        assert extra["flowsde"] == extra["torchdiffeq"]
    else:  # fixed steps: one more evaluation per output time after the first, in both
        assert extra["flowsde"][1] - extra["flowsde"][0] == extra["torchdiffeq"][1] - extra["torchdiffeq"][0] == 3


def test_time_gradients_of_exponential_growth_are_exact():
    """y' = a y: y(T) = y0 exp(a (T - t0)), so dy(T)/dT = a y(T) and dy(T)/dt0 = -a y(T)."""
    a = torch.tensor(0.7, dtype=F64)
    y0 = torch.tensor([1.5, -0.5], dtype=F64)
    t = torch.tensor([0.2, 1.1], dtype=F64, requires_grad=True)
    ys = flowsde.odeint_adjoint(lambda s, y: a * y, y0, t, rtol=1e-10, atol=1e-12, adjoint_params=())
    (gt,) = torch.autograd.grad(ys[-1].sum(), [t])
    yT = float(ys[-1].sum())
    assert gt.tolist() == pytest.approx([-0.7 * yT, 0.7 * yT], rel=1e-8)


def test_a_one_element_tuple_state_hands_its_norm_a_tuple_in_the_backward_pass_too():
    """The forward norm of a 1-tuple state gets a tuple (as torchdiffeq); the backward default and seminorm
    norms apply it to y and a_y as tuples too (a bare tensor had made another norm: other backward steps)."""
    W = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(11), requires_grad=True)

    def norm(xs):
        assert isinstance(xs, tuple)
        return xs[0].abs().max()
    for aopts in (None, dict(norm="seminorm")):
        out = {}
        for name, lib in (("flowsde", flowsde), ("torchdiffeq", torchdiffeq)):
            n = [0]

            def f(t, ys):
                n[0] += 1
                return (torch.tanh(ys[0] @ W) * torch.cos(t),)
            y0 = (torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True),)
            t = torch.tensor([0.0, 2.0], dtype=F64, requires_grad=True)
            ys = lib.odeint_adjoint(f, y0, t, adjoint_params=(W,), options=dict(norm=norm), adjoint_options=aopts)
            fwd = n[0]
            g = torch.autograd.grad(ys[0][-1].sum(), [y0[0], W, t])
            out[name] = (fwd, n[0] - fwd, g)
        assert out["flowsde"][:2] == out["torchdiffeq"][:2]
        assert rel(out["flowsde"][2], out["torchdiffeq"][2]) < 1e-10
