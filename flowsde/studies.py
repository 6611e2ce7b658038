"""Convergence studies: errors over a list of step counts and the fitted empirical order.

Strong and weak studies drive every step count with the *same* Brownian path (a
:class:`~flowsde.brownian.GridBrownian` on the finest grid, refined, never redrawn), so the fitted
slope measures the method and not the Monte Carlo noise between independent runs.
"""
from __future__ import annotations

import math

import os
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import numpy as np
import torch

from .brownian import GridBrownian, SampledPath
from .solvers import SDE_METHODS, odeint, sdeint


def fit_order(hs: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(h)``: the empirical order of convergence."""
    return fit_order_ci(hs, errors)[0]


def fit_order_ci(hs: Sequence[float], errors: Sequence[float], level: float = 0.95):
    """``(order, low, high)``: the least-squares slope of ``log(error)`` against ``log(h)`` and its
    ``level`` confidence interval from the regression's standard error (Student t with ``n - 2`` degrees
    of freedom; ``(order, nan, nan)`` with two points)."""
    from scipy import stats

    hs, errors = np.asarray(hs, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    if hs.size < 2 or hs.size != errors.size:
        raise ValueError("fit_order needs at least two (h, error) pairs of equal length")
    if not (np.all(np.isfinite(errors)) and np.all(np.isfinite(hs))):
        raise ValueError(f"fit_order needs finite step sizes and errors, got errors {errors.tolist()}")
    if np.any(errors <= 0) or np.any(hs <= 0):
        raise ValueError(f"fit_order needs positive step sizes and errors, got errors {errors.tolist()}")
    if np.unique(hs).size < 2:
        raise ValueError(f"fit_order needs at least two distinct step sizes, got {hs.tolist()}")
    x, y = np.log(hs), np.log(errors)
    slope, icpt = np.polyfit(x, y, 1)
    if hs.size < 3:
        return float(slope), float("nan"), float("nan")
    resid = y - (slope * x + icpt)
    se = np.sqrt(resid @ resid / (hs.size - 2) / np.sum((x - x.mean()) ** 2))
    half = float(stats.t.ppf(0.5 + level / 2, hs.size - 2) * se)
    return float(slope), float(slope - half), float(slope + half)


@dataclass
class Convergence:
    """Result of a convergence study: step sizes, errors, fitted order and the order theory predicts."""

    method: str
    kind: str  # "ode", "strong" or "weak"
    problem: str
    hs: List[float]
    errors: List[float]
    expected: float
    order: float = field(init=False)
    order_ci: tuple = field(init=False)

    def __post_init__(self):
        self.order, lo, hi = fit_order_ci(self.hs, self.errors)
        self.order_ci = (lo, hi)

    def to_dict(self) -> dict:
        """A JSON-ready record of the study."""
        return {"method": self.method, "kind": self.kind, "problem": self.problem, "hs": list(self.hs),
                "errors": list(self.errors), "order": self.order, "order_ci": list(self.order_ci),
                "expected": self.expected}


def ode_convergence(method: str, func: Callable, y0: torch.Tensor, t1: float, exact: torch.Tensor,
                    steps: Sequence[int], expected: float, problem: str = "") -> Convergence:
    """Max-abs error at ``t1`` of ``odeint(method)`` from 0 for each number of steps, and its order."""
    t = torch.tensor([0.0, t1], dtype=torch.float64)
    errs, hs = [], []
    for n in steps:
        ys = odeint(func, y0, t, method=method, options=dict(step_size=t1 / n))
        errs.append(float((ys[-1] - exact).abs().max()))
        hs.append(t1 / n)
    return Convergence(method, "ode", problem, hs, errs, expected)


def shared_path(t1: float, n_fine: int, shape, seed: int, dtype=torch.float64, device="cpu") -> GridBrownian:
    """The Brownian path every step count of a strong/weak study is driven by."""
    return GridBrownian(t0=0.0, t1=t1, steps=n_fine, shape=shape, seed=seed, dtype=dtype, device=device)


def sde_convergence(method: str, sde, y0: torch.Tensor, t1: float, bm: GridBrownian,
                    reference: torch.Tensor, steps: Sequence[int], expected: float, kind: str = "strong",
                    problem: str = "", options=None) -> Convergence:
    """Strong error ``E|X_n - X_T|`` or weak error ``|E[X_n - X_T]|`` along one shared path ``bm``.

    ``reference`` is the solution at ``t1`` on the same path (exact, or path-wise exact on the fine grid).
    For the weak error the path-wise reference serves as a control variate: the Monte Carlo noise left is
    that of ``X_n - X_T``, not of ``X_n``, so the bias of the method stands out at modest sample sizes.
    """
    if kind not in ("strong", "weak"):
        raise ValueError(f"kind must be 'strong' or 'weak', got {kind!r}")
    n_fine = bm.grid.size - 1
    t = torch.tensor([0.0, t1], dtype=torch.float64)
    errs, hs = [], []
    for n in steps:
        if n_fine % n:
            raise ValueError(f"step count {n} does not divide the Brownian grid's {n_fine} steps")
        ys = sdeint(sde, y0, t.to(y0.dtype), bm=bm, method=method, dt=t1 / n, options=options)
        diff = ys[-1] - reference
        errs.append(float(diff.abs().mean()) if kind == "strong" else float(diff.mean(0).abs().mean()))
        hs.append(t1 / n)
    return Convergence(method, kind, problem, hs, errs, expected)


def format_table(rows: Sequence[Convergence]) -> str:
    """A plain-text table: method, kind, problem, error at each step size, fitted and expected order."""
    if not rows:
        return ""
    head = ["method", "kind", "problem"] + [f"h={h:.3g}" for h in rows[0].hs] + ["order", "theory"]
    body = [[r.method, r.kind, r.problem] + [f"{e:.3e}" for e in r.errors] + [f"{r.order:.3f}", f"{r.expected:g}"]
            for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size samples ``(n, d)``: the mean over random
    directions of the 1-D Wasserstein distance of the projections (sorted differences)."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"samples must both have shape (n, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double().cpu() @ dirs, dim=0).values
    pb = torch.sort(b.double().cpu() @ dirs, dim=0).values
    return float((pa - pb).abs().mean())


# ---- convergence(problem, method): the command line's studies -------------------------------------------

#: Problems a convergence study knows, with the methods it runs on each and the order theory predicts.
SDE_PROBLEMS = {
    # problem: {method: (strong order, weak order or None)}
    "ou": {"euler": (1.0, 1.0), "milstein": (1.0, None), "heun": (1.0, None),      # additive noise
           "midpoint": (1.0, None), "euler_heun": (1.0, None), "reversible_heun": (1.0, None),
           "srk": (2.0, None)},  # (Rößler's SRA1 on a linear drift with additive noise: its order-1.5 error
    # terms vanish, the first left is of order 2 — measured 2.00 [1.99, 2.01]; order 1.5 on GBM below)
    "gbm": {"euler": (0.5, None), "milstein": (1.0, None), "heun": (1.0, None),    # multiplicative noise
            "midpoint": (1.0, None), "euler_heun": (1.0, None), "srk": (1.5, None),
            "reversible_heun": (1.0, None)},  # (torchsde lists reversible Heun's order for other than additive
    # noise as unknown, 1/2 at least; on GBM's commutative noise it measures 0.98 [0.96, 0.99], 4000 paths)
    "bm": {"euler": (0.5, None), "milstein": (0.5, None), "heun": (0.5, None),     # whole-path error
           "midpoint": (0.5, None), "euler_heun": (0.5, None), "srk": (0.5, None), "reversible_heun": (0.5, None)},
}
ODE_PROBLEMS = {
    "ou_drift": {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4, "rk4_classic": 4},
    "linear": {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4, "rk4_classic": 4},
    "mixture": {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4, "rk4_classic": 4, "ddim": 1},
}
# the exact mixture flow under the other paths, and the learned MLP field (CondOT)
for _name in ("mixture_vp", "mixture_edm", "mlp"):
    ODE_PROBLEMS[_name] = dict(ODE_PROBLEMS["mixture"])
PROBLEMS = tuple(SDE_PROBLEMS) + tuple(ODE_PROBLEMS)


def _dist():
    """``(rank, world)`` of an initialised torch.distributed group, else ``(0, 1)``."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks (``x`` itself in one process)."""
    import torch.distributed as dist
    if _dist()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def shard(paths: int, rank: int, world: int):
    """Rows ``[start, stop)`` of ``paths`` that ``rank`` of ``world`` simulates (contiguous, balanced)."""
    start = rank * paths // world
    return start, (rank + 1) * paths // world


