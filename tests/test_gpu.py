"""On a CUDA machine: the compiled Triton kernels (not the interpreter) against the reference, backend
parity end to end, CUDA-graph capture of the sampling loop, and no host-device synchronisation in the step
loops (checked by CUDA's own sync detector). Skipped where there is no GPU; CI has none, so these run on a
lent GPU (see benchmarks/RESULTS.md). The CPU-side parts of the graph feature are tested everywhere.
On a GPU machine run the rest of the suite with ``TRITON_INTERPRET=1`` (its Triton tests use CPU tensors
in the interpreter) and this file without it (compiled kernels)."""
import os
import sys

import pytest
import torch

import flowsde
from flowsde import kernels
from flowsde.kernels import PhiloxNoise, reference
from flowsde.kernels.philox import philox_randint, philox_randn
from flowsde.paths import CondOT, VPCosine
from flowsde.problems import MLPVelocity, OrnsteinUhlenbeck

CUDA = torch.cuda.is_available() and kernels.HAS_TRITON and os.environ.get("TRITON_INTERPRET") != "1"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and compiled (not interpreted) Triton")
DEV = "cuda"


def test_cuda_graph_needs_cuda_tensors_and_a_constant_sigma():
    model = lambda x, t: -x  # noqa: E731
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        flowsde.sample(model, x0, method="euler", steps=3, cuda_graph=True)
    with pytest.raises(ValueError, match="constant sigma"):
        flowsde.sample(model, x0, method="euler", steps=3, sigma=lambda t: t, cuda_graph=True)


def _g(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def rnd(shape, dtype, seed):
    return torch.randn(shape, generator=_g(seed), dtype=torch.float64).to(dtype).to(DEV)


@gpu
def test_compiled_kernels_match_the_reference_in_float64():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import gpu_kernels
    rows = gpu_kernels.check_kernels(DEV, n=(1 << 16) + 17)
    assert len(rows) >= 7


@gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (1037, 3), (4, 5, 6), (1 << 20,)])
def test_compiled_combine_over_dtypes_and_shapes(dtype, shape):
    tri = kernels.ops("triton", DEV)
    ts = [rnd(shape, dtype, i) for i in range(6)]
    cs = [0.7, -1.3, 1 / 3, 2.5e-3, -0.125, 1e-7]
    got = tri.combine(list(zip(cs, ts)))
    exact = sum(c * t.double() for c, t in zip(cs, ts))
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert got.dtype == dtype and float((got.double() - exact).abs().max()) <= tol * float(exact.abs().max())


@gpu
def test_fast_launch_keys_on_alignment_and_sizes():
    """The cached direct launch must not reuse a kernel specialised for aligned pointers or sizes divisible
    by 16 on views that are not: alternate aligned and offset views and odd sizes, against the reference."""
    tri = kernels.ops("triton", DEV)
    base = [rnd((4099,), torch.float32, i) for i in range(3)]
    for off, n in [(0, 4096), (1, 4096), (0, 4095), (3, 4093), (0, 4096), (2, 17), (0, 16), (1, 1)]:
        y, k, g = (b[off:off + n] for b in base)
        got = tri.combine([(1.0, y), (0.25, k)], [(0.5, g)], PhiloxNoise(7 + n))
        want = reference.combine([(1.0, y), (0.25, k)], [(0.5, g)], None, key=7 + n)
        assert float((got - want).abs().max()) < 1e-5, (off, n)
        e = tri.error_norm(y.reshape(1, -1), k.reshape(1, -1), g.reshape(1, -1), 1e-3, 1e-6)
        assert torch.allclose(e, reference.error_norm(y.reshape(1, -1), k.reshape(1, -1), g.reshape(1, -1), 1e-3,
                                                      1e-6), rtol=1e-5)


