"""Fixed-step SDE methods as data: which SDE and noise types each supports, its orders, and its step.

Every step is written against a :class:`StepContext` (the checked drift and diffusion, the time grid and
the Brownian increments) and combines its terms with the kernel ops, so one step is one fused update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from ..kernels.reference import axpy_, noise_prod

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
SDE_TYPES = ("ito", "stratonovich")


@dataclass(frozen=True)
class SDEMethod:
    """A fixed-step SDE method.

    ``strong_order`` maps a noise type to the strong order of convergence (``None`` for "as general");
    ``weak_order`` is the weak order; ``step(ctx, k, y)`` advances ``y`` over grid step ``k``;
    ``stage_c`` are the fractions of a step at which the step evaluates ``f`` and ``g``; ``solver_state``
    names the state a method carries from step to step (``ctx.extra``, torchsde's ``extra_solver_state``;
    empty for the one-step methods).
    """

    name: str
    sde_types: Tuple[str, ...]
    noise_types: Tuple[str, ...]
    strong_orders: Dict[str, float]
    weak_order: float
    step: Callable
    stage_c: Tuple[float, ...] = (0.0,)
    solver_state: Tuple[str, ...] = ()

    def strong_order(self, noise_type: str) -> float:
        """The strong order of convergence for SDEs of the given noise type."""
        return self.strong_orders.get(noise_type, self.strong_orders["default"])


def _euler_step(ctx, k, y):
    t0, dt = ctx.times[k][0], ctx.h[k]
    f = ctx.f(t0, y)
    g = ctx.g(t0, y)
    z, sc = ctx.noise(k, g)
    return ctx.ops.sde_update(y, [(dt, f)], [(sc, g)], z, ctx.noise_type, out=ctx.out(y, f, g, z))


def _heun_step(ctx, k, y):
    (t0, t1), dt = ctx.times[k], ctx.h[k]
    f = ctx.f(t0, y)
    g = ctx.g(t0, y)
    z, sc = ctx.noise(k, g)
    y_pred = ctx.ops.sde_update(y, [(dt, f)], [(sc, g)], z, ctx.noise_type, out=ctx.out(y, f, g, z))
    f1 = ctx.f(t1, y_pred)
    g1 = ctx.g(t1, y_pred)
    return ctx.ops.sde_update(y, [(0.5 * dt, f), (0.5 * dt, f1)], [(0.5 * sc, g), (0.5 * sc, g1)], z,
                              ctx.noise_type, out=ctx.out(y, f, f1, g, g1, z))


def _midpoint_step(ctx, k, y):
    """torchsde's ``midpoint`` (Stratonovich): the drift and diffusion at the half-step state, one increment."""
    (t0, tm), dt = ctx.times[k], ctx.h[k]
    f = ctx.f(t0, y)
    g = ctx.g(t0, y)
    z, sc = ctx.noise(k, g)
    y_mid = ctx.ops.sde_update(y, [(0.5 * dt, f)], [(0.5 * sc, g)], z, ctx.noise_type, out=ctx.out(y, f, g, z))
    f1 = ctx.f(tm, y_mid)
    g1 = ctx.g(tm, y_mid)
    return ctx.ops.sde_update(y, [(dt, f1)], [(sc, g1)], z, ctx.noise_type, out=ctx.out(y, f1, g1, z))


def _euler_heun_step(ctx, k, y):
    """torchsde's ``euler_heun`` (Stratonovich): the drift at the start, the diffusion averaged over the start
    and a predictor ``y + g dW`` (two diffusion evaluations, one drift)."""
    (t0, t1), dt = ctx.times[k], ctx.h[k]
    f = ctx.f(t0, y)
    g = ctx.g(t0, y)
    z, sc = ctx.noise(k, g)
    y_pred = ctx.ops.sde_update(y, [], [(sc, g)], z, ctx.noise_type, out=ctx.out(y, f, g, z))
    g1 = ctx.g(t1, y_pred)
    return ctx.ops.sde_update(y, [(dt, f)], [(0.5 * sc, g), (0.5 * sc, g1)], z, ctx.noise_type,
                              out=ctx.out(y, f, g, g1, z))


