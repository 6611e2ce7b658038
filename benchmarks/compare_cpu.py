"""One-run CPU comparison of flowsde with its peers; prints a markdown table of medians and ratios.

    python benchmarks/compare_cpu.py [--rounds 9] [--threads 2]

Each round runs every contender once, in rotating order, so slow drifts of a shared machine hit all of
them alike; the table gives each contender's median time and the median over rounds of its time divided
by flowsde's in the same round (> 1: flowsde is faster).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402


def rounds_of(contenders, rounds):
    names = list(contenders)
    times = {n: [] for n in names}
    for fn in contenders.values():  # warm-up
        fn()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            a = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - a)
    return times


def table(title, times, base="flowsde"):
    lines = [f"### {title}", "", "| contender | median time (ms) | median ratio to flowsde |", "|---|---:|---:|"]
    for n, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times[base]))
        lines.append(f"| {n} | {statistics.median(ts) * 1e3:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", default="16,32,64", help="MLP widths for the RK4 comparison")
    ap.add_argument("--only", choices=["ou", "rk4", "dopri5", "adjoint"], help="run one section")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"flowsde CPU comparison: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.rounds} rounds, {time.strftime('%Y-%m-%d')}\n")

    if args.only in (None, "ou"):
        ou_section(args)
    if args.only in (None, "rk4"):
        rk4_section(args)
    if args.only in (None, "dopri5"):
        dopri5_section(args)
    if args.only in (None, "adjoint"):
        adjoint_section(args)


def adjoint_section(args):
    field, y0, t = peers.adjoint_ode_problem()
    res = rounds_of({
        "flowsde": lambda: peers.adjoint_ode(peers.flowsde, field, y0, t),
        "torchdiffeq": lambda: peers.adjoint_ode(peers.torchdiffeq, field, y0, t),
        "flowsde, seminorm": lambda: peers.adjoint_ode(peers.flowsde, field, y0, t,
                                                      adjoint_options=dict(norm="seminorm")),
        "torchdiffeq, seminorm": lambda: peers.adjoint_ode(peers.torchdiffeq, field, y0, t,
                                                          adjoint_options=dict(norm="seminorm")),
    }, args.rounds)
    print(table("odeint_adjoint forward + backward (dopri5, rtol = atol = 1e-5, the same steps), MLP 2-32-32-2, "
                "B=1024, 5 outputs", res) + "\n")
    for sde_type, method, methods in (("stratonovich", None, "Heun forward, midpoint backward"),
                                      ("ito", None, "Euler forward, Milstein backward"),
                                      ("stratonovich", "reversible_heun", "reversible Heun, run backwards exactly")):
        sde, y0, ts = peers.adjoint_sde_problem(sde_type=sde_type)
        res = rounds_of({
            "flowsde": lambda: peers.adjoint_sde(peers.flowsde, sde, y0, ts, method=method),
            "torchsde": lambda: peers.adjoint_sde(peers.torchsde, sde, y0, ts, method=method),
        }, args.rounds)
        print(table(f"sdeint_adjoint forward + backward ({sde_type}, {methods}, the same BrownianInterval and "
                    f"steps), MLP drift 2-32-2, B=256, dt=0.02", res) + "\n")


def dopri5_section(args):
    field = peers.MLPField(width=64).eval()
    y0 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.0, 1.0, 11)
    res = rounds_of({
        "flowsde": lambda: peers.dopri5_flowsde(field, y0, t),
        "torchdiffeq": lambda: peers.dopri5_torchdiffeq(field, y0, t),
    }, args.rounds)
    print(table("dopri5 (rtol = atol = 1e-5, the same steps), MLP 2-64-64-2, B=4096, 11 outputs", res) + "\n")
    res = rounds_of({
        "flowsde": lambda: peers.dopri5_flowsde(peers.linear_field, y0, t, 1e-7),
        "torchdiffeq": lambda: peers.dopri5_torchdiffeq(peers.linear_field, y0, t, 1e-7),
    }, args.rounds)
    print(table("dopri5 solver overhead alone (field: -y), rtol = atol = 1e-7", res) + "\n")
    res = rounds_of({
        "flowsde": lambda: peers.dopri5_flowsde(field, y0, t, 1e-9, "dopri8"),
        "torchdiffeq": lambda: peers.dopri5_torchdiffeq(field, y0, t, 1e-9, "dopri8"),
    }, args.rounds)
    print(table("dopri8 (rtol = atol = 1e-9, the same steps), MLP 2-64-64-2, B=4096, 11 outputs", res))


def ou_section(args):
    p = peers.ou_problem()
    ou = rounds_of({
        "flowsde": lambda: peers.ou_flowsde(*p),
        "hand loop (sde.f, sde.g)": lambda: peers.ou_hand_loop_generic(*p),
        "hand loop (inlined)": lambda: peers.ou_hand_loop(*p),
        "torchsde": lambda: peers.ou_torchsde(*p),
    }, args.rounds)
    print(table("OU Euler–Maruyama, B=10,000 paths, N=1,000 steps, float32", ou) + "\n")


def rk4_section(args):
    for w in [int(x) for x in args.widths.split(",")]:
        field, y0, t = peers.mlp_problem()
        field = peers.MLPField(width=w).eval()
        mlp = rounds_of({
            "flowsde": lambda: peers.mlp_flowsde(field, y0, t),
            "torchdiffeq": lambda: peers.mlp_torchdiffeq(field, y0, t),
            "the 200 field evaluations alone": lambda: peers.mlp_field_alone(field, y0, t),
        }, args.rounds)
        print(table(f"RK4 on an MLP field (2-{w}-{w}-2, SiLU), B=4096, 50 steps, float32", mlp))
        ceiling = statistics.median(a / b for a, b in zip(mlp["torchdiffeq"], mlp["the 200 field evaluations alone"]))
        print(f"\nCeiling of any solver's speed-up over torchdiffeq here (its time / the evaluations alone): "
              f"{ceiling:.2f}×\n")
    field, y0, t = peers.mlp_problem()
    tiny = rounds_of({
        "flowsde": lambda: peers.flowsde.odeint(peers.linear_field, y0, t, method="rk4"),
        "torchdiffeq": lambda: peers.torchdiffeq.odeint(peers.linear_field, y0, t, method="rk4"),
    }, args.rounds)
    print(table("RK4 solver overhead alone (field: -y), B=4096, 50 steps", tiny) + "\n")


if __name__ == "__main__":
    main()
