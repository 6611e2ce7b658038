"""The DDIM-equivalent step for any Gaussian path, as a solver.

The solver never sees a path: it asks the field it is given for the data and noise estimates at a time
(``field.denoise(t, x) -> (z_hat, eps_hat)``) and takes the path coefficients at the grid times as plain
numbers, prepared before the loop. Step from ``t`` to ``t'`` (Song et al. 2021, written for
``x_t = alpha_t z + beta_t eps``): ``x' = alpha' z_hat + sqrt(beta'^2 - s^2) eps_hat + s xi`` with
``s = eta (beta'/beta) sqrt(beta^2 - (alpha/alpha')^2 beta'^2)`` (``eta = 0``: deterministic DDIM;
``eta = 1``: the DDPM posterior's variance). On CondOT with velocity output it is exactly Euler.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .. import kernels
from ..brownian import GridBrownian
from . import fixed


def ddim_noise_scales(alpha: Sequence[float], beta: Sequence[float], eta: float) -> list:
    """Per step ``k`` the fresh-noise scale ``s_k`` of DDIM(eta) from ``t_k`` to ``t_{k+1}``."""
    out = []
    for k in range(len(alpha) - 1):
        a, b, a1, b1 = alpha[k], beta[k], alpha[k + 1], beta[k + 1]
        if eta == 0.0 or b1 == 0.0:
            out.append(0.0)
            continue
        r = a / a1
        var = max(b * b - r * r * b1 * b1, 0.0)
        out.append(min(eta * (b1 / b) * math.sqrt(var), b1))
    return out


def ddim(field, x0: torch.Tensor, grid: np.ndarray, alpha: Sequence[float], beta: Sequence[float],
         eta: float = 0.0, seed=None) -> torch.Tensor:
    """Integrate with the DDIM step over ``grid``; ``alpha``/``beta`` are the path's values on the grid."""
    times = fixed.StageTimes(grid, (0.0,), x0.dtype, x0.device)
    scales = ddim_noise_scales(alpha, beta, eta)
    noise = GridBrownian(grid, tuple(x0.shape), seed, x0.dtype, x0.device) if any(scales) else None
    x = x0
    for k in range(len(grid) - 1):
        z, eps = field.denoise(times[k][0], x)
        s = scales[k]
        x = kernels.ddim_update(z, eps, alpha[k + 1], beta[k + 1], s, noise.normal(k) if s else None)
    return x
