"""The ``flowsde`` command line (``python -m flowsde`` too).

    flowsde                                   every method's convergence on the OU problem (the default)
    flowsde converge --problem ou [--method euler] [--kind strong|weak] [--quick] [--json F] [--plot F.png]
    flowsde bench [--quick] [--json F] [--plot F.png]
    torchrun --nproc_per_node 2 -m flowsde converge ...     paths sharded over processes (gloo / nccl)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import List, Optional

import torch

from . import __version__
from .studies import (ODE_POINTS, PROBLEMS, SDE_PROBLEMS, Convergence, _dist, convergence, default_steps,
                      figure_format, format_table, methods_for, plot_convergence)


def convergence_rows(problem: str = "ou", paths: int = 4000, seed: int = 0, quick: bool = False, method=None,
                     kind=None, device="cpu", progress: bool = False, steps=None) -> List[Convergence]:
    """The studies ``flowsde converge`` runs: one method, or every method of the problem (with the weak
    study of Euler–Maruyama where theory gives its weak order)."""
    methods = [method] if method else list(methods_for(problem))
    steps = steps or default_steps(problem, quick)
    n_fine = 256 if quick else 1024
    rows = []
    if problem == "ou" and method is None and kind is None:  # every method: the ODE ones on the OU drift too
        rows += convergence_rows("ou_drift", seed=seed, quick=quick, device=device, progress=progress)
    for m in methods:
        if problem not in SDE_PROBLEMS:
            kinds = ["ode"]
        else:
            has_weak = SDE_PROBLEMS[problem][m][1] is not None
            kinds = ["strong"] + (["weak"] if has_weak else []) if kind is None else \
                [kind] if kind == "strong" or has_weak or method else []  # weak: where theory gives an order
        for k in kinds:
            rows.append(convergence(problem, m, steps, paths, seed, k, device, n_fine, progress,
                                    ref_steps=1024 if quick else 2048))
    return rows


def check_kind(problem: str, method, kind):
    """``None``, or why ``--kind`` cannot be studied on this problem / method (the message for the user)."""
    if kind is None:
        return None
    if problem not in SDE_PROBLEMS:
        return None if kind == "ode" else f"{problem!r} is an ODE problem: its errors are --kind ode"
    if kind == "ode":
        return f"{problem!r} is an SDE problem: --kind strong or weak"
    weak = [m for m, (_, w) in SDE_PROBLEMS[problem].items() if w is not None]
    if kind == "weak" and (method not in weak if method else not weak):
        return (f"no weak study of {method!r} on {problem!r}; weak studies: {weak or 'none on this problem'}"
                if method else f"no method has a weak study on {problem!r}")
    return None


def _machine(device) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def _init_distributed(device: str):
    """Join the process group ``torchrun`` set up (``WORLD_SIZE`` > 1); returns ``(rank, world)``."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
        if str(device).startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _dist()


def _converge(args) -> int:
    import torch.distributed as dist
    rank, world = _init_distributed(args.device)
    try:
        status = _converge_in_group(args, rank, world)
        if dist.is_initialized():
            dist.barrier()  # (rank 0 writes the table while the others wait)
        return status
    finally:  # every rank leaves the group before exiting: gloo's threads left running abort the process at
        if dist.is_initialized():  # interpreter exit ("terminate called without an active exception")
            dist.destroy_process_group()


def _converge_in_group(args, rank: int, world: int) -> int:
    paths = args.paths if args.paths else (1000 if args.quick else 4000)
    start = time.perf_counter()
    rows = convergence_rows(args.problem, paths, args.seed, args.quick, args.method, args.kind, args.device,
                            progress=rank == 0 and sys.stderr.isatty())
    if rank != 0:
        return 0
    sde = args.problem in SDE_PROBLEMS
    paths = paths if sde else ODE_POINTS
    print(f"flowsde {__version__}: convergence on the {args.problem} problem "
          + (f"({paths} paths sharing one Brownian path, {world} process(es), float64)" if sde
             else f"({paths} starting points, float64)"))
    if sde:
        print("strong: mean |X_n - X_T| on the shared path (Brownian motion: RMS over the whole path); "
              "weak: |mean (X_n - X_T)|")
    print("order: least-squares slope of log error against log h, 95 % interval in brackets\n")
    print(format_table(rows))
    print("\n" + "\n".join(f"  {r.method:<12} {r.kind:<6} order {r.order:.3f} [{r.order_ci[0]:.3f}, "
                           f"{r.order_ci[1]:.3f}]  theory {r.expected:g}" for r in rows))
    print(f"\n{len(rows)} studies in {time.perf_counter() - start:.1f} s")
    meta = {"flowsde": __version__, "command": "converge", "problem": args.problem, "paths": paths,
            "seed": args.seed, "quick": args.quick, "world_size": world, "device": str(args.device),
            "machine": _machine(args.device), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta, studies=[r.to_dict() for r in rows]), fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_convergence(rows, args.plot, f"flowsde: convergence on {args.problem}")
        print(f"wrote {args.plot}")  # (an extension-less name was given .png by the argument check)
    return 0


