"""``flowsde.sdeint_adjoint``: torchsde's ``sdeint_adjoint`` gradients on the same Brownian path (same backward
steps), convergence to backpropagation through the solve as dt shrinks, no graph kept by the forward solve,
the default tree, and clear errors."""
import math

import pytest
import torch
import torchsde

import flowsde

F64 = torch.float64


class NeuralSDE(torch.nn.Module):
    """A small time-dependent SDE with parameters in the drift and in the diffusion, for each noise type."""

    def __init__(self, sde_type, noise_type, d=3, m=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sde_type, self.noise_type, self.d, self.m = sde_type, noise_type, d, m
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(d, generator=g, dtype=F64) * 0.3)
        cols = m if noise_type in ("general", "additive") else 1
        self.wg = torch.nn.Parameter(torch.randn(d, d * cols, generator=g, dtype=F64) * 0.3)
        self.grad_modes = set()

    def f(self, t, y):
        self.grad_modes.add(torch.is_grad_enabled())
        return torch.tanh(y @ self.w + self.b) * torch.cos(t)

    def g(self, t, y):
        nt = self.noise_type
        if nt == "diagonal":  # g_i depends on y_i alone, as diagonal noise requires
            return 0.3 * torch.sigmoid(y * self.wg[:, 0]) + 0.1 * t
        if nt == "scalar":
            return (0.3 * torch.tanh(y @ self.wg) + 0.2).unsqueeze(-1)
        if nt == "additive":
            return (0.2 * self.wg[0].reshape(self.d, self.m) + 0.1 * t).expand(y.shape[0], self.d, self.m)
        return 0.3 * torch.tanh(y @ self.wg).reshape(y.shape[0], self.d, self.m)

    def noise_shape(self, batch):
        return {"diagonal": (batch, self.d), "scalar": (batch, 1)}.get(self.noise_type, (batch, self.m))


def _grads(fn, sde, y0, ts, **kw):
    ys = fn(sde, y0, ts, **kw)
    loss = (ys ** 2).sum() + ys[1].sum()
    return ys.detach(), torch.autograd.grad(loss, [y0] + list(sde.parameters()))


def rel(a, b):
    return max(float((x - z).abs().max()) / max(1e-30, float(z.abs().max())) for x, z in zip(a, b))


@pytest.mark.parametrize("sde_type,noise_type,method,adjoint_method", [
    ("stratonovich", "diagonal", "heun", "midpoint"), ("stratonovich", "diagonal", "heun", "heun"),
    ("stratonovich", "scalar", "heun", "midpoint"), ("stratonovich", "general", "heun", "midpoint"),
    ("stratonovich", "additive", "heun", "heun"),
    ("ito", "diagonal", "euler", "euler"), ("ito", "diagonal", "milstein", "euler"), ("ito", "scalar", "euler", "euler"),
    ("ito", "general", "euler", "euler"), ("ito", "additive", "euler", "euler"),
    ("ito", "diagonal", "euler", "milstein"), ("ito", "diagonal", "milstein", None),  # (None: torchsde's default)
    ("stratonovich", "diagonal", "milstein", "milstein"), ("stratonovich", "diagonal", "midpoint", "euler_heun"),
    ("stratonovich", "general", "euler_heun", "euler_heun"), ("stratonovich", "scalar", None, None)])
def test_gradients_equal_torchsde_sdeint_adjoint(sde_type, noise_type, method, adjoint_method):
    """Same BrownianInterval, same forward and backward methods and steps: the gradients of y0 and of the drift's
    and diffusion's parameters equal torchsde's to 1e-12 (Itô: torchsde's reverse-drift and adjoint corrections;
    a last interval that is not a whole number of steps, 0.3)."""
    sde = NeuralSDE(sde_type, noise_type)
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ts = torch.tensor([0.0, 0.25, 0.5, 0.8], dtype=F64)
    bm = torchsde.BrownianInterval(0.0, 0.8, size=sde.noise_shape(4), dtype=F64, entropy=3,
                                   levy_area_approximation="none")
    kw = dict(bm=bm, method=method, adjoint_method=adjoint_method, dt=2 ** -5)
    ys_a, ga = _grads(flowsde.sdeint_adjoint, sde, y0, ts, **kw)
    ys_b, gb = _grads(torchsde.sdeint_adjoint, sde, y0, ts, **kw)
    assert float((ys_a - ys_b).abs().max()) < 1e-12
    assert rel(ga, gb) < 1e-12


