"""Adaptive step sizes for SDEs: ``sdeint(..., adaptive=True, rtol, atol, dt_min)``, shared or per sample.

The error estimate is step doubling on one Brownian path: a step of size ``h`` with the increment
``W(t + h) - W(t)`` against two steps of ``h/2`` with the two half increments. The path is flowsde's
:class:`~flowsde.brownian.VirtualBrownianTree` (by default, or passed as ``bm``), queried at device times,
so a rejected step asks the tree for the same path again and the accepted solution is a solution on that
one path whatever steps were tried. The full step and the first half step start from the same point:
the drift and diffusion there are evaluated once.

Error ratio: RMS of ``(y_two_halves - y_full) / (atol + rtol max(|y|, |y_two_halves|))`` over all elements
(shared step) or over each sample's elements (``per_sample=True``); a step is accepted when the ratio is
<= 1 (or the step is already ``dt_min``) and the state advances to the two-half-steps value. The next step
is ``h * clip(safety * ratio^(-1/(q + 1/2)), dfactor, ifactor)`` (at most ``h`` after a rejection; a PI
controller with ``pcoeff`` / ``icoeff``, see :class:`~flowsde.solvers.adaptive.Controller`) with
``q`` the method's strong order for the noise type (the local error of a strong-order-q method in the
mean-square sense is O(h^(q+1/2))). Steps end exactly on the output times ``ts`` (as torchsde's adaptive
mode does), so outputs are never interpolated.

Every decision is taken on the device (accept/reject and output writes under masks, the step sizes in
device tensors): the host reads whether the solve has finished only every ``check_every`` steps (default 1
on CPU tensors, where a read costs nothing, 8 on CUDA), and with ``capturable=True`` never (a fixed budget
of ``max_num_steps`` attempts, safe to capture as a CUDA graph). With ``per_sample=True`` every sample has
its own time, step size and acceptance (the drift and diffusion are called with ``t`` of shape
``(rows,)``), and at each check the finished samples leave the batch: the work follows the sum of the
samples' efforts. A torchsde Brownian object as ``bm`` is queried at host times instead (one read per
query; shared steps only).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

from .. import _checks
from ..brownian import GridBrownian, SampledPath, VirtualBrownianTree
from .adaptive import Controller, loop_budget
from .sde import StepContext
from .sde_methods import _diffusion_with_derivative

ADAPTIVE_SDE_OPTIONS = ("return_stats", "grad_free", "backend", "max_num_steps", "safety", "ifactor", "dfactor",
                        "pcoeff", "icoeff", "per_sample", "check_every", "capturable")


class _AdaptiveContext(StepContext):
    """A :class:`StepContext` whose single step slot is set per attempt: rows, start and end times (device
    tensors), step size and increment. The drift and diffusion at the attempt's start are memoised, so the
    full step and the first half step share them."""

    def __init__(self, sde, y0, t_dtype, bm, grad_free, stage_c, ops):
        super().__init__(sde, y0, None, t_dtype, bm, None, grad_free, stage_c, ops)
        self.t_dtype = t_dtype
        self.stage_c = stage_c
        self._dw = None
        self._memo = []

    def begin(self, rows: int):
        """A new attempt on ``rows`` rows (per-sample mode compacts the batch): forget the memoised values."""
        self.shape = (rows,) + self.shape[1:]
        self.batch = rows
        if self.g_shape is not None:
            self.g_shape = (rows,) + self.g_shape[1:]
        self._memo = []

    def set_step(self, ta: torch.Tensor, tb: torch.Tensor, h: torch.Tensor, dw: torch.Tensor, span=None):
        self.h = [h]
        self.times = [tuple(tb if c == 1.0 else ta + c * (tb - ta) if c else ta for c in self.stage_c)]
        self._dw = dw
        self._span = span  # (float64 ends of the attempt, for the space-time area query of srk)

    def space_time(self, k, g):
        """``(dW, U)`` of the attempt, from the ``bm``'s ``bm(ta, tb, return_U=True)`` (see
        :func:`_area_query`)."""
        return self.area(*self._span)

    def _memoised(self, name, fn, t, y):
        for key, t_, y_, out in self._memo:  # a handful of entries per attempt
            if key == name and t_ is t and y_ is y:
                return out
        out = fn(t, y)
        self._memo.append((name, t, y, out))
        return out

    def f(self, t, y):
        return self._memoised("f", super().f, t, y)

    def g(self, t, y):
        return self._memoised("g", super().g, t, y)

    def g_and_derivative(self, t, y):
        """Milstein's ``(g, v -> (dg/dy g) v)`` at ``(t, y)``, memoised like ``f`` and ``g``."""
        return self._memoised("gdg", lambda t_, y_: _diffusion_with_derivative(self, t_, y_), t, y)

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


