"""``flowsde.odeint``: torchdiffeq's entry point, on flowsde's fixed-step driver."""
from __future__ import annotations

import math
import numbers

from typing import Dict

import numpy as np
import torch

from .. import _checks, kernels
from . import fixed
from .adaptive import (ADAPTIVE_OPTIONS, ADAPTIVE_TABLEAUX, _rms, integrate_per_sample, integrate_pieces, loop_budget,
                       mixed_norm)
from .rk import EULER, HEUN2, HEUN3, MIDPOINT, RK4, RK4_CLASSIC, ButcherTableau, rk_step

#: Fixed-step methods by name. Adding a method is one line: a name and its tableau.
ODE_METHODS: Dict[str, ButcherTableau] = {
    "euler": EULER,
    "midpoint": MIDPOINT,
    "heun": HEUN2,
    "heun2": HEUN2,
    "heun3": HEUN3,
    "rk4": RK4,
    "rk4_classic": RK4_CLASSIC,
}
#: Adaptive methods (embedded pairs), see :mod:`flowsde.solvers.adaptive`.
ADAPTIVE_ODE_METHODS = tuple(ADAPTIVE_TABLEAUX)

ODE_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb", "return_stats", "backend")


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """Integrate ``dy/dt = func(t, y)`` from ``y(t[0]) = y0`` and return ``y`` at every time in ``t``.

    Same arguments and result layout as ``torchdiffeq.odeint``: ``func`` gets a 0-dim tensor ``t`` (in
    ``y0``'s dtype, on its device) and the state; ``y0`` is a tensor (or a tuple of tensors); ``t`` is
    1-D and strictly increasing or strictly decreasing (integration backwards in time). The result has
    shape ``(len(t), *y0.shape)`` (a tuple of such tensors for a tuple ``y0``).

    Methods (``method=``): ``euler``, ``midpoint``, ``heun`` (alias ``heun2``, explicit trapezoid),
    ``heun3``, ``rk4`` (Kutta's 3/8 rule, torchdiffeq's ``rk4``) and ``rk4_classic``; adaptive
    (embedded pairs, shared step size, torchdiffeq's controller and dense output): ``dopri5`` (the
    default), ``bosh3``, ``heun_euler`` (alias ``adaptive_heun``), with options ``first_step``,
    ``max_num_steps`` (reaching it: ``status`` in the stats, or a RuntimeError without them),
    ``min_step``, ``max_step``, ``safety``, ``ifactor``, ``dfactor``, ``check_every`` (how often the
    host reads whether the integration has finished) and ``clip_end`` (the last step ends on ``t[-1]``:
    the field is never evaluated past it).
    Options: ``step_size`` (uniform grid from ``t[0]`` to ``t[-1]``; outputs in between interpolated)
    or ``grid_constructor(func, y0, t) -> grid``; without either the grid is ``t`` itself.
    ``interp``: ``"linear"`` (default) or ``"cubic"`` (Hermite) for outputs inside a step.
    ``return_stats=True`` returns ``(ys, stats)`` (``nfe``, ``steps``, ``accepted``, ``rejected``,
    ``status``). ``backend``: see
    :func:`flowsde.kernels.resolve_backend`. ``rtol`` / ``atol`` are for the adaptive methods.
    """
    if method is None:
        method = "dopri5"
    adaptive = isinstance(method, str) and method in ADAPTIVE_TABLEAUX
    if not adaptive and (not isinstance(method, str) or method not in ODE_METHODS):
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(ODE_METHODS) + sorted(ADAPTIVE_TABLEAUX)}")
    opts = _checks.check_options(options, ADAPTIVE_OPTIONS if adaptive else ODE_OPTIONS,
                                 f"odeint(method={method!r})")
    tab = ADAPTIVE_TABLEAUX[method] if adaptive else ODE_METHODS[method]

    # tuples of tensors are integrated as one flat state, as torchdiffeq does (its mixed error norm: the largest
    # of the parts' RMS norms)
    shapes = None
    if isinstance(y0, tuple):
        if not y0 or not all(isinstance(v, torch.Tensor) for v in y0):
            raise TypeError("y0 must be a tensor or a non-empty tuple of tensors")
        for i, v in enumerate(y0):
            if not v.is_floating_point():
                raise TypeError(f"y0[{i}] must be a floating-point tensor, got {v.dtype}")
        shapes = [v.shape for v in y0]
        user_func = func

        def func(tt, y, _f=user_func):
            parts = _split(y, shapes)
            outs = _f(tt, parts)
            if not isinstance(outs, (tuple, list)) or len(outs) != len(shapes):
                raise TypeError(f"func must return a tuple of {len(shapes)} tensors for a tuple y0")
            for i, (o, s) in enumerate(zip(outs, shapes)):
                if not isinstance(o, torch.Tensor) or o.shape != s:
                    got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                    raise ValueError(f"func returned {got} for part {i} of the tuple state, expected shape {tuple(s)}")
            return torch.cat([o.reshape(-1) for o in outs])

        y0 = torch.cat([v.reshape(-1) for v in y0])
    y0 = _checks.check_state("y0", y0)
    t = _checks.check_times("t", t, y0, at_least_two=False)  # one time: y0 alone, as torchdiffeq
    t_host = _checks.host_times("t", t)
    ops = kernels.ops(opts.get("backend"), y0.device, y0.numel())
    if adaptive:
        return _adaptive(func, y0, t_host, tab, rtol, atol, opts, ops, shapes)

    step_size = opts.get("step_size")
    gc = opts.get("grid_constructor")
    if step_size is not None and gc is not None:
        raise ValueError("options step_size and grid_constructor are mutually exclusive")
    if len(t_host) == 1:  # nothing to integrate: y0 (a copy), as torchdiffeq returns it
        if step_size is not None:
            _checks.check_step("step_size", step_size)
        ys = y0.clone().unsqueeze(0)
        ys = _unflat(ys, shapes)
        stats = {"nfe": 0, "steps": 0, "accepted": 0, "rejected": 0, "status": "success"}
        return (ys, stats) if opts.get("return_stats", False) else ys
    if step_size is not None:
        grid = fixed.uniform_grid(t_host[0], t_host[-1], _checks.check_step("step_size", step_size))
    elif gc is not None:
        grid = _user_grid(gc, func, y0, t, t_host[0] > t_host[-1])
        grid = fixed.check_grid(grid, t_host, "grid_constructor")
    else:
        grid = t_host
    interp_name = opts.get("interp", "linear")
    if interp_name not in ("linear", "cubic"):
        raise ValueError(f"option interp must be 'linear' or 'cubic', got {interp_name!r}")

    stats = {"nfe": 0, "steps": 0}
    shape = tuple(y0.shape)

    def field(tt, y):
        stats["nfe"] += 1
        return _checks.check_output("func", func(tt, y), y0, shape)

    times = fixed.StageTimes(grid, tab.c, y0.dtype, y0.device, bool(opts.get("perturb", False)))
    h_all = np.diff(grid).tolist()

    def step(k, y):
        stats["steps"] += 1
        y1, ks = rk_step(field, times[k], y, h_all[k], tab, ops)
        return y1, ks[0]

    interp = None
    if interp_name == "cubic":
        ends = fixed.StageTimes(grid, (1.0,), y0.dtype, y0.device)
        cache = {}

        def interp(k, ya, yb, f0, s):
            if k not in cache:
                cache.clear()
                cache[k] = field(ends[k][0], yb)
            return kernels.hermite(ya, f0, yb, cache[k], s, h_all[k])

    ys = fixed.integrate(step, y0, grid, t_host, interp, ops.lerp)
    ys = _unflat(ys, shapes)
    if opts.get("return_stats", False):  # a fixed grid accepts every step
        return ys, dict(stats, accepted=stats["steps"], rejected=0, status="success")
    return ys