def _bench(args) -> int:
    from .bench import format_bench, plot_bench, run_bench

    start = time.perf_counter()
    rows = run_bench(quick=args.quick, device=args.device, progress=sys.stderr.isatty(), seed=args.seed)
    print(f"flowsde {__version__}: accuracy against cost, flowsde and its peers in one run "
          f"({_machine(args.device)}, {time.strftime('%Y-%m-%d')})\n")
    print(format_bench(rows))
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"flowsde": __version__, "command": "bench", "quick": args.quick, "seed": args.seed,
                       "device": str(args.device),
                       "machine": _machine(args.device), "date": time.strftime("%Y-%m-%d"), "rows": rows}, fh,
                      indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_bench(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``flowsde`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="flowsde", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"flowsde {__version__}")
    sub = parser.add_subparsers(dest="command")
    conv = sub.add_parser("converge", aliases=["convergence"], help="convergence study: errors and fitted orders")
    conv.add_argument("--problem", default="ou", choices=PROBLEMS, help="reference problem (default: ou)")
    conv.add_argument("--method", default=None, help="one method (default: every method of the problem)")
    conv.add_argument("--kind", default=None, choices=["strong", "weak", "ode"], help="error kind")
    conv.add_argument("--paths", type=int, default=None, help="Monte Carlo paths (default 4000; 1000 with --quick)")
    bench = sub.add_parser("bench", help="accuracy against wall time and NFE, flowsde and its peers")
    for p in (conv, bench):
        p.add_argument("--quick", action="store_true", help="a smaller run (well under a minute on 2 cores)")
        p.add_argument("--json", default=None, help="write the results to this JSON file")
        p.add_argument("--plot", default=None, help="write a PNG figure to this file")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["converge"] + argv
    args = parser.parse_args(argv)
    _check_outputs(parser, args)
    if args.command in ("converge", "convergence"):
        if args.paths is not None and args.paths < 10:
            parser.error("--paths must be at least 10")
        if args.paths is not None and args.problem not in SDE_PROBLEMS:
            parser.error(f"--paths is for SDE problems; {args.problem!r} is an ODE problem ({ODE_POINTS} "
                         f"starting points, drawn from --seed)")
        if args.method is not None and args.method not in methods_for(args.problem):
            parser.error(f"method {args.method!r} is not studied on {args.problem!r}; "
                         f"choose from {sorted(methods_for(args.problem))}")
        why = check_kind(args.problem, args.method, args.kind)
        if why:
            parser.error(why)
        return _converge(args)
    return _bench(args)


#: the largest --seed: the runs seed torch generators with the seed plus small offsets (int64)
SEED_MAX = 2 ** 63 - 1 - 16


def _check_outputs(parser, args):
    """The device and the output files, before any work: a run does not end in a traceback after minutes."""
    try:
        dev = torch.device(args.device)
    except (RuntimeError, TypeError):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no CUDA device")
    if not 0 <= args.seed <= SEED_MAX:  # (2**64 aliased seed 0 on the Brownian streams; larger ones overflowed
        # torch's generators after part of the run)
        parser.error(f"--seed must be an integer in [0, {SEED_MAX}], got {args.seed}")
    if args.plot is not None:  # the name the figure will be written to, checked below like --json
        try:
            fmt = figure_format(args.plot)
        except ValueError as e:
            parser.error(f"--plot {args.plot}: {e}")
        if not os.path.splitext(args.plot)[1]:
            args.plot = f"{args.plot}.{fmt}"
    for name in ("json", "plot"):
        path = getattr(args, name)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            parser.error(f"--{name} {path}: the folder {folder} does not exist")
        if os.path.isdir(path):
            parser.error(f"--{name} {path}: is a folder; give a file name")
        if not os.access(path if os.path.exists(path) else folder, os.W_OK):
            parser.error(f"--{name} {path}: not writable")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
