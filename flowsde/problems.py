"""Reference problems with exact solutions or laws, for parity, convergence and benchmark runs.

Every SDE problem is a torchsde-compatible object (``f``, ``g``, ``noise_type``, ``sde_type``), so the
same instance can be handed to ``flowsde.sdeint`` and ``torchsde.sdeint``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


class _ConstantDiffusion:
    """Shared helper: a constant diffusion ``sigma`` laid out for the problem's noise type."""

    _g_last = None
    _g_key = None

    def _const_g(self, y: torch.Tensor) -> torch.Tensor:
        # a constant: built once per state layout and sigma (g is called every step) as a broadcast view, no
        # copy; a changed sigma (the instance's attribute) is seen at the next call
        key = (tuple(y.shape), y.dtype, y.device, self.noise_type, self.sigma)
        if self._g_key != key:
            self._g_last, self._g_key = self._build_g(y), key
        return self._g_last

    def _build_g(self, y: torch.Tensor) -> torch.Tensor:
        s = torch.tensor(self.sigma, dtype=y.dtype, device=y.device)
        if self.noise_type == "diagonal":
            return s.expand(y.shape)
        if self.noise_type == "scalar":
            return s.expand(*y.shape, 1)
        d = y.shape[-1]
        return (s * torch.eye(d, dtype=y.dtype, device=y.device)).expand(y.shape[0], d, d)


class OrnsteinUhlenbeck(_ConstantDiffusion):
    """``dX = -theta X dt + sigma dW`` (Itô; the same in Stratonovich form since the noise is additive).

    ``noise_type`` may be ``"diagonal"`` (``g`` is ``sigma`` per coordinate), ``"additive"`` (``g`` is
    ``sigma I``, shape ``(batch, d, d)``) or ``"scalar"`` (one Brownian motion shared by all coordinates).
    The exact transition is ``N(x0 e^{-theta t}, sigma^2/(2 theta) (1 - e^{-2 theta t}))``.
    """

    def __init__(self, theta: float = 1.0, sigma: float = 1.0, noise_type: str = "diagonal",
                 sde_type: str = "ito"):
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        self.sde_type = sde_type  # additive noise: the Ito and Stratonovich forms are the same SDE
        if theta <= 0 or sigma < 0:
            raise ValueError(f"OrnsteinUhlenbeck needs theta > 0 and sigma >= 0, got {theta}, {sigma}")
        if noise_type not in ("diagonal", "additive", "scalar"):
            raise ValueError(f"noise_type must be diagonal, additive or scalar, got {noise_type!r}")
        self.theta, self.sigma, self.noise_type = float(theta), float(sigma), noise_type

    def f(self, t, y):
        return y * (-self.theta)

    def g(self, t, y):
        return self._const_g(y)

    # ---- exact law -------------------------------------------------------------------------------
    def mean(self, x0, t: float):
        """``E[X_t | X_0 = x0] = x0 e^{-theta t}`` (also the exact solution of the drift ODE)."""
        return x0 * math.exp(-self.theta * t)

    def variance(self, t: float) -> float:
        """``Var[X_t | X_0] = sigma^2 / (2 theta) (1 - e^{-2 theta t})``."""
        return self.sigma ** 2 / (2 * self.theta) * (1.0 - math.exp(-2 * self.theta * t))

    def stationary_variance(self) -> float:
        """``sigma^2 / (2 theta)``."""
        return self.sigma ** 2 / (2 * self.theta)

    def exact_step(self, x, h: float, xi):
        """One exact transition over ``h`` driven by the standard normal ``xi``."""
        return x * math.exp(-self.theta * h) + math.sqrt(self.variance(h)) * xi

    # ---- Euler–Maruyama's own law (no discretisation bias to fit) ---------------------------------
    def em_mean(self, x0, h: float, n: int):
        """Mean of Euler–Maruyama after ``n`` steps of size ``h``: ``(1 - theta h)^n x0``."""
        return x0 * (1.0 - self.theta * h) ** n

    def em_variance(self, h: float, n: int) -> float:
        """Variance of Euler–Maruyama after ``n`` steps: ``sigma^2 h (1 - q^{2n}) / (1 - q^2)``, q = 1 - theta h."""
        q = 1.0 - self.theta * h
        if abs(1.0 - q * q) < 1e-300:
            return self.sigma ** 2 * h * n
        return self.sigma ** 2 * h * (1.0 - q ** (2 * n)) / (1.0 - q * q)

    def pathwise(self, x0, grid, w, areas=None):
        """Reference solution at ``grid[-1]`` along a Brownian path known at the times ``grid``.

        ``w[k] = W(grid[k]) - W(grid[0])`` (shape ``(len(grid), *noise_shape)``). Integration by parts,
        ``X_T = e^{-theta T} x0 + sigma (W_T - theta int_0^T e^{-theta (T - s)} W_s ds)``, with the
        ``ds`` integral by the trapezoid rule: strong error O(h) in the grid step ``h``, and the
        mean ``x0 e^{-theta T}`` is kept exactly. With each step's space-time area ``areas[k] = int (W_s -
        W(grid[k])) ds`` (:meth:`flowsde.brownian.GridBrownian.areas`) the integral is taken on each step
        as ``e_k (W_k h + U_k) + theta e_k (W_k h^2 / 2 + h U_k / 2)`` (the weight linear in ``s``): strong
        error O(h^2), below a 1.5-order method's at any coarser step.
        """
        grid = np.asarray(grid, dtype=np.float64)
        T, t0 = grid[-1], grid[0]
        wts = torch.as_tensor(np.exp(-self.theta * (T - grid)), dtype=w.dtype, device=w.device)
        wts = wts.reshape(-1, *([1] * (w.dim() - 1)))
        h = torch.as_tensor(np.diff(grid), dtype=w.dtype, device=w.device).reshape(-1, *([1] * (w.dim() - 1)))
        if areas is not None:
            e, wk = wts[:-1], w[:-1]
            integral = (e * (wk * h + areas) + self.theta * e * (wk * h * h * 0.5 + h * areas * 0.5)).sum(0)
        else:
            integrand = wts * w
            integral = (0.5 * h * (integrand[1:] + integrand[:-1])).sum(0)
        noise = self.sigma * (w[-1] - self.theta * integral)
        if self.noise_type == "scalar":
            noise = noise.reshape(noise.shape[0], *([1] * (x0.dim() - 1)))
        return x0 * math.exp(-self.theta * (T - t0)) + noise