def methods_for(problem: str) -> dict:
    """The methods a study of ``problem`` runs, with their predicted orders."""
    if problem in SDE_PROBLEMS:
        return SDE_PROBLEMS[problem]
    if problem in ODE_PROBLEMS:
        return ODE_PROBLEMS[problem]
    raise ValueError(f"unknown problem {problem!r}; known problems: {PROBLEMS}")


def convergence(problem: str = "ou", method: str = "euler", steps: Sequence[int] = (8, 16, 32, 64, 128),
                paths: int = 4000, seed: int = 0, kind: str = None, device="cpu", n_fine: int = 1024,
                progress: bool = False, ref_steps: int = 2048) -> Convergence:
    """A convergence study of ``method`` on ``problem`` (see :data:`SDE_PROBLEMS`, :data:`ODE_PROBLEMS`).

    SDE problems (``kind`` ``"strong"``, the default, or ``"weak"``): every step count is driven by one
    Brownian path of ``n_fine`` steps (Philox stream, keyed by ``seed``), and the error is measured on that
    path against the exact solution (OU: path-wise exact on the fine grid; GBM: ``x0 exp(...)``; Brownian
    motion: the whole path at every fine time, since every method is exact at its own grid points — the
    order is that of the linear interpolation between steps, 1/2). Strong error: mean over paths of
    ``|X_n - X_T|``; weak error: ``|mean over paths of (X_n - X_T)|`` (the path-wise exact solution as a
    control variate).

    ODE problems (``kind="ode"``): the linear system (and the OU drift ``dy/dt = -y``, ``ou_drift``)
    against its matrix exponential; the exact Gaussian-mixture flow (:func:`~flowsde.problems.
    reference_mixture`) under CondOT (``mixture``), VPCosine (``mixture_vp``) and EDM (``mixture_edm``),
    and the learned MLP field (``mlp``): 256 starting points, ``flowsde.sample``, RMS error against a
    ``ref_steps``-step RK4 reference (default 2048; ``flowsde converge --quick`` takes 1024, whose error is
    still 1/256 of RK4's at 256 steps).

    Under ``torch.distributed`` each rank simulates its share of the paths — the rows a one-process run
    would draw — and the error sums are reduced over the ranks.
    """
    from tqdm.auto import tqdm

    from .problems import BrownianMotionProblem, GeometricBrownianMotion, OrnsteinUhlenbeck

    table = methods_for(problem)
    if method not in table:
        raise ValueError(f"method {method!r} is not studied on {problem!r}; methods: {sorted(table)}")
    steps = [int(n) for n in steps]
    if any(n < 1 for n in steps) or len(steps) < 2 or len(set(steps)) != len(steps):
        raise ValueError(f"steps must be at least two distinct positive step counts, got {steps}")
    bar = tqdm(steps, desc=f"{problem}/{method}", disable=not progress, leave=False)
    if problem in ODE_PROBLEMS:
        if kind not in (None, "ode"):
            raise ValueError(f"{problem!r} is an ODE problem: kind must be 'ode'")
        return _ode_study(problem, method, steps, table[method], device, bar, seed, ref_steps)
    kind = kind or "strong"
    if kind not in ("strong", "weak"):
        raise ValueError(f"kind must be 'strong' or 'weak' for an SDE problem, got {kind!r}")
    strong, weak = table[method]
    expected = strong if kind == "strong" else weak
    if expected is None:
        raise ValueError(f"no weak study of {method!r} on {problem!r}: weak studies run Euler–Maruyama")
    if isinstance(paths, bool) or not isinstance(paths, int) or paths < 1:
        raise ValueError(f"paths must be a positive int, got {paths!r}")
    if any(n_fine % n for n in steps):
        raise ValueError(f"every step count must divide n_fine={n_fine}, got {steps}")
    rank, world = _dist()
    lo, hi = shard(paths, rank, world)
    dt, t1 = torch.float64, 1.0
    y0 = torch.ones(hi - lo, 1, dtype=dt, device=device)
    fine = GridBrownian(t0=0.0, t1=t1, steps=n_fine, shape=(hi - lo, 1), seed=seed, dtype=dt, device=device,
                        stream="philox", row_start=lo)
    # drawn once, shared by every step count (with each fine step's space-time area for srk)
    bm = SampledPath(fine.grid, fine.path(), fine.areas() if method == "srk" else None)
    strat = "ito" not in SDE_METHODS[method].sde_types  # (Stratonovich-only methods solve the Stratonovich form)
    if problem == "ou":
        sde = OrnsteinUhlenbeck(1.0, 1.0, sde_type="stratonovich" if strat else "ito")
        ref = sde.pathwise(y0, bm.grid, bm.values, bm.areas)
    elif problem == "gbm":
        sde = GeometricBrownianMotion(0.5, 0.5, sde_type="stratonovich" if strat else "ito")
        ref = sde.exact(y0, t1, bm(0.0, t1))
    else:
        sde = BrownianMotionProblem(1.0)
        sde.sde_type = "stratonovich" if strat else "ito"
        ref = y0 + bm.values
    ts = torch.as_tensor(bm.grid if problem == "bm" else [0.0, t1], dtype=dt, device=device)
    errs, hs = [], []
    for n in bar:
        ys = sdeint(sde, y0, ts, bm=bm, method=method, dt=t1 / n)
        diff = (ys - ref) if problem == "bm" else (ys[-1] - ref)
        if problem == "bm":  # RMS over the fine times, per path
            per_path = diff.pow(2).mean(0).mean(-1).sqrt()
        else:
            per_path = diff.abs().mean(-1) if kind == "strong" else diff.mean(-1)
        total = _all_sum(torch.stack([per_path.sum(), torch.tensor(float(per_path.numel()), dtype=dt,
                                                                   device=device)]))
        mean = float(total[0] / total[1])
        errs.append(abs(mean))
        hs.append(t1 / n)
    return Convergence(method, kind, problem, hs, errs, expected)


