"""GPU benchmark of the fused kernels (run on a CUDA machine):

    python benchmarks/gpu_kernels.py [--quick]

1. checks every kernel against the PyTorch reference in float64;
2. for each step kernel at 16M elements: achieved bandwidth as a fraction of a measured device-to-device
   copy, and the speedup over eager PyTorch and over torch.compile of the same update, all in device time
   (L2 flushed, the host's enqueue time kept out: :func:`gpu_time`), plus the bandwidth a loop of
   back-to-back calls sees; and under autograd, forward + backward of the RK4 and EM updates (the fused
   combine with its adjoint) against the PyTorch ops autograd records;
3. end to end: flowsde.sample (small MLP, 2-D, B=65,536, 100 steps, Euler and RK4, with and without
   CUDA-graph capture) and flowsde.odeint over a hand-written loop and over torchdiffeq;
4. the whole-trajectory OU kernel (B=10^6, N=1000) over torchsde on the GPU;
5. adaptive Euler–Maruyama on the device-side Brownian tree against torchsde's adaptive mode, and one
   tree query (kernel against the PyTorch specification).
Prints a markdown report with the device name and date (paste it into benchmarks/RESULTS.md).

``check_kernels(device)`` (part 1), ``bandwidth(device=...)`` and ``backward(device=...)`` (part 2),
``launch_overhead``, ``end_to_end``, ``ou_trajectory`` and ``adaptive_sde`` (``device=...``, parts 3–5) also
run on CPU tensors in Triton's interpreter, timed with the host's clock (the CUDA-graph rows NaN there):
the test suite (tests/test_triton.py, tests/test_gpu_script.py) calls them with small sizes, so the
script's checking and measuring code is itself tested. ``--json`` is rewritten after each section, so a
run cut short by a time limit keeps what it measured (``"complete": false``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():  # before triton is imported: its library functions are made per mode
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flowsde import kernels  # noqa: E402
from flowsde.kernels import PhiloxNoise, reference  # noqa: E402
from flowsde.kernels.philox import philox_randn  # noqa: E402


def check_kernels(device="cuda", n=1 << 16) -> list:
    """Every kernel against the reference in float64; returns ``[(name, max abs error)]`` and raises if
    one is off by more than 1e-12 (5e-6 for those that draw float32 noise)."""
    tri = kernels.ops("triton", device)
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    y, k1, k2, k3, k4, gg, dw = (r(n) for _ in range(7))
    rows = []
    cases = {
        "rk4 update (5 terms)": (lambda o: o.lincomb(y, [(0.1, k1), (0.3, k2), (0.3, k3), (0.1, k4)]), 1e-12),
        "euler-maruyama, given dW": (lambda o: o.sde_update(y, [(0.01, k1)], [(0.1, gg)], dw, "diagonal"), 1e-12),
        "stochastic heun, given dW": (lambda o: o.sde_update(y, [(0.005, k1), (0.005, k2)],
                                                             [(0.05, gg), (0.05, k3)], dw, "diagonal"), 1e-12),
        "euler-maruyama, in-kernel noise": (lambda o: o.sde_update(y, [(0.01, k1)], [(0.1, gg)], PhiloxNoise(3),
                                                                   "diagonal"), 5e-6),
        "ddim + cfg + eta noise": (lambda o: o.combine([(0.9, y), (-0.2, k1), (0.5, k2)], [(0.1, None)],
                                                       PhiloxNoise(4)), 5e-6),
    }
    torch_ops = kernels.ops("torch")
    for name, (fn, tol) in cases.items():
        err = float((fn(tri) - fn(torch_ops)).abs().max())
        rows.append((name, err))
        if err > tol:
            raise AssertionError(f"{name}: max abs error {err:.3e} > {tol}")
    B, d, m = max(2, n // 64), 8, 4  # (batch, d) states: general noise a (batch, d, m) G, scalar noise (batch, 1)
    yb, fb = y[:B * d].reshape(B, d), k1[:B * d].reshape(B, d)
    G = torch.cat([k2, k3, k4, gg])[:B * d * m].reshape(B, d, m)  # (4n elements: enough for B d m = n / 2)
    dwm, gs, dws = dw[:B * m].reshape(B, m), gg[:B * d].reshape(B, d, 1), dw[:B].reshape(B, 1)
    matrix = {  # the matrix-noise kernel (additive / general noise) and scalar noise, given dW and drawn
        "general noise (matrix kernel), given dW": (
            lambda o: o.sde_update(yb, [(0.01, fb)], [(0.1, G)], dwm, "general"),
            lambda: reference.sde_update(yb, [(0.01, fb)], [(0.1, G)], dwm, "general"), 1e-12),
        "general noise (matrix kernel), in-kernel noise": (
            lambda o: o.sde_update(yb, [(0.01, fb)], [(0.1, G)], PhiloxNoise(5), "general"),
            lambda: torch_ops.sde_update(yb, [(0.01, fb)], [(0.1, G)], PhiloxNoise(5), "general"), 5e-6),
        "scalar noise, given dW": (
            lambda o: o.sde_update(yb, [(0.01, fb)], [(0.1, gs)], dws, "scalar"),
            lambda: reference.sde_update(yb, [(0.01, fb)], [(0.1, gs)], dws, "scalar"), 1e-12),
        "scalar noise, in-kernel noise": (
            lambda o: o.sde_update(yb, [(0.01, fb)], [(0.1, gs)], PhiloxNoise(6), "scalar"),
            lambda: torch_ops.sde_update(yb, [(0.01, fb)], [(0.1, gs)], PhiloxNoise(6), "scalar"), 5e-6),
        "noise draw (normal, float64)": (
            lambda o: o.normal(7, (B, d), torch.float64, device),
            lambda: philox_randn(7, B * d, device).to(torch.float64).reshape(B, d), 5e-6),
    }
    for name, (fn, want, tol) in matrix.items():
        got, ref = fn(tri), want()
        if got.shape != ref.shape or got.dtype != torch.float64:
            raise AssertionError(f"{name}: {got.dtype} {tuple(got.shape)}, want float64 {tuple(ref.shape)}")
        err = float((got - ref).abs().max())
        rows.append((name, err))
        if err > tol:
            raise AssertionError(f"{name}: max abs error {err:.3e} > {tol}")
    B = max(2, n // 64)
    y2, e2 = y[:B * 64].reshape(B, 64), k1[:B * 64].reshape(B, 64) * 1e-3
    err = float((tri.error_norm(y2, y2 + e2, e2, 1e-3, 1e-6) - reference.error_norm(y2, y2 + e2, e2, 1e-3, 1e-6)
                 ).abs().max())
    rows.append(("per-sample error norm", err))
    if err > 1e-12:
        raise AssertionError(f"error norm: {err}")
    from flowsde.solvers.linear import solve_linear_sde
    x0 = torch.ones(min(n, 4096), dtype=torch.float64, device=device)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    a = solve_linear_sde(x0, ts, 1 / 32, a=-1.0, d=0.5, seed=1, backend="triton")
    b = solve_linear_sde(x0, ts, 1 / 32, a=-1.0, d=0.5, seed=1, backend="torch")
    err = float((a - b).abs().max())
    rows.append(("whole-trajectory OU", err))
    if err > 5e-6:
        raise AssertionError(f"trajectory: {err}")
    from flowsde.brownian import VirtualBrownianTree
    B = max(2, min(n, 1 << 14) // 4)
    bm = VirtualBrownianTree(0.0, 1.0, (B, 4), seed=9, dtype=torch.float64, device=device)
    t = torch.rand(B, generator=g, dtype=torch.float64).to(device)
    err = float((bm.at(t, ops=tri) - bm.at(t, ops=torch_ops)).abs().max())
    rows.append(("virtual Brownian tree query", err))
    if err > 1e-12:
        raise AssertionError(f"tree: {err}")
    return rows


def _cuda(device) -> bool:
    return str(device).startswith("cuda")


def _sync(device):
    """Wait for the device's queue (CUDA); nothing to wait for on a CPU device."""
    if _cuda(device):
        torch.cuda.synchronize()


