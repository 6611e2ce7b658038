"""``flowsde.odeint``: torchdiffeq's entry point, on flowsde's fixed-step driver."""
from __future__ import annotations

import math
import numbers

from typing import Dict

import numpy as np
import torch

from .. import _checks, kernels
from . import events, fixed
from .adaptive import (ADAPTIVE_OPTIONS, ADAPTIVE_TABLEAUX, _interp_eval, _rms, integrate_adaptive, integrate_per_sample,
                       integrate_pieces, loop_budget, mixed_norm)
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

ODE_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb", "return_stats", "backend",
               "norm")  # (norm: no effect on fixed steps, as in torchdiffeq; odeint_adjoint's backward uses it)
#: the fixed-step options that only event handling takes (the search has no end: a budget, and how often the
#: host reads whether it has crossed)
EVENT_OPTIONS = ("max_num_steps", "check_every")


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
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

    ``event_fn(t, y) -> tensor`` (torchdiffeq's event handling): ``t`` must hold two times, the start and
    any time after it in the direction to integrate; the solve runs until ``event_fn`` crosses zero
    (the first of its outputs to do so) and returns ``(event_t, solution)``, ``solution`` holding ``y0``
    and the state at the event (shape ``(2, *y0.shape)``); the crossing is located to within ``atol`` in
    time. Fixed-step methods need ``step_size`` and take ``max_num_steps`` (default 20,000) and
    ``check_every``. See :mod:`flowsde.solvers.events` and :func:`odeint_event` for gradients through the
    event time.
    """
    if method is None:
        method = "dopri5"
    adaptive = isinstance(method, str) and method in ADAPTIVE_TABLEAUX
    if not adaptive and (not isinstance(method, str) or method not in ODE_METHODS):
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(ODE_METHODS) + sorted(ADAPTIVE_TABLEAUX)}")
    allowed = ADAPTIVE_OPTIONS if adaptive else ODE_OPTIONS + (EVENT_OPTIONS if event_fn is not None else ())
    opts = _checks.check_options(options, allowed, f"odeint(method={method!r}{', event_fn' if event_fn is not None else ''})")
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
    if opts.get("norm") is not None and opts.get("per_sample"):
        raise ValueError("option norm is not supported with per_sample=True (the error norm is each sample's RMS)")
    opts["norm"] = error_norm(opts.get("norm"), shapes)
    if event_fn is not None:
        return _until_event(func, event_fn, y0, t, t_host, tab, adaptive, rtol, atol, opts, ops, shapes)
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
        grid = fixed.uniform_grid(t_host[0], t_host[-1], _checks.check_step("step_size", step_size),
                                   t.dtype)
    elif gc is not None:
        grid = _user_grid(gc, func, y0, t, t_host[0] > t_host[-1])
        grid = fixed.check_grid(grid, t_host, "grid_constructor")
    else:
        grid = t_host
    interp_name = _interp_option(opts)
    field, stats = _counted(func, y0)
    times = fixed.StageTimes(grid, tab.c, y0.dtype, y0.device, bool(opts.get("perturb", False)))
    h_all = np.diff(grid).tolist()
    pool = fixed.StatePool(y0)  # (the stage inputs and states written into preallocated buffers)

    def step(k, y):
        stats["steps"] += 1
        y1, ks = rk_step(field, times[k], y, h_all[k], tab, ops, pool)
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

    ys = fixed.integrate(step, y0, grid, t_host, interp, ops.lerp, pool)
    ys = _unflat(ys, shapes)
    if opts.get("return_stats", False):  # a fixed grid accepts every step
        return ys, dict(stats, accepted=stats["steps"], rejected=0, status="success")
    return ys


UNDERFLOW = ("torchdiffeq's 'underflow in dt': the state or the field is not finite there, the solution blows "
             "up, or the tolerances cannot be met in this dtype")


def _adaptive(func, y0, t_host, tab, rtol, atol, opts, ops, shapes, event=None):
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
    if event is not None:
        return _adaptive_event(func, y0, t_host, tab, rtol, atol, opts, ops, shapes, check, event)
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
    norm = opts["norm"]
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


def _interp_option(opts) -> str:
    name = opts.get("interp", "linear")
    if name not in ("linear", "cubic"):
        raise ValueError(f"option interp must be 'linear' or 'cubic', got {name!r}")
    return name


def _counted(func, y0):
    """The field as the fixed-step loops call it (its output checked, its evaluations counted) and the
    stats dict it counts into."""
    stats = {"nfe": 0, "steps": 0}
    shape = tuple(y0.shape)

    def field(tt, y):
        stats["nfe"] += 1
        return _checks.check_output("func", func(tt, y), y0, shape)
    return field, stats


def _until_event(func, event_fn, y0, t, t_host, tab, adaptive, rtol, atol, opts, ops, shapes):
    """``odeint`` with ``event_fn``: search from ``t[0]`` in the direction of ``t[1]`` (see :mod:`.events`)."""
    if len(t_host) != 2:
        raise ValueError(f"with event_fn, t must hold two times, the start and a time after it in the direction "
                         f"to integrate (only its direction is used: the solve runs until the event), got {len(t_host)}")
    split = (lambda y: _split(y, shapes)) if shapes is not None else None
    if adaptive:
        return _adaptive(func, y0, t_host, tab, rtol, atol, opts, ops, shapes, event=(event_fn, split, t))
    if opts.get("grid_constructor") is not None:
        raise ValueError("event handling with a fixed-step method takes options step_size, not grid_constructor "
                         "(the search has no end time to build a grid to)")
    if opts.get("step_size") is None:
        raise ValueError(f"event handling with the fixed-step method {tab.name!r} needs options step_size "
                         f"(as torchdiffeq's)")
    dt = _checks.check_step("step_size", opts["step_size"])
    interp_name = _interp_option(opts)
    max_steps = opts.get("max_num_steps", events.FIXED_MAX_STEPS)
    check_every = opts.get("check_every", 1 if y0.device.type == "cpu" else 8)
    for name, v in (("max_num_steps", max_steps), ("check_every", check_every)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    field, stats = _counted(func, y0)
    t0 = torch.full((), float(t_host[0]), dtype=torch.float64, device=y0.device)
    ev = events.Event(event_fn, t0, y0, split, tdtype=t.dtype)
    te, ye, status = t0, y0, "success"
    if not ev.check_start():
        te, ye, status = events.fixed_until_event(
            field, y0, float(t_host[0]), 1.0 if t_host[1] > t_host[0] else -1.0, dt, tab, ops, ev, interp_name,
            bool(opts.get("perturb", False)), int(max_steps), int(check_every), _event_tol(atol), stats)
    return _event_result(te, ye, y0, t, shapes, dict(stats, accepted=stats.get("accepted", stats["steps"]), rejected=0,
                                                     status=status), opts)


def _adaptive_event(func, y0, t_host, tab, rtol, atol, opts, ops, shapes, check, event):
    event_fn, split, t = event
    for name in ("per_sample", "capturable", "clip_end", "step_t", "jump_t"):
        if opts.get(name) is not None and opts.get(name) is not False:
            raise ValueError(f"option {name} is not supported with event_fn")
    flip = bool(t_host[1] < t_host[0])  # backwards: integrate s = -t, as torchdiffeq does
    f = (lambda s, y: -func(-s, y)) if flip else func
    s0 = -float(t_host[0]) if flip else float(t_host[0])
    start = torch.full((), s0, dtype=torch.float64, device=y0.device)
    ev = events.Event(event_fn, start, y0, split, flip, tdtype=t.dtype)
    te, ye = start, y0
    stats = {"nfe": 0, "steps": 0, "accepted": 0, "rejected": 0, "status": "success"}
    if not ev.check_start():
        watch = events.Watch(ev, y0.device)
        norm = opts["norm"]
        _, st = integrate_adaptive(f, y0, np.array([s0]), tab, rtol, atol, opts, ops, check, norm=norm, event=watch)
        stats = {k: v for k, v in st.items() if not k.startswith("_")}
        if stats["status"] == "success":
            te, ye = watch.locate(_interp_eval, _event_tol(atol), y0.dtype)
        else:
            te, ye = torch.full((), st["_t"], dtype=torch.float64, device=y0.device), st["_y"]
    return _event_result(-te if flip else te, ye, y0, t, shapes, stats, opts)


def _event_tol(atol) -> float:
    """The bisection's tolerance in time: ``atol``, as torchdiffeq's (read once, before the loop)."""
    return float(atol.detach().max()) if isinstance(atol, torch.Tensor) else float(atol)


def _event_result(te, ye, y0, t, shapes, stats, opts):
    if stats["status"] != "success" and not opts.get("return_stats", False):
        why = (f"the step size underflowed ({UNDERFLOW})" if stats["status"] == "dt_underflow" else
               f"no event within max_num_steps={stats['steps']} steps")
        raise RuntimeError(f"odeint stopped at t={float(te)!r}: {why}; pass options=dict(return_stats=True) to "
                           f"get the time and state reached with the status")
    event_t = te.to(device=t.device, dtype=t.dtype)
    solution = _unflat(torch.stack([y0, ye]), shapes)
    return (event_t, solution, stats) if opts.get("return_stats", False) else (event_t, solution)


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=None, **kwargs):
    """torchdiffeq's ``odeint_event``: :func:`odeint` with ``event_fn`` from the time ``t0``, forwards (or
    backwards with ``reverse_time=True``), with the gradient of the event time linked up.

    Returns ``(event_t, solution)`` as ``odeint(..., event_fn=...)``; both carry gradients with respect to
    ``y0``, the parameters of ``func`` and those of ``event_fn`` (torchdiffeq gives the last none), by the
    implicit function theorem on ``event_fn(t*, y(t*)) = 0`` (:func:`flowsde.solvers.events.reroute`): one
    more evaluation of ``func`` and two of ``event_fn`` at the event. ``odeint_interface``: the solver to
    call (default :func:`odeint`); ``kwargs`` go to it (``rtol``, ``atol``, ``method``, ``options``)."""
    first = y0[0] if isinstance(y0, tuple) and y0 else y0
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got {type(y0).__name__}")
    if not isinstance(t0, torch.Tensor):
        t0 = torch.tensor(t0, dtype=first.dtype if first.is_floating_point() else torch.float64)
    if t0.numel() != 1:
        raise ValueError(f"t0 must be one time, got shape {tuple(t0.shape)}")
    if t0.requires_grad and torch.is_grad_enabled():
        raise ValueError("gradients with respect to t0 are not supported (times are read on the host); pass "
                         "t0.detach()")
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0 - 1.0 if reverse_time else t0 + 1.0])
    out = (odeint if odeint_interface is None else odeint_interface)(func, y0, t, event_fn=event_fn, **kwargs)
    event_t, solution = out[0], out[1]
    shapes = [v.shape for v in y0] if isinstance(y0, tuple) else None
    if shapes is None:
        flat_func, split, y_flat, ye = func, None, y0, solution[-1]
    else:
        def flat_func(tt, y):
            return torch.cat([o.reshape(-1) for o in func(tt, _split(y, shapes))])
        split = lambda y: _split(y, shapes)  # noqa: E731
        y_flat = torch.cat([v.reshape(-1) for v in y0])
        ye = torch.cat([s[-1].reshape(-1) for s in solution])
    ev = events.Event(event_fn, t0[0].to(y_flat.device), y_flat, split, tdtype=t0.dtype)
    if ev.check_start():  # the event holds at t0: the time is t0 whatever the inputs, the state y0
        return (event_t, solution) + tuple(out[2:])
    event_t, ye = events.reroute(flat_func, ev, event_t, ye)
    if shapes is None:
        solution = torch.cat([solution[:-1], ye[None]])
    else:
        solution = tuple(torch.cat([s[:-1], p[None]]) for s, p in zip(solution, _split(ye, shapes)))
    return (event_t, solution) + tuple(out[2:])


def error_norm(norm, shapes):
    """The adaptive methods' norm of the scaled error, as torchdiffeq's option ``norm``: ``None`` is RMS for a
    tensor state and the mixed norm (the largest of the parts' RMS norms) for a tuple state; a callable
    ``norm(x)`` is given the scaled error shaped as the state (a tuple of its parts for a tuple state) and
    returns one number (a 0-dim tensor; a host number is put on the device). It is taken on the device
    every step: a norm that reads its value back (``.item()``) synchronises each step."""
    if norm is None:
        return mixed_norm([math.prod(s) for s in shapes]) if shapes is not None else _rms
    if isinstance(norm, str):
        raise ValueError(f"option norm={norm!r}: a norm is a callable here; 'seminorm' is an adjoint_options value "
                         f"(odeint_adjoint)")
    if not callable(norm):
        raise TypeError(f"option norm must be a callable norm(x) -> 0-dim tensor, got {type(norm).__name__}")
    if getattr(norm, "_flowsde_flat", False):  # (already over the flat state: passed on by odeint_adjoint)
        return norm

    def flat_norm(x: torch.Tensor) -> torch.Tensor:
        r = norm(_split(x, shapes) if shapes is not None else x)
        if not isinstance(r, torch.Tensor):
            r = torch.as_tensor(r, dtype=torch.float64, device=x.device)
        if r.numel() != 1:
            raise ValueError(f"option norm must return one number, got a tensor of shape {tuple(r.shape)}")
        return r.reshape(())
    flat_norm._flowsde_flat = True
    return flat_norm


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