#: the linear problems of :func:`monte_carlo_weak`: coefficients of ``dX = (a X + b) dt + (c X + d) dW`` and
#: the exact first and second moments at ``t`` from ``x0 = 1``
LINEAR_PROBLEMS = {
    "ou": (dict(a=-1.0, d=1.0), lambda t: math.exp(-t), lambda t: math.exp(-2 * t) + 0.5 * (1 - math.exp(-2 * t))),
    "gbm": (dict(a=0.5, c=0.5, d=0.0), lambda t: math.exp(0.5 * t), lambda t: math.exp((2 * 0.5 + 0.25) * t)),
}


def monte_carlo_weak(problem: str = "ou", steps: Sequence[int] = (4, 8, 16, 32), paths: int = 1 << 20,
                     moment: int = 1, seed: int = 0, t1: float = 1.0, device="cpu", backend=None) -> Convergence:
    """Weak error of Euler–Maruyama by plain Monte Carlo on the whole-trajectory kernel
    (:func:`flowsde.solve_linear_sde`: every step of every path in one launch on the triton backend):
    ``|mean over paths of X_n^moment - E[X_T^moment]|`` against the exact moment, for OU (``dX = -X dt +
    dW``) or GBM (Itô, ``mu = sigma = 0.5``), from ``x0 = 1`` to ``t1``. Each step count draws its own
    ``paths`` independent paths (seed ``seed + n``): no shared path and no control variate, so the
    Monte Carlo standard error, about ``sqrt(Var X_T^moment / paths)``, must sit well below the smallest
    error — the regime of millions of paths this kernel is for. Expected order 1 (Euler–Maruyama's weak
    order; at the default 2^20 paths and 4..32 steps, on the torch backend of this project's CPU machine:
    OU mean 1.10, OU second moment 1.11, GBM mean 1.01, GBM second moment 0.94, about 1.5 s each); under
    ``torch.distributed`` each rank simulates its share and the sums are reduced."""
    if problem not in LINEAR_PROBLEMS:
        raise ValueError(f"unknown linear problem {problem!r}; known: {sorted(LINEAR_PROBLEMS)}")
    if moment not in (1, 2):
        raise ValueError(f"moment must be 1 or 2, got {moment!r}")
    if isinstance(paths, bool) or not isinstance(paths, int) or paths < 1:
        raise ValueError(f"paths must be a positive int, got {paths!r}")
    steps = [int(n) for n in steps]
    if any(n < 1 for n in steps) or len(steps) < 2 or len(set(steps)) != len(steps):
        raise ValueError(f"steps must be at least two distinct positive step counts, got {steps}")
    from .solvers.linear import solve_linear_sde

    coef, m1, m2 = LINEAR_PROBLEMS[problem]
    exact = (m1 if moment == 1 else m2)(t1)
    rank, world = _dist()
    lo, hi = shard(paths, rank, world)
    x0 = torch.ones(hi - lo, dtype=torch.float64, device=device)
    ts = torch.tensor([0.0, t1], dtype=torch.float64, device=device)
    errs, hs = [], []
    for n in steps:
        # (each rank its own stream: seed and rank together key the draws)
        x = solve_linear_sde(x0, ts, t1 / n, seed=(seed + n) * max(1, world) + rank, backend=backend, **coef)[-1]
        total = _all_sum(torch.stack([x.pow(moment).sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                          device=device)]))
        errs.append(abs(float(total[0] / total[1]) - exact))
        hs.append(t1 / n)
    return Convergence("euler", "weak", f"{problem} (monte carlo, moment {moment}, {paths} paths)", hs, errs, 1.0)