@pytest.mark.parametrize("sde_type,method,adjoint_method,rates", [
    ("stratonovich", "heun", "midpoint", (3.0, 3.0, 3.0, 3.0)), ("ito", "euler", "euler", (3.0, 3.0, 3.0, 1.4)),
    ("ito", "milstein", "milstein", (3.0, 3.0, 3.0, 3.0))])
def test_gradients_tend_to_backpropagation_through_the_solve(sde_type, method, adjoint_method, rates):
    """On one Brownian path, the adjoint's gradients (y0, the drift's w and b, the diffusion's wg) approach those of
    backpropagating through flowsde.sdeint as dt shrinks: each 4x smaller dt at least `rates` times closer
    (Stratonovich midpoint/Heun and Itô Milstein: first order; Itô Euler–Maruyama: first order in y0 and the
    drift, half order in the diffusion's parameters)."""
    sde = NeuralSDE(sde_type, "diagonal")
    y0 = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    bm = flowsde.VirtualBrownianTree(0.0, 1.0, shape=(64, 3), seed=5, tol=2 ** -14, dtype=F64)
    errs = []
    for dt in (2 ** -3, 2 ** -5, 2 ** -7):
        _, a = _grads(flowsde.sdeint_adjoint, sde, y0, ts, bm=bm, method=method, adjoint_method=adjoint_method, dt=dt)
        _, b = _grads(flowsde.sdeint, sde, y0, ts, bm=bm, method=method, dt=dt)
        errs.append([float((p - q).abs().max() / q.abs().max()) for p, q in zip(a, b)])
    for coarse, fine in zip(errs, errs[1:]):
        assert len(coarse) == len(rates)
        for e0, e1, r in zip(coarse, fine, rates):
            assert e0 / e1 > r


def test_forward_keeps_no_graph_and_the_default_tree_is_seeded():
    sde = NeuralSDE("stratonovich", "general")
    y0 = torch.randn(3, 3, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 0.5], dtype=F64)
    sde.grad_modes.clear()
    ys = flowsde.sdeint_adjoint(sde, y0, ts, dt=0.05, seed=7)
    assert sde.grad_modes == {False} and ys.requires_grad
    g1 = torch.autograd.grad(ys.sum(), [y0])[0]
    g2 = torch.autograd.grad(flowsde.sdeint_adjoint(sde, y0, ts, dt=0.05, seed=7).sum(), [y0])[0]
    g3 = torch.autograd.grad(flowsde.sdeint_adjoint(sde, y0, ts, dt=0.05, seed=8).sum(), [y0])[0]
    assert torch.equal(g1, g2) and not torch.equal(g1, g3)
    # the default path: a GridBrownian of (batch, m) from the seed on the grid both passes step on (here the
    # forward grid, which the backward pass walks in reverse): passing it gives the same numbers
    grid = flowsde.solvers.fixed.uniform_grid(0.0, 0.5, 0.05)
    motion = flowsde.GridBrownian(grid=grid, shape=(3, 2), seed=7, dtype=F64)
    g4 = torch.autograd.grad(flowsde.sdeint_adjoint(sde, y0, ts, bm=motion, dt=0.05).sum(), [y0])[0]
    assert torch.allclose(g1, g4, rtol=1e-12, atol=0)  # (its grid points agree to rounding: 0.5 - 0.05 k)
    ys, st = flowsde.sdeint_adjoint(sde, y0, ts, dt=0.05, seed=7, options=dict(return_stats=True))
    assert st["steps"] == 10 and ys.requires_grad


