"""The workloads of the CPU benchmarks, each written for flowsde and for its peers.

Shared by the pytest-benchmark suite (``benchmarks/test_bench_core.py``) and the one-run ratio script
(``benchmarks/compare_cpu.py``), so both time exactly the same work.
"""
from __future__ import annotations

import math

import torch
import torchdiffeq
import torchsde

import flowsde
from flowsde.problems import OrnsteinUhlenbeck

THETA, SIGMA = 1.0, 0.5


def ou_problem(B=10_000, N=1_000, d=1, dtype=torch.float32):
    """OU Euler–Maruyama workload: B paths, N steps over [0, 1]."""
    sde = OrnsteinUhlenbeck(theta=THETA, sigma=SIGMA)
    y0 = torch.ones(B, d, dtype=dtype)
    ts = torch.tensor([0.0, 1.0], dtype=dtype)
    return sde, y0, ts, 1.0 / N


def ou_flowsde(sde, y0, ts, dt, seed=0):
    return flowsde.sdeint(sde, y0, ts, method="euler", dt=dt, seed=seed)


def ou_torchsde(sde, y0, ts, dt, seed=0):
    bm = torchsde.BrownianInterval(float(ts[0]), float(ts[-1]), size=y0.shape, dtype=y0.dtype, entropy=seed)
    return torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=dt)


def ou_hand_loop_generic(sde, y0, ts, dt, seed=0):
    """A hand-written Euler–Maruyama loop for any diagonal-noise SDE object (calls sde.f and sde.g)."""
    gen = torch.Generator().manual_seed(seed)
    n = round(float(ts[-1] - ts[0]) / dt)
    times = torch.linspace(float(ts[0]), float(ts[-1]), n + 1, dtype=ts.dtype).unbind(0)
    x = y0
    sq = math.sqrt(dt)
    for k in range(n):
        t = times[k]
        x = x + sde.f(t, x) * dt + sde.g(t, x) * (sq * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    return torch.stack([y0, x])


def ou_hand_loop(sde, y0, ts, dt, seed=0):
    """The tightest loop by hand, constants inlined: x += -theta x dt + sigma sqrt(dt) randn."""
    gen = torch.Generator().manual_seed(seed)
    n = round(float(ts[-1] - ts[0]) / dt)
    x = y0
    sq = math.sqrt(dt)
    for _ in range(n):
        x = x + (-THETA * x) * dt + SIGMA * sq * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return torch.stack([y0, x])


class MLPField(torch.nn.Module):
    """A small velocity field v(t, x): 2-D state plus time in, SiLU MLP of width 64."""

    def __init__(self, d=2, width=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, d))

    def forward(self, t, x):
        return self.net(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


def mlp_problem(B=4096, steps=50):
    field = MLPField().eval()
    y0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.0, 1.0, steps + 1)
    return field, y0, t


def mlp_flowsde(field, y0, t):
    with torch.no_grad():
        return flowsde.odeint(field, y0, t, method="rk4")


def mlp_torchdiffeq(field, y0, t):
    with torch.no_grad():
        return torchdiffeq.odeint(field, y0, t, method="rk4")


def mlp_field_alone(field, y0, t):
    """The 4 (len(t) - 1) field evaluations of an RK4 solve and nothing else: what a solver that cost
    nothing would take, so torchdiffeq's time over this one bounds any solver's speed-up."""
    times = t.unbind(0)
    with torch.no_grad():
        for k in range(len(times) - 1):
            for _ in range(4):
                field(times[k], y0)
    return y0


def linear_field(t, y):
    """A field that costs almost nothing: what is left to time is the solver itself."""
    return -y


def dopri5_flowsde(field, y0, t, tol=1e-5, method="dopri5"):
    with torch.no_grad():
        return flowsde.odeint(field, y0, t, rtol=tol, atol=tol, method=method)


def dopri5_torchdiffeq(field, y0, t, tol=1e-5, method="dopri5"):
    with torch.no_grad():
        return torchdiffeq.odeint(field, y0, t, rtol=tol, atol=tol, method=method)


# ---- adjoint gradients: forward and backward pass, flowsde against torchdiffeq / torchsde ---------------
def adjoint_ode_problem(B=1024, width=32):
    field = MLPField(width=width)
    y0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.0, 1.0, 5)
    return field, y0, t


def adjoint_ode(lib, field, y0, t, tol=1e-5, **kw):
    """One forward and backward pass of an adjoint solve (dopri5), the gradient of a loss on every output."""
    y = y0.clone().requires_grad_(True)
    ys = lib.odeint_adjoint(field, y, t, rtol=tol, atol=tol, **kw)
    return torch.autograd.grad(ys.pow(2).mean(), [y] + list(field.parameters()))


class NeuralSDE(torch.nn.Module):
    """A small latent-style SDE: an MLP drift and a state-dependent diagonal diffusion."""

    def __init__(self, sde_type="stratonovich", d=2, width=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.sde_type, self.noise_type = sde_type, "diagonal"
        self.drift = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, d))
        self.scale = torch.nn.Parameter(torch.full((d,), 0.3))

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return self.scale * torch.sigmoid(y)


def adjoint_sde_problem(B=256, sde_type="stratonovich"):
    sde = NeuralSDE(sde_type)
    y0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(0.0, 1.0, 3)
    return sde, y0, ts


def adjoint_sde(lib, sde, y0, ts, dt=0.02, entropy=0, method=None):
    """One forward and backward pass of sdeint_adjoint on a fresh BrownianInterval (the same for both
    libraries: the comparison is of the solvers, not the Brownian objects), torchsde's default backward
    method for the forward ``method`` (default Heun for Stratonovich SDEs, Euler for Itô ones)."""
    bm = torchsde.BrownianInterval(float(ts[0]), float(ts[-1]), size=tuple(y0.shape), entropy=entropy,
                                   levy_area_approximation="none")
    y = y0.clone().requires_grad_(True)
    method = method or ("heun" if sde.sde_type == "stratonovich" else "euler")
    ys = lib.sdeint_adjoint(sde, y, ts, bm=bm, method=method, dt=dt)
    return torch.autograd.grad(ys.pow(2).mean(), [y] + list(sde.parameters()))