_MIXTURE_REF = {}


ODE_POINTS = 256  # starting points of the sampling (ODE) studies


def _ode_study(problem, method, steps, expected, device, bar, seed=0, ref_steps=2048) -> Convergence:
    from .problems import LinearODE, reference_mixture

    dt = torch.float64
    errs, hs = [], []
    if problem in ("linear", "ou_drift"):  # the OU drift: dy/dt = -y, y(t) = e^{-t} y0
        lin = LinearODE() if problem == "linear" else LinearODE(torch.tensor([[-1.0]], dtype=dt))
        y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]] if problem == "linear" else [[1.0]], dtype=dt, device=device)
        t1 = 2.0
        exact = lin.exact(y0, t1).to(device)
        t = torch.tensor([0.0, t1], dtype=dt, device=device)
        for n in bar:
            ys = odeint(lin, y0, t, method=method, options=dict(step_size=t1 / n))
            errs.append(float((ys[-1] - exact).abs().max()))
            hs.append(t1 / n)
        return Convergence(method, "ode", problem, hs, errs, expected)
    from .paths import EDM, CondOT, VPCosine
    from .sampling import sample

    path = {"mixture_vp": VPCosine(), "mixture_edm": EDM()}.get(problem, CondOT())
    if problem == "mlp":
        import copy

        from .problems import learned_field
        net = copy.deepcopy(learned_field()[0]).double().to(device)
        model = lambda x, t: net(x, t)  # noqa: E731
    else:
        mix = reference_mixture().to(device)
        model = lambda x, t: mix.velocity(x, t, path)  # noqa: E731
    scale = float(path.beta(torch.zeros((), dtype=dt)))  # x(0) = beta_0 * noise
    x0 = scale * torch.randn(ODE_POINTS, 2, dtype=dt, generator=torch.Generator().manual_seed(5 + seed)).to(device)
    key = (problem, str(device), seed, ref_steps)
    if key not in _MIXTURE_REF:
        _MIXTURE_REF[key] = sample(model, x0, path=path, method="rk4", steps=ref_steps)
    ref = _MIXTURE_REF[key]
    for n in bar:
        errs.append(float((sample(model, x0, path=path, method=method, steps=n) - ref).pow(2).mean().sqrt()))
        hs.append(1.0 / n)
    return Convergence(method, "ode", problem, hs, errs, expected)