def test_errors():
    sde = NeuralSDE("ito", "diagonal")
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="nn.Module"):
        flowsde.sdeint_adjoint(type("P", (), dict(f=sde.f, g=sde.g, noise_type="diagonal", sde_type="ito"))(), y0, ts)
    with pytest.raises(ValueError, match="'milstein' needs diagonal noise"):
        flowsde.sdeint_adjoint(NeuralSDE("ito", "general"), y0, ts, adjoint_method="milstein")
    with pytest.raises(ValueError, match="not a backward method for ito"):
        flowsde.sdeint_adjoint(sde, y0, ts, adjoint_method="midpoint")
    with pytest.raises(NotImplementedError, match="adjoint_adaptive"):
        flowsde.sdeint_adjoint(sde, y0, ts, adjoint_adaptive=True)
    with pytest.raises(ValueError, match="gradients with respect to ts"):
        flowsde.sdeint_adjoint(sde, y0, ts.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="unknown option"):
        flowsde.sdeint_adjoint(sde, y0, ts, adjoint_options=dict(step_size=0.1))
    with pytest.raises(ValueError, match="logqp=True needs the prior drift"):
        flowsde.sdeint_adjoint(sde, y0, ts, logqp=True)
    with pytest.raises(ValueError, match=r"logqp=True needs y0 of shape \(batch, d\)"):
        flowsde.sdeint(LatentSDE("ito", "diagonal"), torch.randn(2, 3, 1, dtype=F64), ts, logqp=True)
    ys = flowsde.sdeint_adjoint(sde, y0, ts, dt=0.1, seed=0)
    with pytest.raises(RuntimeError, match="does not support double backward"):  # refused, not a silently
        torch.autograd.grad(ys.sum(), [y0], create_graph=True)                   # wrong second derivative
    with pytest.raises(ValueError, match="sde has no attribute noise_type"):
        flowsde.sdeint_adjoint(torch.nn.Linear(3, 3), y0, ts)


class LatentSDE(NeuralSDE):
    """A posterior SDE with a prior drift h (a latent SDE), for torchsde's logqp=True."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.hw = torch.nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(9), dtype=F64) * 0.4)

    def h(self, t, y):
        return -y @ self.hw


@pytest.mark.parametrize("sde_type,noise_type,method,adjoint_method", [
    ("ito", "diagonal", "euler", "euler"), ("ito", "diagonal", "milstein", None),
    ("stratonovich", "diagonal", "heun", "midpoint"), ("stratonovich", "scalar", "heun", "heun"),
    ("ito", "general", "euler", "euler"), ("ito", "additive", "euler", "euler")])
def test_logqp_equals_torchsde_through_sdeint_and_the_adjoint(sde_type, noise_type, method, adjoint_method):
    """logqp=True: the solution and the log-ratio increments (T - 1, batch) of torchsde's SDELogqp (|(f - h) / g|^2 / 2
    for diagonal noise, the pseudo-inverse otherwise), and their gradients by backpropagation (sdeint) and by the
    adjoint (sdeint_adjoint), equal to torchsde's on the same BrownianInterval (of d + 1 channels for diagonal
    noise, as torchsde's augmented state)."""
    sde = LatentSDE(sde_type, noise_type)
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ts = torch.tensor([0.0, 0.25, 0.5, 0.8], dtype=F64)
    size = (4, 4) if noise_type == "diagonal" else sde.noise_shape(4)
    bm = torchsde.BrownianInterval(0.0, 0.8, size=size, dtype=F64, entropy=3, levy_area_approximation="none")
    out = {}
    for name, fn in (("ours", flowsde.sdeint), ("ref", torchsde.sdeint), ("ours_adj", flowsde.sdeint_adjoint),
                     ("ref_adj", torchsde.sdeint_adjoint)):
        kw = dict(bm=bm, method=method, dt=2 ** -5, logqp=True)
        if name.endswith("adj"):
            kw["adjoint_method"] = adjoint_method
        ys, log_ratio = fn(sde, y0, ts, **kw)
        loss = (ys ** 2).sum() + 0.3 * log_ratio.sum()
        out[name] = (ys.detach(), log_ratio.detach(), torch.autograd.grad(loss, [y0] + list(sde.parameters())))
    assert out["ours"][1].shape == (3, 4)
    for ours, ref in (("ours", "ref"), ("ours_adj", "ref_adj")):
        assert float((out[ours][0] - out[ref][0]).abs().max()) < 1e-12
        assert float((out[ours][1] - out[ref][1]).abs().max()) < 1e-12
        assert rel(out[ours][2], out[ref][2]) < 1e-12


class _ItoWdW(torch.nn.Module):
    """(W, Z) with dZ = W dW (Itô): under Euler–Maruyama W_1^2 - 2 Z_1 is the sum of the squared increments."""
    noise_type, sde_type = "general", "ito"

    def f(self, t, y):
        return torch.zeros_like(y)

    def g(self, t, y):
        return torch.stack([torch.ones_like(y[:, 0]), y[:, 0]], 1).unsqueeze(-1)