class BrownianMotionProblem(_ConstantDiffusion):
    """``dX = sigma dW``: ``X_t = x0 + sigma W_t``, law ``N(x0, sigma^2 t)``; Euler–Maruyama is exact."""

    sde_type = "ito"

    def __init__(self, sigma: float = 1.0, noise_type: str = "diagonal"):
        if noise_type not in ("diagonal", "additive", "scalar"):
            raise ValueError(f"noise_type must be diagonal, additive or scalar, got {noise_type!r}")
        self.sigma, self.noise_type = float(sigma), noise_type

    def f(self, t, y):
        return torch.zeros_like(y)

    def g(self, t, y):
        return self._const_g(y)

    def exact(self, x0, w):
        """The solution given ``w = W_t - W_0``."""
        if self.noise_type == "scalar":
            w = w.reshape(w.shape[0], *([1] * (x0.dim() - 1)))
        return x0 + self.sigma * w

    def mean(self, x0, t: float):
        return x0

    def variance(self, t: float) -> float:
        return self.sigma ** 2 * t


class GeometricBrownianMotion:
    """``dX = mu X dt + sigma X dW`` (multiplicative noise), Itô or Stratonovich.

    Itô: ``X_t = x0 exp((mu - sigma^2/2) t + sigma W_t)``; Stratonovich: ``X_t = x0 exp(mu t + sigma W_t)``.
    ``noise_type`` ``"diagonal"`` (one Brownian motion per coordinate) or ``"scalar"`` (one shared).
    """

    def __init__(self, mu: float = 0.5, sigma: float = 0.5, sde_type: str = "ito", noise_type: str = "diagonal"):
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        if noise_type not in ("diagonal", "scalar"):
            raise ValueError(f"noise_type must be 'diagonal' or 'scalar', got {noise_type!r}")
        self.mu, self.sigma, self.sde_type, self.noise_type = float(mu), float(sigma), sde_type, noise_type

    def f(self, t, y):
        return self.mu * y

    def g(self, t, y):
        g = self.sigma * y
        return g if self.noise_type == "diagonal" else g.unsqueeze(-1)

    def exact(self, x0, t: float, w):
        """The solution at time ``t`` (started at 0) given ``w = W_t - W_0``."""
        if self.noise_type == "scalar":
            w = w.reshape(w.shape[0], *([1] * (x0.dim() - 1)))
        drift = self.mu - 0.5 * self.sigma ** 2 if self.sde_type == "ito" else self.mu
        return x0 * torch.exp(drift * t + self.sigma * w)

    def mean(self, x0, t: float):
        rate = self.mu if self.sde_type == "ito" else self.mu + 0.5 * self.sigma ** 2
        return x0 * math.exp(rate * t)