def _time(fn, reps=20, calls=1, device="cuda"):
    """Median wall seconds per call of ``fn`` (host and device, as a user's loop sees them): ``reps`` runs
    of ``calls`` back-to-back calls each (no synchronisation between them), timed with CUDA events after
    one warm-up call. Used where host time is part of the cost (end to end, loops of launches). On a CPU
    device (the interpreter, in the test suite) the same runs are timed with the host's clock."""
    fn()
    if not _cuda(device):
        ts = []
        for _ in range(reps):
            s = time.perf_counter()
            for _ in range(calls):
                fn()
            ts.append((time.perf_counter() - s) / calls)
        ts.sort()
        return ts[len(ts) // 2]
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / calls)
    ts.sort()
    return ts[len(ts) // 2]


_FLUSH = {}


def gpu_time(fn, reps=20, device="cuda", flush_bytes=256 << 20):
    """Median device seconds of one call of ``fn``, the host's enqueue time excluded.

    Timing a single call between two events counts the host's enqueue time whenever the queue is empty
    when the start event is recorded: the GPU passes the start event at once and then waits for the host
    to launch the kernel (50–70 µs for a Python-wrapped Triton launch, against ~110 µs for the kernel
    itself at 16M float32 elements — the bias that put the first runs of this script at 70–78 % of copy
    bandwidth). Here each sample first flushes the L2 cache (zeroing ``flush_bytes``), then holds the
    stream with a sleep kernel while the host enqueues [start event, ``fn``, end event]. If the start
    event has already completed when the end event has been enqueued, the sleep was too short for this
    host: the sample is discarded and the sleep doubled. Every contender (copy, eager, torch.compile,
    fused) is timed this way. On a CPU device (the interpreter, in the test suite) it is the median wall
    time."""
    fn()
    if not _cuda(device):
        ts = []
        for _ in range(reps):
            s = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - s)
        ts.sort()
        return ts[len(ts) // 2]
    if (device, flush_bytes) not in _FLUSH:
        _FLUSH[(device, flush_bytes)] = torch.empty(flush_bytes // 4, dtype=torch.float32, device=device)
    flush = _FLUSH[(device, flush_bytes)]
    torch.cuda.synchronize()
    cycles, ts, retakes = 1 << 21, [], 0
    while len(ts) < reps:
        flush.zero_()
        torch.cuda._sleep(cycles)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        early = a.query()  # the GPU reached the start before the host had enqueued everything
        b.synchronize()
        if early and retakes < 8:
            cycles, retakes = cycles * 2, retakes + 1
            continue
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def bandwidth(n=1 << 24, reps=20, device="cuda", compile=True) -> tuple:
    """Per step kernel: ``(name, GB/s, fraction of copy bandwidth, speedup over eager, over torch.compile,
    GB/s in a loop of back-to-back calls)`` and the copy bandwidth in GB/s, all device times from
    :func:`gpu_time`. Bytes are the full-size tensors each kernel must read and write once (``n`` float32
    elements each; general noise reads its ``(batch, d, m)`` matrix, ``m`` of them). The SDE-extension
    update is the DDIM row's kernel with other coefficients. The updates without drawn noise are first
    checked equal to their eager forms. On a CPU device (the test suite, through the interpreter) it runs
    the same code with wall times, no torch.compile and no loop column."""
    cuda = _cuda(device)
    tri = kernels.ops("triton", device)
    g_ = torch.Generator(device="cpu").manual_seed(1)
    x = [torch.randn(n, generator=g_).to(device) for _ in range(6)]
    dst = torch.empty_like(x[0])
    end = time.perf_counter() + (1.0 if cuda else 0.0)  # bring the clocks up before the first measurement
    while time.perf_counter() < end:
        dst.copy_(x[0])
        torch.cuda.synchronize()
    t_copy = gpu_time(lambda: dst.copy_(x[0]), reps, device)
    copy_bw = 2 * n * 4 / t_copy
    y, k1, k2, k3, k4, g = x

    def eager_rk4():
        return y + 0.1 * k1 + 0.3 * k2 + 0.3 * k3 + 0.1 * k4

    def eager_em():
        return y + 0.01 * k1 + 0.1 * g * torch.randn_like(y)

    def eager_ddim():
        return 0.9 * y + 0.5 * (k1 + 2.5 * (k2 - k1)) + 0.1 * torch.randn_like(y)

    def eager_heun():
        return y + 0.005 * k1 + 0.005 * k2 + (0.05 * g + 0.05 * k3) * k4

    d, m = 8, 4  # (batch, d) states: scalar noise draws one normal per row; general noise a (batch, d, m) G
    y2, f2, g2 = y.view(-1, d), k1.view(-1, d), g.view(-1, d, 1)
    G = torch.randn(n * m, generator=g_).to(device).view(-1, d, m)

    def eager_scalar():
        return y2 + 0.01 * f2 + 0.1 * g2.squeeze(-1) * torch.randn(y2.shape[0], 1, device=device)

    def eager_general():
        dw = torch.randn(y2.shape[0], m, 1, device=device)
        return y2 + 0.01 * f2 + 0.1 * torch.bmm(G, dw).squeeze(-1)

    def eager_norm():
        return reference.error_norm(y2, f2, k2.view(-1, d), 1e-3, 1e-6)

    cases = [  # (name, full-size tensors moved, fused, eager)
        ("rk4 update", 6, lambda: tri.lincomb(y, [(0.1, k1), (0.3, k2), (0.3, k3), (0.1, k4)]), eager_rk4),
        ("euler-maruyama (noise in kernel)", 4, lambda: tri.sde_update(y, [(0.01, k1)], [(0.1, g)], PhiloxNoise(1),
                                                                        "diagonal"), eager_em),
        ("ddim + cfg (noise in kernel)", 4, lambda: tri.combine([(0.9, y), (-0.75, k1), (1.25, k2)], [(0.1, None)],
                                                                 PhiloxNoise(2)), eager_ddim),
        ("stochastic heun (given dW)", 7, lambda: tri.sde_update(y, [(0.005, k1), (0.005, k2)],
                                                                 [(0.05, g), (0.05, k3)], k4, "diagonal"), eager_heun),
        ("euler-maruyama, scalar noise (in kernel)", 4, lambda: tri.sde_update(y2, [(0.01, f2)], [(0.1, g2)],
                                                                                PhiloxNoise(3), "scalar"), eager_scalar),
        ("euler-maruyama, general noise m=4 (in kernel)", 3 + m, lambda: tri.sde_update(
            y2, [(0.01, f2)], [(0.1, G)], PhiloxNoise(4), "general"), eager_general),
        ("per-sample error norm", 3, lambda: tri.error_norm(y2, f2, k2.view(-1, d), 1e-3, 1e-6), eager_norm),
    ]
    for name, _, fused, eager in cases:  # the updates without drawn noise equal their eager form
        if "in kernel" not in name:
            want = eager()
            err = float((fused() - want).abs().max()) / max(1.0, float(want.abs().max()))
            if err > 1e-5:
                raise AssertionError(f"{name}: fused and eager differ by {err:.2e} (relative)")
    rows = []
    for name, tensors, fused, eager in cases:
        t_f, t_e = gpu_time(fused, reps, device), gpu_time(eager, reps, device)
        t_c = float("nan")
        if compile:
            try:
                t_c = gpu_time(torch.compile(eager), reps, device)
            except Exception:  # pragma: no cover - depends on the machine
                pass
        loop_bw = tensors * n * 4 / _time(fused, 5, calls=20) if cuda else float("nan")
        bw = tensors * n * 4 / t_f
        rows.append((name, bw / 1e9, bw / copy_bw, t_e / t_f, t_c / t_f, loop_bw / 1e9))
    return rows, copy_bw / 1e9


def backward(n=1 << 24, reps=20, device="cuda") -> list:
    """Forward and backward of a step under autograd (training through the solver): the fused combine
    with its adjoint (``flowsde.kernels.autograd``) against the eager form (PyTorch ops, ``randn_like``
    noise) autograd records, ``[(name, fused s, eager s, eager / fused)]``, device times of
    :func:`gpu_time`. The fused gradients are first checked equal to the torch backend's (the same noise,
    through the mirror, to its float32 rounding)."""
    tri, ref = kernels.ops("triton", device), kernels.ops("torch", device)
    g_ = torch.Generator(device="cpu").manual_seed(2)
    y, k1, k2, k3, k4, g, w = (torch.randn(n, generator=g_).to(device).requires_grad_(True) for _ in range(7))
    w = w.detach()
    cases = [  # (name, inputs, the step on an op set, the eager form timed against it)
        ("rk4 update, forward + backward", [y, k1, k2, k3, k4],
         lambda o: o.lincomb(y, [(0.1, k1), (0.3, k2), (0.3, k3), (0.1, k4)]),
         lambda: y + 0.1 * k1 + 0.3 * k2 + 0.3 * k3 + 0.1 * k4),
        ("euler-maruyama (noise in kernel), forward + backward", [y, k1, g],
         lambda o: o.sde_update(y, [(0.01, k1)], [(0.1, g)], PhiloxNoise(5), "diagonal"),
         lambda: y + 0.01 * k1 + 0.1 * g * torch.randn_like(y)),
    ]
    rows = []
    for name, inputs, step, eager in cases:
        if type(step(tri).grad_fn).__name__ != "_FusedCombineBackward":  # else it would time the PyTorch ops
            raise AssertionError(f"{name}: the triton backend did not run the fused combine under autograd")

        def grads(out, inputs=inputs):
            return torch.autograd.grad(out, inputs, grad_outputs=w)
        for a, b in zip(grads(step(tri)), grads(step(ref))):  # the torch backend: the same noise (mirror)
            err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
            if err > 1e-5:
                raise AssertionError(f"{name}: fused and eager gradients differ by {err:.2e} (relative)")
        t_f = gpu_time(lambda step=step: grads(step(tri)), reps, device)
        t_e = gpu_time(lambda eager=eager: grads(eager()), reps, device)
        rows.append((name, t_f, t_e, t_e / t_f))
    return rows


def tune(n=1 << 24, reps=20) -> list:
    """Sweep the elementwise kernels' launch configuration (elements and warps per program) on the RK4
    update and the in-kernel-noise EM update: ``[(block, warps, rk4 GB/s, em GB/s)]``."""
    from flowsde.kernels import combine as C
    tri = kernels.ops("triton", "cuda")
    y, k1, k2, k3, k4, g = (torch.randn(n, device="cuda") for _ in range(6))
    saved = dict(C.CONFIG)
    rows = []
    try:
        for block in (512, 1024, 2048, 4096, 8192):
            for warps in (2, 4, 8, 16):
                if block // (32 * warps) < 1:
                    continue
                C.CONFIG.update(block=block, num_warps=warps)
                t_rk = gpu_time(lambda: tri.lincomb(y, [(0.1, k1), (0.3, k2), (0.3, k3), (0.1, k4)]), reps)
                t_em = gpu_time(lambda: tri.sde_update(y, [(0.01, k1)], [(0.1, g)], PhiloxNoise(1), "diagonal"),
                                reps)
                rows.append((block, warps, 6 * n * 4 / t_rk / 1e9, 4 * n * 4 / t_em / 1e9))
    finally:
        C.CONFIG.update(saved)
    return rows


def launch_overhead(reps=200, device="cuda") -> dict:
    """Host time to enqueue one small update (no synchronisation): the cost that graphs remove. On a CPU
    device the kernels run in the interpreter inside the call, so the figure is the whole call there."""
    tri = kernels.ops("triton", device)
    y, k = torch.randn(64, device=device), torch.randn(64, device=device)
    out = {}
    from flowsde.kernels import combine as C

    def slow():
        C.FAST_LAUNCH = False
        try:
            tri.combine([(1.0, y), (0.1, k)])
        finally:
            C.FAST_LAUNCH = True
    for name, fn in (("triton combine (2 terms)", lambda: tri.combine([(1.0, y), (0.1, k)])),
                     ("triton combine, Triton's own launch path", slow),
                     ("torch.add(y, k, alpha=0.1)", lambda: torch.add(y, k, alpha=0.1))):
        fn()
        _sync(device)
        s = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - s) / reps
        _sync(device)
    return out


def end_to_end(B=65536, steps=100, reps=10, device="cuda"):
    """``flowsde.sample`` (Euler and RK4 on a 2-64-64-2 MLP) with and without CUDA-graph capture, a
    hand-written loop and torchdiffeq's odeint on the same field: ``{name: seconds}``. Off CUDA (the test
    suite, on CPU tensors) the CUDA-graph rows are NaN: there is no graph to capture."""
    import torchdiffeq
    import flowsde
    from flowsde.problems import MLPVelocity
    dev = device
    model = MLPVelocity(width=64).to(dev).eval()
    x0 = torch.randn(B, 2, device=dev)
    grid = torch.linspace(0, 1, steps + 1, device=dev)
    out = {}

    def hand_euler():
        x = x0
        for k in range(steps):
            t = torch.full((B,), k / steps, device=dev)
            x = x + model(x, t) / steps
        return x

    def hand_rk4():  # torchdiffeq's rk4 is Kutta's 3/8 rule; the classic rule costs the same
        x, h = x0, 1.0 / steps
        for k in range(steps):
            t0 = torch.full((B,), k * h, device=dev)
            k1 = model(x, t0)
            k2 = model(x + h / 2 * k1, t0 + h / 2)
            k3 = model(x + h / 2 * k2, t0 + h / 2)
            k4 = model(x + h * k3, t0 + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    with torch.no_grad():
        for method, hand in (("euler", hand_euler), ("rk4", hand_rk4)):
            out[f"{method}: flowsde.sample, backend=triton"] = _time(
                lambda: flowsde.sample(model, x0, method=method, steps=steps, backend="triton"), reps, device=dev)
            out[f"{method}: flowsde.sample, backend=torch (auto at this size)"] = _time(
                lambda: flowsde.sample(model, x0, method=method, steps=steps, backend="torch"), reps, device=dev)
            out[f"{method}: flowsde.sample, cuda_graph=True (triton)"] = _time(
                lambda: flowsde.sample(model, x0, method=method, steps=steps, cuda_graph=True), reps,
                device=dev) if _cuda(dev) else float("nan")
            out[f"{method}: hand-written loop"] = _time(hand, reps, device=dev)
            out[f"{method}: torchdiffeq.odeint"] = _time(
                lambda: torchdiffeq.odeint(model.ode_field(), x0, grid, method=method)[-1], reps, device=dev)
            out[f"{method}: flowsde.odeint"] = _time(
                lambda: flowsde.odeint(model.ode_field(), x0, grid, method=method)[-1], reps, device=dev)
    return out


def ou_trajectory(B=1_000_000, N=1000, device="cuda"):
    """The whole-trajectory OU kernel (B paths, N Euler–Maruyama steps, float32) against torchsde's Euler
    on the same device: ``(seconds, torchsde seconds / these)``."""
    import torchsde
    from flowsde.problems import OrnsteinUhlenbeck
    from flowsde.solvers.linear import solve_linear_sde
    dev = device
    x0 = torch.ones(B, 1, device=dev)
    ts = torch.tensor([0.0, 1.0], device=dev)
    t_f = _time(lambda: solve_linear_sde(x0, ts, 1 / N, a=-1.0, d=0.5, seed=0, backend="triton"), 5, device=dev)
    sde = OrnsteinUhlenbeck(theta=1.0, sigma=0.5)
    t_s = _time(lambda: torchsde.sdeint(sde, x0, ts, dt=1 / N, method="euler"), 1, device=dev)
    return t_f, t_s / t_f


def adaptive_sde(B=65536, rtol=1e-3, device="cuda", reps=None):
    """Adaptive Euler–Maruyama on GBM (B paths, float32, the same tree for both): flowsde on the device
    (tree kernel, no host read per step; check every 8) against torchsde's adaptive mode, and one tree
    query (kernel against the PyTorch specification): ``{flowsde_s, torchsde_s, query_kernel_s,
    query_torch_s}``. ``reps``: timed runs of each (after a warm-up); ``None``, the GPU run's 3 of flowsde,
    1 of torchsde, 20 and 5 of the kernel and PyTorch queries."""
    import warnings

    import torchsde

    import flowsde
    from flowsde.brownian import VirtualBrownianTree
    from flowsde.problems import GeometricBrownianMotion
    dev = device
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    y0 = torch.ones(B, 1, device=dev)
    ts = torch.tensor([0.0, 1.0], device=dev)
    kw = dict(dt=0.1, adaptive=True, rtol=rtol, atol=rtol, dt_min=1e-6, method="euler")

    def run(solve, backend=None):
        bm = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=3, device=dev)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend:
                return solve(sde, y0, ts, bm=bm, options=dict(backend=backend), **kw)
            return solve(sde, y0, ts, bm=bm, **kw)
    n_f, n_t, n_qk, n_qr = (3, 1, 20, 5) if reps is None else (reps,) * 4
    t_f = _time(lambda: run(flowsde.sdeint, "triton"), n_f, device=dev)
    t_t = _time(lambda: run(torchsde.sdeint), n_t, device=dev)
    bm = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=3, device=dev)
    t = torch.rand(B, device=dev, dtype=torch.float64)
    q_k = _time(lambda: bm.at(t, ops=kernels.ops("triton", dev)), n_qk, device=dev)
    q_r = _time(lambda: bm.at(t, ops=kernels.ops("torch")), n_qr, device=dev)
    return {"flowsde_s": t_f, "torchsde_s": t_t, "query_kernel_s": q_k, "query_torch_s": q_r}