@gpu
def test_compiled_noise_is_the_philox_mirror_and_has_the_right_law():
    tri = kernels.ops("triton", DEV)
    n = 1 << 20
    for key in (0, 12345, 2 ** 40 + 3, torch.tensor(2 ** 62 + 5, device=DEV)):
        z = tri.normal(key, (n,), torch.float32, DEV)
        k = key if isinstance(key, int) else int(key)
        assert float((z - philox_randn(k, n, DEV)).abs().max()) < 2e-6
        assert abs(float(z.mean())) < 5 / n ** 0.5 and abs(float(z.var()) - 1) < 1e-2
    a, b = tri.normal(1, (n,), torch.float32, DEV), tri.normal(2, (n,), torch.float32, DEV)
    assert abs(float((a * b).mean())) < 5 / n ** 0.5
    i1, _, _, _ = philox_randint(99, 8, DEV)
    assert i1.dtype == torch.int64


@gpu
def test_backends_agree_on_cuda_for_odeint_sdeint_and_sample():
    x0 = rnd((64, 2), torch.float64, 0)
    f = lambda t, y: torch.sin(t) * y - y ** 3  # noqa: E731
    t = torch.linspace(0, 1, 5, dtype=torch.float64, device=DEV)
    for m in ("euler", "heun", "rk4", "dopri5", "dopri8", "fehlberg2"):
        opt = {} if m in ("dopri5", "dopri8", "fehlberg2") else dict(step_size=0.05)
        a = flowsde.odeint(f, x0, t, method=m, options=dict(opt, backend="triton"))
        b = flowsde.odeint(f, x0, t, method=m, options=dict(opt, backend="torch"))
        # (dopri8's coefficients reach ~50: the kernel's ~48-bit float64 coefficients leave ~6e-13, interpreted)
        assert float((a - b).abs().max()) < (1e-10 if m == "dopri8" else 1e-12), m
    sde = OrnsteinUhlenbeck(theta=1.0, sigma=0.5)
    from flowsde.brownian import GridBrownian
    bm = GridBrownian(t0=0.0, t1=1.0, steps=20, shape=(64, 2), seed=1, dtype=torch.float64, device=DEV)
    a = flowsde.sdeint(sde, x0, t, bm=bm, dt=0.05, method="euler", options=dict(backend="triton"))
    b = flowsde.sdeint(sde, x0, t, bm=bm, dt=0.05, method="euler", options=dict(backend="torch"))
    assert float((a - b).abs().max()) < 1e-12
    sde.sde_type = "stratonovich"  # (OU's diffusion is constant: both calculi agree)
    a = flowsde.sdeint(sde, x0, t, bm=bm, dt=0.05, method="reversible_heun", options=dict(backend="triton"))
    b = flowsde.sdeint(sde, x0, t, bm=bm, dt=0.05, method="reversible_heun", options=dict(backend="torch"))
    assert float((a - b).abs().max()) < 1e-12
    cond = torch.full((64, 1), 2.0, dtype=torch.float64, device=DEV)
    uncond = torch.zeros(1, 1, dtype=torch.float64, device=DEV)
    model = lambda x, t, c: c * (1.0 - x) + 0.2 * t[:, None] * x  # noqa: E731
    kw = dict(path=VPCosine(), prediction="epsilon", method="ddim", steps=8, t_start=0.05, cond=cond,
              uncond=uncond, guidance_scale=2.5)
    a = flowsde.sample(model, x0, backend="triton", **kw)
    b = flowsde.sample(model, x0, backend="torch", **kw)
    assert float((a - b).abs().max()) < 1e-10


SAMPLERS = {
    "euler": dict(method="euler"),
    "heun": dict(method="heun"),
    "rk4": dict(method="rk4"),
    "ddim": dict(method="ddim"),
    "ddim-eta1": dict(method="ddim", eta=1.0, seed=3),
    "dpmpp_2m": dict(method="dpmpp_2m"),
    "sde-extension": dict(method="euler", sigma=0.7, seed=4),
}


