"""``flowsde.sdeint``: torchsde's entry point, on flowsde's fixed-step driver."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import _checks, kernels
from ..brownian import GridBrownian, VirtualBrownianTree, _grid_index
from ..kernels import PhiloxNoise
from . import fixed
from .sde_methods import DEFAULT_SDE_METHOD, NOISE_TYPES, SDE_METHODS, SDE_TYPES

SDE_OPTIONS = ("return_stats", "grad_free", "backend")


def _bm_interval(bm):
    """``(t0, t1)`` a Brownian object is defined on, where it says: flowsde's (``t0`` / ``t1``), torchsde's
    ``BrownianInterval`` and ``BrownianTree`` (which keep them privately); ``None`` when unknown (torchsde's
    ``BrownianPath`` grows as it is queried)."""
    if hasattr(bm, "t0") and hasattr(bm, "t1"):
        return float(bm.t0), float(bm.t1)
    kind = type(bm).__name__
    inner = bm if kind == "BrownianInterval" else getattr(bm, "_interval", None) if kind == "BrownianTree" else None
    if inner is not None and hasattr(inner, "_start") and hasattr(inner, "_end"):
        return float(inner._start), float(inner._end)
    return None


class StepContext:
    """What an SDE step needs: checked drift/diffusion, grid, step sizes and Brownian increments."""

    def __init__(self, sde, y0, grid, t_dtype, bm, seed, grad_free, stage_c=(0.0,), ops=None):
        self.sde = sde
        self.ops = kernels.ops("torch") if ops is None else ops
        self.noise_type = sde.noise_type
        self.sde_type = sde.sde_type
        self.grad_free = grad_free
        self.grid = grid
        if grid is not None:  # the adaptive driver (grid None) sets the step per attempt
            self.h = np.diff(grid).tolist()
            self.sqrt_h = np.sqrt(np.diff(grid)).tolist()
            self.times = fixed.StageTimes(grid, stage_c, t_dtype, y0.device)
        self.nfe = self.nge = 0
        self.extra = None  # the state a method carries between steps (reversible_heun's (f, g, z))
        self.pool = None  # the fixed-step driver's fixed.StatePool, that a step's updates are written into
        self.like = y0
        self.shape = tuple(y0.shape)
        self.batch = y0.shape[0]
        self.m = None  # noise channels of additive / general noise, fixed by the first g
        self.g_shape = {"diagonal": self.shape, "scalar": self.shape + (1,)}.get(self.noise_type)
        self.g_name = f"sde.g (diffusion, {self.noise_type} noise)"
        self.bm = bm
        self.seed = seed
        self.own_grid = isinstance(bm, GridBrownian) and grid is not None and bm.grid.shape == grid.shape \
            and np.array_equal(bm.grid, grid)

    def out(self, *live):
        """A preallocated buffer for an update whose operands (and every tensor the step still needs) are
        ``live``, or ``None`` (allocate): see :class:`~flowsde.solvers.fixed.StatePool`."""
        return None if self.pool is None else self.pool.take(*live)

    @property
    def stats(self):
        n = len(self.h)
        return {"nfe": self.nfe, "nge": self.nge, "steps": n, "accepted": n, "rejected": 0, "status": "success"}

    def f(self, t, y):
        self.nfe += 1
        return _checks.check_output("sde.f (drift)", self.sde.f(t, y), self.like, self.shape)

    def g(self, t, y):
        self.nge += 1
        out = self.sde.g(t, y)
        if self.g_shape is None:  # additive / general: the first g fixes the number of noise channels
            if isinstance(out, torch.Tensor) and out.dim() == 3:
                self.m = out.shape[-1]
                self.g_shape = self.shape + (self.m,)
            else:
                return _checks.check_output(self.g_name, out, self.like, self.shape + ("m",))
        return _checks.check_output(self.g_name, out, self.like, self.g_shape)

    def noise_shape(self):
        nt = self.noise_type
        if nt == "diagonal":
            return self.shape
        if nt == "scalar":
            return (self.batch, 1)
        return (self.batch, self.m)

    def noise(self, k, g):
        """The Brownian increment over grid step ``k`` as ``(z, scale)`` with ``dW = scale * z``.

        With flowsde's own grid Brownian motion ``z`` is the standard normal draw and ``scale`` is
        ``sqrt(h)``, so a step folds the scaling into its fused update instead of a pass of its own.
        ``g`` fixes the number of noise channels on first use (additive and general noise).
        """
        if self.bm is None:  # the triton backend draws its own noise in the kernel (Philox)
            stream = "philox" if self.ops.name == "triton" else "torch"
            self.bm = GridBrownian(self.grid, self.noise_shape(), self.seed, self.like.dtype, self.like.device,
                                   stream=stream)
            self.own_grid = True
        if self.own_grid:
            z, scale = self.bm.draw(k), self.sqrt_h[k]
            if isinstance(z, PhiloxNoise):  # drawn in the SDE's shape by the kernel: the bm must have it
                if tuple(self.bm.shape) != tuple(self.noise_shape()):
                    raise ValueError(f"bm (Brownian increment) returned shape {tuple(self.bm.shape)}, expected "
                                     f"{tuple(self.noise_shape())}")
                return z, scale
        else:
            z, scale = self.bm(self.grid[k], self.grid[k + 1]), 1.0
        return _checks.check_output("bm (Brownian increment)", z, self.like, self.noise_shape()), scale

    def space_time(self, k, g):
        """``(dW, U)`` over grid step ``k``: the increment and its space-time Lévy area ``int (W_s - W_tk) ds``
        (the srk method's), from flowsde's own motion or a ``bm`` answering ``bm(ta, tb, return_U=True)``."""
        if self.bm is None or self.own_grid:
            dw = self.dw(k, g)  # (starts flowsde's own motion on first use)
            return dw, self.bm.area(k, dw)
        try:
            out = self.bm(self.grid[k], self.grid[k + 1], return_U=True)
        except (TypeError, NotImplementedError, ValueError) as e:
            out = e
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor)):
            raise ValueError("method 'srk' needs the space-time Levy area of each step: bm must answer bm(ta, tb, "
                             "return_U=True) (torchsde's BrownianInterval with levy_area_approximation='space-time', "
                             "'davie' or 'foster', or flowsde's GridBrownian), or pass bm=None") from (
                out if isinstance(out, Exception) else None)
        shape = self.noise_shape()
        return tuple(_checks.check_output(f"bm {what}", v, self.like, shape) for what, v in
                     (("increment", out[0]), ("space-time area", out[1])))

    def dw(self, k, g):
        """The Brownian increment ``W(t_{k+1}) - W(t_k)`` itself."""
        z, scale = self.noise(k, g)
        if isinstance(z, PhiloxNoise):
            z = self.ops.normal(z.key, self.noise_shape(), self.like.dtype, self.like.device)
        return z if scale == 1.0 else z.mul_(scale)


_NAMES = ("drift", "diffusion", "prior_drift", "drift_and_diffusion", "drift_and_diffusion_prod")


def _at_point(owner, t, y, compute):
    """``compute(t, y)``, kept on ``owner._last`` for the next call at the same point (the same ``t`` and ``y``
    objects) in the same grad mode: the solvers ask for the drift and then the diffusion at one point (a value
    made without grad has no graph for Milstein's dg/dy)."""
    last, grad = owner._last, torch.is_grad_enabled()
    if last is None or last[0] is not t or last[1] is not y or last[2] != grad:
        owner._last = last = (t, y, grad, compute(t, y))
    return last[3]


class _Renamed:
    """An SDE seen through torchsde's ``names`` (its methods under other names) and/or defined by
    ``f_and_g`` alone: ``f`` and ``g`` for the solvers. ``f_and_g`` is called once per ``(t, y)``: the
    solvers ask for the drift and then the diffusion at the same point, and the pair is kept for it."""

    def __init__(self, sde, names):
        self.noise_type, self.sde_type = sde.noise_type, sde.sde_type
        pick = lambda key, default: getattr(sde, names.get(key, default), None)  # noqa: E731
        for key, name in names.items():
            if key != "prior_drift" and not callable(getattr(sde, name, None)):
                raise TypeError(f"names maps {key!r} to {name!r}, which the sde does not define as a method")
        if "drift_and_diffusion_prod" in names:
            raise NotImplementedError("names['drift_and_diffusion_prod'] (a g_prod) is not supported: flowsde's "
                                      "steps need the diffusion itself")
        self._f, self._g = pick("drift", "f"), pick("diffusion", "g")
        self._fg = pick("drift_and_diffusion", "f_and_g")
        self._last = None
        for attr, fn in (("f", self._f), ("g", self._g)):
            if not callable(fn) and not callable(self._fg):
                raise TypeError(f"sde must define a method {names.get('drift' if attr == 'f' else 'diffusion', attr)}"
                                f"(t, y) or f_and_g(t, y) (a g_prod alone is not supported: flowsde's steps need "
                                f"the diffusion itself)")

    def _pair(self, t, y):
        return _at_point(self, t, y, self._fg)

    def f(self, t, y):
        return self._f(t, y) if callable(self._f) else self._pair(t, y)[0]

    def g(self, t, y):
        return self._g(t, y) if callable(self._g) else self._pair(t, y)[1]


class _Logqp:
    """torchsde's ``logqp=True``: the state ``(batch, d)`` gains a last column, the running integral of
    ``|u|^2 / 2`` with ``u = (f - h) / g`` (diagonal noise; ``pinv(g) (f - h)`` otherwise), ``h`` the prior
    drift — the log-ratio (KL) penalty of latent SDEs. Its diffusion is zero. The diffusion computed for the
    drift is kept for the ``g`` asked next at the same point."""

    def __init__(self, sde, prior):
        self.noise_type, self.sde_type = sde.noise_type, sde.sde_type
        self.sde, self.h, self._last = sde, prior, None

    def _g(self, t, y):
        return _at_point(self, t, y, lambda t, y: self.sde.g(t, y[:, :-1]))

    def f(self, t, y):
        x = y[:, :-1]
        f, g, h = self.sde.f(t, x), self._g(t, y), self.h(t, x)
        if self.noise_type == "diagonal":  # (torchsde's stable division: |g| below 1e-7 taken as 1e-7)
            u = (f - h) / torch.where(g.abs() > 1e-7, g, 1e-7 * g.sign())
        else:
            u = torch.bmm(torch.linalg.pinv(g), (f - h).unsqueeze(-1)).squeeze(-1)
        return torch.cat([f, 0.5 * (u * u).sum(dim=1, keepdim=True)], dim=1)

    def g(self, t, y):
        g = self._g(t, y)
        zero = g.new_zeros((g.shape[0], 1) + tuple(g.shape[2:]))
        return torch.cat([g, zero], dim=1)


def _with_logqp(sde, y0, names):
    """The SDE and state of a ``logqp=True`` solve (``y0`` of shape ``(batch, d)``, a prior drift ``h``)."""
    if not isinstance(y0, torch.Tensor) or y0.dim() != 2:
        raise ValueError(f"logqp=True needs y0 of shape (batch, d), got "
                         f"{tuple(y0.shape) if isinstance(y0, torch.Tensor) else type(y0).__name__}")
    name = (names or {}).get("prior_drift", "h")
    prior = getattr(sde, name, None)
    if not callable(prior):
        raise ValueError(f"logqp=True needs the prior drift: the sde has no method {name}(t, y)")
    inner = _torchsde_arguments(sde, names)
    return _Logqp(inner, prior), torch.cat([y0, y0.new_zeros((y0.shape[0], 1))], dim=1)


def _split_logqp(ys):
    """``(ys, log_ratio)``: the solution and the penalty's increments between successive times, ``(T - 1, batch)``."""
    return ys[..., :-1], ys[1:, :, -1] - ys[:-1, :, -1]


def _torchsde_arguments(sde, names):
    """torchsde's ``names``: maps its keys to the SDE's method names (``logqp`` is applied by
    :func:`_with_logqp`, ``extra`` / ``extra_solver_state`` by :func:`_solver_state`)."""
    if names is not None:
        if not isinstance(names, dict) or any(k not in _NAMES or not isinstance(v, str) for k, v in names.items()):
            raise ValueError(f"names must map some of {_NAMES} to method names of the sde, got {names!r}")
    names = names or {}
    if names or not all(callable(getattr(sde, a, None)) for a in ("f", "g")):
        return _Renamed(sde, names)
    return sde


def _solver_state(method, state, y0, noise_type, adaptive):
    """torchsde's ``extra_solver_state``, checked: ``()`` (or ``None``) for a method that keeps none between
    steps; for ``reversible_heun`` ``None`` (start from ``y0``) or its ``(f, g, z)`` at ``ts[0]``, as
    ``extra=True`` returned it (to resume a solve where another ended)."""
    if state is None:
        return None
    if not isinstance(state, (tuple, list)) or not all(isinstance(x, torch.Tensor) for x in state):
        raise TypeError(f"extra_solver_state must be a tuple of tensors, got {type(state).__name__}")
    names = method.solver_state
    if len(state) != len(names):
        what = f"{len(names)} tensors {names}" if names else "() (it keeps no state between steps)"
        raise ValueError(f"extra_solver_state for method {method.name!r} must be {what}, got {len(state)} tensors")
    if not names:
        return None
    if adaptive:
        raise ValueError(f"method {method.name!r} runs fixed steps only (adaptive=False)")
    f, g, z = state
    for what, x in (("f", f), ("z", z)):
        _checks.check_output(f"extra_solver_state {what}", x, y0, tuple(y0.shape))
    g_shape = {"diagonal": tuple(y0.shape), "scalar": tuple(y0.shape) + (1,)}.get(noise_type)
    if g_shape is None:  # additive / general: (batch, d, m), any m
        g_shape = tuple(y0.shape) + ((g.shape[-1],) if isinstance(g, torch.Tensor) and g.dim() == 3 else ("m",))
    _checks.check_output("extra_solver_state g", g, y0, g_shape)
    return tuple(state)


def _snapped(bm, t: float) -> float:
    """``t`` as the grid motion's grid time it names within float32 rounding (else ``t`` itself)."""
    try:
        return float(bm.grid[_grid_index(bm, t, loose=True)])
    except ValueError:
        return t


def times_on_motion(bm, ts, ts_host, y0) -> np.ndarray:
    """The host times ``ts`` as a given Brownian object sees them: checked against its dtype and interval;
    within the rounding of ``ts``'s dtype (float32 0.1 is 0.10000000149) clipped onto the motion's interval,
    as torchsde does, and on a grid motion snapped onto the grid times they name."""
    if not callable(bm):
        raise TypeError("bm must be a Brownian object callable as bm(ta, tb)")
    if hasattr(bm, "dtype") and bm.dtype != y0.dtype:
        raise TypeError(f"bm has dtype {bm.dtype} but y0 has dtype {y0.dtype}")
    span = _bm_interval(bm)
    if span is None:
        return ts_host
    tol = 4 * torch.finfo(ts.dtype).eps * max(1.0, float(np.abs(ts_host).max()))
    if not (span[0] <= ts_host[0] + tol and span[1] >= ts_host[-1] - tol):
        raise ValueError(f"bm covers [{span[0]}, {span[1]}] but ts spans [{ts_host[0]}, {ts_host[-1]}]")
    ts_host = np.clip(ts_host, span[0], span[1])
    if getattr(bm, "_tol32", None) is not None and ts.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # float32 ts on a grid motion: a time within float32 rounding of a grid time is that time (0.1 in
        # float32 is 0.10000000149, not a grid point to the float64 tolerance)
        ts_host = np.array([_snapped(bm, v) for v in ts_host])
    if not np.all(np.diff(ts_host) > 0):
        raise ValueError(f"ts is not strictly increasing on the bm's interval [{span[0]}, {span[1]}]")
    return ts_host


def sdeint(sde, y0, ts, bm=None, method=None, dt=1e-3, adaptive=False, rtol=1e-5, atol=1e-4, dt_min=1e-5,
           options=None, names=None, logqp=False, extra=False, extra_solver_state=None, seed=None):
    """Integrate the SDE ``dY = f(t, Y) dt + g(t, Y) dW`` and return ``Y`` at every time in ``ts``.

    Same arguments and result layout as ``torchsde.sdeint``: ``sde`` has methods ``f(t, y)`` and
    ``g(t, y)`` and attributes ``noise_type`` (``diagonal``, ``scalar``, ``additive``, ``general``) and
    ``sde_type`` (``ito``, ``stratonovich``); ``y0`` has shape ``(batch, d)`` (``(batch, *shape)`` for
    diagonal and scalar noise); ``ts`` is strictly increasing; the result has shape
    ``(len(ts), *y0.shape)``. Steps of size ``dt`` run from ``ts[0]`` to ``ts[-1]`` and outputs inside
    a step are interpolated linearly, as torchsde does.

    Methods: ``euler`` (Itô Euler–Maruyama, alias ``euler_maruyama``), ``srk`` (Itô, Rößler's), ``heun``,
    ``midpoint``, ``euler_heun`` and ``reversible_heun`` (Stratonovich, torchsde's) and ``milstein`` (Itô
    or Stratonovich; diagonal, scalar or additive noise; ``options=dict(grad_free=True)`` for the
    derivative-free variant). The default is ``euler`` for Itô and ``midpoint`` (torchsde's default) for
    Stratonovich SDEs.

    ``extra=True`` also returns torchsde's ``extra_solver_state`` at ``ts[-1]`` (reversible Heun's ``(f, g,
    z)``, ``()`` for the other methods); ``extra_solver_state`` resumes a solve from one.

    ``bm``: any Brownian object answering ``bm(ta, tb)`` (a torchsde one, or a
    :class:`flowsde.brownian.GridBrownian`); with ``bm=None`` flowsde draws its increments from ``seed``
    (same seed, same result). ``options``: ``return_stats`` (returns ``(ys, stats)`` with ``nfe``,
    ``nge``, ``steps``; after ``extra_solver_state`` with ``extra``), ``grad_free``, ``backend``.
    """
    from .adaptive_sde import ADAPTIVE_SDE_OPTIONS, sdeint_adaptive
    if logqp:  # the KL penalty as a last state column (torchsde's SDELogqp), split off the result
        aug, y_aug = _with_logqp(sde, y0, names)
        out = sdeint(aug, y_aug, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, None, extra=extra,
                     extra_solver_state=extra_solver_state, seed=seed)
        if isinstance(out, tuple):
            return _split_logqp(out[0]) + out[1:]
        return _split_logqp(out)
    opts = _checks.check_options(options, ADAPTIVE_SDE_OPTIONS if adaptive else SDE_OPTIONS,
                                 f"sdeint(adaptive={bool(adaptive)})")
    for attr, allowed in (("noise_type", NOISE_TYPES), ("sde_type", SDE_TYPES)):
        if not hasattr(sde, attr):
            raise ValueError(f"sde has no attribute {attr}: set it to one of {allowed}")
        if getattr(sde, attr) not in allowed:
            raise ValueError(f"sde.{attr} must be one of {allowed}, got {getattr(sde, attr)!r}")
    sde = _torchsde_arguments(sde, names)
    if method is None:
        method = DEFAULT_SDE_METHOD[sde.sde_type]
    if not isinstance(method, str) or method not in SDE_METHODS:
        raise ValueError(f"unknown SDE method {method!r}; known methods: {sorted(SDE_METHODS)}")
    m = SDE_METHODS[method]
    if sde.sde_type not in m.sde_types:
        raise ValueError(f"method {method!r} solves {' or '.join(m.sde_types)} SDEs, but sde.sde_type is "
                         f"{sde.sde_type!r}")
    if sde.noise_type not in m.noise_types:
        raise ValueError(f"method {method!r} supports noise types {m.noise_types}, but sde.noise_type is "
                         f"{sde.noise_type!r}")

    y0 = _checks.check_state("y0", y0)
    if y0.dim() < 2:
        raise ValueError(f"y0 must have shape (batch, d), got shape {tuple(y0.shape)}")
    if sde.noise_type in ("additive", "general") and y0.dim() != 2:
        raise ValueError(f"{sde.noise_type} noise needs y0 of shape (batch, d), got {tuple(y0.shape)}")
    ts = _checks.check_times("ts", ts, y0, at_least_two=False)  # one time: y0 alone, as torchsde
    ts_host = _checks.host_times("ts", ts, increasing_only=True)
    step = _checks.check_step("dt", dt)
    ops = kernels.ops(opts.get("backend"), y0.device, y0.numel())
    _checks.check_seed(seed)
    if bm is not None:
        ts_host = times_on_motion(bm, ts, ts_host, y0)
    if adaptive and m.solver_state:
        raise ValueError(f"method {method!r} runs fixed steps only (a rejected step would have to restore the "
                         f"state it carries); use adaptive=False, or milstein / heun adaptively")
    state = _solver_state(m, extra_solver_state, y0, sde.noise_type, adaptive)

    def result(ys, final_state, stats):  # torchsde's layout (extra_solver_state after ys), then the stats
        out = (ys,) + ((final_state,) if extra else ()) + ((stats,) if opts.get("return_stats", False) else ())
        return out if len(out) > 1 else ys
    if adaptive:
        out = sdeint_adaptive(sde, y0, ts, ts_host, m, step, rtol, atol, dt_min, bm, seed, opts, ops)
        ys, stats = out if isinstance(out, tuple) else (out, None)
        return result(ys, (), stats)
    if len(ts_host) == 1:  # nothing to integrate: y0 (a copy), as torchsde returns it
        ys = y0.clone().unsqueeze(0)
        stats = {"nfe": 0, "nge": 0, "steps": 0, "accepted": 0, "rejected": 0, "status": "success"}
        if extra and m.solver_state and state is None:  # (the state a solve from here would start with)
            state = (sde.f(ts[0], y0), sde.g(ts[0], y0), y0)
        return result(ys, state or (), stats)
    grid = fixed.uniform_grid(ts_host[0], ts_host[-1], step, ts.dtype)
    if isinstance(bm, VirtualBrownianTree):  # below a leaf the tree is linear: too little variance
        leaf = (bm.t1 - bm.t0) / 2 ** bm.depth
        shortest = float(np.diff(grid).min())
        if shortest < leaf * (1 - 1e-9):  # (a step of one leaf, up to rounding: fine)
            which = f"dt={step!r}" if step < leaf * (1 - 1e-9) else f"the last step ({shortest:.3g}, dt={step!r})"
            warnings.warn(f"{which} is below the VirtualBrownianTree's resolution (its leaves are {leaf:.3g} long, "
                          f"inside which W is linear: increments there have too little variance); build it with "
                          f"a smaller tol", UserWarning, stacklevel=2)
    ys, final_state, stats = run_on_grid(sde, y0, grid, ts_host, m, ts.dtype, bm, seed,
                                         bool(opts.get("grad_free", False)), ops, state)
    return result(ys, final_state, stats)


def run_on_grid(sde, y0, grid, t_out, method, t_dtype, bm=None, seed=None, grad_free=False, ops=None,
                extra_solver_state=None):
    """Run the SDE ``method`` (an :class:`SDEMethod`) over a prepared host ``grid`` (float64, increasing):
    ``(ys, extra_solver_state, stats)``, the solution at the times ``t_out``, the state the method carries
    at the grid's end (``()`` for one-step methods) and the counts of evaluations."""
    ctx = StepContext(sde, y0, grid, t_dtype, bm, seed, grad_free, method.stage_c, ops)
    if extra_solver_state is not None:
        ctx.extra = extra_solver_state
        g = extra_solver_state[method.solver_state.index("g")]
        if ctx.g_shape is None:  # (additive / general noise: the channels the given diffusion has)
            ctx.m, ctx.g_shape = g.shape[-1], tuple(g.shape)
    step_fn = method.step
    ctx.pool = fixed.StatePool(y0)

    def do_step(k, y):
        return step_fn(ctx, k, y), None

    ys = fixed.integrate(do_step, y0, grid, t_out, lerp=ctx.ops.lerp, pool=ctx.pool)
    return ys, (tuple(ctx.extra) if method.solver_state else ()), ctx.stats


def solve_on_grid(sde, y0, grid, t_out, method, t_dtype, bm=None, seed=None, grad_free=False,
                  return_stats=False, ops=None):
    """:func:`run_on_grid`'s solution (and stats with ``return_stats``): the driver behind ``sdeint`` and
    ``flowsde.sample``."""
    ys, _, stats = run_on_grid(sde, y0, grid, t_out, method, t_dtype, bm, seed, grad_free, ops)
    return (ys, stats) if return_stats else ys