class PerSampleGBM:
    """Geometric Brownian motion with a volatility of its own per sample: ``dX = mu X dt + s X dW`` where
    ``s`` rides along in the state (``y = (X, s)``, ``ds = 0``), so a solver that runs only some rows still
    knows each row's volatility. Itô, scalar noise (``g`` is ``(batch, 2, 1)``: the Milstein term
    ``(dg/dy) g = (s^2 X, 0)`` is then exact). The per-sample adaptive benchmark: a few volatile samples
    need many more steps than the calm ones.

    Exact: ``X_t = X_0 exp((mu - s^2/2) t + s W_t)``.
    """

    noise_type, sde_type = "scalar", "ito"

    def __init__(self, mu: float = 0.5):
        self.mu = float(mu)

    @staticmethod
    def initial(x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The state ``(x0, sigma)`` from ``(batch,)`` tensors."""
        return torch.stack([x0, sigma], 1)

    def f(self, t, y):
        return torch.stack([self.mu * y[:, 0], torch.zeros_like(y[:, 1])], 1)

    def g(self, t, y):
        return torch.stack([y[:, 1] * y[:, 0], torch.zeros_like(y[:, 1])], 1).unsqueeze(-1)

    def exact(self, y0, t: float, w):
        """``X_t`` (shape ``(batch,)``) given ``w = W_t - W_0`` of shape ``(batch, 1)``."""
        s = y0[:, 1]
        return y0[:, 0] * torch.exp((self.mu - 0.5 * s * s) * t + s * w[:, 0])


class LinearODE:
    """``dy/dt = A y`` with exact solution ``y(t) = expm(A (t - t0)) y0``; states are ``(batch, d)``.

    The default ``A`` is a damped rotation (eigenvalues ``-0.1 +- i``).
    """

    def __init__(self, A: Optional[torch.Tensor] = None):
        A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=torch.float64) if A is None else torch.as_tensor(A)
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
        self.A = A

    def __call__(self, t, y):
        return y @ self.A.to(dtype=y.dtype, device=y.device).T

    def exact(self, y0, t, t0: float = 0.0):
        """The solution at every time of ``t`` (shape ``(len(t), *y0.shape)``)."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        A = self.A.to(torch.float64)
        maps = torch.linalg.matrix_exp((t - t0).reshape(-1, 1, 1) * A)  # (T, d, d)
        out = torch.einsum("tij,...j->t...i", maps, y0.to(torch.float64).cpu())
        return out.to(dtype=y0.dtype, device=y0.device)


# ---- a learned field ------------------------------------------------------------------------------

def reference_mixture():
    """A 2-D mixture of three correlated Gaussians (weights 0.3, 0.5, 0.2): smooth marginal flows, the
    convergence studies' exact-field problem."""
    from .paths.mixture import GaussianMixture

    return GaussianMixture([0.3, 0.5, 0.2], [[-2.0, 0.0], [1.0, 1.0], [0.5, -1.5]],
                           [[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.5]], [[0.2, -0.05], [-0.05, 0.1]]])


def ring_mixture(k: int = 8, radius: float = 2.0, std: float = 0.2):
    """A 2-D mixture of ``k`` equal Gaussians on a circle: the learned-field problem's data."""
    from .paths.mixture import GaussianMixture

    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixture(torch.ones(k), means, torch.full((k,), std * std))


class MLPVelocity(torch.nn.Module):
    """A small velocity field ``v(x, t)``: ``[x, t]`` -> SiLU MLP -> ``dx``. Called as ``model(x, t)``
    with ``t`` of shape ``(batch,)`` (the convention of :func:`flowsde.sample`)."""

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 3, generator: Optional[torch.Generator] = None):
        super().__init__()
        sizes = [dim + 1] + [width] * (depth - 1) + [dim]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            lin = torch.nn.Linear(a, b)
            bound = 1.0 / math.sqrt(a)
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=generator)
                lin.bias.uniform_(-bound, bound, generator=generator)
            layers += [lin] if i == len(sizes) - 2 else [lin, torch.nn.SiLU()]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x, t):
        """The velocity at states ``x`` (``(batch, dim)``) and times ``t`` (``(batch,)`` or scalar)."""
        t = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], dim=1))

    def ode_field(self):
        """The same field with odeint's argument order ``f(t, x)`` (``t`` a 0-dim tensor)."""
        return lambda t, x: self(x, t.reshape(1).expand(x.shape[0]))


_LEARNED = {}


def learned_field(seed: int = 0, iterations: int = 2000, batch: int = 512, width: int = 64, lr: float = 3e-3):
    """A velocity field trained with flowsde's own flow-matching loss (CondOT) on :func:`ring_mixture`.

    Deterministic from ``seed`` (parameters, data, times and noise all come from one generator); about
    five seconds on two CPU cores; cached per process. Returns ``(model, mixture)``: the model is in eval
    mode, float32, called as ``model(x, t)``; ``mixture`` is the exact training distribution.
    """
    key = (seed, iterations, batch, width, lr)
    if key not in _LEARNED:
        from .paths import CondOT, flow_matching_loss

        mix = ring_mixture()
        gen = torch.Generator().manual_seed(seed)
        model = MLPVelocity(width=width, generator=gen)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
        path = CondOT()
        for _ in range(iterations):
            z = mix.sample(batch, generator=gen).float()
            loss = flow_matching_loss(model, z, path, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _LEARNED[key] = (model, mix)
    return _LEARNED[key]