def _brownian_query(bm, shape, device, t_first: float, ops, per_sample: bool):
    """``query(ta, tb, rows) -> (W(ta), W(tb))`` relative to ``W(t_first)``, for the rows asked (``None``:
    all; times 0-dim, or one per row).

    flowsde's tree answers both times in one call at device times (no host read); any other Brownian
    object (torchsde's) is asked ``bm(t_first, t)`` at host times, one read per query, shared steps only."""
    if isinstance(bm, VirtualBrownianTree):
        if tuple(bm.shape) != tuple(shape):
            raise ValueError(f"bm has shape {tuple(bm.shape)}, but this SDE's Brownian motion has shape "
                             f"{tuple(shape)}")
        if bm.device != device:
            raise ValueError(f"bm is on {bm.device} but y0 is on {device}")
        w_first = bm.at(torch.full((), t_first, dtype=torch.float64, device=bm.device), None, ops)  # a fresh tensor
        every = torch.arange(shape[0], device=w_first.device)

        def tree_query(ta, tb, rows):
            r = every if rows is None else rows
            n = r.shape[0]
            w = bm.at(torch.cat([ta.expand(n), tb.expand(n)]), torch.cat([r, r]), ops)
            base = w_first if rows is None else w_first[rows]
            return w[:n] - base, w[n:] - base
        return tree_query
    if per_sample:
        raise ValueError("per_sample=True needs flowsde's VirtualBrownianTree as bm (bm=None makes one): it is "
                         "queried at a time per sample on the device; a torchsde Brownian object is not")

    def host_value(t):
        th = float(t)  # a host read: the price of a Brownian object queried at host times
        if th <= t_first:
            return torch.zeros(shape, dtype=getattr(bm, "dtype", torch.float32), device=t.device)
        w = bm(t_first, th)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(shape):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"bm (Brownian increment) returned shape {got}, expected {tuple(shape)}")
        return w
    return lambda ta, tb, rows: (host_value(ta), host_value(tb))


def _area_query(bm, shape, dev):
    """``area(ta, tb) -> (dW, U)``, the increment and space-time Lévy area of ``[ta, tb]`` from a Brownian
    object that answers ``bm(ta, tb, return_U=True)`` (torchsde's ``BrownianInterval`` with a space-time
    Lévy area approximation), at host times — what adaptive ``srk`` needs for every attempted step and
    half step. flowsde's tree keeps no areas: refused by name."""
    need = ("method 'srk' with adaptive=True needs the space-time Levy area of every attempted step: pass "
            "bm=torchsde.BrownianInterval(t0, t1, size=..., levy_area_approximation='space-time') (flowsde's "
            "VirtualBrownianTree, the default, keeps no areas), or use adaptive=False")
    if bm is None or isinstance(bm, VirtualBrownianTree):
        raise ValueError(need)

    def area(ta, tb):
        try:
            out = bm(float(ta), float(tb), return_U=True)  # host reads: the price of host-time queries
        except (TypeError, NotImplementedError, ValueError) as e:
            raise ValueError(need) from e
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out)):
            raise ValueError(need)
        for what, v in zip(("increment", "space-time area"), out):
            if tuple(v.shape) != tuple(shape) or v.device != dev:
                raise ValueError(f"bm {what} has shape {tuple(v.shape)} on {v.device}, expected {tuple(shape)} "
                                 f"on {dev}")
        return out
    return area


