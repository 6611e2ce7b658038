"""Where does the host time of one fused-kernel launch go? (run on a CUDA machine)

Times, per call and without synchronising: flowsde's combine wrapper with the launch stubbed out; a
trivial Triton kernel taking 1 and 11 pointer arguments (Triton's launch path and a cached compiled
kernel called directly); torch.add for scale.
"""
import time

import torch
import triton
import triton.language as tl

from flowsde import kernels
from flowsde.kernels import combine as C


@triton.jit
def _one(o, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(o + i, 1.0, mask=i < n)


@triton.jit
def _eleven(o, a, b, c, d, e, f, g, h, k, m, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(o + i, 1.0, mask=i < n)


def per_call(fn, reps=500):
    fn()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(reps):
        fn()
    t = (time.perf_counter() - s) / reps
    torch.cuda.synchronize()
    return 1e6 * t


def main():
    y, k = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    tri = kernels.ops("triton", "cuda")
    rows = [("torch.add", per_call(lambda: torch.add(y, k, alpha=0.1))),
            ("flowsde combine, full", per_call(lambda: tri.combine([(1.0, y), (0.1, k)])))]
    real = C._launch
    C._launch = lambda *a, **kw: None
    rows.append(("flowsde combine, launch stubbed out", per_call(lambda: tri.combine([(1.0, y), (0.1, k)]))))
    C._launch = real
    ptrs = [torch.empty(64, device="cuda") for _ in range(11)]
    rows.append(("triton kernel, 1 pointer, kernel[grid]", per_call(lambda: _one[(1,)](ptrs[0], 64, B=64))))
    rows.append(("triton kernel, 11 pointers, kernel[grid]", per_call(lambda: _eleven[(1,)](*ptrs, 64, B=64))))
    c1 = _one[(1,)](ptrs[0], 64, B=64)
    c11 = _eleven[(1,)](*ptrs, 64, B=64)
    rows.append(("triton kernel, 1 pointer, compiled[grid]", per_call(lambda: c1[(1, 1, 1)](ptrs[0], 64, 64))))
    rows.append(("triton kernel, 11 pointers, compiled[grid]", per_call(lambda: c11[(1, 1, 1)](*ptrs, 64, 64))))
    run1 = c1[(1, 1, 1)]
    rows.append(("triton kernel, 1 pointer, runner reused", per_call(lambda: run1(ptrs[0], 64, 64))))
    for name, us in rows:
        print(f"| {name} | {us:.1f} µs |")


if __name__ == "__main__":
    main()
