"""The adaptive driver for ``odeint``: embedded Runge–Kutta pairs with error control, shared step size.

Every decision is taken on the device: a step is always computed, then accepted or rejected by masks
(``torch.where``), the next step size comes from the controller formula on device scalars, and the output
times inside an accepted step are filled by dense interpolation under masks. The host learns whether the
integration has finished only every ``check_every`` steps (one read; default every step on CPU tensors,
where a read costs nothing, and every 8 on CUDA), so the loop does not synchronise per step.

The controller (:class:`Controller`) and the dense output follow torchdiffeq's by default (an I-controller:
safety 0.9, ifactor 10, dfactor 0.2, exponent 1/order; a PI controller with ``pcoeff`` / ``icoeff``;
Hairer's initial step; a quartic interpolant through the step's ends and
its midpoint), so with the same tolerances the accepted steps are torchdiffeq's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from .. import _checks


@dataclass(frozen=True)
class EmbeddedTableau:
    """An embedded explicit RK pair. ``c[i]``/``a[i]``: time fraction and weights of stage ``i + 1`` (stage 0
    is the field at the start); ``b``: solution weights; ``e``: error weights (``b - b_hat``); ``mid``:
    weights of the midpoint value used by the dense output; ``order``: the order the controller uses."""

    name: str
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    e: Tuple[float, ...]
    mid: Tuple[float, ...]
    order: int

    def __post_init__(self):
        s = len(self.c) + 1
        if len(self.a) != s - 1 or any(len(r) != i + 1 for i, r in enumerate(self.a)):
            raise ValueError(f"tableau {self.name}: row i of a must have i + 1 entries")
        if not (len(self.b) == len(self.e) == len(self.mid) == s):
            raise ValueError(f"tableau {self.name}: b, e and mid need {s} entries")

    @property
    def fsal(self) -> bool:
        """The last stage is evaluated at the solution itself (first same as last)."""
        return self.b[-1] == 0.0 and tuple(self.b[:-1]) == tuple(self.a[-1])


DOPRI5 = EmbeddedTableau(
    "dopri5", (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
     (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
     -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1.0 / 60.0),
    (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
     187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2),
    order=5)
BOSH3 = EmbeddedTableau(
    "bosh3", (1 / 2, 3 / 4, 1.0), ((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    (2 / 9, 1 / 3, 4 / 9, 0.0), (2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    (0.0, 0.5, 0.0, 0.0), order=3)
# Heun (trapezoid) with an Euler error estimate; as in torchdiffeq's "adaptive_heun", the next step's first
# stage reuses the field at the Euler predictor.
HEUN_EULER = EmbeddedTableau("heun_euler", (1.0,), ((1.0,),), (0.5, 0.5), (0.5, -0.5), (0.5, 0.0), order=2)

@dataclass(frozen=True)
class Controller:
    """Step-size control from the error ratio ``r`` (accept when ``r <= 1``), shared by the adaptive drivers.

    After an accepted step the factor is the PI controller's ``safety r^(-(pcoeff + icoeff)/k)
    r_prev^(pcoeff/k)``, with ``r_prev`` the ratio of the previous accepted step (at least 1e-4; 1 before
    the first); after a rejection it is the I controller's ``safety r^(-1/k)``. ``k`` is the exponent's
    order: the pair's order for ODEs (as torchdiffeq), ``q + 1/2`` for an SDE method of strong order
    ``q``. The default ``pcoeff = 0``, ``icoeff = 1`` is torchdiffeq's I-controller, number for number;
    ``pcoeff = 0.4, icoeff = 0.3`` is Gustafsson's PI controller (exponents 0.7/k and 0.4/k; Hairer &
    Wanner, Solving ODEs II, IV.2), which damps the step-size oscillation of a stability-limited step.
    The factor is then clipped to ``[dfactor, ifactor]``; see :meth:`factor` for the two conventions.
    """

    k: float
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    pcoeff: float = 0.0
    icoeff: float = 1.0

    @classmethod
    def from_options(cls, opts: dict, k: float) -> "Controller":
        c = cls(float(k), *(float(opts.get(n, d)) for n, d in (("safety", 0.9), ("ifactor", 10.0),
                                                                 ("dfactor", 0.2), ("pcoeff", 0.0),
                                                                 ("icoeff", 1.0))))
        if not (0 < c.safety <= 1) or not (c.ifactor >= 1) or not (0 < c.dfactor <= 1):
            raise ValueError(f"need 0 < safety <= 1, ifactor >= 1 and 0 < dfactor <= 1; got safety={c.safety}, "
                             f"ifactor={c.ifactor}, dfactor={c.dfactor}")
        if not (c.pcoeff >= 0 and c.icoeff > 0):
            raise ValueError(f"need pcoeff >= 0 and icoeff > 0, got pcoeff={c.pcoeff}, icoeff={c.icoeff}")
        return c

    def factor(self, r: torch.Tensor, r_prev, shrink_after_accept: bool = False) -> torch.Tensor:
        """The factor for the next step from float64 ratios ``r`` (and ``r_prev``, same shape, or ``None``
        for the I controller). torchdiffeq's convention (default): an accepted step never shrinks the next
        (``factor >= 1`` when ``r < 1``), a rejected one shrinks it by at most ``dfactor``. With
        ``shrink_after_accept`` (the SDE driver's): ``clip(factor, dfactor, ifactor)``, at most 1 after a
        rejection, ``dfactor`` for a non-finite ratio. ``r == 0``: ``ifactor``."""
        rc = r.clamp_min(1e-300)
        fac = self.safety / rc ** (1.0 / self.k)
        if r_prev is not None and (self.pcoeff != 0.0 or self.icoeff != 1.0):
            pi = self.safety * rc ** (-(self.pcoeff + self.icoeff) / self.k) * r_prev ** (self.pcoeff / self.k)
            fac = torch.where(r <= 1, pi, fac)
        if shrink_after_accept:
            fac = fac.clamp(self.dfactor, self.ifactor)
            fac = torch.where(r > 1, fac.clamp(max=1.0), fac)
            fac = torch.where(torch.isfinite(r), fac, torch.full_like(fac, self.dfactor))
        else:
            fac = torch.maximum(fac, torch.where(r < 1, torch.ones_like(fac), torch.full_like(fac, self.dfactor)))
            fac = fac.clamp(max=self.ifactor)
        return torch.where(r == 0, torch.full_like(fac, self.ifactor), fac)

    @staticmethod
    def remember(r: torch.Tensor, r_prev: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
        """``r_prev`` for the next step: the ratio of this step where it was accepted (at least 1e-4)."""
        return torch.where(accept, r.clamp_min(1e-4), r_prev)


def loop_budget(opts: dict, dev_type: str):
    """``(max_steps, check_every, capturable)`` of an adaptive loop from its options: how many attempted
    steps at most, how often the host reads whether it has finished (default every step on CPU tensors,
    where a read is free, every 8 on CUDA), and whether it runs its whole budget with no read at all."""
    capturable = bool(opts.get("capturable", False))
    if capturable and "max_num_steps" not in opts:
        raise ValueError("capturable=True runs a fixed budget of steps: pass max_num_steps")
    max_steps = int(opts.get("max_num_steps", 2 ** 31 - 1))
    if max_steps < 1:
        raise ValueError(f"max_num_steps must be >= 1, got {max_steps}")
    check_every = max_steps + 1 if capturable else int(opts.get("check_every", 1 if dev_type == "cpu" else 8))
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    return max_steps, check_every, capturable


# Fehlberg's RK2(1) (E. Fehlberg, NASA TR R-315, 1969): the low-order solution is the last stage's point,
# whose field the next step starts from (torchdiffeq's "fehlberg2", step for step)
FEHLBERG2 = EmbeddedTableau("fehlberg2", (1 / 2, 1.0), ((1 / 2,), (1 / 256, 255 / 256)), (1 / 512, 255 / 256, 1 / 512),
                            (-1 / 512, 0.0, 1 / 512), (0.0, 0.5, 0.0), order=2)
# Prince & Dormand's RK8(7)13M (P. J. Prince and J. R. Dormand, "High order embedded Runge–Kutta formulae",
# J. Comput. Appl. Math. 7(1), 1981), with the 14th, first-same-as-last stage and the midpoint weights of the
# dense output that torchdiffeq's "dopri8" uses (the rational coefficients as tabulated there, for step-for-step
# parity; ``mid`` its continuous extension evaluated at half the step)
_D8_C = (1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20,
         1201146811 / 1299019798, 1.0, 1.0, 1.0)
_D8_A = (
    (1 / 18,),
    (1 / 48, 1 / 16),
    (1 / 32, 0.0, 3 / 32),
    (5 / 16, 0.0, -75 / 64, 75 / 64),
    (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
    (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000),
    (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777, 545815736 / 2771057229,
     -180193667 / 1043307555),
    (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301, 100302831 / 723423059,
     790204164 / 839813087, 800635310 / 3783071287),
    (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246, -309121744 / 1061227803, -12992083 / 490766935,
     6005943493 / 2108947869, 393006217 / 1396673457, 123872331 / 1001029789),
    (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823, -10304129995 / 1701304382,
     -48777925059 / 3047939560, 15336726248 / 1032824649, -45442868181 / 3398467696, 3065993473 / 597172653),
    (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517, -703635378 / 230739211,
     5731566787 / 1027545527, 5232866602 / 850066563, -4093664535 / 808688257, 3962137247 / 1805957418,
     65686358 / 487910083),
    (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805, 652783627 / 914296604,
     11173962825 / 925320556, -13158990841 / 6184727034, 3936647629 / 1978049680, -160528059 / 685178525,
     248638103 / 1413531060, 0.0),
)
_D8_B = (14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825, 181606767 / 758867731,
         561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087,
         -528747749 / 2220607170, 1 / 4)
_D8_B7 = (13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145, 1757004468 / 5645159321,
          656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535, 53011238 / 667516719, 2 / 45, 0.0)
DOPRI8 = EmbeddedTableau(
    "dopri8", _D8_C, _D8_A + (_D8_B,), _D8_B + (0.0,), tuple(b - b7 for b, b7 in zip(_D8_B, _D8_B7)) + (0.0,),
    (0.04103130360739393, 0.0, 0.0, 0.0, 0.0, 0.05100562801991382, 0.2388930677412202, 0.3096870143996103,
     -0.2172325471755352, 0.07833405679331928, -0.0018614369715579948, 0.007072844202678841, 0.00690847373200576,
     -0.013838404349047373), order=8)

ADAPTIVE_TABLEAUX = {"dopri5": DOPRI5, "dopri8": DOPRI8, "bosh3": BOSH3, "fehlberg2": FEHLBERG2,
                     "heun_euler": HEUN_EULER, "adaptive_heun": HEUN_EULER}
ADAPTIVE_OPTIONS = ("first_step", "max_num_steps", "min_step", "max_step", "safety", "ifactor", "dfactor", "clip_end",
                    "pcoeff", "icoeff",
                    "check_every", "return_stats", "backend", "per_sample", "step_t", "jump_t", "capturable", "norm")


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half types in float32 for error norms (``err / atol`` overflows float16 at the usual tolerances)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mixed_norm(sizes):
    """torchdiffeq's norm for a tuple state flattened into one tensor: the largest of the parts' RMS norms
    (a large quiet part does not dilute the error of a small one)."""
    sizes = list(sizes)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([_rms(p) for p in x.split(sizes) if p.numel()]).max()
    return norm


def integrate_adaptive(func, y0: torch.Tensor, t_out: np.ndarray, tab: EmbeddedTableau, rtol, atol, opts,
                       ops, field_check, f_start=None, dt_start=None, land=False, norm=_rms, event=None):
    """Integrate ``func`` from ``t_out[0]`` through every ``t_out`` (increasing) with the pair ``tab``.

    ``field_check(out)`` validates a field value. ``f_start`` / ``dt_start``: the derivative at the start
    and the first step (device tensors), carried over from a previous piece (see :func:`integrate_pieces`);
    ``land``: clip the step that would pass ``t_out[-1]`` so it ends there exactly (instead of overshooting
    and interpolating); a float ``>= t_out[-1]`` clips onto that time instead (a ``step_t`` at or beyond
    the end, as torchdiffeq clips any step that would pass one). ``norm``: of the scaled error (and in
    the initial step's estimate); RMS, or :func:`mixed_norm` for a tuple state. ``event``: a
    :class:`~flowsde.solvers.events.Watch`; the solve then has no end (``t_out`` is the start alone) and
    stops at the host check after a step crossed the event (the steps in between take no time).
    Returns ``(ys, stats)``; ``stats["_f"]`` and ``stats["_dt"]`` hold the derivative at the end and the
    next step size, for a following piece.
    """
    dev, ydt = y0.device, y0.dtype
    f64 = dict(dtype=torch.float64, device=dev)

    def const(v):  # device scalars by a fill, never a host-to-device copy (legal under graph capture)
        return v.to(**f64) if isinstance(v, torch.Tensor) else torch.full((), float(v), **f64)
    rtol_t, atol_t = const(rtol), const(atol)
    min_step = const(opts.get("min_step", 0.0))
    max_step = const(opts.get("max_step", float("inf")))
    ctrl = Controller.from_options(opts, tab.order)
    max_steps, check_every, capturable = loop_budget(opts, dev.type)
    nfe = 0

    def f(t, y):
        nonlocal nfe
        nfe += 1
        return field_check(func(t.to(ydt), y))

    t_outs = torch.stack([const(v) for v in t_out])
    t0 = t_outs[0].clone()
    t_end = float(t_out[-1]) if event is None else math.inf
    y = y0
    f0 = f(t0, y) if f_start is None else f_start
    first = opts.get("first_step")
    if dt_start is not None:
        dt = dt_start
    elif first is not None:
        dt = const(_checks.check_step("first_step", first))
    else:
        with torch.no_grad():  # step sizes carry no gradient (the probe is one evaluation, as in torchdiffeq)
            dt = _initial_step(f, t0, y, f0, tab.order - 1, rtol_t, atol_t, norm)
    outs = [y0] + [None] * (len(t_out) - 1)
    written = torch.zeros(len(t_out), dtype=torch.bool, device=dev)
    written[0].fill_(True)  # a fill, not a host-to-device copy (legal under graph capture)
    accepted = torch.zeros((), dtype=torch.int64, device=dev)
    rejected = torch.zeros((), dtype=torch.int64, device=dev)
    r_prev = torch.ones((), **f64)
    stalled = torch.zeros((), dtype=torch.bool, device=dev)
    first_pending = 1
    status, steps = "success", 0
    t_end_t = const(t_end)
    land_t = None if land is False or land is None else (t_end_t if land is True else const(land))

    def host_check():  # the one host read: (time reached, stalled[, event seen]), every check_every steps and at
        # the end; an event seen reads as the (infinite) end reached
        flags = [t0, stalled.to(torch.float64)] + ([event.found.to(torch.float64)] if event is not None else [])
        read = torch.stack(flags).tolist()
        return (math.inf if event is not None and read[2] else read[0]), read[1]
    while True:
        if steps >= max_steps:  # the budget is spent: did the solve finish since the last check? (one read)
            if not capturable:
                t_now, stuck = host_check()
                status = "success" if t_now >= t_end else "dt_underflow" if stuck else "max_num_steps"
            break
        steps += 1
        active = t0 < t_end_t  # False only in the steps between finishing and the next host check
        if event is not None:  # (or the event seen)
            active = active & ~event.found
        dt = torch.where(torch.isfinite(dt), dt, min_step)
        dt = torch.minimum(torch.maximum(dt, min_step), max_step)
        # a step that no longer moves the time (torchdiffeq's "underflow in dt"): the solution or the field
        # is not finite, or the tolerances cannot be met; the host stops at its next check
        stalled = stalled | (active & ~(t0 + dt > t0))
        if land_t is not None:  # a step that would pass the landing time ends on it exactly; the controller
            # sees the clipped step
            room = land_t - t0
            clip = dt >= room
            dt = torch.where(clip & active, room, dt)
            t1 = torch.where(clip & active, land_t, t0 + dt)
        else:
            t1 = t0 + dt
        # a step after the end (before the host has seen it) takes no time: the field is never asked past
        # the end (where it may not be finite; a NaN there would reach the gradients through the masks)
        h = torch.where(active, dt, torch.zeros_like(dt))
        t1 = torch.where(active, t1, t0)
        dty = h.to(ydt)
        ks, y1, err = embedded_step(f, tab, y, f0, t0, t1, h, dty, ops)
        ratio = norm(_wide(err) / (atol_t + rtol_t * torch.maximum(_wide(y).abs(), _wide(y1).abs())))
        # a step at min_step is taken whatever its error, unless the error is not finite (a NaN state or
        # field): then no smaller step exists and the solve has stalled (torchdiffeq: underflow in dt)
        floor = dt <= min_step
        accept = ((ratio <= 1) | (floor & torch.isfinite(ratio))) & active
        stalled = stalled | (active & floor & ~torch.isfinite(ratio))
        # dense output for the output times this step covers (masked: no host read)
        ymid = torch.addcmul(y, dty, ops.combine(list(zip(tab.mid, ks))))
        coeff = _interp_fit(y, y1, ymid, f0, ks[-1], dty)
        if event is not None:
            event.step(accept, t0, t1, dt, coeff, y1)
        for j in range(first_pending, len(t_out)):
            tj = t_outs[j]
            hit = accept & (tj > t0) & (tj <= t1) & ~written[j]
            val = _interp_eval(coeff, ((tj - t0) / dt).to(ydt))
            outs[j] = torch.where(hit, val, outs[j]) if outs[j] is not None else torch.where(hit, val, val)
            written[j] = written[j] | hit
        # the controller (torchdiffeq's), on device scalars
        r = ratio.detach().to(torch.float64)
        dt_next = torch.minimum(torch.maximum(dt * ctrl.factor(r, r_prev), min_step), max_step)
        r_prev = ctrl.remember(r, r_prev, accept)
        y = torch.where(accept, y1, y)
        f0 = torch.where(accept, ks[-1], f0)
        t0 = torch.where(accept, t1, t0)
        dt = torch.where(active, dt_next, dt)
        accepted += accept.to(torch.int64)
        rejected += (~accept & active).to(torch.int64)
        if steps % check_every == 0:
            t_now, stuck = host_check()
            if t_now >= t_end:
                break
            if stuck:
                status = "dt_underflow"
                break
            if event is not None:
                event.forget()
            first_pending = int(np.searchsorted(t_out, t_now, side="right"))
    ys = torch.stack([o if o is not None else torch.full_like(y0, float("nan")) for o in outs])
    ys = torch.where(written.reshape(-1, *([1] * y0.dim())), ys, torch.full_like(ys, float("nan")))
    if capturable:  # no host read at all: counts stay on the device, the budget is always spent
        stats = {"nfe": nfe, "steps": steps, "accepted": accepted, "rejected": rejected, "status": "budget",
                 "finished": t0 >= t_end_t, "dt_underflow": stalled, "_f": f0, "_dt": dt}
    else:
        stats = {"nfe": nfe, "steps": steps, "accepted": int(accepted), "rejected": int(rejected),
                 "status": status, "_t": float(t0), "_f": f0, "_dt": dt, "_y": y}
    return ys, stats


def integrate_pieces(func, y0: torch.Tensor, t_out: np.ndarray, tab: EmbeddedTableau, rtol, atol, opts, ops,
                     field_check, step_t=(), jump_t=(), norm=_rms):
    """:func:`integrate_adaptive` with steps that end exactly on ``step_t`` and ``jump_t`` (increasing time).

    The interval is cut at those times (inside it) and the pieces solved one after another, the step
    size and, across a ``step_t``, the derivative carried over (no extra evaluation: the steps are those of
    one solve whose steps are clipped to land on the times, as torchdiffeq's). Across a ``jump_t`` the
    field is discontinuous: the derivative is evaluated again just after it (at the next float), on the
    side the solve continues on — torchdiffeq's convention.
    """
    t0, t1 = float(t_out[0]), float(t_out[-1])
    jumps = {float(v) for v in jump_t if t0 < v < t1}
    cuts = sorted({float(v) for v in step_t if t0 < v < t1} | jumps)
    clip_end = bool(opts.get("clip_end", False))  # the last step lands on t1: the field is never asked past it
    # a step_t / jump_t at or beyond the end: the step that would pass it lands on it (torchdiffeq's rule)
    beyond = [float(v) for v in list(step_t) + list(jump_t) if float(v) >= t1]
    last_land = True if clip_end else (min(beyond) if beyond else False)
    if not cuts:
        return integrate_adaptive(func, y0, t_out, tab, rtol, atol, opts, ops, field_check, norm=norm, land=last_land)
    ends = cuts + [t1]
    outs, y, a, f_start, dt_start = [y0], y0, t0, None, None
    total = {"nfe": 0, "steps": 0, "accepted": 0, "rejected": 0, "status": "success"}
    limit = opts.get("max_num_steps")
    for b in ends:
        inner = [float(v) for v in t_out if a < v < b]
        piece = np.array([a] + inner + [b], dtype=np.float64)
        piece_opts = opts
        if limit is not None:  # one budget for the whole solve, shared by its pieces
            if total["steps"] >= limit:
                total["status"], total["_t"] = "max_num_steps", a
                break
            piece_opts = dict(opts, max_num_steps=limit - total["steps"])
        ys, st = integrate_adaptive(func, y, piece, tab, rtol, atol, piece_opts, ops, field_check, f_start,
                                    dt_start, land=True if b != t1 else last_land, norm=norm)
        for key in ("nfe", "steps", "accepted", "rejected"):
            total[key] += st[key]
        outs.extend(ys[1:len(inner) + 1].unbind(0))
        if b == t1 or b in set(map(float, t_out)):
            outs.append(ys[-1])
        if st["status"] != "success":
            total["status"], total["_t"] = st["status"], st["_t"]
            break
        y, a, dt_start = ys[-1], b, st["_dt"]
        if b in jumps:  # the next float after the jump in the dtype the field sees it in (float32: one
            # float64 ulp after would round back onto the jump, the wrong side of it)
            bt = torch.full((), b, dtype=_time_dtype(y0.dtype), device=y0.device)
            f_start = field_check(func(torch.nextafter(bt, bt + 1).to(y0.dtype), y))
            total["nfe"] += 1
        else:
            f_start = st["_f"]
    while len(outs) < len(t_out):
        outs.append(torch.full_like(y0, float("nan")))
    return torch.stack(outs), total


def _time_dtype(ydt: torch.dtype) -> torch.dtype:
    """The dtype in which "the next float" is taken for a field that sees times in ``ydt`` (float32 for
    float32 states; float64 otherwise — half types, where nextafter is not implemented, included)."""
    return torch.float32 if ydt == torch.float32 else torch.float64


def _just_before(t1: torch.Tensor, ydt: torch.dtype) -> torch.Tensor:
    """The float just before ``t1`` as the field sees it (in ``ydt``), as a float64 tensor."""
    t = t1.to(_time_dtype(ydt))
    return torch.nextafter(t, t - 1).to(torch.float64)


def embedded_step(f, tab: EmbeddedTableau, y, f0, t0, t1, dt, dty, ops):
    """One step of the pair from ``y`` (``f0`` its field): ``(ks, y1, err)``. ``dt`` is the float64 step
    (a scalar, or one per row), ``dty`` the same in ``y``'s dtype laid out to broadcast against ``y``."""
    ks = [f0]
    yi = y
    t1_prev = _just_before(t1, dty.dtype)  # stages at the step's end: just before it, as torchdiffeq's
    for ci, row in zip(tab.c, tab.a):
        ti = t1_prev if ci == 1.0 else t0 + ci * dt
        yi = torch.addcmul(y, dty, ops.combine([(w, k) for w, k in zip(row, ks)]))
        ks.append(f(ti, yi))
    y1 = yi if tab.fsal else torch.addcmul(y, dty, ops.combine(list(zip(tab.b, ks))))
    return ks, y1, dty * ops.combine(list(zip(tab.e, ks)))


def _initial_step(f, t0, y0, f0, order, rtol, atol, norm=_rms):
    """Hairer, Nørsett & Wanner, Sec. II.4 (as torchdiffeq), on device scalars (norms of half types in
    float32)."""
    scale = atol + _wide(y0).abs() * rtol
    d0, d1 = norm(_wide(y0) / scale), norm(_wide(f0) / scale)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300)).abs().to(torch.float64)
    y1 = torch.addcmul(y0, h0.to(y0.dtype), f0)
    f1 = f(t0 + h0, y1)
    d2 = (norm(_wide(f1 - f0) / scale) / h0).abs().to(torch.float64)
    d1 = d1.to(torch.float64)
    tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(tiny, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / torch.maximum(d1, d2).clamp_min(1e-300)) ** (1.0 / float(order + 1)))
    return torch.minimum(100 * h0, h1.abs())


