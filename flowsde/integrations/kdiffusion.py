"""k-diffusion-style sampler functions on flowsde's fused step ops.

Convention (k-diffusion, Karras et al. 2022): ``x = x0 + sigma * eps``; ``model(x, sigma * s_in,
**extra_args)`` is a denoiser returning the x0 estimate, ``sigma`` a tensor of shape ``(batch,)``;
``sigmas`` decreases to (usually) 0 and sampling starts from ``x = sigmas[0] * randn``. In flowsde's
terms this is the variance-exploding path (alpha = 1, beta = sigma) with data prediction; each step is one
fused update ``x' = A x + B D(x, sigma) (+ noise)`` whose coefficients are computed on the host from the
sigmas, so the loop reads nothing back from the device.

    from flowsde.integrations import kdiffusion as K
    x = K.sample_heun(denoiser, sigmas[0] * torch.randn(shape), K.get_sigmas_karras(30, 0.002, 80.0))
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .. import _checks, kernels
from ..brownian import GridBrownian


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """The Karras et al. (2022) noise levels: ``n`` values from ``sigma_max`` to ``sigma_min``, then 0."""
    if n < 1 or not (0 < sigma_min < sigma_max):
        raise ValueError(f"need n >= 1 and 0 < sigma_min < sigma_max, got {n}, {sigma_min}, {sigma_max}")
    ramp = np.linspace(0, 1, n)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = (a + ramp * (b - a)) ** rho
    return torch.as_tensor(np.append(sig, 0.0), dtype=torch.float64, device=device)


def _host_sigmas(sigmas) -> list:
    s = sigmas.detach().to("cpu", torch.float64).tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
    if len(s) < 2 or any(not math.isfinite(v) or v < 0 for v in s) or any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be finite, >= 0 and strictly decreasing, with at least two values")
    return [float(v) for v in s]


class _Denoiser:
    def __init__(self, model, x, extra_args):
        self.model, self.extra = model, dict(extra_args or {})
        self.like, self.shape = x, tuple(x.shape)
        self.nfe = 0
        self._sig = {}

    def __call__(self, x, k: int, sigma_table: torch.Tensor):
        self.nfe += 1
        s = sigma_table[k].expand(self.shape[0])
        out = self.model(x, s, **self.extra)
        return _checks.check_output("model (denoiser)", out, self.like, self.shape)


def _prepare(model, x, sigmas, extra_args, backend):
    x = _checks.check_state("x", x)
    sig = _host_sigmas(sigmas)
    table = torch.as_tensor(sig, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    return x, sig, table, _Denoiser(model, x, extra_args), kernels.ops(backend, x.device, x.numel())


def _callback(callback, i, x, sig, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sig[i], "sigma_hat": sig[i], "denoised": denoised})


def sample_euler(model: Callable, x: torch.Tensor, sigmas, extra_args: Optional[dict] = None, callback=None,
                 disable=None, backend=None) -> torch.Tensor:
    """Euler in sigma space: ``d = (x - D(x, s)) / s``, ``x' = x + d (s' - s)`` — one fused update
    ``x' = (s'/s) x + (1 - s'/s) D`` per step (Karras et al. 2022, Algorithm 1 without churn, first order)."""
    x, sig, table, den, ops = _prepare(model, x, sigmas, extra_args, backend)
    for i in range(len(sig) - 1):
        d = den(x, i, table)
        _callback(callback, i, x, sig, d)
        r = sig[i + 1] / sig[i]
        x = ops.combine([(r, x), (1.0 - r, d)])
    return x


def sample_heun(model: Callable, x: torch.Tensor, sigmas, extra_args: Optional[dict] = None, callback=None,
                disable=None, backend=None) -> torch.Tensor:
    """Heun's second-order method in sigma space (Karras et al. 2022, Algorithm 1 without churn): an Euler
    predictor, then the average of the two slopes; the last step to sigma = 0 is an Euler step."""
    x, sig, table, den, ops = _prepare(model, x, sigmas, extra_args, backend)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        d = den(x, i, table)
        _callback(callback, i, x, sig, d)
        r = s1 / s
        x_pred = ops.combine([(r, x), (1.0 - r, d)])
        if s1 == 0.0:
            x = x_pred
            continue
        d1 = den(x_pred, i + 1, table)
        # x + (s1 - s)/2 * [(x - d)/s + (x_pred - d1)/s1]
        h = s1 - s
        x = ops.combine([(1.0 + 0.5 * h / s, x), (-0.5 * h / s, d), (0.5 * h / s1, x_pred), (-0.5 * h / s1, d1)])
    return x


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0):
    """``(sigma_down, sigma_up)`` of an ancestral step: deterministic to ``sigma_down``, then fresh noise
    of scale ``sigma_up`` so the total is ``sigma_to`` (``eta = 1``: the DDPM posterior's variance)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(max(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2, 0.0)))
    return math.sqrt(max(sigma_to ** 2 - up ** 2, 0.0)), up


def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas, extra_args: Optional[dict] = None,
                           callback=None, disable=None, eta: float = 1.0, seed: Optional[int] = None,
                           backend=None) -> torch.Tensor:
    """Ancestral Euler: an Euler step to ``sigma_down`` and noise of scale ``sigma_up``, fused in one update
    (the noise drawn in the kernel on the triton backend; keyed by ``(seed, step)``)."""
    x, sig, table, den, ops = _prepare(model, x, sigmas, extra_args, backend)
    noise = GridBrownian(np.arange(len(sig), dtype=np.float64), tuple(x.shape), seed, x.dtype, x.device,
                         stream="philox" if ops.name == "triton" else "torch")
    for i in range(len(sig) - 1):
        d = den(x, i, table)
        _callback(callback, i, x, sig, d)
        down, up = get_ancestral_step(sig[i], sig[i + 1], eta)
        r = down / sig[i]
        if up == 0.0:
            x = ops.combine([(r, x), (1.0 - r, d)])
        else:
            x = ops.combine([(r, x), (1.0 - r, d)], [(up, None)], noise.draw(i))
    return x


def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas, extra_args: Optional[dict] = None, callback=None,
                    disable=None, backend=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of diffusion
    probabilistic models", Algorithm 2; k-diffusion's ``sample_dpmpp_2m``): the exponential integrator of the
    data-prediction ODE in ``lambda = -log sigma``, second order by a multistep correction of the data
    estimate, one model call a step. With ``h = lambda' - lambda`` and ``r = h_prev / h``, ``x' = (s'/s) x +
    (1 - s'/s) [(1 + 1/(2r)) D - D_prev / (2r)]`` — one fused update of three terms; the first step and the
    last one to sigma = 0 are first order (``x' = (s'/s) x + (1 - s'/s) D``: DDIM's step in sigma space)."""
    x, sig, table, den, ops = _prepare(model, x, sigmas, extra_args, backend)
    prev = None
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        d = den(x, i, table)
        _callback(callback, i, x, sig, d)
        rho = s1 / s
        if prev is None or s1 == 0.0:
            x = ops.combine([(rho, x), (1.0 - rho, d)])
        else:
            r = math.log(sig[i - 1] / s) / math.log(s / s1)  # h_prev / h
            w = 1.0 / (2.0 * r)
            x = ops.combine([(rho, x), ((1.0 - rho) * (1.0 + w), d), (-(1.0 - rho) * w, prev)])
        prev = d
    return x