def default_steps(problem: str, quick: bool = False) -> List[int]:
    """The step counts a study of ``problem`` uses by default (asymptotic regime of every method)."""
    if problem.startswith("mixture") or problem == "mlp":
        return [32, 64, 128, 256] if quick else [16, 32, 64, 128, 256]
    if problem in ODE_PROBLEMS:
        return [16, 32, 64, 128] if quick else [16, 32, 64, 128, 256]
    return [8, 16, 32, 64] if quick else [8, 16, 32, 64, 128]


def plot_convergence(rows: Sequence[Convergence], filename: str, title: str = "") -> None:
    """A log-log plot of error against step size, one curve per study, with its fitted slope (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    for r in rows:
        hs, errs = np.asarray(r.hs), np.asarray(r.errors)
        line, = ax.loglog(hs, errs, "o-", label=f"{r.method} ({r.kind}): slope {r.order:.2f}, theory {r.expected:g}")
        fit = np.exp(np.polyval(np.polyfit(np.log(hs), np.log(errs), 1), np.log(hs)))
        ax.loglog(hs, fit, "--", color=line.get_color(), alpha=0.5)
    style_axes(ax, "step size h", title, 8)
    save_figure(fig, filename)


def style_axes(ax, xlabel: str, title: str, legend_size: int) -> None:
    """Labels, a log grid and the legend of one work-precision or convergence panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("error")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_format(filename: str) -> str:
    """The format of a figure file from its extension (``png`` where it has none); a ``ValueError`` for
    one matplotlib is not asked to write here."""
    ext = os.path.splitext(str(filename))[1].lower().lstrip(".")
    if ext and ext not in FIGURE_FORMATS:
        raise ValueError(f"a figure is written as {', '.join(FIGURE_FORMATS)}; got the extension .{ext}")
    return ext or "png"


def save_figure(fig, filename: str) -> None:
    """Write ``fig`` to ``filename`` (PNG) and free it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(filename, format=figure_format(filename))
    plt.close(fig)