@gpu
@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replays_equal_the_uncaptured_loop(name, backend):
    flowsde.graphs.clear_graph_cache()
    kw = dict(SAMPLERS[name], steps=12, backend=backend)
    model = MLPVelocity(width=32, generator=_g(0)).to(DEV)
    path = CondOT()
    x0 = torch.randn(300, 2, device=DEV)
    want = flowsde.sample(model, x0, path=path, **dict(kw, backend="triton"))  # the Philox stream
    got, st = flowsde.sample(model, x0, path=path, cuda_graph=True, return_stats=True, **kw)
    tol = 0.0 if backend == "triton" else 1e-5
    assert float((got - want).abs().max()) <= tol
    assert st["nfe"] == flowsde.sample(model, x0, path=path, return_stats=True, **kw)[1]["nfe"]
    x1 = torch.randn(300, 2, device=DEV)          # new inputs, same graph
    kw2 = dict(kw, seed=kw["seed"] + 1) if "seed" in kw else kw
    got = flowsde.sample(model, x1, path=path, cuda_graph=True, **kw2)
    want = flowsde.sample(model, x1, path=path, **dict(kw2, backend="triton"))
    assert float((got - want).abs().max()) <= tol
    assert len(flowsde.graphs._CACHE) == 1
    assert torch.equal(x0, x0.clone())


@gpu
def test_cuda_graph_with_guidance_takes_new_conditions():
    flowsde.graphs.clear_graph_cache()
    model = lambda x, t, c: c * (1.0 - x) + 0.2 * t[:, None] * x  # noqa: E731
    x0 = torch.randn(64, 2, device=DEV)
    uncond = torch.zeros(1, 1, device=DEV)
    kw = dict(path=VPCosine(), prediction="epsilon", method="ddim", steps=10, t_start=0.05, uncond=uncond,
              guidance_scale=2.5)
    for c in (1.0, 3.0):
        cond = torch.full((64, 1), c, device=DEV)
        got = flowsde.sample(model, x0, cond=cond, cuda_graph=True, **kw)
        want = flowsde.sample(model, x0, cond=cond, **kw)
        assert float((got - want).abs().max()) == 0.0


def _synchronising_calls(fn):
    """The number of synchronising CUDA calls ``fn`` makes, as CUDA's sync detector reports them."""
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in seen)


@gpu
def test_no_host_sync_in_the_step_loops_on_cuda():
    """CUDA's sync detector (``.item()``, ``nonzero``, device-to-host copies...): a solve may read its time
    grid once, but the count must not grow with the number of steps; flowsde.sample makes none (but for the
    pinned-memory allocator's occasional new block when it copies the time table)."""
    model = MLPVelocity(width=32, generator=_g(0)).to(DEV)
    x0 = torch.randn(256, 2, device=DEV)
    sde = OrnsteinUhlenbeck(theta=1.0, sigma=0.5)
    t = torch.tensor([0.0, 0.5, 1.0], device=DEV)
    runs = {}
    for b in ("torch", "triton"):  # (auto would pick torch at this size: both named)
        runs.update({
            f"sample heun {b}": lambda n, b=b: flowsde.sample(model, x0, method="heun", steps=n, backend=b),
            f"sample sde {b}": lambda n, b=b: flowsde.sample(model, x0, method="euler", sigma=0.5, steps=n, seed=1,
                                                             backend=b),
            f"sample ddim eta {b}": lambda n, b=b: flowsde.sample(model, x0, method="ddim", eta=1.0, path=VPCosine(),
                                                                  prediction="epsilon", steps=n, t_start=0.05,
                                                                  seed=2, backend=b),
            f"sdeint {b}": lambda n, b=b: flowsde.sdeint(sde, x0, t, dt=1.0 / n, seed=0, options=dict(backend=b)),
            f"odeint rk4 {b}": lambda n, b=b: flowsde.odeint(model.ode_field(), x0, t, method="rk4",
                                                             options=dict(step_size=1.0 / n, backend=b)),
        })
    for name, run in runs.items():
        run(4), run(64), run(4)  # compile the kernels and fill the allocators' caches first
        few, many = _synchronising_calls(lambda: run(4)), _synchronising_calls(lambda: run(64))
        # a sync per step would add 60; allow 2 for the pinned-memory allocator's occasional new block
        assert many <= few + 2, f"{name}: {few} syncs with 4 steps, {many} with 64"
        if name.startswith("sample"):
            assert many <= 2, f"{name} synchronised {many} times"