def test_the_default_motion_is_exact_at_every_step_and_serves_srk_and_float32_grid_times():
    """bm=None: the increments have the Brownian variance at every forward step (dt not a power of two, outputs
    off the step grid: a tree with leaves of dt / 8 had made the quadratic variation 3 % low), adaptive steps
    are unbiased (E[X_1] = 1 for dX = X dW; it had been 1.28), srk runs (its areas come with the motion), and
    float32 ts on a GridBrownian are the grid times the forward pass snapped them to."""
    ts = torch.tensor([0.0, 0.37, 1.0], dtype=F64)
    ys = flowsde.sdeint_adjoint(_ItoWdW(), torch.zeros(20000, 2, dtype=F64), ts, dt=0.01, seed=0, method="euler",
                                adjoint_params=())
    qv = ys[-1, :, 0] ** 2 - 2 * ys[-1, :, 1]
    assert abs(float(qv.mean()) - 1.0) < 5 * float(qv.std()) / 20000 ** 0.5

    class GBM(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))

        def f(self, t, y):
            return torch.zeros_like(y)

        def g(self, t, y):
            return self.s * y
    x1 = flowsde.sdeint_adjoint(GBM(), torch.ones(4000, 1, dtype=F64), ts[[0, 2]], dt=0.05, adaptive=True,
                                rtol=1e-3, atol=1e-3, seed=0)[-1].detach()
    assert abs(float(x1.mean()) - 1.0) < 5 * (math.e - 1) ** 0.5 / 4000 ** 0.5  # (the bias had been 0.28)
    sde = NeuralSDE("ito", "diagonal")
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ys = flowsde.sdeint_adjoint(sde, y0, ts, dt=0.05, method="srk", seed=1)
    assert torch.autograd.grad(ys.sum(), [y0])[0].shape == y0.shape
    # float32 ts on a GridBrownian: the same gradients as torchsde's adjoint on that motion
    sde32 = NeuralSDE("ito", "diagonal").float()
    y32 = y0.detach().float().requires_grad_(True)
    t32 = torch.tensor([0.0, 0.1, 0.3])
    bm = flowsde.GridBrownian(t0=0.0, t1=0.3, steps=3, shape=(4, 3), seed=1, dtype=torch.float32)
    a = torch.autograd.grad(flowsde.sdeint_adjoint(sde32, y32, t32, bm=bm, dt=0.1, method="euler",
                                                   adjoint_method="euler").sum(), [y32])[0]
    b = torch.autograd.grad(torchsde.sdeint_adjoint(sde32, y32, t32, bm=bm, dt=0.1, method="euler",
                                                    adjoint_method="euler").sum(), [y32])[0]
    assert torch.allclose(a, b, atol=1e-5)


# ---- reversible Heun: the exact gradient of the discretised solve ------------------------------------------

@pytest.mark.parametrize("noise_type", ["diagonal", "scalar", "additive", "general"])
def test_reversible_heun_adjoint_is_backpropagation_exactly_and_torchsde_on_whole_steps(noise_type):
    """adjoint_reversible_heun (the default for method='reversible_heun') runs the solve backwards exactly: its
    gradients equal backpropagation through flowsde.sdeint's reversible Heun solve to rounding, for output times
    inside steps too (where torchsde's, stepping from each output time, differ by 5-20 % here), and torchsde's
    sdeint_adjoint where the output times are whole numbers of steps apart."""
    sde = NeuralSDE("stratonovich", noise_type)
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    for ts, whole in ((torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64), True),
                      (torch.tensor([0.0, 0.3, 0.55, 1.0], dtype=F64), False)):
        bm = torchsde.BrownianInterval(0.0, 1.0, size=sde.noise_shape(4), dtype=F64, entropy=5)
        kw = dict(bm=bm, method="reversible_heun", dt=2 ** -5)
        ys, ours = _grads(flowsde.sdeint_adjoint, sde, y0, ts, **kw)
        ys_bp, bp = _grads(flowsde.sdeint, sde, y0, ts, **kw)
        assert torch.equal(ys, ys_bp)
        assert rel(ours, bp) < 1e-12
        _, ref = _grads(torchsde.sdeint_adjoint, sde, y0, ts, **kw)
        if whole:
            assert rel(ours, ref) < 1e-12
        else:  # (torchsde warns that its backward steps differ from the forward's here)
            assert rel(ref, bp) > 1e-3


