"""Preallocated outputs: every step op's ``out=`` on both backends (the triton one in the interpreter), and the
step loops writing their states into a :class:`~flowsde.solvers.fixed.StatePool` — no state allocated per
step, the same numbers as without one, safe when a field returns its own input, off under autograd."""
import numpy as np
import pytest
import torch

import flowsde
from flowsde import kernels
from flowsde.kernels import PhiloxNoise, reference
from flowsde.paths import VPCosine
from flowsde.solvers import fixed

BACKENDS = ["torch"] + (["triton"] if kernels.HAS_TRITON else [])


def rnd(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_every_step_op_writes_its_result_into_out(backend, dtype):
    o = kernels.ops(backend, "cpu")
    y, k1, k2 = (rnd((5, 300), dtype, i) for i in range(3))
    g = rnd((5, 300), dtype, 3)
    dw = rnd((5, 300), dtype, 4)
    cases = {
        "lincomb": lambda out: o.lincomb(y, [(0.1, k1), (-0.2, k2)], out=out),
        "combine": lambda out: o.combine([(0.9, y), (0.3, k1)], [(0.5, g)], PhiloxNoise(11), out=out),
        "diagonal": lambda out: o.sde_update(y, [(0.1, k1)], [(0.3, g)], dw, "diagonal", out=out),
        "scalar": lambda out: o.sde_update(y, [(0.1, k1)], [(0.3, g.unsqueeze(-1))], dw[:, :1], "scalar", out=out),
        "drawn": lambda out: o.sde_update(y, [(0.1, k1)], [(0.3, g)], PhiloxNoise(3), "diagonal", out=out),
    }
    for name, op in cases.items():
        want = op(None)
        out = torch.full_like(y, float("nan"))
        got = op(out)
        assert got is out, name
        assert torch.equal(out, want), name
    # additive / general noise: the matrix kernel on the triton backend
    y2, f2 = rnd((6, 3), dtype, 5), rnd((6, 3), dtype, 6)
    G, w = rnd((6, 3, 2), dtype, 7), rnd((6, 2), dtype, 8)
    for dW in (w, PhiloxNoise(9)):
        want = o.sde_update(y2, [(0.1, f2)], [(0.5, G)], dW, "general")
        out = torch.empty_like(y2)
        assert o.sde_update(y2, [(0.1, f2)], [(0.5, G)], dW, "general", out=out) is out
        assert torch.equal(out, want)
    # the per-sample error norm (float32 for half data)
    e = rnd((5, 300), dtype, 9) * 1e-3
    want = o.error_norm(y, k1, e, 1e-3, 1e-4)
    out = torch.empty(5, dtype=want.dtype)
    assert o.error_norm(y, k1, e, 1e-3, 1e-4, out=out) is out and torch.equal(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_may_be_an_input_and_a_wrong_out_is_refused(backend):
    o = kernels.ops(backend, "cpu")
    y, k = rnd((4, 70)), rnd((4, 70), seed=1)
    want = y + 0.5 * k
    y_in = y.clone()
    assert o.lincomb(y_in, [(0.5, k)], out=y_in) is y_in and torch.allclose(y_in, want, rtol=0, atol=1e-15)
    k_in = k.clone()  # out is a later term: computed apart, then copied in
    assert torch.allclose(o.lincomb(y, [(0.5, k_in)], out=k_in), want, rtol=0, atol=1e-15)
    G = rnd((4, 70, 1))
    with pytest.raises(ValueError, match="cannot be written"):
        o.sde_update(y, [(0.1, k)], [(0.2, G)], rnd((4, 1)), "general", out=torch.empty(4, 70, dtype=torch.int64))
    with pytest.raises(ValueError, match="out"):
        o.lincomb(y, [(0.5, k)], out=torch.empty(4, 71, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        o.error_norm(y, k, k, 1e-3, 1e-4, out=torch.empty(3, dtype=torch.float64))


@pytest.fixture(autouse=True)
def every_state_pooled(monkeypatch):
    """The loops keep a pool for states of at least StatePool.MIN_BYTES; these tests' small states too."""
    monkeypatch.setattr(fixed.StatePool, "MIN_BYTES", 0)


def test_small_states_get_no_pool(monkeypatch):
    monkeypatch.setattr(fixed.StatePool, "MIN_BYTES", 1 << 20)
    assert fixed.StatePool(torch.empty(1 << 17)).take() is None  # 512 KiB of float32: allocated per step
    assert fixed.StatePool(torch.empty(1 << 18)).take() is not None


def test_the_pool_hands_out_buffers_nothing_live_shares_and_none_under_autograd():
    like = rnd((3, 4))
    pool = fixed.StatePool(like, limit=3)
    a = pool.take(like)
    b = pool.take(a)  # a is live: another buffer
    assert a is not b and pool.take([(1.0, a)], [b]) is not None and len(pool.buffers) == 3
    assert pool.take(a, b, pool.buffers[2]) is None  # all three in use, the limit reached: allocate
    assert pool.take(b) is a  # a is free again: reused
    assert pool.take(like.float()) is None  # a float32 operand: the result would not be laid out as like
    leaf = like.clone().requires_grad_()
    assert pool.take(leaf) is None  # recorded by autograd: out= has no derivative
    with torch.no_grad():
        assert pool.take(leaf) is not None
    assert pool.owns(a) and not pool.owns(like) and pool.kept(a) is not a and pool.kept(like) is like


class _Spy:
    """Counts what the loops' pools hand out: buffers made, takes answered, takes refused."""

    def __init__(self, monkeypatch, off=False):
        self.pools, self.refused, self.given = [], 0, 0
        spy = self
        init, take = fixed.StatePool.__init__, fixed.StatePool.take

        def spy_init(pool, like, limit=8):
            init(pool, like, limit)
            spy.pools.append(pool)

        def spy_take(pool, *parts):
            got = None if off else take(pool, *parts)
            if got is None:
                spy.refused += 1
            else:
                spy.given += 1
            return got

        monkeypatch.setattr(fixed.StatePool, "__init__", spy_init)
        monkeypatch.setattr(fixed.StatePool, "take", spy_take)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()


def _loops(backend, steps):
    """Every fixed-step loop that writes into a pool, on a small problem: ``name -> run()``."""
    net = _mlp()

    def model(x, t):
        return net(torch.cat([x, t.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)], 1))

    x0 = rnd((64, 2), seed=3)
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    bm = flowsde.GridBrownian(np.linspace(0.0, 1.0, steps + 1), (64, 2), seed=4, dtype=torch.float64)

    class SDE:
        noise_type = "diagonal"

        def __init__(self, kind):
            self.sde_type = kind

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return 0.3 * torch.ones_like(y)

    kw = dict(backend=backend, steps=steps)
    with torch.no_grad():
        return {
            "sample heun": lambda: flowsde.sample(model, x0, **kw),
            "sample rk4": lambda: flowsde.sample(model, x0, method="rk4", **kw),
            "sample ddim eta": lambda: flowsde.sample(model, x0, VPCosine(), "epsilon", "ddim", eta=1.0, seed=1, t_start=0.02,
                                                      t_end=0.98, **kw),
            "sample dpmpp_2m": lambda: flowsde.sample(model, x0, VPCosine(), "epsilon", "dpmpp_2m", t_start=0.02, t_end=0.98,
                                                      **kw),
            "sample euler sde": lambda: flowsde.sample(model, x0, VPCosine(), "epsilon", "euler", sigma=0.5, seed=2,
                                                       t_start=0.02, t_end=0.98, **kw),
            "odeint rk4": lambda: flowsde.odeint(lambda tt, y: -y + torch.sin(tt), x0, t, method="rk4",
                                                 options=dict(step_size=1.0 / steps, backend=backend)),
            "sdeint euler": lambda: flowsde.sdeint(SDE("ito"), x0, t, bm=bm, method="euler", dt=1.0 / steps,
                                                   options=dict(backend=backend)),
            "sdeint heun": lambda: flowsde.sdeint(SDE("stratonovich"), x0, t, bm=bm, method="heun", dt=1.0 / steps,
                                                  options=dict(backend=backend)),
        }


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_loops_allocate_no_state_per_step_and_give_the_same_numbers(backend, monkeypatch):
    for name in _loops(backend, 4):
        results, made = {}, {}
        for steps in (4, 24):
            for off in (False, True):
                with monkeypatch.context() as m:
                    spy = _Spy(m, off)
                    with torch.no_grad():
                        results[steps, off] = _loops(backend, steps)[name]()
                if not off:
                    assert spy.given > 0 and spy.refused == 0, (name, spy.given, spy.refused)
                    made[steps] = sum(len(p.buffers) for p in spy.pools)
        assert made[24] == made[4] <= 5, (name, made)  # the buffers do not grow with the number of steps
        for steps in (4, 24):
            assert torch.equal(results[steps, False], results[steps, True]), name


def test_a_field_that_returns_its_input_keeps_every_stage(monkeypatch):
    """dy/dt = y written as ``lambda t, y: y``: each stage derivative is the stage input's buffer itself, so
    the pool must hand the next stage input another one (RK4 after one unit step: e to 4th order)."""
    y0 = torch.ones(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    spy = _Spy(monkeypatch)
    got = flowsde.odeint(lambda tt, y: y, y0, t, method="rk4_classic", options=dict(step_size=1.0))[-1]
    assert spy.given > 0
    assert torch.allclose(got, torch.full_like(y0, 1 + 1 + 1 / 2 + 1 / 6 + 1 / 24), rtol=0, atol=1e-15)
    fine = flowsde.odeint(lambda tt, y: y, y0, torch.linspace(0, 1, 3, dtype=torch.float64), method="rk4",
                          options=dict(step_size=0.01))
    assert torch.allclose(fine[-1], torch.full_like(y0, np.e), rtol=1e-9, atol=0)
    assert torch.allclose(fine[1], torch.full_like(y0, np.exp(0.5)), rtol=1e-9, atol=0)  # saved outputs kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autograd_the_loops_allocate_and_differentiate(backend, monkeypatch):
    spy = _Spy(monkeypatch)
    y0 = rnd((8, 2)).requires_grad_()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y1 = flowsde.odeint(lambda tt, y: -2.0 * y, y0, t, method="rk4", options=dict(step_size=0.1, backend=backend))
    y1[-1].sum().backward()
    h = 0.1  # RK4's amplification factor of y' = -2 y, ten steps
    r = 1 - 2 * h + (2 * h) ** 2 / 2 - (2 * h) ** 3 / 6 + (2 * h) ** 4 / 24
    assert torch.allclose(y0.grad, torch.full_like(y0, r ** 10), rtol=1e-13, atol=0)
    assert spy.given == 0 and spy.refused > 0


def test_torch_func_transforms_pass_through_the_pooled_loops():
    """vmap / grad / jvp wrap the states in tensors without storage: the pool must step aside before it looks
    at any (review finding: it read the storage first)."""
    ys = rnd((2, 4, 3))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    out = torch.func.vmap(lambda y: flowsde.odeint(lambda tt, v: -v, y, t, method="rk4",
                                                   options=dict(step_size=0.1)))(ys)
    assert torch.allclose(out[:, -1], ys * np.exp(-1.0), rtol=1e-6)
    x0 = rnd((16, 2), seed=1)
    g = torch.func.grad(lambda x: flowsde.sample(lambda v, tt: -v, x, method="heun", steps=5, backend="torch").sum())(x0)
    assert torch.allclose(g, torch.full_like(x0, (1 - 0.2 + 0.02) ** 5), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_in_any_layout_are_pooled(backend):
    """A transposed (dense, batch not outermost) state: the pool's buffers are contiguous, as the fused kernel
    writes (review finding: buffers laid out as the state were refused by the kernel's out=)."""
    x0 = rnd((2, 64)).t()  # (64, 2), strides (1, 64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    want = flowsde.odeint(lambda tt, v: -v, x0.contiguous(), t, method="rk4", options=dict(step_size=0.1,
                                                                                               backend=backend))
    got = flowsde.odeint(lambda tt, v: -v, x0, t, method="rk4", options=dict(step_size=0.1, backend=backend))
    assert torch.equal(got, want)
    with torch.no_grad():
        a = flowsde.sample(lambda v, tt: -v, x0, method="heun", steps=4, backend=backend)
        b = flowsde.sample(lambda v, tt: -v, x0.contiguous(), method="heun", steps=4, backend=backend)
    assert torch.equal(a, b)


def test_out_with_mixed_dtypes_and_differentiated_coefficients_equals_the_allocating_op():
    """A narrower first term is widened before it is scaled (review finding: it was scaled in its own dtype,
    1e8 overflowed float16); a coefficient tensor that requires grad sends out= the differentiable way."""
    t0 = torch.full((3, 4), 1e4, dtype=torch.float16)
    k = rnd((3, 4), torch.float32, 1)
    for c0 in (1.0, 1e4):
        want = reference.combine([(c0, t0), (0.5, k)])
        out = torch.empty_like(want)
        assert torch.equal(reference.combine([(c0, t0), (0.5, k)], out=out), want)
        assert torch.isfinite(out).all()
    c = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y = rnd((3, 4))
    res = reference.lincomb(y, [(c, k.double())], out=torch.empty(3, 4, dtype=torch.float64))
    res.sum().backward()
    assert torch.allclose(c.grad, k.double().sum())


def test_the_environment_variable_turns_every_pool_off(monkeypatch):
    monkeypatch.setenv("FLOWSDE_STATE_POOL", "0")
    spy = _Spy(monkeypatch)
    flowsde.odeint(lambda tt, v: -v, rnd((4, 2)), torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                   options=dict(step_size=0.25))
    assert spy.given == 0 and spy.refused > 0