@gpu
def test_whole_trajectory_kernel_on_cuda_matches_the_reference():
    from flowsde.solvers.linear import solve_linear_sde
    x0 = torch.ones(10_000, dtype=torch.float64, device=DEV)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device=DEV)
    a = solve_linear_sde(x0, ts, 1 / 64, a=-1.0, d=0.5, seed=1, backend="triton")
    b = solve_linear_sde(x0, ts, 1 / 64, a=-1.0, d=0.5, seed=1, backend="torch")
    assert float((a - b).abs().max()) < 1e-5
    # law of the endpoint: EM's own OU variance
    ou = OrnsteinUhlenbeck(theta=1.0, sigma=0.5)
    m, v = ou.em_mean(1.0, 1 / 64, 64), ou.em_variance(1 / 64, 64)
    assert abs(float(a[-1].mean()) - m) < 5 * (v / 1e4) ** 0.5
    assert reference is not None and PhiloxNoise is not None


@gpu
def test_adaptive_odeint_with_a_fixed_budget_is_captured_as_a_cuda_graph():
    """dopri5 with options=dict(capturable=True, max_num_steps=N) and host times: captured once, replayed on
    a new state, it equals the uncaptured solve."""
    model = MLPVelocity(width=32, generator=_g(0)).to(DEV).double()
    f = model.ode_field()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)  # on the host
    opts = dict(capturable=True, max_num_steps=60)
    x_static = torch.randn(512, 2, dtype=torch.float64, device=DEV)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            flowsde.odeint(f, x_static, t, rtol=1e-6, atol=1e-6, options=opts)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flowsde.odeint(f, x_static, t, rtol=1e-6, atol=1e-6, options=opts)
        x_new = torch.randn(512, 2, dtype=torch.float64, device=DEV)
        x_static.copy_(x_new)
        graph.replay()
        want = flowsde.odeint(f, x_new, t, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all()
    assert float((out - want).abs().max()) < 1e-10


@gpu
def test_compiled_matrix_noise_kernel_matches_the_reference():
    tri = kernels.ops("triton", DEV)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        y, f = rnd((1000, 7), dtype, 0), rnd((1000, 7), dtype, 1)
        g, dw = rnd((1000, 7, 3), dtype, 2), rnd((1000, 3), dtype, 3)
        got = tri.sde_update(y, [(0.1, f)], [(0.5, g)], dw, "general")
        want = reference.sde_update(y, [(0.1, f)], [(0.5, g)], dw, "general")
        assert float((got - want).abs().max()) < tol * max(1.0, float(want.abs().max()))
        got = tri.sde_update(y, [(0.1, f)], [(0.5, g)], PhiloxNoise(5), "additive")
        want = kernels.ops("torch").sde_update(y, [(0.1, f)], [(0.5, g)], PhiloxNoise(5), "additive")
        assert float((got - want).abs().max()) < 1e-5


@gpu
def test_adaptive_sdeint_with_a_fixed_budget_is_captured_as_a_cuda_graph():
    """sdeint(adaptive=True) with capturable=True (tree kernel, masks, no host read): captured once and
    replayed on a new state it equals the uncaptured solve; the triton and torch backends take the same
    steps on the GPU too."""
    from flowsde.brownian import VirtualBrownianTree
    from flowsde.problems import GeometricBrownianMotion
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)  # on the host
    bm = VirtualBrownianTree(0.0, 1.0, (1024, 1), seed=3, dtype=torch.float64, device=DEV)
    kw = dict(bm=bm, dt=0.1, adaptive=True, rtol=1e-3, atol=1e-3, method="euler")
    opts = dict(capturable=True, max_num_steps=200, backend="triton", per_sample=True)
    y_static = torch.ones(1024, 1, dtype=torch.float64, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flowsde.sdeint(sde, y_static, ts, options=opts, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flowsde.sdeint(sde, y_static, ts, options=opts, **kw)
    y_new = torch.full((1024, 1), 2.0, dtype=torch.float64, device=DEV)
    y_static.copy_(y_new)
    graph.replay()
    want = flowsde.sdeint(sde, y_new, ts, options=dict(backend="triton", per_sample=True), **kw)
    assert torch.isfinite(out).all() and float((out - want).abs().max()) < 1e-12
    other = flowsde.sdeint(sde, y_new, ts, options=dict(backend="torch", per_sample=True), **kw)
    assert float((other - want).abs().max()) < 1e-12
    # bm=None: the tree is built inside the captured solve (from the seed), with no host-to-device copy
    kw.pop("bm")
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        out2 = flowsde.sdeint(sde, y_static, ts, seed=5, options=opts, **kw)
    graph2.replay()
    want2 = flowsde.sdeint(sde, y_static.clone(), ts, seed=5, options=dict(backend="triton", per_sample=True), **kw)
    assert float((out2 - want2).abs().max()) < 1e-12


@gpu
def test_compiled_fused_combine_differentiates_like_the_pytorch_ops():
    """Backpropagation through odeint and through sdeint's in-kernel noise with the compiled kernels and
    their adjoint (flowsde.kernels.autograd) against the PyTorch ops on the same noise (the mirror)."""
    lin = torch.nn.Linear(3, 3).double().to(DEV)
    y0 = rnd((4096, 3), torch.float64, 0)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=DEV)
    grads = {}
    for be in ("triton", "torch"):
        y = y0.clone().requires_grad_(True)
        lin.zero_grad()
        out = flowsde.odeint(lambda s, x: torch.tanh(lin(x)), y, t, method="rk4",
                             options=dict(step_size=0.05, backend=be))[-1]
        g = kernels.ops(be, DEV).combine([(1.0, out), (0.1, out ** 2)], [(0.5, out)], PhiloxNoise(7))
        g.pow(2).sum().backward()
        grads[be] = [y.grad, lin.weight.grad.clone()]
        assert be == "torch" or type(g.grad_fn).__name__ == "_FusedCombineBackward"
    for a, b in zip(grads["triton"], grads["torch"]):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), float((a - b).abs().max())