def _reversible_heun_step(ctx, k, y):
    """torchsde's ``reversible_heun`` (Stratonovich; Kidger, Foster, Li & Lyons 2021, "Efficient and accurate
    gradients for neural SDEs"): a Heun step whose drift and diffusion are evaluated at a second state ``z``,
    carried with them from step to step, so that each step costs one evaluation and can be run backwards
    exactly (``ctx.extra = (f, g, z)``, starting from ``(f(t0, y0), g(t0, y0), y0)``)::

        z1 = 2 y0 - z0 + f0 dt + g0 dW,   (f1, g1) = (f, g)(t1, z1),   y1 = y0 + (f0 + f1) dt / 2 + (g0 + g1) dW / 2
    """
    (t0, t1), dt = ctx.times[k], ctx.h[k]
    if ctx.extra is None:
        ctx.extra = (ctx.f(t0, y), ctx.g(t0, y), y)
    f0, g0, z0 = ctx.extra
    noise, sc = ctx.noise(k, g0)
    z1 = ctx.ops.sde_update(y, [(1.0, y), (-1.0, z0), (dt, f0)], [(sc, g0)], noise, ctx.noise_type)
    f1 = ctx.f(t1, z1)
    g1 = ctx.g(t1, z1)
    ctx.extra = (f1, g1, z1)
    return ctx.ops.sde_update(y, [(0.5 * dt, f0), (0.5 * dt, f1)], [(0.5 * sc, g0), (0.5 * sc, g1)], noise,
                              ctx.noise_type)


# Rößler's stochastic Runge–Kutta methods (A. Rößler, "Runge–Kutta methods for the strong approximation of
# solutions of stochastic differential equations", SIAM J. Numer. Anal. 48(3), 2010), strong order 1.5: SRI2 for
# diagonal and scalar noise, SRA1 for additive noise, with the coefficients torchsde tabulates (srid2, sra1)
_SRI = dict(c0=(0.0, 1.0, 0.5, 0.0), c1=(0.0, 0.25, 1.0, 0.25),
            a0=((), (1.0,), (0.25, 0.25), (0.0, 0.0, 0.0)), a1=((), (0.25,), (1.0, 0.0), (0.0, 0.0, 0.25)),
            b0=((), (0.0,), (1.0, 0.5), (0.0, 0.0, 0.0)), b1=((), (-0.5,), (1.0, 0.0), (2.0, -1.0, 0.5)),
            alpha=(1 / 6, 1 / 6, 2 / 3, 0.0), beta1=(-1.0, 4 / 3, 2 / 3, 0.0), beta2=(1.0, -4 / 3, 1 / 3, 0.0),
            beta3=(2.0, -4 / 3, -2 / 3, 0.0), beta4=(-2.0, 5 / 3, -2 / 3, 1.0))
_SRA = dict(c0=(0.0, 0.75), c1=(1.0, 0.0), a0=((), (0.75,)), b0=((), (1.5,)), alpha=(1 / 3, 2 / 3),
            beta1=(1.0, 0.0), beta2=(-1.0, 1.0))
_SRK_C = (0.0, 0.25, 0.5, 0.75, 1.0)  # every stage time of both tableaux, as fractions of the step


def _srk_step(ctx, k, y):
    """One step of Rößler's SRI2 (diagonal / scalar noise) or SRA1 (additive noise), from the step's increment
    ``I`` and space-time area ``U`` (``I_k0``): each stage's drift and diffusion evaluated once."""
    t = dict(zip(_SRK_C, ctx.times[k]))
    h = ctx.h[k]
    lin = ctx.ops.lincomb
    if ctx.noise_type == "additive":  # the diffusion depends on t alone: evaluated at y
        T = _SRA
        gs = [ctx.g(t[c], y) for c in T["c1"]]
        dw, u = ctx.space_time(k, gs[0])
        prod = lambda g, w: noise_prod(g, w, "additive")  # noqa: E731
        f0 = ctx.f(t[T["c0"][0]], y)
        h1 = lin(y, [(T["a0"][1][0] * h, f0)]) + prod(gs[0], u * (T["b0"][1][0] / h))
        f1 = ctx.f(t[T["c0"][1]], h1)
        noise = sum(prod(g, dw * b1 + u * (b2 / h)) for g, b1, b2 in zip(gs, T["beta1"], T["beta2"]))
        return lin(y, [(T["alpha"][0] * h, f0), (T["alpha"][1] * h, f1)]) + noise
    T = _SRI
    scalar = ctx.noise_type == "scalar"
    col = (lambda g: g.squeeze(-1)) if scalar else (lambda g: g)  # noqa: E731
    g0 = ctx.g(t[T["c1"][0]], y)
    dw, u = ctx.space_time(k, g0)
    sq = h ** 0.5
    ikk, ikkk = (dw * dw - h) * 0.5, (dw * dw * dw - 3.0 * h * dw) / 6.0
    h0s, fs, gs = [y], [None] * 4, [col(g0)]

    def f_of(j):  # a stage's drift, evaluated once and only where a coefficient needs it
        if fs[j] is None:
            fs[j] = ctx.f(t[T["c0"][j]], h0s[j])
        return fs[j]
    for s in range(1, 4):
        drift0 = [(T["a0"][s][j] * h, f_of(j)) for j in range(s) if T["a0"][s][j]]
        drift1 = [(T["a1"][s][j] * h, f_of(j)) for j in range(s) if T["a1"][s][j]]
        noise0 = [(T["b0"][s][j] / h, gs[j] * u) for j in range(s) if T["b0"][s][j]]
        noise1 = [(T["b1"][s][j] * sq, gs[j]) for j in range(s) if T["b1"][s][j]]
        h0s.append(lin(y, drift0 + noise0))
        gs.append(col(ctx.g(t[T["c1"][s]], lin(y, drift1 + noise1))))
    out = lin(y, [(T["alpha"][s] * h, f_of(s)) for s in range(4) if T["alpha"][s]])
    for s in range(4):
        w = dw * T["beta1"][s] + ikk * (T["beta2"][s] / sq) + u * (T["beta3"][s] / h) + ikkk * (T["beta4"][s] / h)
        out = out + gs[s] * w
    return out


