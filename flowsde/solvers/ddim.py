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
         eta: float = 0.0, seed=None, ops=None, stream=None) -> torch.Tensor:
    """Integrate with the DDIM step over ``grid``; ``alpha``/``beta`` are the path's values on the grid.

    The field's protocol: ``field.outputs(t, x) -> [(w_i, out_i)]`` (the model outputs and their guidance
    weights) and ``field.denoise_coefficients(k) -> (p1, p2, q1, q2)`` with ``z_hat = p1 x + p2 out`` and
    ``eps_hat = q1 x + q2 out`` at ``grid[k]``. The step is then affine in ``x`` and the outputs, so each
    step is one fused launch: ``x' = (a' p1 + c q1) x + sum_i w_i (a' p2 + c q2) out_i + s xi``.
    The eta noise comes from ``stream`` (default: ``philox`` in the kernel on the triton backend,
    ``torch`` otherwise).
    """
    return ddim_loop(field, grid, alpha, beta, eta, x0, ops, seed=seed, stream=stream)(x0)


def ddim_loop(field, grid: np.ndarray, alpha: Sequence[float], beta: Sequence[float], eta: float, like, ops=None,
              seed=None, stream=None, noise=None):
    """The DDIM loop of :func:`ddim` with everything it needs prepared (time table on the device, noise
    scales, noise source): returns ``run(x0) -> x``, whose body only launches work (capturable as a CUDA
    graph). ``noise``: a source with ``draw(k)`` (default: a :class:`~flowsde.brownian.GridBrownian`
    from ``seed`` on ``stream``)."""
    ops = kernels.ops("torch") if ops is None else ops
    times = fixed.StageTimes(grid, (0.0,), like.dtype, like.device)
    scales = ddim_noise_scales(alpha, beta, eta)
    if noise is None and any(scales):
        stream = stream or ("philox" if ops.name == "triton" else "torch")
        noise = GridBrownian(grid, tuple(like.shape), seed, like.dtype, like.device, stream=stream)
    steps = []
    for k in range(len(grid) - 1):
        p1, p2, q1, q2 = field.denoise_coefficients(k)
        s, a1, b1 = scales[k], alpha[k + 1], beta[k + 1]
        c = math.sqrt(max(b1 * b1 - s * s, 0.0))
        steps.append((a1 * p1 + c * q1, a1 * p2 + c * q2, s))

    def run(x0):
        x, pool = x0, fixed.StatePool(x0)  # (each new state written into one of two buffers, in turn)
        for k, (cx, co, s) in enumerate(steps):
            outs = field.outputs(times[k][0], x)
            terms = [(cx, x)] + [(w * co, o) for w, o in outs]
            out = pool.take(terms)
            x = ops.combine(terms, [(s, None)], noise.draw(k), out=out) if s else ops.combine(terms, out=out)
        return x
    return run


def _half_log_snr(a: float, b: float) -> float:
    """``lambda = log(alpha / beta)`` (``-inf`` at pure noise, ``+inf`` at the data)."""
    if a == 0.0:
        return -math.inf
    if b == 0.0:
        return math.inf
    return math.log(a / b)


def dpmpp_2m_loop(field, grid: np.ndarray, alpha: Sequence[float], beta: Sequence[float], like, ops=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of diffusion
    probabilistic models", Algorithm 2) for any Gaussian path, on the field protocol of :func:`ddim`.

    In ``lambda = log(alpha / beta)`` the step from ``t`` to ``t'`` is the exponential integrator of the
    data-prediction ODE, ``x' = (beta'/beta) x + (alpha' - alpha beta'/beta) D`` (DDIM's step when ``D`` is
    the data estimate ``z_hat``), made second order by the multistep estimate ``D = (1 + 1/(2r)) z_hat_k -
    z_hat_{k-1} / (2r)``, ``r = h_{k-1} / h_k`` (first order at the first step, at the last one to
    ``beta' = 0`` and after a step from ``alpha = 0``, where ``h_{k-1}`` is infinite). With ``z_hat = p1 x +
    p2 out`` each step is two fused launches: the new state, and the data estimate the next step reuses.
    Returns ``run(x0) -> x`` (only launches: capturable as a CUDA graph)."""
    ops = kernels.ops("torch") if ops is None else ops
    times = fixed.StageTimes(grid, (0.0,), like.dtype, like.device)
    lam = [_half_log_snr(a, b) for a, b in zip(alpha, beta)]
    steps = []
    for k in range(len(grid) - 1):
        p1, p2, _, _ = field.denoise_coefficients(k)
        a, b, a1, b1 = alpha[k], beta[k], alpha[k + 1], beta[k + 1]
        rho = b1 / b
        c = a1 - a * rho  # the weight of D
        h, h_prev = lam[k + 1] - lam[k], (lam[k] - lam[k - 1]) if k else math.inf
        w = 0.0 if b1 == 0.0 or not math.isfinite(h_prev) or not math.isfinite(h) else h / (2.0 * h_prev)
        steps.append((rho, c * (1.0 + w), -c * w, p1, p2, k + 1 < len(grid) - 1))

    def run(x0):
        x, z_prev, pool = x0, None, fixed.StatePool(x0)  # (the states and data estimates in four buffers)
        for k, (rho, c0, c1, p1, p2, more) in enumerate(steps):
            outs = field.outputs(times[k][0], x)
            terms = [(rho + c0 * p1, x)] + [(wi * c0 * p2, o) for wi, o in outs]
            if c1 != 0.0:
                terms.append((c1, z_prev))
            est = [(p1, x)] + [(wi * p2, o) for wi, o in outs]
            z_k = ops.combine(est, out=pool.take(terms, z_prev)) if more else None
            x, z_prev = ops.combine(terms, out=pool.take(terms, z_k)), z_k
        return x
    return run
