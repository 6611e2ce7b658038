"""Event handling for ``odeint``: torchdiffeq's ``event_fn`` and ``odeint_event``.

``odeint(func, y0, t, event_fn=ev)`` integrates from ``t[0]`` in the direction of ``t[1]`` (only its
direction counts: there is no end time) until ``ev(t, y)`` crosses zero, then locates the crossing inside
the step that made it by bisection on that step's interpolant, to within ``atol`` in time. An event function
with several outputs stops at the first of them to cross: their values are each multiplied by its sign at
the start and the smallest is watched (torchdiffeq's combination).

The step loop does not read the device per step: whether a step crossed is a device flag, read with the
rest every ``check_every`` steps (default every step on CPU tensors, where a read is free, every 8 on CUDA);
steps taken after the crossing before the read are discarded (the adaptive loop makes them take no time).
The bisection runs after the loop, a fixed number of halvings computed from the bracket (one read).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import fixed
from ..kernels import hermite
from .rk import rk_step

#: torchdiffeq's bound on the steps of a fixed-step event search (its ``max_itrs``)
FIXED_MAX_STEPS = 20000
#: at most this many halvings of the bracket (float64 time resolves no more)
MAX_HALVINGS = 128


class Event:
    """The user's event function as one scalar that is positive until the first output crosses zero.

    ``flip``: the driver integrates ``s = -t`` (adaptive solves backwards in time); the user's function
    still sees ``t``. ``split``: a flat state back to the user's tuple (``None``: the state itself). Times
    reach the function in ``tdtype`` (the dtype of the user's ``t``, as torchdiffeq passes them: float64
    times locate a float32 state's event to float64 resolution; default the state's)."""

    def __init__(self, event_fn, t0: torch.Tensor, y0: torch.Tensor, split=None, flip: bool = False, tdtype=None):
        if not callable(event_fn):
            raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
        self.fn, self.split, self.flip = event_fn, split, flip
        self.ydt = y0.dtype if tdtype is None else tdtype
        with torch.no_grad():
            c0 = self._raw(t0, y0).detach()
        self.sign0 = torch.sign(c0)
        self.c0 = torch.min(c0 * self.sign0)

    def _raw(self, t, y):
        tt = (-t if self.flip else t).to(self.ydt)
        out = self.fn(tt, y if self.split is None else self.split(y))
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"event_fn must return a floating-point tensor, got {got}")
        if out.numel() == 0:
            raise ValueError("event_fn returned an empty tensor: it must return at least one value")
        if out.device != y.device:
            raise ValueError(f"event_fn returned a tensor on {out.device}, expected {y.device} (the state's device)")
        return out

    def __call__(self, t, y):
        return torch.min(self._raw(t, y) * self.sign0)

    def crossed(self, t, y) -> torch.Tensor:
        """A device flag: the event has happened at ``(t, y)`` (a NaN value counts, as in torchdiffeq)."""
        return ~(self(t, y) > 0)

    def check_start(self) -> bool:
        """Whether the event holds at the start already (one read, before the loop)."""
        c0 = float(self.c0)
        if math.isnan(c0):
            raise ValueError("event_fn is NaN at the initial time and state")
        return c0 == 0.0


def halvings(span: float, tol: float) -> int:
    """How many halvings bring a bracket of length ``span`` to ``tol`` (torchdiffeq's count), bounded."""
    if span <= 0:
        return 0
    if not tol > 0:
        return MAX_HALVINGS
    return int(min(MAX_HALVINGS, max(0, math.ceil(math.log2(span / tol)))))


def locate(ev: Event, interp, ta: torch.Tensor, tb: torch.Tensor, tol: float):
    """The crossing in ``(ta, tb]`` (float64 device times; ``interp(t)`` the state there): bisection on the
    sign of ``ev`` to within ``tol``, then the midpoint of the bracket and the state at it (with the
    interpolant's gradient: the time itself carries none, as in torchdiffeq)."""
    n = halvings(float(abs(tb - ta)), tol)  # the one read, after the loop
    with torch.no_grad():
        for _ in range(n):
            tm = (ta + tb) / 2
            before = ev(tm, interp(tm)) > 0  # still on the starting side: the crossing is later
            ta, tb = torch.where(before, tm, ta), torch.where(before, tb, tm)
    te = (ta + tb) / 2
    return te, interp(te)


def _fraction(t, ta, tb, dtype):
    return ((t - ta) / (tb - ta)).to(dtype)


def fixed_until_event(field, y0: torch.Tensor, t0: float, direction: float, dt: float, tab, ops, ev: Event,
                      interp: str, perturb: bool, max_steps: int, check_every: int, tol: float, stats: dict):
    """Fixed steps of ``dt`` from ``t0`` (``direction`` +1 / -1) until ``ev`` crosses: ``(t_event, y_event,
    status)`` with the time a float64 device scalar. The grid is ``t0 + k dt`` in float64 (torchdiffeq adds
    ``dt`` to a time held in the state's dtype). Without a crossing within ``max_steps`` steps: the time and
    state reached and status ``"max_num_steps"``."""
    dev, ydt = y0.device, y0.dtype
    y, k = y0, 0
    found = torch.zeros((), dtype=torch.bool, device=dev)
    while k < max_steps:
        n = min(check_every, max_steps - k)
        grid = t0 + direction * dt * np.arange(k, k + n + 1, dtype=np.float64)
        times = fixed.StageTimes(grid, tab.c, ydt, dev, perturb)
        ends = fixed.StageTimes(grid, (1.0,), ydt, dev)
        hs = np.diff(grid).tolist()
        recs = []
        for i in range(n):
            stats["steps"] += 1
            y1, ks = rk_step(field, times[i], y, hs[i], tab, ops)
            hit = ev.crossed(ends[i][0], y1)
            recs.append((y, y1, ks[0], hit))
            if check_every > 1:  # once crossed, the state stays before the event until the host reads it (the
                # field is not asked past the event, where it may not be defined)
                found = found | hit
                y1 = torch.where(found, y, y1)
            y = y1
        k += n
        flags = torch.stack([r[3] for r in recs]).tolist()  # the loop's one read per check_every steps
        if any(flags):
            i = flags.index(True)
            stats["accepted"] = k - n + i + 1  # the steps up to the crossing (those after it are discarded)
            ya, yb, fa, _ = recs[i]
            ta, tb = (torch.full((), float(v), dtype=torch.float64, device=dev) for v in grid[i:i + 2])
            if interp == "cubic":
                fb = field(ends[i][0], yb)
                h = float(grid[i + 1] - grid[i])

                def at(t):  # the fixed-step driver's cubic Hermite, at a device time
                    return hermite(ya, fa, yb, fb, _fraction(t, ta, tb, ydt), h)
            else:
                def at(t):
                    return ya + _fraction(t, ta, tb, ydt) * (yb - ya)
            te, ye = locate(ev, at, ta, tb, tol)
            return te, ye, "success"
    return torch.full((), float(t0 + direction * dt * k), dtype=torch.float64, device=dev), y, "max_num_steps"


class Watch:
    """The adaptive loop's side of the search: per attempted step, on the device, whether it is accepted
    and crosses; the records since the last host check are kept so the first crossing step's interpolant
    can be found after the loop."""

    def __init__(self, ev: Event, device):
        self.ev = ev
        self.found = torch.zeros((), dtype=torch.bool, device=device)
        self.recs = []

    def step(self, accept, t0, t1, dt, coeff, y1):
        hit = accept & ~self.found & self.ev.crossed(t1, y1)
        self.recs.append((hit, t0, t1, dt, coeff))
        self.found = self.found | hit

    def forget(self):  # the host has read that no step so far crossed
        self.recs = []

    def locate(self, interp_eval, tol: float, dtype):
        flags = torch.stack([r[0] for r in self.recs]).tolist()  # one read, after the loop
        _, ta, tb, dt, coeff = self.recs[flags.index(True)]
        return locate(self.ev, lambda t: interp_eval(coeff, ((t - ta) / dt).to(dtype)), ta, tb, tol)


def reroute(func, ev: Event, te: torch.Tensor, ye: torch.Tensor):
    """``odeint_event``'s gradients: the event time as a function of everything upstream, by the implicit
    function theorem on ``c(t*, y(t*)) = 0``, and the state at it as ``y(t*)``'s total derivative.

    With ``c`` the (combined) event function, ``f`` the field and ``y`` the state at the event (its graph
    that of the solve at fixed time): ``dt* = -(c_y dy + c_p dp) / (c_t + c_y . f)`` (``p``: the event
    function's parameters, which torchdiffeq leaves without gradient) and ``dy(t*) = dy + f dt*``. Built
    as ``t* + (g - g.detach())`` with ``g = -c(t*, y) / (c_t + c_y . f)``: the values stay the solver's to
    the bit, the gradients are the theorem's. ``te``: the event time as the driver's float64 tensor."""
    if not torch.is_grad_enabled():
        return te, ye
    tq = te.detach().to(ye.dtype)
    with torch.no_grad():
        f = func(tq, ye.detach())
    with torch.enable_grad():
        tt, yy = tq.clone().requires_grad_(True), ye.detach().clone().requires_grad_(True)
        c = ev(tt, yy)
        if not c.requires_grad:  # no differentiable path from (t, y) to the event function: no implicit gradient
            return te, ye
        dct, dcy = torch.autograd.grad(c, (tt, yy), allow_unused=True)
        dcdt = (dct if dct is not None else torch.zeros_like(tt)) + (
            (dcy * f).sum() if dcy is not None else torch.zeros_like(tt))
        if not float(dcdt) != 0:  # (one read) a tangential or degenerate crossing: t* is not a differentiable
            # function of the inputs there; the state keeps the solve's gradient at a fixed time
            return te, ye
        g = -ev(te, ye) / dcdt.detach()
    if not g.requires_grad:
        return te, ye
    shift = g - g.detach()  # zero in value, the implicit gradient in its graph
    return te + shift.to(te.dtype), ye + f * shift.to(ye.dtype)