def _milstein_step(ctx, k, y):
    t0, dt = ctx.times[k][0], ctx.h[k]
    nt = ctx.noise_type
    f = ctx.f(t0, y)
    if nt == "additive":  # g does not depend on y: the correction vanishes and the step is Euler's
        g = ctx.g(t0, y)
        z, sc = ctx.noise(k, g)
        return ctx.ops.sde_update(y, [(dt, f)], [(sc, g)], z, nt)
    ito = ctx.sde_type == "ito"
    if ctx.grad_free:
        g = ctx.g(t0, y)
        dw = ctx.dw(k, g)
        v = dw * dw - _rows_like(dt, dw) if ito else dw * dw
        sq = dt ** 0.5
        gv = g if nt == "diagonal" else g.squeeze(-1)
        y_sup = ctx.ops.lincomb(y, [(dt if ito else 0.0, f), (sq, gv)])
        g_sup = ctx.g(t0, y_sup)
        out = ctx.ops.sde_update(y, [(dt, f)], [(1.0, g)], dw, nt)
        if isinstance(sq, torch.Tensor):  # a zero-length step (the adaptive loop after its end, before the host
            # check): no correction, not 0.5 / 0 = inf (its zero gradient times inf was NaN in y0's gradient)
            half = torch.where(sq > 0, 0.5 / torch.where(sq > 0, sq, torch.ones_like(sq)), torch.zeros_like(sq))
        else:
            half = 0.5 / sq
        return axpy_(out, ctx.ops.noise_prod(g_sup - g, v, nt), half)
    # (the adaptive driver's context memoises it: the full and the first half step share the start point)
    g, gdg_fn = ctx.g_and_derivative(t0, y) if hasattr(ctx, "g_and_derivative") else \
        _diffusion_with_derivative(ctx, t0, y)
    dw = ctx.dw(k, g)
    v = dw * dw - _rows_like(dt, dw) if ito else dw * dw
    return ctx.ops.sde_update(y, [(dt, f), (0.5, gdg_fn(v))], [(1.0, g)], dw, nt)


def _rows_like(dt, x: torch.Tensor):
    """A step size laid out to broadcast against ``x``: a float or 0-dim tensor as it is, a per-row tensor
    ``(rows, 1, ...)`` reshaped to ``(rows, 1, ..)`` of ``x``'s rank (Brownian increments may have another
    rank than the state)."""
    if isinstance(dt, torch.Tensor) and dt.dim() > 0:
        return dt.reshape(dt.shape[0], *([1] * (x.dim() - 1)))
    return dt