ADAPTIVE_ORDERS = {2: "heun_euler", 3: "bosh3", 5: "dopri5"}


def sample_dpm_adaptive(model: Callable, x: torch.Tensor, sigma_min: float, sigma_max: float,
                        extra_args: Optional[dict] = None, callback=None, disable=None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, eta: float = 0.0, return_info: bool = False,
                        backend=None):
    """Adaptive sampling in the spirit of k-diffusion's ``sample_dpm_adaptive``, on flowsde's adaptive driver.

    Integrates the probability-flow ODE of the denoiser from ``sigma_max`` to ``sigma_min`` in
    ``s = log sigma``, where it reads ``dx/ds = x - D(x, sigma)`` (smooth over many decades of sigma), with
    an embedded Runge–Kutta pair chosen by ``order`` (2: ``heun_euler``, 3: ``bosh3``, 5: ``dopri5``) and
    flowsde's error control (``rtol``, ``atol``; defaults as k-diffusion's). Not the DPM-Solver update
    itself: the same job (adaptive steps, error-controlled, deterministic), done by flowsde's adaptive
    driver. ``callback`` is not called (steps are taken on the device without host reads); ``eta > 0`` (the
    ancestral variant) is not supported. ``return_info``: also return ``{"nfe", "steps", "accepted",
    "rejected"}``.
    """
    from ..solvers import odeint

    if order not in ADAPTIVE_ORDERS:
        raise ValueError(f"order must be one of {sorted(ADAPTIVE_ORDERS)}, got {order!r}")
    if eta:
        raise ValueError("sample_dpm_adaptive here integrates the ODE: eta must be 0")
    if not (0 < float(sigma_min) < float(sigma_max)):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    x = _checks.check_state("x", x)
    den = _Denoiser(model, x, extra_args)

    def field(s, y):  # s = log sigma (0-dim); dy/ds = y - D(y, sigma)
        sig = torch.exp(s).to(y.dtype).expand(y.shape[0])
        den.nfe += 1
        d = _checks.check_output("model (denoiser)", den.model(y, sig, **den.extra), den.like, den.shape)
        return y - d

    s = torch.tensor([math.log(sigma_max), math.log(sigma_min)], dtype=torch.float64, device=x.device)
    ys, st = odeint(field, x, s, method=ADAPTIVE_ORDERS[order], rtol=rtol, atol=atol,
                    options=dict(return_stats=True, backend=backend, clip_end=True))
    if st["status"] != "success":
        raise RuntimeError(f"adaptive sampling stopped with status {st['status']}")
    info = {"nfe": den.nfe, "steps": st["steps"], "accepted": st["accepted"], "rejected": st["rejected"]}
    return (ys[-1], info) if return_info else ys[-1]