def test_reversible_heun_adjoint_makes_one_evaluation_per_step_keeps_no_graph_and_takes_logqp_float32_and_seed():
    class Counting(LatentSDE):
        calls = 0

        def f(self, t, y):
            Counting.calls += 1
            return super().f(t, y)

    sde = Counting("stratonovich", "diagonal")
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    bm = flowsde.VirtualBrownianTree(0.0, 1.0, shape=(4, 3), seed=1, dtype=F64)
    ys = flowsde.sdeint_adjoint(sde, y0, ts, bm=bm, method="reversible_heun", dt=0.05)
    assert ys.grad_fn is not None and Counting.calls == 21  # forward: 20 steps, one drift each, and the start
    Counting.calls = 0
    ys.sum().backward()
    assert Counting.calls == 21  # backward: one (f, g) per grid point (torchsde's backward step makes two)
    bm1 = flowsde.VirtualBrownianTree(0.0, 1.0, shape=(4, 4), seed=1, dtype=F64)  # (d + 1 channels for logqp)
    kw = dict(bm=bm1, method="reversible_heun", dt=0.05, logqp=True)
    grads = []
    for fn in (flowsde.sdeint_adjoint, flowsde.sdeint):
        ys, log_ratio = fn(sde, y0, ts, **kw)
        grads.append(torch.autograd.grad(ys.pow(2).sum() + log_ratio.sum(), [y0] + list(sde.parameters())))
    assert rel(*grads) < 1e-9
    ys = flowsde.sdeint_adjoint(sde, y0, ts, method="reversible_heun", dt=0.05, seed=4)  # bm=None
    (g,) = torch.autograd.grad(ys.sum(), y0)
    assert torch.isfinite(g).all() and torch.equal(ys, flowsde.sdeint_adjoint(sde, y0, ts, method="reversible_heun",
                                                                              dt=0.05, seed=4))
    sde32 = NeuralSDE("stratonovich", "general").float()
    y32 = y0.detach().float().requires_grad_(True)
    bm32 = torchsde.BrownianInterval(0.0, 1.0, size=(4, 2), entropy=2)
    a = _grads(flowsde.sdeint_adjoint, sde32, y32, ts.float(), bm=bm32, method="reversible_heun", dt=0.05)[1]
    b = _grads(flowsde.sdeint, sde32, y32, ts.float(), bm=bm32, method="reversible_heun", dt=0.05)[1]
    assert a[0].dtype == torch.float32 and rel(a, b) < 1e-5


def test_reversible_heun_adjoint_errors():
    sde = NeuralSDE("stratonovich", "diagonal")
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="runs a method='reversible_heun' solve backwards"):
        flowsde.sdeint_adjoint(sde, y0, ts, method="heun", adjoint_method="adjoint_reversible_heun")
    with pytest.raises(ValueError, match="fixed steps only"):
        flowsde.sdeint_adjoint(sde, y0, ts, method="reversible_heun", adaptive=True)
    with pytest.raises(ValueError, match="the forward method is 'euler'"):
        flowsde.sdeint_adjoint(NeuralSDE("ito", "diagonal"), y0, ts, method="euler",
                               adjoint_method="adjoint_reversible_heun")
    with pytest.raises(ValueError, match="solves stratonovich SDEs"):
        flowsde.sdeint_adjoint(NeuralSDE("ito", "diagonal"), y0, ts, method="reversible_heun")
    # a continuous-adjoint backward method for a reversible Heun solve: allowed (approximate gradients)
    ys = flowsde.sdeint_adjoint(sde, y0, ts, method="reversible_heun", adjoint_method="midpoint", dt=0.1, seed=0)
    assert torch.isfinite(torch.autograd.grad(ys.sum(), y0)[0]).all()


def test_backward_steps_evaluate_the_drift_once_per_stage_point():
    """Each backward step evaluates the SDE once per point it visits: midpoint and Heun two, Euler–Heun two (its
    predictor and corrector combinations at the step's start share one evaluation), Euler one."""
    class Counting(NeuralSDE):
        calls = 0

        def f(self, t, y):
            Counting.calls += 1
            return super().f(t, y)

    y0 = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    for kind, method, per_step in (("stratonovich", "euler_heun", 2), ("stratonovich", "midpoint", 2),
                                   ("stratonovich", "heun", 2), ("ito", "euler", 1)):
        sde = Counting(kind, "diagonal")
        ys = flowsde.sdeint_adjoint(sde, y0, ts, method="euler" if kind == "ito" else "heun", adjoint_method=method,
                                    dt=0.1, seed=0)
        Counting.calls = 0
        ys.sum().backward()
        assert Counting.calls == 10 * per_step, method
