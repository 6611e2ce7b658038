"""Adaptive SDE solves, flowsde against torchsde's adaptive mode, side by side, then flowsde's shared step
against its step size per sample:

    python benchmarks/adaptive_sde.py [--paths 256] [--only torchsde|per_sample]

GBM dX = 0.5 X dt + 0.5 X dW on [0, 1] from X0 = 1, both libraries on the same virtual Brownian tree
(so both solve on the same path), error = RMS over paths of X(1) - the exact solution on that path,
NFE = drift evaluations, time = median of 3 runs. Euler–Maruyama (Itô), Milstein (Itô) and Heun
(Stratonovich, exact solution x0 exp(mu t + sigma W)).

Per sample: ``PerSampleGBM`` (the volatility rides in the state), one sample in eight with sigma 2, the rest
0.2; Milstein; the shared step against ``per_sample=True`` at several tolerances; mean evaluations per
sample, rows passed to the drift in all, RMS relative error of X(1) over all / calm / volatile samples.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torchsde

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flowsde  # noqa: E402
from flowsde.brownian import VirtualBrownianTree  # noqa: E402
from flowsde.problems import GeometricBrownianMotion, PerSampleGBM  # noqa: E402


class Counted(GeometricBrownianMotion):
    calls = 0

    def f(self, t, y):
        Counted.calls += 1
        return super().f(t, y)


def run(lib, method, sde_type, rtol, paths, seed=3):
    sde = Counted(mu=0.5, sigma=0.5, sde_type=sde_type)
    y0 = torch.ones(paths, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    solve = flowsde.sdeint if lib == "flowsde" else torchsde.sdeint
    times = []
    for _ in range(3):
        bm = VirtualBrownianTree(0.0, 1.0, (paths, 1), seed=seed, dtype=torch.float64)
        Counted.calls = 0
        s = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ys = solve(sde, y0, ts, bm=bm, dt=0.1, adaptive=True, rtol=rtol, atol=rtol, dt_min=1e-7, method=method)
        times.append(time.perf_counter() - s)
    err = float((ys[-1].detach() - sde.exact(y0, 1.0, bm(0.0, 1.0))).pow(2).mean().sqrt())
    return err, Counted.calls, sorted(times)[1]


def per_sample_rows(paths, seed=0):
    sig = torch.full((paths,), 0.2, dtype=torch.float64)
    sig[::8] = 2.0
    sde, y0 = PerSampleGBM(), PerSampleGBM.initial(torch.ones(paths, dtype=torch.float64), sig)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    rows = []
    for per_sample, rtol in ((False, 1e-3), (True, 1e-3), (True, 3e-4), (True, 1e-4)):
        times = []
        for _ in range(3):
            bm = VirtualBrownianTree(0.0, 1.0, (paths, 1), seed=seed, dtype=torch.float64)
            s = time.perf_counter()
            ys, st = flowsde.sdeint(sde, y0, ts, bm=bm, method="milstein", dt=0.05, adaptive=True, rtol=rtol,
                                    atol=rtol, dt_min=1e-6, options=dict(return_stats=True, per_sample=per_sample))
            times.append(time.perf_counter() - s)
        exact = sde.exact(y0, 1.0, bm.value(1.0))
        rel = ((ys[-1, :, 0] - exact) / exact).pow(2)
        nfe = float(st["nfe"].double().mean()) if per_sample else st["nfe"]
        n_rows = st["rows"] if per_sample else st["nfe"] * paths
        rows.append((("per sample" if per_sample else "shared"), rtol, nfe, n_rows, float(rel.mean().sqrt()),
                     float(rel[sig < 1].mean().sqrt()), float(rel[sig > 1].mean().sqrt()), sorted(times)[1]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=256)
    ap.add_argument("--only", choices=("torchsde", "per_sample"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.only != "per_sample":
        print(f"GBM, {args.paths} paths, same Brownian tree for both, {time.strftime('%Y-%m-%d')}\n")
        print("| method | rtol = atol | flowsde error | torchsde error | flowsde NFE | torchsde NFE | flowsde ms | "
              "torchsde ms |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for method, sde_type in (("euler", "ito"), ("milstein", "ito"), ("heun", "stratonovich")):
            for rtol in (1e-2, 1e-3, 1e-4):
                ef, nf, tf = run("flowsde", method, sde_type, rtol, args.paths)
                et, nt, tt = run("torchsde", method, sde_type, rtol, args.paths)
                print(f"| {method} | {rtol:g} | {ef:.2e} | {et:.2e} | {nf} | {nt} | {1e3 * tf:.0f} | {1e3 * tt:.0f} |")
    if args.only != "torchsde":
        print(f"\nPerSampleGBM, Milstein, {args.paths} paths (one in eight with sigma 2, the rest 0.2), "
              f"{time.strftime('%Y-%m-%d')}\n")
        print("| steps | rtol = atol | NFE per sample | rows evaluated | RMS rel. error | calm | volatile | ms |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|")
        for mode, rtol, nfe, n_rows, e_all, e_calm, e_wild, t in per_sample_rows(args.paths):
            print(f"| {mode} | {rtol:g} | {nfe:.1f} | {n_rows} | {e_all:.2e} | {e_calm:.2e} | {e_wild:.2e} | "
                  f"{1e3 * t:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