def _diffusion_with_derivative(ctx, t0, y):
    """``g`` at ``(t0, y)`` and a function ``v -> (dg/dy . g) * v`` by autograd.

    Diagonal noise (``g_i`` depends on ``y_i`` only) uses one vector-Jacobian product; scalar noise needs
    the Jacobian-vector product ``(dg/dy) g`` (the Milstein term's direction), taken by double backward.
    """
    grad_mode = torch.is_grad_enabled()  # the caller's: under no_grad the step builds no graph of its own
    with torch.enable_grad():
        y_ = y if y.requires_grad else y.detach().requires_grad_(True)
        g = ctx.g(t0, y_)
        if not g.requires_grad:  # g does not depend on y (nor on anything differentiable): no correction
            return g, lambda v: torch.zeros_like(y)
        # the step is differentiated when the state is, or when g depends on a tensor that requires grad
        # (the diffusion's parameters; found once per solve by walking g's graph)
        create = grad_mode and (y.requires_grad or _depends_on_other_leaves(ctx, g, y_))
        if ctx.noise_type == "diagonal":
            def gdg(v):
                with torch.enable_grad():
                    (d,) = torch.autograd.grad(g, y_, grad_outputs=g * v, create_graph=create,
                                               retain_graph=True, allow_unused=True)  # (callable again)
                return torch.zeros_like(y) if d is None else d
        else:  # scalar: g has shape (*y.shape, 1)
            gs = g.squeeze(-1)
            w = torch.zeros_like(gs, requires_grad=True)
            (u,) = torch.autograd.grad(gs, y_, grad_outputs=w, create_graph=True, allow_unused=True)

            def gdg(v):
                if u is None:
                    return torch.zeros_like(y)
                with torch.enable_grad():
                    (jv,) = torch.autograd.grad(u, w, grad_outputs=gs if create else gs.detach(),
                                                create_graph=create, retain_graph=True, allow_unused=True)
                jv = torch.zeros_like(y) if jv is None else jv
                return jv * v.reshape(v.shape[0], *([1] * (jv.dim() - 1)))
    if not create:
        return g.detach(), lambda v: gdg(v).detach()
    return g, gdg


def _depends_on_other_leaves(ctx, g: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``g``'s autograd graph reaches a tensor that requires grad other than ``leaf`` (the state's
    stand-in). Walked once per solve (``ctx`` caches it): the diffusion's structure does not change
    between steps."""
    cached = getattr(ctx, "_g_params", None)
    if cached is not None:
        return cached
    seen, stack, found = set(), [g.grad_fn], False
    while stack and not found:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf that requires grad
        found = var is not None and var is not leaf
        stack.extend(nxt for nxt, _ in fn.next_functions)
    ctx._g_params = found
    return found


EULER = SDEMethod("euler", ("ito",), NOISE_TYPES, {"additive": 1.0, "default": 0.5}, 1.0, _euler_step)
HEUN = SDEMethod("heun", ("stratonovich",), NOISE_TYPES, {"general": 0.5, "default": 1.0}, 1.0, _heun_step,
                 stage_c=(0.0, 1.0))
MILSTEIN = SDEMethod("milstein", SDE_TYPES, ("diagonal", "scalar", "additive"), {"default": 1.0}, 1.0,
                     _milstein_step)
MIDPOINT = SDEMethod("midpoint", ("stratonovich",), NOISE_TYPES, {"general": 0.5, "default": 1.0}, 1.0,
                     _midpoint_step, stage_c=(0.0, 0.5))
SRK = SDEMethod("srk", ("ito",), ("diagonal", "scalar", "additive"), {"default": 1.5}, 1.5, _srk_step,
                stage_c=_SRK_C)
EULER_HEUN = SDEMethod("euler_heun", ("stratonovich",), NOISE_TYPES, {"general": 0.5, "default": 1.0}, 1.0,
                       _euler_heun_step, stage_c=(0.0, 1.0))
# strong order 1 for additive noise, 1/2 in general (torchsde's, from Kidger et al. 2021)
REVERSIBLE_HEUN = SDEMethod("reversible_heun", ("stratonovich",), NOISE_TYPES, {"additive": 1.0, "default": 0.5},
                            1.0, _reversible_heun_step, stage_c=(0.0, 1.0), solver_state=("f", "g", "z"))

#: SDE methods by name (aliases included).
SDE_METHODS: Dict[str, SDEMethod] = {
    "euler": EULER,
    "euler_maruyama": EULER,
    "heun": HEUN,
    "midpoint": MIDPOINT,
    "euler_heun": EULER_HEUN,
    "milstein": MILSTEIN,
    "srk": SRK,
    "reversible_heun": REVERSIBLE_HEUN,
}
DEFAULT_SDE_METHOD = {"ito": "euler", "stratonovich": "midpoint"}  # (torchsde: srk for Itô — here method="srk",
# which needs the space-time area of every step — and midpoint)
