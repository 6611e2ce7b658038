"""Convergence studies: errors over a list of step counts and the fitted empirical order.

Strong and weak studies drive every step count with the *same* Brownian path (a
:class:`~flowsde.brownian.GridBrownian` on the finest grid, refined, never redrawn), so the fitted
slope measures the method and not the Monte Carlo noise between independent runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import numpy as np
import torch

from .brownian import GridBrownian
from .solvers import odeint, sdeint


def fit_order(hs: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(h)``: the empirical order of convergence."""
    hs, errors = np.asarray(hs, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    if hs.size < 2 or hs.size != errors.size:
        raise ValueError("fit_order needs at least two (h, error) pairs of equal length")
    if np.any(errors <= 0) or np.any(hs <= 0):
        raise ValueError(f"fit_order needs positive step sizes and errors, got errors {errors.tolist()}")
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


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

    def __post_init__(self):
        self.order = fit_order(self.hs, self.errors)


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
