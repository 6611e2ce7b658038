"""``flowsde.sdeint_adjoint``: torchsde's stochastic adjoint, gradients in memory that does not grow with the
number of steps (Li, Wong, Chen & Duvenaud 2020, "Scalable gradients for stochastic differential equations").

The forward solve is :func:`flowsde.sdeint` without a graph. The backward pass integrates, from each output
time to the one before and on the same Brownian path queried backwards, the augmented SDE of
``(y, a, a_p)``: ``y`` reconstructed by the reverse-time SDE, ``a' = -a^T df/dy dt - a^T d(g dW)/dy`` and
``a_p' = -a^T df/dp dt - a^T d(g dW)/dp``, restarting ``y`` from the forward solution at every output time and
adding that time's incoming gradient to ``a``. Stratonovich SDEs reverse as they are (midpoint, Heun,
Euler–Heun or Milstein backward steps); an Itô SDE's reverse drift and adjoint carry torchsde's corrections (``f - sum_j
(dg_j/dy) g_j`` and the adjoint's Itô term, ``(a^T dg/dy) dg/d(y, p)``; additive noise needs none), stepped
by Euler–Maruyama or, for diagonal noise, Milstein (with the augmented SDE's own Milstein term). Each
evaluation's vector-Jacobian products are taken by autograd, with no graph kept between steps.

A ``reversible_heun`` solve is instead run backwards exactly, step for step on its own grid
(:func:`_reversible_backward`, torchsde's ``adjoint_reversible_heun``): the gradient of the discretised solve.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _checks
from ..brownian import GridBrownian, VirtualBrownianTree
from ..kernels.reference import noise_prod
from . import fixed
from .adjoint import differentiated_params

#: the backward methods, by the forward SDE's type (the first is the default, as torchsde's for Stratonovich)
REVERSIBLE = "adjoint_reversible_heun"
ADJOINT_METHODS = {"stratonovich": ("midpoint", "heun", "euler_heun", "milstein", REVERSIBLE),
                   "ito": ("euler", "milstein")}
_ALIASES = {"euler_maruyama": "euler"}


def sdeint_adjoint(sde, y0, ts, bm=None, method=None, adjoint_method=None, dt=1e-3, adaptive=False,
                   adjoint_adaptive=False, rtol=1e-5, adjoint_rtol=1e-5, atol=1e-4, adjoint_atol=1e-4, dt_min=1e-5,
                   options=None, adjoint_options=None, adjoint_params=None, names=None, logqp=False, extra=False,
                   extra_solver_state=None, seed=None):
    """:func:`flowsde.sdeint` with gradients by the stochastic adjoint (torchsde's ``sdeint_adjoint``: the same
    arguments and results).

    ``adjoint_params``: the tensors to differentiate besides ``y0`` (default ``sde.parameters()``; ``sde`` must
    then be an ``nn.Module``). ``adjoint_method``: the backward steps, with torchsde's defaults —
    ``"midpoint"`` (default), ``"heun"``, ``"euler_heun"`` or ``"milstein"`` for Stratonovich SDEs (and
    ``"adjoint_reversible_heun"``, the default for ``method="reversible_heun"``: its exact gradient), ``"milstein"`` (default for
    diagonal noise) or ``"euler"`` (default otherwise) for Itô SDEs; Milstein needs diagonal noise. The backward steps are ``dt``
    long, from each output time down to the one before. ``bm``: any Brownian object that answers queries
    in any order (torchsde's ``BrownianInterval`` / ``BrownianTree``, flowsde's ``VirtualBrownianTree``);
    with ``bm=None`` an exact motion from ``seed`` that knows every time both passes ask (see
    :func:`_default_motion`; not ``sdeint``'s own ``bm=None`` stream). ``logqp=True`` returns ``(ys, log_ratio)`` as torchsde (the
    penalty differentiated with the rest). ``adjoint_adaptive``, ``extra`` / ``extra_solver_state`` and double
    backward are not supported (refused).
    """
    from .sde import SDE_METHODS, _split_logqp, _torchsde_arguments, _with_logqp, sdeint, times_on_motion

    params = differentiated_params(sde, adjoint_params, "sdeint_adjoint: sde")
    if adjoint_adaptive:
        raise NotImplementedError("sdeint_adjoint: adjoint_adaptive=True is not supported (the backward steps are "
                                  "dt long)")
    for attr in ("noise_type", "sde_type"):
        if not hasattr(sde, attr):
            raise ValueError(f"sde has no attribute {attr}: set it (noise_type: diagonal, scalar, additive or "
                             f"general; sde_type: ito or stratonovich)")
    if extra or extra_solver_state is not None:
        raise NotImplementedError("sdeint_adjoint: extra / extra_solver_state (torchsde's solver state, to resume "
                                  "a solve) are not supported; flowsde.sdeint takes them")
    inner = _torchsde_arguments(sde, names)
    solved, solved_names = sde, names
    if logqp:  # the KL penalty as a last state column, differentiated with the rest (as torchsde)
        inner, y0 = _with_logqp(sde, y0, names)
        solved, solved_names = inner, None
    kind = inner.sde_type
    known = ADJOINT_METHODS.get(kind)
    if known is None:
        raise ValueError(f"sde.sde_type must be 'ito' or 'stratonovich', got {kind!r}")
    if adjoint_method is None:  # torchsde's defaults: Milstein for Itô diagonal noise, midpoint for Stratonovich,
        # the exact backward run of a reversible Heun solve
        adjoint_method = "milstein" if kind == "ito" and inner.noise_type == "diagonal" else \
            REVERSIBLE if method == "reversible_heun" else known[0]
    adjoint_method = _ALIASES.get(adjoint_method, adjoint_method)
    if adjoint_method == REVERSIBLE and method != "reversible_heun":
        raise ValueError(f"adjoint_method {REVERSIBLE!r} runs a method='reversible_heun' solve backwards; the "
                         f"forward method is {method!r}")
    if adjoint_method not in known:
        raise ValueError(f"adjoint_method {adjoint_method!r} is not a backward method for {kind} SDEs; known: {known}")
    if adjoint_method == REVERSIBLE and adaptive:
        raise ValueError("method 'reversible_heun' runs fixed steps only (adaptive=False)")
    if adjoint_method == "milstein" and inner.noise_type != "diagonal":
        raise ValueError(f"adjoint_method 'milstein' needs diagonal noise (the adjoint of {inner.noise_type} noise is "
                         f"not diagonal, as in torchsde); use {known[0]!r}")
    adjoint_options = _checks.check_options(adjoint_options, (), "sdeint_adjoint's adjoint_options")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
    if isinstance(ts, torch.Tensor) and ts.requires_grad and torch.is_grad_enabled():
        raise ValueError("sdeint_adjoint: gradients with respect to ts are not supported; pass ts.detach()")
    if not isinstance(ts, torch.Tensor):
        ts = torch.tensor(ts, dtype=y0.dtype)
    step = _checks.check_step("dt", dt)
    t_host = _checks.host_times("ts", _checks.check_times("ts", ts, y0, at_least_two=False), increasing_only=True)
    if bm is None:
        bm = _default_motion(inner, y0, ts, t_host, step, seed, adaptive, adjoint_method != REVERSIBLE)
    t_host = times_on_motion(bm, ts, t_host, y0)  # (the times the forward solve steps between, snapped as there)
    if method is not None and method not in SDE_METHODS:
        raise ValueError(f"unknown SDE method {method!r}; known methods: {sorted(SDE_METHODS)}")
    opts = dict(options or {})
    stats = {}

    reversible = adjoint_method == REVERSIBLE
    carried = []  # (the reversible Heun solve's (f, g, z) at ts[-1], where its backward run starts)

    def forward(y):
        out = sdeint(solved, y, ts, bm=bm, method=method, dt=dt, adaptive=adaptive, rtol=rtol, atol=atol,
                     dt_min=dt_min, options=opts, names=solved_names, extra=reversible, seed=seed)
        out = out if isinstance(out, tuple) else (out,)
        if reversible:
            carried[:] = [out[1]]
        if opts.get("return_stats", False):
            stats.update(out[-1])
        return out[0]

    def backward(ys, grads):
        if reversible:
            return _reversible_backward(inner, ys, grads, params, t_host, ts.dtype, step, bm, carried[0])
        return _backward(inner, ys, grads, params, t_host, ts.dtype, step, bm, adjoint_method)

    ys = _SDEAdjoint.apply(forward, backward, y0, *params)
    result = _split_logqp(ys) if logqp else (ys,)
    if opts.get("return_stats", False):
        return result + (stats,)
    return result if logqp else ys


def _default_motion(sde, y0, ts, t_host, step, seed, adaptive, backward_grids=True):
    """flowsde's Brownian motion for ``bm=None`` (torchsde's default is a ``BrownianInterval``), exact at every
    time either pass asks: for fixed steps a :class:`~flowsde.brownian.GridBrownian` on the union of the
    forward grid and every backward interval's grid (with space-time areas, for ``srk``); for adaptive steps
    a :class:`~flowsde.brownian.VirtualBrownianTree` on ``[ts[0], ts[-1]]`` at its default resolution (leaves
    ``span 2^-20``, as adaptive ``sdeint``'s own). Shaped as the noise (``m`` channels read off one diffusion
    evaluation for additive / general noise)."""
    nt = sde.noise_type
    if nt == "diagonal":
        shape = tuple(y0.shape)
    elif nt == "scalar":
        shape = (y0.shape[0], 1)
    else:
        with torch.no_grad():
            g = sde.g(ts[0].to(y0.dtype).to(y0.device), y0)
        if not isinstance(g, torch.Tensor) or g.dim() != 3:
            raise ValueError(f"sde.g must return (batch, d, m) for {nt} noise, got "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
        shape = (y0.shape[0], g.shape[-1])
    t0, t1 = float(t_host[0]), float(t_host[-1])
    if not t1 > t0:  # (one time, nothing to integrate: any motion will do)
        return GridBrownian(grid=[t0, t0 + 1.0], shape=shape, seed=seed, dtype=y0.dtype, device=y0.device)
    if adaptive:
        return VirtualBrownianTree(t0, t1, shape=shape, seed=seed, dtype=y0.dtype, device=y0.device)
    grids = [fixed.uniform_grid(t0, t1, step, ts.dtype)]
    if backward_grids:  # (a reversible Heun solve runs backwards on its own grid)
        grids += [fixed.uniform_grid(float(t_host[i]), float(t_host[i - 1]), step, ts.dtype)
                  for i in range(1, len(t_host))]
    grid = np.unique(np.concatenate(grids))
    # a forward point and a backward one that differ by rounding (0.5 - 0.05 k against 0.05 (10 - k)) are one
    # time: the motion's own lookup tolerance (1e-9 of its smallest step) then answers both
    grid = grid[np.concatenate([[True], np.diff(grid) > 1e-9 * step])]
    grid[-1] = t1
    return GridBrownian(grid=grid, shape=shape, seed=seed, dtype=y0.dtype, device=y0.device)


class _SDEAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward, backward, y0, *params):
        with torch.no_grad():
            ys = forward(y0.detach())
        ctx.backward = backward
        ctx.save_for_backward(ys)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        if torch.is_grad_enabled():  # (create_graph=True: a graph of the gradient was asked for)
            raise RuntimeError("sdeint_adjoint does not support double backward (create_graph=True): the backward "
                               "solve is not differentiated; backpropagate through flowsde.sdeint instead")
        (ys,) = ctx.saved_tensors
        with torch.no_grad():
            adj_y, adj_p = ctx.backward(ys, grad_ys)
        return (None, None, adj_y, *adj_p)


def _vjp(outputs, inputs, grad_outputs, retain=False):
    """``sum_i grad_outputs_i^T d outputs_i / d inputs`` (zeros where an output does not depend on an input)."""
    live = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not live:
        return [torch.zeros_like(x) for x in inputs]
    got = torch.autograd.grad([o for o, _ in live], inputs, [g for _, g in live], allow_unused=True,
                              retain_graph=retain)
    return [torch.zeros_like(x) if v is None else v for x, v in zip(inputs, got)]


def _columns(g, noise_type):
    """The noise columns ``g_j`` of a scalar / general (or additive) diffusion ``(batch, d, m)``."""
    return [g.squeeze(-1)] if noise_type == "scalar" else list(g.unbind(-1))


def _jvp_columns(g, y, noise_type):
    """``sum_j (dg_j/dy) g_j`` over the noise columns ``g_j`` of a scalar / general diffusion (each a
    Jacobian-vector product by double backward, kept differentiable)."""
    cols = _columns(g, noise_type)
    total = torch.zeros_like(y)
    for c in cols:
        if not c.requires_grad:
            continue
        w = torch.zeros_like(c, requires_grad=True)
        (u,) = torch.autograd.grad(c, y, w, create_graph=True, allow_unused=True)
        if u is None:
            continue
        (jv,) = torch.autograd.grad(u, w, c, create_graph=True, allow_unused=True)
        if jv is not None:
            total = total + jv
    return total


class _Augmented:
    """The augmented SDE of the backward pass, evaluated at ``(t, y, a)`` with a Brownian increment ``v``:
    ``(dy, da, da_p)`` for weights ``(cf, cg)`` on drift and noise, ``dy = cf f + cg g v`` and ``(da, da_p) =
    -(a^T d dy/d(y, p))`` minus, for Itô SDEs, ``cf`` times the Itô term ``(a^T dg/dy) dg/d(y, p)``."""

    def __init__(self, sde, params):
        self.sde, self.params, self.nt = sde, list(params), sde.noise_type
        self.ito = sde.sde_type == "ito" and self.nt != "additive"

    def _evaluate(self, t, y):
        """``(y', f, g)`` at ``(t, y)``, ``y'`` a leaf that requires grad (called under ``enable_grad``)."""
        yv = y.detach().requires_grad_(True)
        f = self.sde.f(t, yv)
        g = self.sde.g(t, yv)
        _checks.check_output("sde.f", f, y, tuple(y.shape))
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"sde.g must return a tensor, got {type(g).__name__}")
        return yv, f, g

    def weighted(self, t, y, a, v, weights):
        """``[self(t, y, a, v, cf, cg) for cf, cg in weights]`` from one evaluation at the point (Stratonovich
        SDEs, which have no Itô terms): the vector-Jacobian products of the drift and of ``g v`` taken once
        each and combined with each pair of weights."""
        with torch.enable_grad():
            yv, f, g = self._evaluate(t, y)
            gv = noise_prod(g, v, self.nt)
            wrt = [yv] + self.params
            af = _vjp([f], wrt, [a], retain=True)
            ag = _vjp([gv], wrt, [a])
        f, gv = f.detach(), gv.detach()
        return [(cf * f + cg * gv, [-(cf * x + cg * z) for x, z in zip(af, ag)]) for cf, cg in weights]

    def __call__(self, t, y, a, v, cf, cg, milstein=False):
        with torch.enable_grad():
            yv, f, g = self._evaluate(t, y)
            if self.ito:  # the reverse-time Itô drift (torchsde's "double Stratonovich correction")
                if self.nt == "diagonal":  # (g_i depends on y_i alone: the vector-Jacobian product is it)
                    corr = None
                    if g.requires_grad:
                        (corr,) = torch.autograd.grad(g, yv, g, create_graph=True, allow_unused=True)
                    corr = torch.zeros_like(y) if corr is None else corr
                else:
                    corr = _jvp_columns(g, yv, self.nt)
                f = f - corr
            gv = noise_prod(g, v, self.nt)
            dy = cf * f + cg * gv
            wrt = [yv] + self.params
            adj = _vjp([dy], wrt, [a], retain=True)
            if self.ito and g.requires_grad:  # the adjoint SDE's Itô form: (a^T dg/dy) dg/d(y, p), with a^T dg/dy held constant
                if self.nt == "diagonal":
                    (adg,) = torch.autograd.grad(g, yv, a, retain_graph=True, allow_unused=True)
                    extra = _vjp([g], wrt, [adg if adg is not None else torch.zeros_like(y)], retain=True)
                else:
                    extra = [torch.zeros_like(x) for x in wrt]
                    for c in _columns(g, self.nt):
                        (adg,) = torch.autograd.grad(c, yv, a, retain_graph=True, allow_unused=True)
                        if adg is None:
                            continue
                        extra = [e + x for e, x in zip(extra, _vjp([c], wrt, [adg], retain=True))]
                adj = [u + cf * e for u, e in zip(adj, extra)]
            adj = [-u for u in adj]
            if milstein and g.requires_grad:  # Milstein's term of the augmented SDE (diagonal noise)
                dy, adj = self._milstein(g, yv, a, v, cf, wrt, dy, adj)
        return dy.detach(), adj

    def _milstein(self, g, yv, a, v, h, wrt, dy, adj):
        """The augmented SDE's ``g dg/dy (dW^2 - dt) / 2`` (Itô; ``dW^2 / 2`` Stratonovich) for diagonal noise, as
        torchsde's adjoint computes it: the state's part ``g g' v2`` and the adjoints' part ``(a v2 dg_i/dy_i)^T
        dg/d(y, p) - d/d(y, p) [(a v2 g)^T dg/dy]``, ``v2`` the Milstein weight."""
        v2 = 0.5 * (v * v - abs(h)) if self.sde.sde_type == "ito" else 0.5 * v * v
        zeros = [torch.zeros_like(x) for x in wrt]
        (vgdg,) = torch.autograd.grad(g, yv, v2 * g, retain_graph=True, allow_unused=True)
        (dgdy,) = torch.autograd.grad(g.sum(), yv, retain_graph=True, allow_unused=True)
        prod = _vjp([g], wrt, [a * v2 * dgdy], retain=True) if dgdy is not None else zeros
        (avg,) = torch.autograd.grad(g, yv, (a * v2 * g).detach(), create_graph=True, allow_unused=True)
        mixed = _vjp([avg.sum()], wrt, [torch.ones((), dtype=avg.dtype, device=avg.device)]) \
            if avg is not None else zeros
        if vgdg is not None:
            dy = dy + vgdg
        return dy, [u + p - m for u, p, m in zip(adj, prod, mixed)]


def _backward(sde, ys, grads, params, t_host, t_dtype, step, bm, method):
    """The adjoint sweep over the output intervals, last to first: ``(dL/dy0, dL/dparams)``."""
    aug = _Augmented(sde, params)
    y, a = ys[-1], grads[-1].clone()
    ap = [torch.zeros_like(p) for p in params]
    from .sde_methods import SDE_METHODS
    c = SDE_METHODS[method].stage_c  # (the backward steps are the forward methods' on the augmented SDE)
    for i in range(len(t_host) - 1, 0, -1):
        grid = fixed.uniform_grid(float(t_host[i]), float(t_host[i - 1]), step, t_dtype)
        times = fixed.StageTimes(grid, c, t_dtype, y.device)
        h = np.diff(grid).tolist()
        for k in range(len(grid) - 1):
            ta, tb = float(grid[k]), float(grid[k + 1])
            v = -bm(tb, ta)  # W(tb) - W(ta), tb < ta: the increment as the backward step meets it
            y, a, ap = _step(aug, method, times[k], h[k], y, a, ap, v)
        y = ys[i - 1]
        a = a + grads[i - 1]
    return a, ap


def _reversible_backward(sde, ys, grads, params, t_host, t_dtype, step, bm, state):
    """The gradient of a ``reversible_heun`` solve, exact up to rounding (torchsde's ``adjoint_reversible_heun``):
    its steps run backwards on the forward grid, from ``(y, f, g, z)`` at ``ts[-1]``, each reconstructing the
    step's start exactly (``z0 = 2 y1 - z1 - f1 dt - g1 dW``, ``(f0, g0) = (f, g)(t0, z0)``, ``y0 = y1 - (f0 +
    f1) dt / 2 - (g0 + g1) dW / 2``) and applying the transpose of the step's linear combinations to the
    adjoints of ``(y, z, f, g)``; the adjoint of ``(f, g)`` at a grid point is pulled back through the one
    evaluation there (a vector-Jacobian product, its graph kept for one step): one evaluation per step,
    where torchsde's backward step makes two. Outputs inside a step (the linear interpolation) get their
    gradients split between the step's ends, so the gradient is exact for any ``ts`` (torchsde's backward
    steps from each output time instead, exact only when ``ts`` are whole numbers of steps apart)."""
    from .sde import StepContext
    grid = fixed.uniform_grid(float(t_host[0]), float(t_host[-1]), step, t_dtype)
    at = fixed.output_weights(grid, t_host)
    _, g1, z1 = state
    y1 = ys[-1]
    nt = sde.noise_type
    ctx = StepContext(sde, y1, grid, t_dtype, bm, None, False, (0.0, 1.0))
    if ctx.g_shape is None:  # (additive / general noise: the channels the forward diffusion had)
        ctx.m, ctx.g_shape = g1.shape[-1], tuple(g1.shape)

    def incoming(a, j):  # the outputs' gradients that reach grid point j
        for i, w in at[j]:
            a = a + grads[i] if w == 1.0 else a + w * grads[i]
        return a

    def evaluate(t, z):  # (f, g) at (t, z), with the graph for the next vector-Jacobian product
        with torch.enable_grad():
            zv = z.detach().requires_grad_(True)
            return zv, ctx.f(t, zv), ctx.g(t, zv)

    def outer(a, dw):  # the adjoint of g -> g dW with respect to g
        return a * dw if nt == "diagonal" else a.unsqueeze(-1) * dw.unsqueeze(-2)

    n = len(grid) - 1
    a_y = incoming(torch.zeros_like(y1), n)
    a_z, a_f, a_g = torch.zeros_like(y1), torch.zeros_like(y1), torch.zeros_like(g1)
    a_p = [torch.zeros_like(p) for p in params]
    zv, fv, gv = evaluate(ctx.times[n - 1][1], z1)
    for k in range(n - 1, -1, -1):
        t0, h = ctx.times[k][0], ctx.h[k]
        dw = ctx.dw(k, gv)
        a_f = a_f + (0.5 * h) * a_y  # (f1, g1)'s adjoints, now whole: pulled back to z1 and the parameters
        a_g = a_g + outer(a_y, 0.5 * dw)
        vz, *vp = _vjp([fv, gv], [zv] + list(params), [a_f, a_g])
        a_z = a_z + vz
        a_p = [p + v for p, v in zip(a_p, vp)]
        f1, g1, z1 = fv.detach(), gv.detach(), zv.detach()
        z0 = 2.0 * y1 - z1 - h * f1 - noise_prod(g1, dw, nt)
        zv, fv, gv = evaluate(t0, z0)
        y0 = y1 - (0.5 * h) * (fv.detach() + f1) - noise_prod(gv.detach() + g1, 0.5 * dw, nt)
        a_y, a_z, a_f, a_g = (a_y + 2.0 * a_z, -a_z, (0.5 * h) * a_y + h * a_z,
                              outer(a_y, 0.5 * dw) + outer(a_z, dw))
        a_y = incoming(a_y, k)
        on_grid = [i for i, _ in at[k] if t_host[i] == grid[k]]
        y1 = ys[on_grid[0]] if on_grid else y0  # (an output at a grid point: the forward's value, as torchsde)
    vz, *vp = _vjp([fv, gv], [zv] + list(params), [a_f, a_g])  # (f, g) at ts[0], evaluated at z0 = y0
    return a_y + a_z + vz, [p + v for p, v in zip(a_p, vp)]


def _step(aug, method, t, h, y, a, ap, v):
    """One backward step of ``method`` (torchsde's midpoint / Heun / Euler–Maruyama on the augmented SDE)."""
    if method in ("euler", "milstein"):
        dy, (da, *dp) = aug(t[0], y, a, v, h, 1.0, milstein=method == "milstein")
        return y + dy, a + da, [p + d for p, d in zip(ap, dp)]
    if method == "euler_heun":  # the diffusion averaged over the start and the predictor y + g dW (both
        # combinations at the start from its one evaluation)
        (dyg, (dag, *_)), (dyf, (daf, *dpf)) = aug.weighted(t[0], y, a, v, [(0.0, 1.0), (h, 0.5)])
        dy1, (da1, *dp1) = aug(t[1], y + dyg, a + dag, v, 0.0, 0.5)
        return y + dyf + dy1, a + daf + da1, [p + d + d1 for p, d, d1 in zip(ap, dpf, dp1)]
    if method == "midpoint":
        dy, (da, *_) = aug(t[0], y, a, v, 0.5 * h, 0.5)
        dy1, (da1, *dp1) = aug(t[1], y + dy, a + da, v, h, 1.0)
        return y + dy1, a + da1, [p + d for p, d in zip(ap, dp1)]
    dy, (da, *dp) = aug(t[0], y, a, v, h, 1.0)  # heun: predictor, then the trapezoid of both stages
    dy1, (da1, *dp1) = aug(t[1], y + dy, a + da, v, h, 1.0)
    return (y + 0.5 * (dy + dy1), a + 0.5 * (da + da1), [p + 0.5 * (d + d1) for p, d, d1 in zip(ap, dp, dp1)])


__all__ = ["sdeint_adjoint", "ADJOINT_METHODS"]