def _interp_fit(y0, y1, ymid, f0, f1, dt):
    a = 2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * ymid
    b = dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * ymid
    c = dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * ymid
    return (y0, dt * f0, c, b, a)


def _interp_eval(coeff, x):
    e, d, c, b, a = coeff
    return e + x * (d + x * (c + x * (b + x * a)))


def _per_row(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(batch,)`` tensor laid out to broadcast against ``like`` (``(batch, ...)``)."""
    return x.reshape(x.shape[0], *([1] * (like.dim() - 1)))


def _rms_rows(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).reshape(x.shape[0], -1).mean(1).sqrt()


def integrate_per_sample(func, y0: torch.Tensor, t_out: np.ndarray, tab: EmbeddedTableau, rtol, atol, opts, ops,
                         field_check):
    """Adaptive integration with a time, a step size and an acceptance per sample (``y0``: ``(batch, ...)``).

    The field is called as ``func(t, y)`` with ``t`` of shape ``(rows,)`` (each row's own time) on the rows
    that are still running only: every ``check_every`` steps the host reads which samples have finished
    (one read) and the active set is compacted, so the work follows the sum of the samples' efforts. The
    error ratio is the per-sample RMS (the ``error_norm`` kernel on the triton backend); the controller is
    the shared-step one, per sample. Returns ``(ys, stats)`` with per-sample ``nfe``, ``accepted``,
    ``rejected`` and ``status`` tensors/lists, plus ``rows`` (rows passed to the field in all).
    """
    dev, ydt = y0.device, y0.dtype
    if y0.dim() < 1 or y0.shape[0] < 1:
        raise ValueError("per_sample=True needs y0 of shape (batch, ...)")
    B = y0.shape[0]
    f64 = dict(dtype=torch.float64, device=dev)
    rtol_f, atol_f = float(rtol), float(atol)
    min_step = float(opts.get("min_step", 0.0))
    max_step = float(opts.get("max_step", float("inf")))
    ctrl = Controller.from_options(opts, tab.order)
    max_steps, check_every, _ = loop_budget(opts, dev.type)
    clip_end = bool(opts.get("clip_end", False))
    rows_total = 0

    def f(t, y):
        nonlocal rows_total
        rows_total += y.shape[0]
        return field_check(func(t.to(ydt), y), y)

    t_outs = torch.as_tensor(t_out, **f64)
    t_end = torch.as_tensor(float(t_out[-1]), **f64)
    T = torch.full((B,), float(t_out[0]), **f64)
    Y = y0
    F0 = f(T, Y)
    nfe = torch.full((B,), 1, dtype=torch.int64, device=dev)
    first = opts.get("first_step")
    if first is not None:
        DT = torch.full((B,), _checks.check_step("first_step", first), **f64)
    else:
        with torch.no_grad():
            scale = atol_f + _wide(Y).abs() * rtol_f
            d0, d1 = _rms_rows(_wide(Y) / scale), _rms_rows(_wide(F0) / scale)
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
            h0 = h0.abs().to(torch.float64)
            F1 = f(T + h0, torch.addcmul(Y, _per_row(h0.to(ydt), Y), F0))
            d2 = (_rms_rows(_wide(F1 - F0) / scale) / h0).to(torch.float64)
            d1 = d1.to(torch.float64)
            h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                             (0.01 / torch.maximum(d1, d2).clamp_min(1e-300)) ** (1.0 / tab.order))
            DT = torch.minimum(100 * h0, h1.abs())
        nfe += 1
    n_out = len(t_out)
    OUT = y0.unsqueeze(0).repeat(n_out, *([1] * y0.dim()))
    WRITTEN = torch.zeros(n_out, B, dtype=torch.bool, device=dev)
    WRITTEN[0] = True
    ACC = torch.zeros(B, dtype=torch.int64, device=dev)
    REJ = torch.zeros(B, dtype=torch.int64, device=dev)
    idx = torch.arange(B, device=dev)
    R_PREV = torch.ones(B, **f64)
    STALLED = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = 0
    while True:
        if steps >= max_steps:
            break
        steps += 1
        y, t0, dt, f0 = Y[idx], T[idx], DT[idx], F0[idx]
        active = t0 < t_end
        dt = torch.where(torch.isfinite(dt), dt, torch.full_like(dt, min_step)).clamp(min_step, max_step)
        STALLED = STALLED.index_copy(0, idx, STALLED[idx] | (active & ~(t0 + dt > t0)))  # see integrate_adaptive
        if clip_end:  # a step that would pass the end ends on it exactly (the field is never asked past it)
            room = t_end - t0
            last = (dt >= room) & active
            dt = torch.where(last, room, dt)
            t1 = torch.where(last, t_end, t0 + dt)
        else:
            t1 = t0 + dt
        h = torch.where(active, dt, torch.zeros_like(dt))  # see integrate_adaptive: no time after the end
        t1 = torch.where(active, t1, t0)
        dty = _per_row(h.to(ydt), y)
        ks, y1, err = embedded_step(f, tab, y, f0, t0, t1, h, dty, ops)
        n_stage = len(ks) - 1
        ratio = ops.error_norm(y, y1, err, rtol_f, atol_f).to(torch.float64).detach()
        floor = dt <= min_step  # see integrate_adaptive
        accept = ((ratio <= 1) | (floor & torch.isfinite(ratio))) & active
        STALLED = STALLED.index_copy(0, idx, STALLED[idx] | (active & floor & ~torch.isfinite(ratio)))
        ymid = torch.addcmul(y, dty, ops.combine(list(zip(tab.mid, ks))))
        coeff = _interp_fit(y, y1, ymid, f0, ks[-1], dty)
        for j in range(1, n_out):
            tj = t_outs[j]
            hit = accept & (tj > t0) & (tj <= t1) & ~WRITTEN[j, idx]
            val = _interp_eval(coeff, _per_row(((tj - t0) / dt).to(ydt), y))
            OUT[j, idx] = torch.where(_per_row(hit, y), val, OUT[j, idx])
            WRITTEN[j, idx] = WRITTEN[j, idx] | hit
        r_prev = R_PREV[idx]
        factor = ctrl.factor(ratio, r_prev)
        R_PREV = R_PREV.index_copy(0, idx, ctrl.remember(ratio, r_prev, accept))
        acc_row = _per_row(accept, y)
        Y = Y.index_copy(0, idx, torch.where(acc_row, y1, y))
        F0 = F0.index_copy(0, idx, torch.where(acc_row, ks[-1], f0))
        T = T.index_copy(0, idx, torch.where(accept, t1, t0))
        DT = DT.index_copy(0, idx, torch.where(active, (dt * factor).clamp(min_step, max_step), dt))
        ACC = ACC.index_add(0, idx, accept.to(torch.int64))
        REJ = REJ.index_add(0, idx, (~accept & active).to(torch.int64))
        nfe = nfe.index_add(0, idx, active.to(torch.int64) * n_stage)
        if steps % check_every == 0:
            running = ((T < t_end) & ~STALLED).nonzero().flatten()  # one host read, every check_every steps
            if running.numel() == 0:
                break
            idx = running
    status = ["success" if d else "dt_underflow" if s else "max_num_steps"
              for d, s in zip((T >= t_end).tolist(), STALLED.tolist())]
    ys = torch.where(_per_row_out(WRITTEN, OUT), OUT, torch.full_like(OUT, float("nan")))
    stats = {"nfe": nfe, "accepted": ACC, "rejected": REJ, "status": status, "steps": steps, "rows": rows_total}
    return ys, stats


def _per_row_out(written: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return written.reshape(*written.shape, *([1] * (out.dim() - 2)))
