"""Sampling time grids on a Gaussian path: uniform in t, or the EDM / Karras spacing."""
from __future__ import annotations

import math

import numpy as np
import torch

from .gaussian import GaussianPath

SPACINGS = ("uniform", "karras")


def noise_to_signal(path: GaussianPath, t: np.ndarray) -> np.ndarray:
    """``sigma(t) = beta_t / alpha_t`` (inf where alpha is 0)."""
    tt = torch.as_tensor(np.asarray(t, dtype=np.float64))
    a, b = path.alpha(tt).numpy(), path.beta(tt).numpy()
    with np.errstate(divide="ignore"):
        return np.where(a == 0, np.inf, b / np.where(a == 0, 1.0, a))


def time_grid(path: GaussianPath, steps: int, t_start: float = 0.0, t_end: float = 1.0,
              spacing: str = "uniform", rho: float = 7.0, sigma_min: float = 0.002) -> np.ndarray:
    """``steps + 1`` increasing times from ``t_start`` to ``t_end`` (float64, on the host).

    ``"uniform"``: equal steps in t. ``"karras"``: equal steps in ``sigma^{1/rho}`` with
    ``sigma = beta / alpha`` the noise-to-signal ratio (Karras et al. 2022, rho = 7), mapped back to t by
    bisection; needs a finite ``sigma`` at ``t_start`` (``t_start > 0`` unless the path is VE/EDM). Where
    ``sigma(t_end) = 0`` the first ``steps`` times run from ``sigma(t_start)`` to ``sigma_min`` and the last
    step goes to ``t_end`` (as EDM's sampler ends at sigma = 0).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    t_start, t_end = float(t_start), float(t_end)
    if not (math.isfinite(t_start) and math.isfinite(t_end) and t_start < t_end):
        raise ValueError(f"need finite t_start < t_end, got t_start={t_start}, t_end={t_end}")
    if not (0.0 <= t_start and t_end <= 1.0):
        raise ValueError(f"a path runs over t in [0, 1] (noise at 0, data at 1): need 0 <= t_start < t_end <= 1, "
                         f"got t_start={t_start}, t_end={t_end}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if spacing == "uniform":
        grid = np.linspace(t_start, t_end, steps + 1)
    else:
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        s0, s1 = noise_to_signal(path, np.array([t_start, t_end]))
        if not np.isfinite(s0):
            raise ValueError(f"karras spacing needs a finite beta/alpha at t_start={t_start} on the {path.name} "
                             f"path (alpha is 0 there): pass t_start > 0")
        probe = noise_to_signal(path, np.linspace(t_start, t_end, 257))
        if not np.all(np.diff(probe) < 0):
            raise ValueError(f"karras spacing needs beta/alpha decreasing in t on the {path.name} path")
        n = steps
        if s1 == 0.0:
            if not (0.0 < sigma_min < s0):
                raise ValueError(f"sigma_min must be in (0, {s0}), got {sigma_min}")
            s1, n = float(sigma_min), max(steps - 1, 1)
        i = np.arange(n + 1) / n
        target = (s0 ** (1 / rho) + i * (s1 ** (1 / rho) - s0 ** (1 / rho))) ** rho
        if n < steps:
            target = np.append(target, 0.0)
        lo, hi = np.full(target.size, t_start), np.full(target.size, t_end)
        for _ in range(200):  # bisection: sigma(t) is decreasing
            mid = 0.5 * (lo + hi)
            above = noise_to_signal(path, mid) > target
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        grid = 0.5 * (lo + hi)
    grid[0], grid[-1] = t_start, t_end
    if not np.all(np.diff(grid) > 0):
        raise ValueError("the time grid is not strictly increasing: use fewer steps or another spacing")
    return grid