@gpu
def test_compiled_channels_last_and_mixed_dtype_steps():
    """A channels_last state steps in memory order (strides kept, values equal the contiguous state's bit for
    bit, drawn noise too); a float32 state with a float16 output promotes to float32 as on torch."""
    tri = kernels.ops("triton", DEV)
    cl = dict(memory_format=torch.channels_last)
    x, k, g = (rnd((4, 8, 16, 16), torch.float32, i) for i in range(3))
    for noise in (None, PhiloxNoise(11)):
        diffusion = [] if noise is None else [(0.3, g)]
        a = tri.combine([(1.0, x.to(**cl)), (0.5, k.to(**cl))], [(s, v.to(**cl)) for s, v in diffusion], noise)
        b = tri.combine([(1.0, x), (0.5, k)], diffusion, noise)
        assert a.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)
    a = tri.combine([(1.0, x), (0.5, k.half())])
    b = kernels.ops("torch").combine([(1.0, x), (0.5, k.half())])
    assert a.dtype == b.dtype == torch.float32 and float((a - b).abs().max()) < 1e-6


@gpu
def test_events_and_the_adjoint_on_cuda_equal_the_cpu():
    """Events (the crossing flags read every check_every = 8 steps on CUDA) and odeint_adjoint on CUDA
    tensors and the triton backend: the CPU's event time, state and gradients."""
    def fall(t, y):
        return torch.stack([y[:, 1], -9.8 * torch.ones_like(y[:, 1])], dim=1)

    def ground(t, y):
        return y[:, 0]
    res = {}
    for dev in ("cpu", DEV):
        y0 = torch.tensor([[10.0, 1.0]] * 3, dtype=torch.float64, device=dev)
        t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=dev)
        ev = [flowsde.odeint(fall, y0, t, method=m, options=o, event_fn=ground)
              for m, o in (("dopri5", {}), ("rk4", dict(step_size=0.01, backend="triton" if dev != "cpu" else "torch")))]
        model = MLPVelocity(width=16, generator=_g(0)).to(dev).double()
        x0 = torch.randn(64, 2, generator=_g(1), dtype=torch.float64).to(dev).requires_grad_(True)
        ys = flowsde.odeint_adjoint(model.ode_field(), x0, t, adjoint_params=tuple(model.parameters()))
        grads = torch.autograd.grad((ys[-1] ** 2).sum(), [x0] + list(model.parameters()))
        res[dev] = [v.cpu() for e in ev for v in e] + [g.cpu() for g in grads]
    for a, b in zip(res["cpu"], res[DEV]):
        assert float((a - b).abs().max()) <= 1e-9 * max(1.0, float(a.abs().max()))