UNDERFLOW = ("torchdiffeq's 'underflow in dt': the state or the field is not finite there, the solution blows "
             "up, or the tolerances cannot be met in this dtype")


def _adaptive(func, y0, t_host, tab, rtol, atol, opts, ops, shapes):
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)):
            raise TypeError(f"{name} must be a number or a tensor, got {type(v).__name__} (per-part tolerances of "
                            f"a tuple state, as torchdiffeq's, are not supported: pass one number)")
        if isinstance(v, torch.Tensor) and v.requires_grad:
            raise ValueError(f"{name} cannot require gradient")
        bad = ~torch.isfinite(v) | (v < 0) if isinstance(v, torch.Tensor) else not math.isfinite(v) or v < 0
        if bad.any() if isinstance(bad, torch.Tensor) else bad:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    host = not isinstance(rtol, torch.Tensor) and not isinstance(atol, torch.Tensor)  # (device ones: not read)
    if host and rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0: no step would ever be accepted")
    _checks.check_resolvable(rtol, atol, y0.dtype, "odeint")
    bounds = {}
    for name in ("min_step", "max_step"):
        v = opts.get(name)
        if v is None:
            continue
        try:
            bounds[name] = float(v)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}") from None
        if not bounds[name] >= 0 or (name == "min_step" and bounds[name] == math.inf):
            raise ValueError(f"{name} must be a number >= 0{'' if name == 'max_step' else ' and finite'}, got {v!r}")
    if "max_step" in bounds and bounds["max_step"] <= bounds.get("min_step", 0.0):
        raise ValueError(f"max_step must be > min_step, got max_step={bounds['max_step']!r}, "
                         f"min_step={bounds.get('min_step', 0.0)!r}")
    per_sample = bool(opts.get("per_sample", False))
    if per_sample and (shapes is not None or isinstance(rtol, torch.Tensor) or isinstance(atol, torch.Tensor)):
        raise ValueError("per_sample=True needs a tensor y0 of shape (batch, ...) and scalar rtol / atol")
    shape = tuple(y0.shape)
    check = lambda out: _checks.check_output("func", out, y0, shape)  # noqa: E731
    check_rows = lambda out, y: _checks.check_output("func", out, y0, tuple(y.shape))  # noqa: E731
    stops = {}
    for name in ("step_t", "jump_t"):
        v = opts.get(name)
        if v is None:
            stops[name] = np.zeros(0)
            continue
        v = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must hold finite times, got {v}")
        stops[name] = v
    if per_sample and (stops["step_t"].size or stops["jump_t"].size):
        raise ValueError("step_t and jump_t are supported with per_sample=False")
    if opts.get("capturable") and (per_sample or stops["step_t"].size or stops["jump_t"].size):
        raise ValueError("capturable=True is supported without per_sample, step_t and jump_t")
    if y0.numel() == 0 or len(t_host) == 1:  # nothing to integrate (and no error norm to take)
        ys = y0.clone().unsqueeze(0) if len(t_host) == 1 else y0.new_empty((len(t_host), *y0.shape))
        ys = _unflat(ys, shapes)
        loop_budget(opts, y0.device.type)  # (the budget options are checked all the same)
        empty = {"nfe": 0, "steps": 0, "accepted": 0, "rejected": 0, "status": "success"}
        if per_sample:
            z = torch.zeros(y0.shape[0], dtype=torch.int64, device=y0.device)
            empty = dict(empty, nfe=z, accepted=z, rejected=z, status=["success"] * y0.shape[0], rows=0)
        elif opts.get("capturable"):  # the stats a captured solve gives: on the device, the budget's status
            z, flag = (torch.zeros((), dtype=d, device=y0.device) for d in (torch.int64, torch.bool))
            empty = dict(empty, accepted=z, rejected=z.clone(), status="budget", finished=~flag, dt_underflow=flag)
        return (ys, empty) if opts.get("return_stats", False) else ys
    f, th = func, t_host
    if t_host[0] > t_host[-1]:  # backwards in time: integrate s = -t (as torchdiffeq does)
        f, th = (lambda s, y: -func(-s, y)), -t_host
        stops = {k: -v for k, v in stops.items()}
    if per_sample:
        ys, stats = integrate_per_sample(f, y0, th, tab, rtol, atol, opts, ops, check_rows)
        if opts.get("return_stats", False):
            return ys, stats
        failed = [i for i, s in enumerate(stats["status"]) if s != "success"]
        if failed:
            under = [i for i in failed if stats["status"][i] == "dt_underflow"]
            why = (f"the step size underflowed for samples {under[:8]}{'...' if len(under) > 8 else ''} ({UNDERFLOW})"
                   if under else "it reached max_num_steps before every sample reached the end")
            raise RuntimeError(f"odeint stopped: {why}; pass options=dict(return_stats=True) to get what was "
                               f"computed and each sample's status")
        return ys
    norm = mixed_norm([math.prod(s) for s in shapes]) if shapes is not None else _rms
    ys, stats = integrate_pieces(f, y0, th, tab, rtol, atol, opts, ops, check, stops["step_t"], stops["jump_t"], norm)
    t_stop = stats.get("_t")
    stats = {k: v for k, v in stats.items() if not k.startswith("_")}
    ys = _unflat(ys, shapes)
    if opts.get("return_stats", False) or opts.get("capturable"):
        return (ys, stats) if opts.get("return_stats", False) else ys
    if stats["status"] == "dt_underflow":
        t_stop = -t_stop if t_host[0] > t_host[-1] else t_stop
        raise RuntimeError(f"odeint stopped: the step size underflowed at t={t_stop!r} ({UNDERFLOW}); pass "
                           f"options=dict(return_stats=True) to get what was computed (outputs not reached are NaN)")
    if stats["status"] != "success":
        raise RuntimeError(f"odeint stopped after max_num_steps={stats['steps']} steps before reaching "
                           f"t={t_host[-1]}; pass options=dict(return_stats=True) to get what was computed "
                           f"(outputs not reached are NaN) with its status")
    return ys


def _split(y, shapes):
    out, i = [], 0
    for s in shapes:
        n = int(np.prod(s)) if len(s) else 1
        out.append(y[i:i + n].reshape(s))
        i += n
    return tuple(out)


def _split_flat(ys, shapes):
    sizes = [int(np.prod(s)) if len(s) else 1 for s in shapes]
    return ys.split(sizes, dim=1)


def _unflat(ys, shapes):
    """A flat ``(len(t), n)`` result back as the tuple state's parts (``shapes`` None: ``ys`` itself)."""
    if shapes is None:
        return ys
    return tuple(p.reshape(ys.shape[0], *s) for p, s in zip(_split_flat(ys, shapes), shapes))


def _user_grid(gc, func, y0, t, backwards):
    """Call a user grid constructor as torchdiffeq does (with increasing times for a reversed ``t``)."""
    if backwards:
        grid = -gc(lambda tt, y: -func(-tt, y), y0, -t)
    else:
        grid = gc(func, y0, t)
    if not isinstance(grid, torch.Tensor):
        raise TypeError(f"grid_constructor must return a tensor, got {type(grid).__name__}")
    return grid.detach().to("cpu", torch.float64).numpy().copy()