def _save(path, results):
    """Write the figures measured so far to ``path`` (JSON), through a temporary file renamed over it: a
    run killed by its time limit keeps the last complete file."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--json", help="also write the figures to this JSON file (rewritten after each section, so a "
                                   "run cut short keeps what it measured; \"complete\" is true once all ran)")
    ap.add_argument("--tune", action="store_true", help="also sweep the elementwise launch configuration")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: running the float64 kernel checks in Triton's interpreter only")
        for name, err in check_kernels("cpu", n=1 << 12):
            print(f"  {name}: max abs error {err:.2e}")
        return 0
    dev = "cuda"
    print(f"## {torch.cuda.get_device_name()} — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n")
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "complete": False}
    _save(args.json, results)
    print("| kernel check (float64) | max abs error vs reference |\n|---|---:|")
    checks = check_kernels(dev)
    for name, err in checks:
        print(f"| {name} | {err:.1e} |")
    results["checks"] = checks
    _save(args.json, results)
    rows, copy = bandwidth(1 << (22 if args.quick else 24), device=dev)
    results["copy_GBps"], results["step_kernels"] = copy, rows
    _save(args.json, results)
    print(f"\nDevice-to-device copy: {copy:.0f} GB/s\n")
    print("| step kernel (device time) | GB/s | of copy | vs eager | vs torch.compile | GB/s, 20 calls back to back |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, bw, frac, se, sc, lbw in rows:
        print(f"| {name} | {bw:.0f} | {100 * frac:.0f} % | {se:.2f}× | {sc:.2f}× | {lbw:.0f} |")
    results["backward"] = backward(1 << (22 if args.quick else 24), device=dev)
    _save(args.json, results)
    print("\n| under autograd (device time) | fused ms | eager ms | eager / fused |\n|---|---:|---:|---:|")
    for name, t_f, t_e, r in results["backward"]:
        print(f"| {name} | {1e3 * t_f:.3f} | {1e3 * t_e:.3f} | {r:.2f}× |")
    if args.tune:
        print("\n| block | warps | rk4 GB/s | EM+noise GB/s |\n|---:|---:|---:|---:|")
        results["tune"] = tune(1 << (22 if args.quick else 24))
        _save(args.json, results)
        for row in results["tune"]:
            print("| %d | %d | %.0f | %.0f |" % row)
    results["launch_overhead_s"] = launch_overhead(device=dev)
    _save(args.json, results)
    print("\n| host time to enqueue one small update | µs |\n|---|---:|")
    for name, t in results["launch_overhead_s"].items():
        print(f"| {name} | {1e6 * t:.1f} |")
    e2e = end_to_end(steps=20 if args.quick else 100, device=dev)
    results["end_to_end_s"] = e2e
    _save(args.json, results)
    print("\n| sampling, MLP 2-64-64-2, B=65,536, %d steps | ms | torchdiffeq / this | hand loop / this |"
          % (20 if args.quick else 100))
    print("|---|---:|---:|---:|")
    for name, t in e2e.items():
        method = name.split(":")[0]
        tdq, hand = e2e[f"{method}: torchdiffeq.odeint"], e2e[f"{method}: hand-written loop"]
        print(f"| {name} | {1e3 * t:.2f} | {tdq / t:.2f}× | {hand / t:.2f}× |")
    B = 100_000 if args.quick else 1_000_000
    t, vs = ou_trajectory(B=B, device=dev)
    results["ou_trajectory"] = {"B": B, "seconds": t, "vs_torchsde": vs}
    _save(args.json, results)
    print(f"\nOU whole trajectory, B={B:,}, N=1000: {1e3 * t:.1f} ms; {vs:.0f}× torchsde on the GPU")
    a = adaptive_sde(B=8192 if args.quick else 65536, device=dev)  # last: not one of the targets
    results["adaptive_sde"] = a
    results["complete"] = True
    _save(args.json, results)
    print(f"\nAdaptive EM on GBM (rtol 1e-3): flowsde {1e3 * a['flowsde_s']:.0f} ms, torchsde "
          f"{1e3 * a['torchsde_s']:.0f} ms ({a['torchsde_s'] / a['flowsde_s']:.1f}×); one tree query: kernel "
          f"{1e6 * a['query_kernel_s']:.0f} µs, PyTorch spec {1e6 * a['query_torch_s']:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
