"""Host time of one fused step on the triton backend, on any machine (no GPU needed):

    python benchmarks/host_overhead.py [--calls 5000] [--rounds 7]

Without a captured CUDA graph a step loop is bound by the host whenever the GPU finishes a step faster
than the host can enqueue the next one (states up to a few million elements): then what the Python
side of a launch costs *is* the step time. This script measures that side — flowsde's dispatch
(:class:`flowsde.kernels.TritonOps`), the wrapper that prepares the kernel's arguments
(:func:`flowsde.kernels.combine.combine`) and the fast launch's specialisation key
(:func:`flowsde.kernels.combine._launch_here`) — with only the final call of the compiled kernel
replaced by a no-op, and CUDA's current device faked: the same Python runs as on a GPU machine. For
scale it times the same calls through combine's general path (``FAST_PATH`` off: what every call cost
before the common case got its short path) and the eager PyTorch ops of the same update on tiny CPU
tensors (their dispatch, what the torch backend costs per op). Medians of interleaved rounds, µs per call; CPU figures are noisy: compare
ratios from one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # (nothing is interpreted: the kernel call is stubbed)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from flowsde import kernels  # noqa: E402
from flowsde.kernels import PhiloxNoise  # noqa: E402


class _NoKernel:
    """A compiled kernel that does nothing: ``kernel[grid](*args)``."""

    def __getitem__(self, grid):
        return lambda *args: None


class _Compiled(dict):
    """flowsde's cache of compiled kernels, where every key (hashed, as a real lookup hashes it) finds the
    no-op kernel."""

    def get(self, key, default=None):
        hash(key)
        return _NoKernel()


def stub_launches():
    """Route every launch through the CUDA fast path (on CPU tensors, as device 0) with a no-op compiled
    kernel: everything flowsde does on the host runs, only the kernel does not."""
    from flowsde.kernels import combine as C
    C.FAST_LAUNCH = True
    C._COMPILED = _Compiled()
    real = C._launch_here
    C._launch_here = lambda kernel, n, args, consts, nw, cuda, index=None, sig=None, **o: real(
        kernel, n, args, consts, nw, True, 0, sig, **o)


def cases(n=4096):
    g = torch.Generator().manual_seed(0)
    x, k1, k2, k3, k4, gg = (torch.randn(n, 2, generator=g) for _ in range(6))
    tri = kernels.ops("triton", "cpu")
    h = 0.01
    fused = {
        "Euler update (2 terms)": lambda: tri.combine([(1.0, x), (h, k1)]),
        "RK4 update (5 terms)": lambda: tri.lincomb(x, [(h / 8, k1), (3 * h / 8, k2), (3 * h / 8, k3), (h / 8, k4)]),
        "EM, in-kernel noise": lambda: tri.sde_update(x, [(h, k1)], [(h ** 0.5, gg)], PhiloxNoise(3), "diagonal"),
        "DDIM + CFG + noise": lambda: tri.combine([(0.9, x), (0.3, k1), (-0.1, k2)], [(0.2, None)], PhiloxNoise(5)),
    }
    t1, t2, t3, t4, tg, z = (v[:4] for v in (k1, k2, k3, k4, gg, x))
    y = x[:4]
    eager = {  # the same updates as PyTorch ops on 8-element tensors: their dispatch alone
        "Euler update (2 terms)": lambda: torch.add(y, t1, alpha=h),
        "RK4 update (5 terms)": lambda: torch.add(y, t1, alpha=h / 8).add_(t2, alpha=3 * h / 8).add_(
            t3, alpha=3 * h / 8).add_(t4, alpha=h / 8),
        "EM, in-kernel noise": lambda: torch.add(y, t1, alpha=h).addcmul_(tg, torch.randn_like(y), value=h ** 0.5),
        "DDIM + CFG + noise": lambda: (0.9 * y).add_(t1, alpha=0.3).add_(t2, alpha=-0.1).add_(torch.randn_like(y),
                                                                                          alpha=0.2),
    }
    return fused, eager


def per_call(fn, calls):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    stub_launches()
    fused, eager = cases()
    for fn in list(fused.values()) + list(eager.values()):  # warm: first launches register the kernels
        for _ in range(50):
            fn()
    from flowsde.kernels import combine as C
    times = {name: ([], [], []) for name in fused}
    for _ in range(args.rounds):  # interleaved: a slow spell of the host hits every column
        for name in fused:
            times[name][0].append(per_call(fused[name], args.calls))
            C.FAST_PATH = False  # the same calls through combine's general path
            times[name][1].append(per_call(fused[name], args.calls))
            C.FAST_PATH = True
            times[name][2].append(per_call(eager[name], args.calls))
    print("| update | fused launch, host µs | general path | eager PyTorch ops | fused / eager |")
    print("|---|---|---|---|---|")
    rows = []
    for name, cols in times.items():
        fa, fg, fb = (statistics.median(c) for c in cols)
        rows.append((name, fa, fg, fb))
        print(f"| {name} | {fa:.1f} | {fg:.1f} | {fb:.1f} | {fa / fb:.2f} |")
    return rows


if __name__ == "__main__":
    main()