def _tolerance(name, v) -> float:
    """A tolerance as a host float: a number (NumPy ones too), or a one-element tensor (read once, before
    the loop: the error norm takes it as a kernel coefficient)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be one number (or a one-element tensor), got shape {tuple(v.shape)}")
        v = float(v.detach().cpu())
    elif isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(v).__name__}")
    if not (v >= 0 and np.isfinite(v)):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _controls(rtol, atol, dt_min, opts, dev_type):
    rtol, atol = _tolerance("rtol", rtol), _tolerance("atol", atol)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    return (rtol, atol, _checks.check_step("dt_min", dt_min)) + loop_budget(opts, dev_type)


def _empty_solve(y0, n_out, per_sample, capturable, opts):
    """The result for a state with no elements (an empty batch, or rows of no elements): every sample
    reaches the end at once, with no evaluations."""
    ys = y0.clone().unsqueeze(0) if n_out == 1 else y0.new_empty((n_out, *y0.shape))
    if not opts.get("return_stats", False):
        return ys
    rows = y0.shape[0]
    zero = torch.zeros(rows, dtype=torch.int64, device=y0.device) if per_sample else 0
    stats = {"nfe": zero, "nge": 0, "steps": 0, "accepted": zero, "rejected": zero}
    if capturable:
        stats.update(status="budget", finished=torch.ones(rows if per_sample else (), dtype=torch.bool,
                                                          device=y0.device))
    elif per_sample:
        stats.update(status=["success"] * rows, rows=0)
    else:
        stats.update(status="success")
    return ys, stats


def sdeint_adaptive(sde, y0, ts, ts_host, method, dt, rtol, atol, dt_min, bm, seed, opts, ops):
    """The adaptive driver behind ``sdeint(..., adaptive=True)`` (see the module docstring)."""
    dev = y0.device
    rtol, atol, dt_min, max_steps, check_every, capturable = _controls(rtol, atol, dt_min, opts, dev.type)
    _checks.check_resolvable(rtol, atol, y0.dtype, "sdeint(adaptive=True)")
    per_sample = bool(opts.get("per_sample", False))
    n_times = len(ts_host)
    if isinstance(bm, (GridBrownian, SampledPath)):
        raise ValueError("adaptive=True needs a Brownian motion that can be queried at any time (bm=None for "
                         "flowsde's VirtualBrownianTree, or torchsde's BrownianInterval / BrownianTree); a "
                         f"{type(bm).__name__} only knows its grid")
    if capturable and bm is not None and not isinstance(bm, VirtualBrownianTree):
        raise ValueError("capturable=True needs flowsde's VirtualBrownianTree as bm (queried on the device)")
    if y0.numel() == 0 or n_times == 1:  # nothing to integrate, no tree to build, no error norm to take
        return _empty_solve(y0, n_times, per_sample, capturable, opts)  # (as odeint)
    t_first, t_end = float(ts_host[0]), float(ts_host[-1])
    t_probe = torch.full((y0.shape[0],) if per_sample else (), t_first, dtype=ts.dtype, device=dev)
    shape = noise_shape(sde, y0, t_probe)
    area = _area_query(bm, shape, dev) if method.name == "srk" else None
    if bm is None:
        bm = VirtualBrownianTree(t_first, t_end, shape, seed=seed, dtype=y0.dtype, device=dev)
    query = _brownian_query(bm, shape, dev, t_first, ops, per_sample)
    if method.name == "euler" and sde.noise_type != "additive" and (per_sample or y0.shape[0] == 1):
        warnings.warn("adaptive Euler–Maruyama with a step chosen from each single path and multiplicative noise "
                      "need not converge (its error can grow as rtol shrinks: Gaines & Lyons 1997); use "
                      "method='milstein' or 'heun', or shared steps over a batch", UserWarning, stacklevel=3)
    ctx = _AdaptiveContext(sde, y0, ts.dtype, bm, bool(opts.get("grad_free", False)), method.stage_c, ops)
    ctx.area = area
    ctrl = Controller.from_options(opts, method.strong_order(sde.noise_type) + 0.5)
    step = method.step
    f64 = dict(dtype=torch.float64, device=dev)
    B, n_out = y0.shape[0], len(ts_host)
    t_outs = torch.stack([torch.full((), float(v), **f64) for v in ts_host])  # fills: no copy (capturable)
    lay = (lambda x, like: x.reshape(x.shape[0], *([1] * (like.dim() - 1)))) if per_sample else \
        (lambda x, like: x)

    # the state of every sample (shared mode: times, steps and counters are 0-dim)
    rows_shape = (B,) if per_sample else ()
    T = torch.full(rows_shape, t_first, **f64)
    H = torch.full(rows_shape, min(float(dt), t_end - t_first), **f64)
    J = torch.ones(rows_shape, dtype=torch.int64, device=dev)  # the next output to write
    WT = torch.zeros(shape, dtype=y0.dtype, device=dev)         # W(T) - W(t_first)
    Y = y0
    OUT = y0.unsqueeze(0).repeat(n_out, *([1] * y0.dim()))
    ACC = torch.zeros(rows_shape, dtype=torch.int64, device=dev)
    REJ = torch.zeros(rows_shape, dtype=torch.int64, device=dev)
    NFE = torch.zeros(rows_shape, dtype=torch.int64, device=dev)
    R_PREV = torch.ones(rows_shape, **f64)  # the ratio of each sample's last accepted step (PI control)
    all_rows = torch.arange(B, device=dev)
    idx = all_rows if per_sample else None  # the rows still running (per-sample mode)
    steps, rows_total = 0, 0
    status = "success"

    if isinstance(bm, VirtualBrownianTree):
        # steps end on the tree's leaf grid: every increment is one of the tree's exact dyadic values, and
        # a rounding-level change in a step size (another backend's reductions) almost never moves an end
        # (on a rough path it would change every step after it)
        g0, leaf = bm.t0, (bm.t1 - bm.t0) * 2.0 ** -bm.depth

        def snap(t, h):
            # the first leaf point strictly after t (t = g0 + k leaf can divide back to k - eps: the +1
            # would then land on t itself, a step of length zero, accepted forever), or t + h rounded
            nxt = ((t - g0) / leaf).floor() + 1
            nxt = torch.where(g0 + nxt * leaf <= t, nxt + 1, nxt)
            return g0 + torch.maximum(((t + h - g0) / leaf + 0.5).floor(), nxt) * leaf
        # the shortest step the leaf grid allows: taken whatever its error, as a step at dt_min is (a retry
        # would try the same leaf on the same path again, forever)
        h_floor = max(dt_min, leaf * (1.0 + 1e-9))
        shrink_on_reject = True
    else:
        def snap(t, h):
            return t + h
        h_floor, shrink_on_reject = dt_min, False

    def attempt(y, t, tn, w):  # t, tn: (float64 time, the same in ts's dtype for the SDE's functions)
        ctx.set_step(t[1], tn[1], lay((tn[0] - t[0]).to(y0.dtype), y), w, (t[0], tn[0]))
        return step(ctx, 0, y)

    while True:
        if steps >= max_steps:
            status = "max_num_steps"
            break
        steps += 1
        if per_sample:
            y, t, h, j, wt, r_prev = Y[idx], T[idx], H[idx], J[idx], WT[idx], R_PREV[idx]
        else:
            y, t, h, j, wt, r_prev = Y, T, H, J, WT, R_PREV
        ctx.begin(y.shape[0])
        nfe_before = ctx.nfe
        active = j < n_out
        target = t_outs[j.clamp(max=n_out - 1)]
        tn = snap(t, h)
        hit = (h >= (target - t) * (1.0 - 1e-12)) | (tn >= target)
        tn = torch.where(hit, target, tn)
        tm = 0.5 * (t + tn)
        w_m, w_n = query(tm, tn, idx)
        ta_, tm_, tn_ = ((v, v.to(ts.dtype)) for v in (t, tm, tn))
        y_full = attempt(y, ta_, tn_, w_n - wt)
        y_two = attempt(attempt(y, ta_, tm_, w_m - wt), tm_, tn_, w_n - w_m)
        per_row = ops.error_norm(y, y_two, y_two - y_full, rtol, atol).to(torch.float64)
        ratio = per_row if per_sample else per_row.pow(2).mean().sqrt()
        ratio = ratio.detach()
        h_used = tn - t
        # a proposal at dt_min is taken whatever its error (its end, rounded to the tree's leaf grid, may lie
        # a fraction of a leaf beyond t + dt_min), and so is a step of one leaf (see h_floor)
        accept = ((ratio <= 1) | (h <= dt_min) | (h_used <= h_floor)) & active
        h_next = (h_used * ctrl.factor(ratio, r_prev, shrink_after_accept=True)).clamp_min(dt_min)
        if shrink_on_reject:  # a rejected step is retried strictly shorter: with ends rounded to the leaf grid
            # a mild shrink could round back to the same end, the same error, forever
            h_next = torch.where(accept, h_next, torch.minimum(h_next, h_used - 0.75 * leaf))
        r_prev = ctrl.remember(ratio, r_prev, accept)
        keep = hit & (ratio <= 1) & (h_used < h)  # a step clipped onto an output time: resume the proposal
        h_new = torch.where(active, torch.where(keep, torch.maximum(h_next, h), h_next), h)
        # the outputs this step reaches (rows of every sample, under masks: no host read)
        out_rows = idx if per_sample else all_rows
        written = accept & hit
        jc = j.clamp(max=n_out - 1).expand(out_rows.shape)
        mask = written.expand(out_rows.shape).reshape(-1, *([1] * (y0.dim() - 1)))
        OUT[jc, out_rows] = torch.where(mask, y_two, OUT[jc, out_rows])
        acc_y = lay(accept, y)
        y_new, t_new = torch.where(acc_y, y_two, y), torch.where(accept, tn, t)
        w_new = torch.where(lay(accept, wt), w_n, wt)
        j_new = j + written.to(torch.int64)
        rows_total += (ctx.nfe - nfe_before) * y.shape[0]  # rows passed to the drift, running or not
        calls = (ctx.nfe - nfe_before) * active.to(torch.int64)
        if per_sample:
            Y, T, WT = Y.index_copy(0, idx, y_new), T.index_copy(0, idx, t_new), WT.index_copy(0, idx, w_new)
            H, J = H.index_copy(0, idx, h_new), J.index_copy(0, idx, j_new)
            R_PREV = R_PREV.index_copy(0, idx, r_prev)
            ACC = ACC.index_add(0, idx, accept.to(torch.int64))
            REJ = REJ.index_add(0, idx, (~accept & active).to(torch.int64))
            NFE = NFE.index_add(0, idx, calls)
        else:
            Y, T, WT, H, J, R_PREV = y_new, t_new, w_new, h_new, j_new, r_prev
            ACC, REJ, NFE = ACC + accept, REJ + (~accept & active), NFE + calls
        if steps % check_every == 0:  # the one host read, every check_every steps
            if per_sample:
                running = (J < n_out).nonzero().flatten()
                if running.numel() == 0:
                    break
                idx = running
            elif int(J) >= n_out:
                break
    nan = torch.full_like(OUT, float("nan"))
    done_out = torch.arange(n_out, device=dev).reshape(n_out, *([1] * J.dim())) < J  # (n_out, rows...)
    ys = torch.where(done_out.reshape(*done_out.shape, *([1] * (y0.dim() - J.dim()))), OUT, nan)
    if not opts.get("return_stats", False):
        if not capturable and not bool((J >= n_out).all()):  # as odeint: no silent NaN outputs
            raise RuntimeError(f"sdeint(adaptive=True) stopped after max_num_steps={steps} attempts before "
                               f"reaching t={t_end}; pass options=dict(return_stats=True) to get what was computed "
                               f"(outputs not reached are NaN) with its status")
        return ys
    stats = {"nfe": NFE, "nge": ctx.nge, "steps": steps, "accepted": ACC, "rejected": REJ}
    if capturable:  # counts stay on the device; the budget is always spent
        stats.update(status="budget", finished=J >= n_out)
    elif per_sample:
        stats.update(status=["success" if d else "max_num_steps" for d in (J >= n_out).tolist()],
                     rows=rows_total)
    else:
        stats.update(nfe=ctx.nfe, accepted=int(ACC), rejected=int(REJ),
                     status="success" if int(J) >= n_out else status)
    return ys, stats
