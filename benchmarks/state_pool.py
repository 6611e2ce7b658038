"""The step loops with and without their state pool (:class:`flowsde.solvers.fixed.StatePool`: every update
written into a preallocated buffer, ``out=``), measured in one run, rounds interleaved.

``python benchmarks/state_pool.py [--device cpu|cuda] [--rounds 11] [--sizes 1024 1048576 ...]``

A field that costs next to nothing (``-x``) isolates the loop: what the pool saves is the allocation of each
new state (on the CPU a fresh large block is page-faulted in; on a GPU the caching allocator's host time),
what it costs is its own bookkeeping per update (~2 µs of host time). "without" replaces the pool's ``take``
by one that always declines, so the loops allocate exactly as they did before the pool existed. Prints the
median milliseconds of a 50-step ``flowsde.sample`` per method and size, and the ratio without / with.
"""
import argparse
import statistics
import time

import torch

import flowsde
from flowsde.solvers import fixed


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def one(n, method, device, steps=50):
    x = torch.randn(max(1, n // 4), 4, device=device)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        flowsde.sample(lambda y, t: -y, x, method=method, steps=steps, backend="torch")
        _sync(device)
        return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1 << 10, 1 << 16, 1 << 20, 1 << 22])
    ap.add_argument("--methods", nargs="+", default=["euler", "heun", "ddim"])
    args = ap.parse_args(argv)
    take = fixed.StatePool.take
    declined = lambda self, *parts: None  # noqa: E731
    rows = []
    try:
        for n in args.sizes:
            for method in args.methods:
                times = {True: [], False: []}
                one(n, method, args.device)  # warm-up
                for _ in range(args.rounds):
                    for pooled in (True, False):
                        fixed.StatePool.take = take if pooled else declined
                        times[pooled].append(one(n, method, args.device))
                fixed.StatePool.take = take
                on, off = statistics.median(times[True]), statistics.median(times[False])
                rows.append((n, method, on, off))
                print(f"{n:>9,d} elements  {method:6s}  with the pool {on * 1e3:8.2f} ms   without {off * 1e3:8.2f} ms"
                      f"   without/with {off / on:5.2f}", flush=True)
    finally:
        fixed.StatePool.take = take
    return rows


if __name__ == "__main__":
    main()