@gpu
def test_adjoint_time_gradients_norms_and_the_stochastic_adjoint_on_cuda_equal_the_cpu():
    """odeint_adjoint with a t that requires grad (on the host beside a CUDA state, as check_times allows),
    a max-norm and seminorm; sdeint_adjoint (Stratonovich midpoint, Itô Milstein, logqp) on a flowsde
    VirtualBrownianTree: the CPU's gradients."""
    import sys as _sys
    _sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_sde_adjoint import LatentSDE
    res = {}
    for dev in ("cpu", DEV):
        model = MLPVelocity(width=16, generator=_g(0)).to(dev).double()
        x0 = torch.randn(64, 2, generator=_g(1), dtype=torch.float64).to(dev).requires_grad_(True)
        t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)  # host times
        ys = flowsde.odeint_adjoint(model.ode_field(), x0, t, adjoint_params=tuple(model.parameters()),
                                    options=dict(norm=lambda x: x.abs().max()),
                                    adjoint_options=dict(norm="seminorm"))
        ode = torch.autograd.grad((ys ** 2).sum(), [x0, t] + list(model.parameters()))
        assert ode[1].device.type == "cpu"
        sde = LatentSDE("ito", "diagonal").to(dev)
        y0 = torch.randn(8, 3, generator=_g(2), dtype=torch.float64).to(dev).requires_grad_(True)
        ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device=dev)
        out = []
        for kind, kw in (("ito", {}), ("ito", dict(logqp=True))):
            bm = flowsde.VirtualBrownianTree(0.0, 1.0, shape=(8, 4 if kw else 3), seed=3, tol=2 ** -12,
                                             dtype=torch.float64, device=dev)
            r = flowsde.sdeint_adjoint(sde, y0, ts, bm=bm, dt=0.05, **kw)
            loss = (r[0] ** 2).sum() + r[1].sum() if kw else (r ** 2).sum()
            out += list(torch.autograd.grad(loss, [y0] + list(sde.parameters())))
        strat = LatentSDE("stratonovich", "diagonal").to(dev)  # reversible Heun, run backwards exactly
        bm = flowsde.VirtualBrownianTree(0.0, 1.0, shape=(8, 3), seed=3, tol=2 ** -12, dtype=torch.float64, device=dev)
        r = flowsde.sdeint_adjoint(strat, y0, ts, bm=bm, dt=0.05, method="reversible_heun")
        out += list(torch.autograd.grad((r ** 2).sum(), [y0] + list(strat.parameters())))
        res[dev] = [v.detach().cpu() for v in ode] + [v.cpu() for v in out]
    for a, b in zip(res["cpu"], res[DEV]):
        assert float((a - b).abs().max()) <= 1e-9 * max(1.0, float(a.abs().max()))
