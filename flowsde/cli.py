"""The ``flowsde`` command line: ``flowsde`` (or ``python -m flowsde``) prints a convergence table of
every method on the Ornstein–Uhlenbeck problem."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from . import __version__
from .problems import GeometricBrownianMotion, OrnsteinUhlenbeck
from .solvers import ODE_METHODS
from .studies import Convergence, format_table, ode_convergence, sde_convergence, shared_path

ODE_STEPS = [8, 16, 32, 64, 128]
SDE_STEPS = [8, 16, 32, 64, 128]


def convergence_rows(problem: str = "ou", paths: int = 4000, seed: int = 0, theta: float = 1.0,
                     sigma: float = 1.0, t1: float = 1.0, n_fine: int = 1024) -> List[Convergence]:
    """Every method's convergence study on the OU problem (``problem="ou"``) or on GBM (``"gbm"``).

    ODE methods integrate the noise-free drift (exact ``x0 e^{-theta t}`` for OU, ``x0 e^{mu t}`` for GBM);
    SDE methods run strong studies along one shared Brownian path, and Euler–Maruyama a weak study too.
    """
    if problem not in ("ou", "gbm"):
        raise ValueError(f"problem must be 'ou' or 'gbm', got {problem!r}")
    y0 = torch.ones(paths, 1, dtype=torch.float64)
    bm = shared_path(t1, n_fine, (paths, 1), seed)
    rows: List[Convergence] = []
    unique = {}
    for name, tab in ODE_METHODS.items():
        unique.setdefault(tab, name)
    if problem == "ou":
        ito = OrnsteinUhlenbeck(theta, sigma)
        strat = OrnsteinUhlenbeck(theta, sigma, sde_type="stratonovich")
        ref = ito.pathwise(y0, bm.grid, bm.path())
        drift, exact_drift, label = ito.f, ito.mean(y0, t1), "ou"
        sde_cases = [("euler", ito, 1.0, None), ("milstein", ito, 1.0, None), ("heun", strat, 1.0, None)]
        ref_strat = ref
    else:
        ito = GeometricBrownianMotion(mu=0.5, sigma=sigma * 0.5)
        strat = GeometricBrownianMotion(mu=0.5, sigma=sigma * 0.5, sde_type="stratonovich")
        w = bm(0.0, t1)
        ref, ref_strat = ito.exact(y0, t1, w), strat.exact(y0, t1, w)
        drift, exact_drift, label = (lambda t, y: 0.5 * y), y0 * torch.exp(torch.tensor(0.5 * t1)), "gbm"
        sde_cases = [("euler", ito, 0.5, None), ("milstein", ito, 1.0, None), ("heun", strat, 1.0, None)]
    for tab, name in unique.items():
        rows.append(ode_convergence(name, drift, y0[:1], t1, exact_drift[:1], ODE_STEPS, tab.order,
                                    problem=label + " drift"))
    for name, sde, order, opts in sde_cases:
        r = ref_strat if sde.sde_type == "stratonovich" else ref
        rows.append(sde_convergence(name, sde, y0, t1, bm, r, SDE_STEPS, order, problem=label, options=opts))
    rows.append(sde_convergence("milstein", ito, y0, t1, bm, ref, SDE_STEPS, 1.0, problem=label + " grad-free",
                                options=dict(grad_free=True)))
    if problem == "ou":
        rows.append(sde_convergence("euler", ito, y0, t1, bm, ref, SDE_STEPS, 1.0, kind="weak", problem=label))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``flowsde`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="flowsde", description=__doc__)
    parser.add_argument("command", nargs="?", default="convergence", choices=["convergence"],
                        help="what to run (default: convergence)")
    parser.add_argument("--problem", default="ou", choices=["ou", "gbm"], help="reference problem (default: ou)")
    parser.add_argument("--paths", type=int, default=4000, help="Monte Carlo paths for SDE studies (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared Brownian path (default 0)")
    parser.add_argument("--theta", type=float, default=1.0, help="OU mean reversion (default 1)")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise scale (default 1)")
    parser.add_argument("--version", action="version", version=f"flowsde {__version__}")
    args = parser.parse_args(argv)
    if args.paths < 10:
        parser.error("--paths must be at least 10")
    start = time.perf_counter()
    rows = convergence_rows(args.problem, args.paths, args.seed, args.theta, args.sigma)
    print(f"flowsde {__version__}: convergence on the {args.problem.upper()} problem "
          f"(T=1, {args.paths} paths sharing one Brownian path of 1024 steps, float64)")
    print("ODE methods on the drift (error: max |y_n - y(T)|; order: fitted slope of log error vs log h)\n")
    print(format_table([r for r in rows if r.kind == "ode"]))
    print("\nSDE methods (strong: E|X_n - X_T| on the shared path; weak: |E[X_n - X_T]|)\n")
    print(format_table([r for r in rows if r.kind != "ode"]))
    print(f"\n{len(rows)} studies in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
