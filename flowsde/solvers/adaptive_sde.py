"""Adaptive step sizes for SDEs: ``sdeint(..., adaptive=True, rtol, atol, dt_min)``.

The error estimate is step doubling on one Brownian path: a step of size ``h`` with the increment
``W(t + h) - W(t)`` against two steps of ``h/2`` with the two half increments, both read from a Brownian
motion that can be queried at any time (flowsde's :class:`~flowsde.brownian.VirtualBrownianTree` by
default, or a torchsde ``BrownianInterval`` / ``BrownianTree``). A rejected step asks the tree for the
same path again, so the accepted solution is a solution on that one path whatever steps were tried.

Error ratio: RMS over all elements of ``(y_two_halves - y_full) / (atol + rtol max(|y|, |y_two_halves|))``;
a step is accepted when the ratio is <= 1 (or the step is already ``dt_min``) and the state advances to the
two-half-steps value. The next step is ``h * clip(safety * ratio^(-1/(q + 1/2)), dfactor, ifactor)`` with
``q`` the method's strong order for the noise type (the local error of a strong-order-q method in the
mean-square sense is O(h^(q+1/2))). Steps end exactly on the output times ``ts`` (as torchsde's adaptive
mode does), so outputs are never interpolated.

Host reads: each attempted step reads one number back (the error ratio) and queries the tree at host
times. This is the price of a Brownian tree queried on the host; the fixed-step driver reads nothing.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _checks
from ..brownian import GridBrownian, VirtualBrownianTree
from .sde import StepContext

ADAPTIVE_SDE_OPTIONS = ("return_stats", "grad_free", "backend", "max_num_steps", "safety", "ifactor", "dfactor")


class _AdaptiveContext(StepContext):
    """A :class:`StepContext` whose single step slot is set per attempt: start time, size, increment."""

    def __init__(self, sde, y0, t_dtype, bm, grad_free, stage_c, ops):
        super().__init__(sde, y0, np.array([0.0, 1.0]), t_dtype, bm, None, grad_free, stage_c, ops)
        self.t_dtype = t_dtype
        self.stage_c = stage_c
        self._dw = None
        self.attempts = 0

    def set_step(self, t0: float, h: float, dw: torch.Tensor):
        self.h, self.sqrt_h = [h], [h ** 0.5]
        dev = self.like.device
        self.times = [tuple(torch.full((), t0 + h if c == 1.0 else t0 + c * h, dtype=self.t_dtype, device=dev)
                            for c in self.stage_c)]
        self._dw = dw

    def noise(self, k, g):
        return self._dw, 1.0

    def dw(self, k, g):
        return self._dw


def noise_shape(sde, y0, t0_tensor):
    """The shape of ``W(t)`` for ``sde``'s noise type (additive / general: ``g`` is asked once for ``m``)."""
    nt = sde.noise_type
    if nt == "diagonal":
        return tuple(y0.shape)
    if nt == "scalar":
        return (y0.shape[0], 1)
    g = sde.g(t0_tensor, y0)
    if not isinstance(g, torch.Tensor) or g.dim() != 3:
        raise ValueError(f"sde.g must return (batch, d, m) for {nt} noise")
    return (y0.shape[0], g.shape[-1])


def sdeint_adaptive(sde, y0, ts, ts_host, method, dt, rtol, atol, dt_min, bm, seed, opts, ops):
    """The adaptive driver behind ``sdeint(..., adaptive=True)`` (see the module docstring)."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and np.isfinite(v)):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    dt_min = _checks.check_step("dt_min", dt_min)
    max_steps = int(opts.get("max_num_steps", 2 ** 31 - 1))
    safety, ifactor, dfactor = (float(opts.get(k, d)) for k, d in (("safety", 0.9), ("ifactor", 10.0),
                                                                    ("dfactor", 0.2)))
    if max_steps < 1 or not (0 < safety <= 1) or not (ifactor >= 1) or not (0 < dfactor <= 1):
        raise ValueError("need max_num_steps >= 1, 0 < safety <= 1, ifactor >= 1 and 0 < dfactor <= 1")
    if isinstance(bm, GridBrownian):
        raise ValueError("adaptive=True needs a Brownian motion that can be queried at any time (bm=None for "
                         "flowsde's VirtualBrownianTree, or torchsde's BrownianInterval / BrownianTree); a "
                         "GridBrownian only knows its grid")
    t0, t_end = float(ts_host[0]), float(ts_host[-1])
    if bm is None:
        shape = noise_shape(sde, y0, ts[0])
        bm = VirtualBrownianTree(t0, t_end, shape, seed=seed, dtype=y0.dtype, device=y0.device)
    ctx = _AdaptiveContext(sde, y0, ts.dtype, bm, bool(opts.get("grad_free", False)), method.stage_c, ops)
    expo = 1.0 / (method.strong_order(sde.noise_type) + 0.5)
    step = method.step

    def one_step(y_start, ta, tb, dw):
        ctx.set_step(ta, tb - ta, dw)
        return step(ctx, 0, y_start)

    outs = [y0]
    y, t, h = y0, t0, min(float(dt), t_end - t0)
    accepted = rejected = attempts = 0
    status = "success"
    for target in ts_host[1:]:
        target = float(target)
        while t < target:
            if attempts >= max_steps:
                status = "max_num_steps"
                break
            attempts += 1
            hit = h >= (target - t) * (1.0 - 1e-12)
            tn = target if hit else t + h
            tm = 0.5 * (t + tn)
            w_a, w_b = bm(t, tm), bm(tm, tn)
            y_full = one_step(y, t, tn, w_a + w_b)
            y_two = one_step(one_step(y, t, tm, w_a), tm, tn, w_b)
            per_row = ops.error_norm(y, y_two, y_two - y_full, rtol, atol)
            ratio = float(per_row.pow(2).mean().sqrt())  # the one host read of the step
            h_used = tn - t
            if ratio <= 1.0 or h_used <= dt_min:
                y, t = y_two, tn
                accepted += 1
            else:
                rejected += 1
            factor = ifactor if ratio == 0 else min(ifactor, max(dfactor, safety * ratio ** -expo))
            if ratio > 1.0:
                factor = min(factor, 1.0)
            h_next = max(h_used * factor, dt_min)
            h = max(h_next, h) if (hit and ratio <= 1.0 and h_used < h) else h_next
        if status != "success":
            break
        outs.append(y)
    while len(outs) < len(ts_host):
        outs.append(torch.full_like(y0, float("nan")))
    ys = torch.stack(outs)
    if opts.get("return_stats", False):
        return ys, {"nfe": ctx.nfe, "nge": ctx.nge, "steps": attempts, "accepted": accepted,
                    "rejected": rejected, "status": status}
    return ys

