"""The fused Triton kernel (in Triton's interpreter on CPU tensors) against the PyTorch reference, its
in-kernel noise, and the triton backend against the torch backend end to end."""
import math

import numpy as np
import pytest
import torch
import torchsde

import flowsde
from flowsde import kernels
from flowsde.kernels import PhiloxNoise, reference
from flowsde.kernels.philox import philox_randint, philox_randn

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def tri():
    return kernels.ops("triton", "cpu")


def rnd(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def close(got, exact, dtype):
    scale = max(1.0, float(exact.abs().max()))
    return float((got.double() - exact).abs().max()) <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (33, 3), (1037,), (4, 5, 6)])
@pytest.mark.parametrize("nterms", [1, 3, 6])
def test_combine_matches_the_reference(tri, dtype, shape, nterms):
    ts = [rnd(shape, dtype, i) for i in range(nterms)]
    cs = [0.7, -1.3, 1 / 3, 2.5e-3, -0.125, 1e-7][:nterms]
    got = tri._c.combine(list(zip(cs, ts)))
    exact = sum(c * t.double() for c, t in zip(cs, ts))
    assert got.dtype == dtype and got.shape == shape and close(got, exact, dtype)
    ref = reference.combine(list(zip(cs, ts)))
    assert close(ref, exact, dtype) or dtype in (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("rowwise", [False, True])
def test_noise_updates_with_given_increments(tri, dtype, rowwise):
    shape = (37, 4)
    y, f, g1, g2 = (rnd(shape, dtype, i) for i in range(4))
    dw = rnd((37, 1) if rowwise else shape, dtype, 9)
    terms, diff = [(1.0, y), (0.01, f)], [(0.5, g1), (0.25, g2)]
    got = tri._c.combine(terms, diff, dw, rowwise=rowwise)
    z = dw.double().expand(shape) if rowwise else dw.double()
    exact = y.double() + 0.01 * f.double() + (0.5 * g1.double() + 0.25 * g2.double()) * z
    assert close(got, exact, dtype)
    assert close(reference.combine(terms, diff, dw, rowwise), exact, dtype) or dtype == torch.float16


def test_strides_and_broadcasting(tri):
    base = rnd((6, 9), torch.float64, 0)
    y = base.T                                   # non-contiguous
    sigma = torch.tensor(0.3, dtype=torch.float64).expand(9, 6)   # a broadcast view
    dw = rnd((9, 6), torch.float64, 1)[:, :]
    got = tri._c.combine([(1.0, y), (2.0, base.T)], [(1.0, sigma)], dw)
    assert torch.allclose(got, 3.0 * y + 0.3 * dw, atol=1e-14, rtol=0)
    assert got.is_contiguous() and torch.equal(base, rnd((6, 9), torch.float64, 0))  # input untouched


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_broadcast_operands_are_read_in_place(tri, dtype):
    """A per-row value ((batch, 1), or a view expanded from one) or a scalar tensor enters the kernel as
    its batch-row or single values, not as a copy the size of the state; the result is the reference's."""
    from flowsde.kernels.combine import _operand
    shape = (37, 3, 5)
    y, f = rnd(shape, dtype, 0), rnd(shape, dtype, 1)
    per_row = rnd((37, 1, 1), dtype, 2)
    expanded = rnd((37,), dtype, 3)[:, None, None].expand(shape)
    scalar = torch.tensor(0.3, dtype=dtype).expand(shape)
    dw = rnd(shape, dtype, 4)
    for t, mode, numel in ((per_row, 1, 37), (expanded, 1, 37), (scalar, 2, 1), (y, 0, y.numel())):
        got_t, got_mode = _operand(t, shape)
        assert got_mode == mode and got_t.numel() == numel
    terms = [(1.0, y), (0.5, per_row), (-0.25, expanded), (2.0, scalar), (0.1, f)]
    diff = [(0.7, per_row), (0.2, expanded)]
    got = tri._c.combine(terms, diff, dw)
    want = reference.combine([(c, t.expand(shape)) for c, t in terms], [(s, g.expand(shape)) for s, g in diff], dw)
    exact = sum(c * t.double() for c, t in terms) + (0.7 * per_row.double() + 0.2 * expanded.double()) * dw.double()
    assert got.shape == shape and close(got, exact, dtype) and close(want, exact, dtype)


@pytest.mark.parametrize("key", [0, 12345, 2 ** 40 + 3, 2 ** 63 - 1])
def test_in_kernel_noise_equals_the_philox_mirror(tri, key):
    z = tri.normal(key, (2049,), torch.float32, "cpu")
    assert float((z - philox_randn(key, 2049)).abs().max()) < 1e-6
    # the fused update draws the same stream: y + 1 * 1 * z
    y = torch.zeros(2049, dtype=torch.float32)
    out = tri.combine([(1.0, y)], [(1.0, None)], PhiloxNoise(key))
    assert float((out - philox_randn(key, 2049)).abs().max()) < 1e-6
    # and so does the torch backend's materialised form
    assert torch.equal(kernels.ops("torch").normal(key, (2049,), torch.float32, "cpu"), philox_randn(key, 2049))


def _philox_scalar(key, ctr):
    """Philox-4x32-10 on one counter, written out directly from the published algorithm."""
    M = 0xFFFFFFFF
    c, k0, k1 = [ctr & M, ctr >> 32, 0, 0], key & M, key >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M, (p0 >> 32) ^ c[3] ^ k1, p0 & M]
        k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
    return c


def test_philox_integers_are_the_published_algorithm():
    """Known-answer check of the mirror's integer stream against a direct scalar implementation."""
    streams = philox_randint(987654321, 5)
    for i in range(5):
        assert [int(s[i]) for s in streams] == _philox_scalar(987654321, i)


def test_noise_stream_is_four_box_muller_normals_per_philox_call(tri):
    """Element i of the noise is lane i % 4 of the Philox call at counter i // 4: Box–Muller on the call's
    uniforms (u0, u1) for lanes 0, 1 and (u2, u3) for lanes 2, 3, computed here from the scalar Philox in
    Python floats; the kernel (block and per-row paths) and every way of drawing the mirror agree."""
    from flowsde.kernels.philox import philox_randn_at

    def uniform(x):  # Triton's uint32 -> [0, 1): as int32, negatives folded with ~, times 2**-31 (float32)
        s = x - 2 ** 32 if x >= 2 ** 31 else x
        return float(np.float32(-s - 1 if s < 0 else s) * np.float32(4.6566127342e-10))

    key, n = 2 ** 40 + 77, 1030
    want = []
    for c in range((n + 3) // 4):
        u = [uniform(v) for v in _philox_scalar(key, c)]
        for a, b in ((u[0], u[1]), (u[2], u[3])):
            r = math.sqrt(-2.0 * math.log(max(a, float(np.float32(1e-7)))))
            th = float(np.float32(b) * np.float32(2 * math.pi))
            want += [r * math.cos(th), r * math.sin(th)]
    want = torch.tensor(want[:n], dtype=torch.float64)
    mirror = philox_randn(key, n)
    assert float((mirror.double() - want).abs().max()) < 1e-6
    assert torch.equal(philox_randn_at(key, torch.arange(n)), mirror)
    for start, m in ((3, 600), (5, 1), (1021, 9)):  # slices that start and end inside a Philox call
        assert torch.equal(philox_randn(key, m, start=start), mirror[start:start + m])
    assert float((tri.normal(key, (n,), torch.float32, "cpu") - mirror).abs().max()) < 1e-6
    per_row = tri.combine([(1.0, torch.zeros(n, 3))], [(1.0, None)], PhiloxNoise(key), rowwise=True)
    assert float((per_row - mirror[:, None]).abs().max()) < 1e-6


def test_the_four_lanes_of_a_philox_call_are_independent_normals(tri):
    """Each lane alone is N(0, 1) and the lanes of one call are uncorrelated, their squares too (the two
    normals of one Box–Muller pair are independent, not merely uncorrelated)."""
    from scipy import stats
    n = 4 * 50_000
    lanes = tri.normal(11, (n // 4, 4), torch.float64, "cpu").T
    tol = 5 / math.sqrt(n // 4)
    for z in lanes:
        assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(float(torch.corrcoef(torch.stack([lanes[i], lanes[j]]))[0, 1])) < tol, (i, j)
            assert abs(float(torch.corrcoef(torch.stack([lanes[i] ** 2, lanes[j] ** 2]))[0, 1])) < tol, (i, j)


def test_in_kernel_noise_has_the_standard_normal_law(tri):
    from scipy import stats
    n = 100_000  # (the bounds scale with 1/sqrt(n); the interpreter's draws cost ~0.1 ms per thousand)
    z = tri.normal(7, (n,), torch.float64, "cpu")
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    lag = float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])           # across elements
    other = tri.normal(8, (n,), torch.float64, "cpu")                         # across steps (keys)
    cross = float(torch.corrcoef(torch.stack([z, other]))[0, 1])
    assert abs(lag) < 5 / math.sqrt(n) and abs(cross) < 5 / math.sqrt(n)
    assert torch.equal(z, tri.normal(7, (n,), torch.float64, "cpu")) and not torch.equal(z, other)


class Launches:
    """Counts the compiled-or-interpreted kernel launches (``combine._launch``, which every kernel of the step
    loops goes through, imported by each kernel family's module): a backend-parity test must see the triton side really launch, not fall back."""

    def __init__(self, monkeypatch):
        from flowsde.kernels import combine as C, matrix_noise, norm
        self.n = 0
        launch = C._launch

        def counted(*a, **kw):
            self.n += 1
            return launch(*a, **kw)
        for module in (C, matrix_noise, norm):  # (each kernel family's file launches through it)
            monkeypatch.setattr(module, "_launch", counted)

    def taken(self):
        n, self.n = self.n, 0
        return n


@pytest.mark.parametrize("method", sorted(flowsde.ODE_METHODS))
def test_odeint_backends_agree(method, monkeypatch):
    from flowsde.problems import LinearODE
    y0 = rnd((5, 2), torch.float64, 3)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    opts = dict(step_size=0.1)
    spy = Launches(monkeypatch)
    a = flowsde.odeint(LinearODE(), y0, t, method=method, options=dict(opts, backend="triton"))
    assert spy.taken() >= 10 * flowsde.ODE_METHODS[method].stages  # every stage input and new state fused
    b = flowsde.odeint(LinearODE(), y0, t, method=method, options=dict(opts, backend="torch"))
    assert spy.taken() == 0
    assert float((a - b).abs().max()) < 1e-12


@pytest.mark.parametrize("method", ["dopri8", "fehlberg2"])
def test_adaptive_odeint_backends_agree(method):
    """Every embedded pair's stage and error combinations through the fused kernel (dopri8's rows hold up to
    13 terms: folded into partial sums of the kernel's six) take the PyTorch backend's steps."""
    y0 = rnd((5, 2), torch.float64, 4)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    f = lambda t, y: torch.sin(t) * y - y ** 3  # noqa: E731
    a, sa = flowsde.odeint(f, y0, t, method=method, rtol=1e-5, atol=1e-5, options=dict(backend="triton",
                                                                                       return_stats=True))
    b, sb = flowsde.odeint(f, y0, t, method=method, rtol=1e-5, atol=1e-5, options=dict(backend="torch",
                                                                                       return_stats=True))
    assert sa["nfe"] == sb["nfe"] and float((a - b).abs().max()) < 1e-10


@pytest.mark.parametrize("method,noise_type,sde_type", [
    ("euler", "diagonal", "ito"), ("euler", "scalar", "ito"), ("euler", "additive", "ito"), ("euler", "general", "ito"),
    ("heun", "diagonal", "stratonovich"), ("heun", "scalar", "stratonovich"), ("heun", "additive", "stratonovich"),
    ("milstein", "diagonal", "ito"), ("milstein", "scalar", "ito"),
    ("midpoint", "general", "stratonovich"), ("euler_heun", "diagonal", "stratonovich"),
    ("reversible_heun", "scalar", "stratonovich"), ("reversible_heun", "general", "stratonovich")])
def test_sdeint_backends_agree_on_a_given_bm(method, noise_type, sde_type, monkeypatch):
    from test_sde_parity import Nonlinear, noise_size
    sde = Nonlinear(noise_type, sde_type)
    y0 = rnd((5, 3), torch.float64, 0)
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(5, noise_size(noise_type)), dtype=torch.float64, entropy=2)
    spy = Launches(monkeypatch)
    a = flowsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=1 / 16, options=dict(backend="triton"))
    assert spy.taken() >= 16  # at least the update of each of the 16 steps ran in a kernel
    b = flowsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=1 / 16, options=dict(backend="torch"))
    assert spy.taken() == 0
    assert float((a - b).abs().max()) < 1e-10


@pytest.mark.parametrize("method,noise_type", [("euler", "diagonal"), ("euler", "scalar"), ("heun", "diagonal"),
                                               ("heun", "scalar")])
def test_sdeint_in_kernel_noise_equals_the_mirrored_brownian_motion(method, noise_type):
    from flowsde.problems import GeometricBrownianMotion
    sde = GeometricBrownianMotion(noise_type=noise_type, sde_type="ito" if method == "euler" else "stratonovich")
    y0 = torch.ones(6, 2)
    ts = torch.tensor([0.0, 1.0])
    a = flowsde.sdeint(sde, y0, ts, method=method, dt=1 / 8, seed=3, options=dict(backend="triton"))
    shape = (6, 2) if noise_type == "diagonal" else (6, 1)
    bm = flowsde.GridBrownian(t0=0.0, t1=1.0, steps=8, shape=shape, seed=3, stream="philox")
    b = flowsde.sdeint(sde, y0, ts, method=method, dt=1 / 8, bm=bm, options=dict(backend="torch"))
    assert float((a - b).abs().max()) < 1e-5
    c = flowsde.sdeint(sde, y0, ts, method=method, dt=1 / 8, seed=4, options=dict(backend="triton"))
    assert float((a - c).abs().max()) > 1e-3


def test_the_backend_variable_switches_every_entry_point(monkeypatch):
    """FLOWSDE_BACKEND=triton / =torch, end to end (no per-call backend=): the same numbers, kernels launched
    only under triton; a per-call backend= wins over the variable."""
    from flowsde.problems import GeometricBrownianMotion, LinearODE
    y0 = rnd((5, 2), torch.float64, 1)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    bm = flowsde.GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(5, 2), seed=1, dtype=torch.float64)

    def model(x, tt, c):
        return c * (1.0 - x) + 0.2 * tt[:, None] * x

    cond, uncond = torch.full((5, 1), 2.0, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    runs = {
        "odeint": lambda **kw: flowsde.odeint(LinearODE(), y0, t, method="rk4", options=dict(step_size=0.125, **kw)),
        "sdeint": lambda **kw: flowsde.sdeint(GeometricBrownianMotion(), y0, t, bm=bm, dt=0.125, options=kw or None),
        "sample": lambda **kw: flowsde.sample(model, y0, flowsde.paths.VPCosine(), "epsilon", "ddim", steps=6,
                                              t_start=0.05, cond=cond, uncond=uncond, guidance_scale=2.0, **kw),
    }
    spy = Launches(monkeypatch)
    for name, run in runs.items():
        got = {}
        for backend in ("triton", "torch"):
            monkeypatch.setenv("FLOWSDE_BACKEND", backend)
            got[backend] = run()
            assert (spy.taken() > 0) == (backend == "triton"), (name, backend)
        assert float((got["triton"] - got["torch"]).abs().max()) < 1e-10, name
        run(backend="torch")  # the per-call choice wins over FLOWSDE_BACKEND=torch's sibling
        monkeypatch.setenv("FLOWSDE_BACKEND", "triton")
        run(backend="torch")
        assert spy.taken() == 0, name


def test_consecutive_steps_of_one_seed_draw_independent_noise(tri):
    """The keys of the steps of one seed (brownian.step_keys) give in-kernel draws that are pairwise
    uncorrelated and differ from step to step and from seed to seed, and repeat for the same seed."""
    from flowsde.brownian import step_keys
    n = 1 << 14
    draws = torch.stack([tri.normal(k, (n,), torch.float64, "cpu") for k in step_keys(5, 8)])
    corr = torch.corrcoef(draws)
    off = corr[~torch.eye(8, dtype=torch.bool)]
    assert float(off.abs().max()) < 5 / math.sqrt(n)
    assert abs(float(draws.mean())) < 5 / math.sqrt(8 * n) and abs(float(draws.var()) - 1) < 0.03
    other = torch.stack([tri.normal(k, (n,), torch.float64, "cpu") for k in step_keys(6, 8)])
    assert float(torch.corrcoef(torch.cat([draws, other]))[:8, 8:].abs().max()) < 5 / math.sqrt(n)
    again = torch.stack([tri.normal(k, (n,), torch.float64, "cpu") for k in step_keys(5, 8)])
    assert torch.equal(draws, again)


def _eager_ddim(model, x, path, prediction, grid, eta, noise, w, cond, uncond):
    """DDIM written out with the path's own conversions (``path.convert``, not the folded coefficients the
    sampler uses): ``x' = alpha' z_hat + sqrt(beta'^2 - s^2) eps_hat + s xi``, guidance on the outputs."""
    for k in range(len(grid) - 1):
        t = torch.tensor(grid[k], dtype=torch.float64)
        tv = t.expand(x.shape[0])
        out = torch.lerp(model(x, tv, uncond.expand_as(cond)), model(x, tv, cond), w)
        z_hat = path.convert(out, x, t, prediction, "data")
        eps_hat = path.convert(out, x, t, prediction, "epsilon")
        a, b = float(path.alpha(t)), float(path.beta(t))
        t1 = torch.tensor(grid[k + 1], dtype=torch.float64)
        a1, b1 = float(path.alpha(t1)), float(path.beta(t1))
        s = eta * (b1 / b) * math.sqrt(max(b * b - (a / a1) ** 2 * b1 * b1, 0.0)) if b1 > 0 else 0.0
        x = a1 * z_hat + math.sqrt(max(b1 * b1 - s * s, 0.0)) * eps_hat + (s * noise(k) if s else 0.0)
    return x


@pytest.mark.parametrize("prediction", ["velocity", "epsilon", "data", "score", "v"])
def test_ddim_with_guidance_equals_its_eager_formula_for_every_prediction_type(prediction, monkeypatch):
    from flowsde.paths.grids import time_grid
    path = flowsde.paths.VPCosine()

    def model(x, t, c):
        return c * (0.5 - x) + 0.3 * t[:, None] * x.flip(1)

    x0 = rnd((16, 2), torch.float64, 6)
    cond, uncond = torch.full((16, 1), 1.5, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    grid = time_grid(path, 6, 0.05, 0.95)
    kw = dict(path=path, prediction=prediction, method="ddim", steps=6, t_start=0.05, t_end=0.95, cond=cond,
              uncond=uncond, guidance_scale=2.5)
    spy = Launches(monkeypatch)
    for eta in (0.0, 1.0):
        for backend, stream in (("triton", "philox"), ("torch", "torch")):  # (each backend's default stream)
            bm = flowsde.GridBrownian(grid, (16, 2), seed=3, dtype=torch.float64, stream=stream)
            want = _eager_ddim(model, x0, path, prediction, grid, eta, bm.normal, 2.5, cond, uncond)
            got = flowsde.sample(model, x0, backend=backend, eta=eta, seed=3, **kw)
            scale = max(1.0, float(want.abs().max()))  # (the kernel's draws are float32 normals)
            assert float((got - want).abs().max()) < (1e-10 if eta == 0 else 1e-6) * scale, (backend, eta)
        assert spy.taken() >= 6


def test_sample_ddim_with_guidance_backends_agree():
    def model(x, t, c):
        return c * (1.0 - x) + 0.2 * t[:, None] * x

    x0 = rnd((16, 2), torch.float64, 5)
    cond, uncond = torch.full((16, 1), 2.0, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    path = flowsde.paths.VPCosine()
    kw = dict(path=path, prediction="epsilon", method="ddim", steps=6, t_start=0.05, cond=cond, uncond=uncond,
              guidance_scale=2.5)
    a = flowsde.sample(model, x0, backend="triton", **kw)
    b = flowsde.sample(model, x0, backend="torch", **kw)
    assert float((a - b).abs().max()) < 1e-10
    a = flowsde.sample(model, x0, backend="triton", eta=1.0, seed=2, **kw)
    # the same run on the torch ops, drawing the in-kernel stream through the PyTorch Philox mirror
    from flowsde.paths.grids import time_grid
    from flowsde.sampling import PathField
    from flowsde.solvers.ddim import ddim
    grid = time_grid(path, 6, 0.05, 1.0)
    field = PathField(model, path, "epsilon", x0, cond, uncond, 2.5, grid)
    tg = torch.as_tensor(grid)
    b = ddim(field, x0, grid, path.alpha(tg).tolist(), path.beta(tg).tolist(), 1.0, 2, kernels.ops("torch"),
             stream="philox")
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6
    c = flowsde.sample(model, x0, backend="triton", eta=1.0, seed=3, **kw)
    assert float((a - c).abs().max() / b.abs().max()) > 1e-3


def test_sample_sde_extension_in_kernel_noise_equals_the_mirror():
    from flowsde.paths.grids import time_grid
    from flowsde.sampling import PathField, _extension_em
    path = flowsde.paths.CondOT()
    model = lambda x, t: -x + 0.3 * t[:, None]  # noqa: E731
    x0 = rnd((12, 2), torch.float64, 1)
    a = flowsde.sample(model, x0, path=path, method="euler", steps=5, t_end=0.9, sigma=0.8, seed=5,
                       backend="triton")
    grid = time_grid(path, 5, 0.0, 0.9)
    b = _extension_em(PathField(model, path, "velocity", x0, grid=grid), x0, grid, 0.8, 5, kernels.ops("torch"),
                      stream="philox")
    assert float((a - b).abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3), (4, 1500), (3, 2, 7), (1100, 2), (300, 5), (1, 1), (0, 4)])
def test_per_sample_error_norm(tri, dtype, shape):
    y0, y1, e = rnd(shape, dtype, 1), rnd(shape, dtype, 2), 1e-3 * rnd(shape, dtype, 3)
    got = tri.error_norm(y0, y1, e, 1e-3, 1e-6)
    ref = reference.error_norm(y0, y1, e, 1e-3, 1e-6)
    assert got.shape == (shape[0],)
    assert torch.allclose(got.double(), ref.double(), rtol=1e-5 if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whole_trajectory_kernel_matches_reference_and_sdeint(dtype):
    from flowsde.problems import GeometricBrownianMotion, OrnsteinUhlenbeck
    from flowsde.solvers.linear import solve_linear_sde
    x0 = torch.ones(300, 2, dtype=dtype)
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    kw = dict(dt=1 / 16, a=lambda t: -1.0 - t, b=0.2, c=0.3, d=lambda t: 0.5 * t, seed=9)
    tri = solve_linear_sde(x0, ts, backend="triton", **kw)
    ref = solve_linear_sde(x0, ts, backend="torch", **kw)
    assert tri.shape == (3, 300, 2) and torch.equal(tri[0], x0)
    assert float((tri.double() - ref.double()).abs().max()) < 1e-5
    # same stream as sdeint on the triton backend: OU and GBM
    for sde, coeffs in [(OrnsteinUhlenbeck(theta=1.5, sigma=0.4), dict(a=-1.5, d=0.4, c=0.0)),
                        (GeometricBrownianMotion(mu=0.3, sigma=0.5), dict(a=0.3, c=0.5, d=0.0))]:
        a = solve_linear_sde(x0, ts, dt=1 / 16, seed=4, backend="triton", **coeffs)
        bm_ts = flowsde.GridBrownian(t0=0.0, t1=1.0, steps=16, shape=(300, 2), seed=4, dtype=dtype,
                                     stream="philox")
        b = flowsde.sdeint(sde, x0, ts, dt=1 / 16, bm=bm_ts, options=dict(backend="torch"))
        assert float((a.double() - b.double()).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_whole_trajectory_kernel_brownian_default_halves_and_strided_start(dtype):
    """The default coefficients (a = b = c = 0, d = 1) are Brownian motion: the path is the cumulative sum
    of the Philox stream's increments; over 2,400 elements (three blocks, the last partial), from a
    transposed start, in half types (accumulated in float32, each saved state rounded once)."""
    from flowsde.solvers.linear import solve_linear_sde
    x0 = rnd((3, 800), dtype, 4).t()
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    got = solve_linear_sde(x0, ts, dt=1 / 8, seed=5, backend="triton")
    ref = solve_linear_sde(x0, ts, dt=1 / 8, seed=5, backend="torch")
    assert got.shape == (3, 800, 3) and got.dtype == dtype
    assert close(got[1:], ref[1:].double(), dtype)
    from flowsde.brownian import GridBrownian
    bm = GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(800, 3), seed=5, dtype=torch.float64, stream="philox")
    w = torch.stack([bm.step(k) for k in range(8)]).cumsum(0)
    assert close(got[1:], x0.double() + w[[3, 7]], dtype)


def test_gpu_benchmark_script_checks_run_in_the_interpreter():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.check_kernels("cpu", n=1 << 11)
    assert len(rows) == 13 and all(err < 1e-5 for _, err in rows)
    rows, copy = mod.bandwidth(n=1 << 10, reps=3, device="cpu", compile=False)
    assert copy > 0 and [r[0] for r in rows] == [
        "rk4 update", "euler-maruyama (noise in kernel)", "ddim + cfg (noise in kernel)", "stochastic heun (given dW)",
        "euler-maruyama, scalar noise (in kernel)", "euler-maruyama, general noise m=4 (in kernel)",
        "per-sample error norm"]
    assert all(bw > 0 and frac > 0 and vs_eager > 0 for _, bw, frac, vs_eager, _, _ in rows)
    rows = mod.backward(n=1 << 10, reps=3, device="cpu")
    assert [r[0] for r in rows] == ["rk4 update, forward + backward",
                                    "euler-maruyama (noise in kernel), forward + backward"]
    assert all(t_f > 0 and t_e > 0 for _, t_f, t_e, _ in rows)


def test_gpu_timer_keeps_the_host_enqueue_time_out(monkeypatch):
    """gpu_kernels.gpu_time on a stand-in for CUDA: a sample whose start event completed before the host had
    enqueued the call (the sleep was too short) is retaken with a doubled sleep; the figure is the median
    of the kept event intervals."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_timer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sleeps, early = [], iter([True, True] + [False] * 10)
    elapsed = iter([9.0, 1.0, 3.0, 2.0])  # ms, of the kept samples

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            pass

        def query(self):
            return next(early)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return next(elapsed)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", sleeps.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: torch.zeros(4))
    calls = []
    t = mod.gpu_time(lambda: calls.append(1), reps=4, device="cuda:0")
    assert sleeps == [1 << 21, 1 << 22, 1 << 23, 1 << 23, 1 << 23, 1 << 23]
    assert len(calls) == 1 + 6 and t == pytest.approx(3.0e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_preallocated_output_may_alias_an_input(backend):
    o = kernels.ops(backend, "cpu")
    y, k = rnd((9, 3), torch.float64, 0), rnd((9, 3), torch.float64, 1)
    expected = y + 0.5 * k + 0.1 * philox_randn(5, 27).double().reshape(9, 3)
    buf = y.clone()
    res = o.combine([(1.0, buf), (0.5, k)], [(0.1, None)], PhiloxNoise(5), out=buf)
    assert res.data_ptr() == buf.data_ptr() and torch.allclose(buf, expected, atol=1e-6)
    with pytest.raises(ValueError, match="out must be"):
        kernels.ops("triton", "cpu").combine([(1.0, y)], out=torch.empty(3))


def test_keys_read_from_device_memory_draw_the_same_stream(tri):
    """The captured-graph noise path: a 0-dim int64 key tensor read by the kernel (and by the mirror)."""
    from flowsde.brownian import DeviceKeys, GridBrownian
    y = rnd((33, 3), torch.float64, 0)
    for key in (7, 2 ** 62 + 11):
        kt = torch.tensor(key)
        a = tri.combine([(1.0, y)], [(0.5, None)], PhiloxNoise(kt))
        b = tri.combine([(1.0, y)], [(0.5, None)], PhiloxNoise(key))
        c = kernels.ops("torch").combine([(1.0, y)], [(0.5, None)], PhiloxNoise(kt))
        assert torch.equal(a, b) and float((a - c).abs().max()) < 1e-6
        assert torch.equal(tri.normal(kt, (5, 7), torch.float32, "cpu"), tri.normal(key, (5, 7), torch.float32, "cpu"))
    # DeviceKeys holding a GridBrownian's keys reproduces its philox draws, step by step
    bm = GridBrownian(np.linspace(0, 1, 5), (33, 3), seed=4, dtype=torch.float64, stream="philox")
    dk = DeviceKeys(torch.tensor(bm.philox_keys()))
    for k in range(4):
        assert torch.equal(tri.combine([(1.0, y)], [(1.0, None)], dk.draw(k)),
                           tri.combine([(1.0, y)], [(1.0, None)], bm.draw(k)))
    with pytest.raises(TypeError, match="0-dim int64"):
        PhiloxNoise(torch.tensor([1, 2]))


@pytest.mark.parametrize("case", ["ddim-eta", "extension-em"])
def test_graph_ready_loops_with_device_keys_equal_the_seeded_run(case):
    """What a captured graph replays: the loop built on device-held keys gives the seeded run's numbers."""
    from flowsde.brownian import DeviceKeys, GridBrownian
    from flowsde.paths.grids import time_grid
    from flowsde.sampling import PathField, _extension_em_loop
    from flowsde.solvers.ddim import ddim_loop
    path = flowsde.paths.VPCosine() if case == "ddim-eta" else flowsde.paths.CondOT()
    model = lambda x, t: -x + 0.3 * t[:, None]  # noqa: E731
    x0 = rnd((12, 2), torch.float64, 1)
    grid = time_grid(path, 5, 0.05, 0.9)
    keys = DeviceKeys(torch.tensor(GridBrownian(grid, (12, 2), seed=9, stream="philox").philox_keys()))
    field = PathField(model, path, "epsilon", x0, grid=grid)
    tri = kernels.ops("triton", "cpu")
    if case == "ddim-eta":
        tg = torch.as_tensor(grid)
        a, b = (path.alpha(tg).tolist(), path.beta(tg).tolist())
        got = ddim_loop(field, grid, a, b, 1.0, x0, tri, noise=keys)(x0)
        want = flowsde.sample(model, x0, path=path, prediction="epsilon", method="ddim", eta=1.0, steps=5,
                              t_start=0.05, t_end=0.9, seed=9, backend="triton")
    else:
        got = _extension_em_loop(field, grid, 0.7, tri, x0, noise=keys)(x0)
        want = flowsde.sample(model, x0, path=path, prediction="epsilon", method="euler", sigma=0.7, steps=5,
                              t_start=0.05, t_end=0.9, seed=9, backend="triton")
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nterms,nnoise", [(0, 1), (1, 1), (2, 2)])
@pytest.mark.parametrize("m", [1, 3])
def test_matrix_noise_kernel_matches_the_reference(tri, dtype, nterms, nnoise, m):
    """Additive / general noise in one pass: y + sum c f + sum s (G dW), dW given or drawn in the kernel."""
    B, d = 37, 5
    y = rnd((B, d), dtype, 0)
    terms = [(0.01 * (k + 1), rnd((B, d), dtype, k + 1)) for k in range(nterms)]
    noise = [(0.5 / (k + 1), rnd((B, d, m), dtype, 10 + k)) for k in range(nnoise)]
    dw = rnd((B, m), dtype, 20)
    got = tri.sde_update(y, terms, noise, dw, "general")
    want = reference.sde_update(y, terms, noise, dw, "general") if terms else \
        y + sum(s * torch.bmm(g, dw.unsqueeze(-1)).squeeze(-1) for s, g in noise)
    assert close(got, want.double(), dtype)
    got = tri.sde_update(y, terms, noise, PhiloxNoise(77), "additive")
    z = philox_randn(77, B * m, "cpu").double().reshape(B, m)  # the stream laid out as the (B, m) increments
    want = y.double() + sum(c * f.double() for c, f in terms) + sum(
        s * torch.bmm(g.double(), z.unsqueeze(-1)).squeeze(-1) for s, g in noise)
    assert float((got.double() - want).abs().max()) < (1e-6 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_matrix_noise_kernel_on_half_types_strided_inputs_and_several_blocks(tri, dtype):
    """B * d = 2,103 elements (three blocks, the last partial), y and dW transposed views, G a slice: the
    kernel against the float64 formula (half types accumulate in float32 and round once)."""
    B, d, m = 701, 3, 2
    y = rnd((d, B), dtype, 0).t()
    f = rnd((B, d), dtype, 1)
    G = rnd((B, d, m + 1), dtype, 2)[..., :m]
    dw = rnd((m, B), dtype, 3).t()
    assert not (y.is_contiguous() or G.is_contiguous() or dw.is_contiguous())
    got = tri.sde_update(y, [(0.1, f)], [(0.5, G)], dw, "general")
    want = y.double() + 0.1 * f.double() + 0.5 * torch.bmm(G.double(), dw.double().unsqueeze(-1)).squeeze(-1)
    assert got.dtype == dtype and close(got, want, dtype)


@pytest.mark.parametrize("row", [1, 2, 3, 4, 6, 8, 12, 1030])
def test_per_row_noise_is_one_draw_per_row_for_every_row_length(tri, row):
    """Scalar noise draws once per run of 1, 2 or 4 elements (the largest dividing the row) and spreads it
    over the run: every element of a row sees its row's draw, the Philox stream at the row (the mirror),
    for row lengths of each run size, blocks that end mid-row and a last block that is not full."""
    B = 3000 // row + 1
    y = torch.zeros(B, row, dtype=torch.float64)
    got = tri.combine([(1.0, y)], [(1.0, None)], PhiloxNoise(2024), rowwise=True)
    want = philox_randn(2024, B, "cpu").double()
    assert float((got - want[:, None]).abs().max()) < 1e-6
    assert torch.equal(got, got[:, :1].expand(B, row))  # one value per row, bit for bit
    d = row if row <= 12 else 4  # matrix noise: a (batch, d, m) matrix times m draws per batch row
    G = torch.ones(B, d, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    got = tri.sde_update(torch.zeros(B, d, dtype=torch.float64), [], [(1.0, G)], PhiloxNoise(7), "general")
    dw = philox_randn(7, B * 3, "cpu").double().reshape(B, 3)
    assert float((got - (dw @ torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))[:, None]).abs().max()) < 1e-4


def test_sdeint_additive_noise_drawn_in_the_kernel_equals_the_mirrored_path():
    from flowsde.brownian import GridBrownian
    from flowsde.problems import OrnsteinUhlenbeck
    sde = OrnsteinUhlenbeck(1.0, 0.5, noise_type="additive")
    y0 = torch.ones(64, 2, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a = flowsde.sdeint(sde, y0, ts, dt=0.05, seed=3, options=dict(backend="triton"))
    m = sde.g(ts[0], y0).shape[-1]
    bm = GridBrownian(t0=0, t1=1, steps=20, shape=(64, m), seed=3, dtype=torch.float64, stream="philox")
    b = flowsde.sdeint(sde, y0, ts, bm=bm, dt=0.05, options=dict(backend="torch"))
    assert float((a - b).abs().max()) < 1e-6


@pytest.mark.parametrize("shape", [(5,), (37, 3), (9, 2, 65)])
@pytest.mark.parametrize("per_row", [False, True])
def test_brownian_tree_kernel_matches_the_reference(tri, shape, per_row):
    """The tree query kernel against its PyTorch specification: one time for all rows or one per row, all
    rows or a subset, the ends of the interval, a shape not a multiple of the block. The normals are the
    same Philox stream through the same float64 Box–Muller, rounded once: equal to rounding."""
    bm = flowsde.VirtualBrownianTree(-1.0, 3.0, shape, seed=12, dtype=torch.float64)
    B = shape[0]
    g = torch.Generator().manual_seed(1)
    t = (torch.rand(B, generator=g, dtype=torch.float64) * 4 - 1) if per_row else torch.tensor(0.83, dtype=torch.float64)
    if per_row:
        t[0], t[-1] = -1.0, 3.0
    ref = bm.at(t, ops=kernels.ops("torch"))
    got = bm.at(t, ops=tri)
    assert got.shape == ref.shape == shape and float((got - ref).abs().max()) < 1e-12
    rows = torch.arange(B - 1, -1, -2)
    tr = t[rows] if per_row else t
    assert float((bm.at(tr, rows, ops=tri) - ref[rows]).abs().max()) < 1e-12
    if per_row:
        assert float(got[0].abs().max()) == 0.0


@pytest.mark.parametrize("per_sample,method,sde_type", [(False, "milstein", "ito"), (True, "heun", "stratonovich")])
def test_adaptive_sdeint_backends_take_the_same_steps(per_sample, method, sde_type):
    """The tree kernel draws the specification's normals bit for bit and step ends sit on the tree's leaf
    grid, so the triton backend takes the torch backend's steps on a rough path (not only close values)."""
    from flowsde.problems import GeometricBrownianMotion
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5, sde_type=sde_type)
    y0 = torch.ones(12, 2, dtype=torch.float64)
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    out = {}
    for be in ("torch", "triton"):
        bm = flowsde.VirtualBrownianTree(0.0, 1.0, (12, 2), seed=2, tol=2.0 ** -12, dtype=torch.float64)
        out[be] = flowsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=0.1, adaptive=True, rtol=1e-2, atol=1e-2,
                                 options=dict(backend=be, per_sample=per_sample, return_stats=True))
    (a, sa), (b, sb) = out["torch"], out["triton"]
    assert float((a - b).abs().max()) < 1e-12
    assert torch.equal(torch.as_tensor(sa["accepted"]), torch.as_tensor(sb["accepted"]))


# ---- edge cases found in review: each one a difference between the backends, or a wrong answer ----------

def _both(fn):
    """``fn(ops)`` on the triton and the torch backend."""
    return fn(kernels.ops("triton", "cpu")), fn(kernels.ops("torch"))


def test_empty_batches_and_empty_rows():
    y = torch.empty(0, 3, dtype=torch.float64)
    a, b = _both(lambda o: o.lincomb(y, [(0.5, y)]))
    assert a.shape == b.shape == (0, 3)
    a, b = _both(lambda o: o.sde_update(y, [(0.1, y)], [(0.2, y)], PhiloxNoise(1), "diagonal"))
    assert a.shape == b.shape == (0, 3)
    z = torch.empty(3, 0, dtype=torch.float64)
    a, b = _both(lambda o: o.error_norm(z, z, z, 1e-3, 1e-6))
    assert a.shape == b.shape == (3,) and bool(a.isnan().all()) and bool(b.isnan().all())


def test_given_noise_broadcasts_as_in_pytorch_or_is_refused():
    y, g = rnd((5, 3), torch.float64, 0), rnd((5, 3), torch.float64, 1)
    for dw in (rnd((3,), torch.float64, 2), rnd((5, 1), torch.float64, 3)):  # broadcast over batch / row
        a, b = _both(lambda o: o.combine([(1.0, y)], [(0.5, g)], dw))
        assert torch.allclose(a, b, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.ops("triton", "cpu").combine([(1.0, y)], [(0.5, g)], rnd((4,), torch.float64, 4))
    with pytest.raises(ValueError, match="one value per batch row"):
        kernels.ops("triton", "cpu").combine([(1.0, y)], [(0.5, g)], rnd((5, 3), torch.float64, 5), rowwise=True)


def test_out_overlapping_a_broadcast_operand_is_read_before_it_is_written():
    y0 = torch.arange(3000, dtype=torch.float64) + 7
    for make in (lambda y: [(1.0, y), (-1.0, y[0])],                 # a scalar view of out
                 lambda y: [(1.0, y), (0.5, y[:1].expand(3000))]):    # an expanded view of out
        a, b = y0.clone(), y0.clone()
        kernels.ops("triton", "cpu").combine(make(a), out=a)
        kernels.ops("torch").combine(make(b), out=b)
        assert torch.equal(a, b)
    Y = rnd((1500, 2), torch.float64, 0)
    a, b = Y.clone(), Y.clone()  # a per-row operand that is a column of out
    kernels.ops("triton", "cpu").combine([(1.0, a), (2.0, a[:, :1])], [(0.1, a[:, 1:])], rnd((1500, 2), torch.float64, 1),
                                         out=a)
    kernels.ops("torch").combine([(1.0, b), (2.0, b[:, :1])], [(0.1, b[:, 1:])], rnd((1500, 2), torch.float64, 1), out=b)
    assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_device_keys_use_all_64_bits_on_both_backends():
    y = rnd((300,), torch.float64, 0)
    for key in (-5, -(2 ** 63), 2 ** 62 + 3):
        a, b = _both(lambda o: o.combine([(1.0, y)], [(1.0, None)], PhiloxNoise(torch.tensor(key))))
        assert float((a - b).abs().max()) < 1e-6
    a, b = (kernels.ops("torch").combine([(0.0, y)], [(1.0, None)], PhiloxNoise(torch.tensor(k))) for k in (-5, 2 ** 63 - 5))
    assert not torch.equal(a, b)  # the top bit is part of the key


def test_the_first_term_fixes_the_shape_even_with_a_zero_coefficient():
    y53, f53, p51 = rnd((5, 3), torch.float64, 0), rnd((5, 3), torch.float64, 1), rnd((5, 1), torch.float64, 2)
    a, b = _both(lambda o: o.combine([(0.0, y53), (1.0, p51), (1.0, f53)]))
    assert a.shape == b.shape == (5, 3) and torch.allclose(a, b)
    inf = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    a, b = _both(lambda o: o.combine([(0.0, inf), (1.0, torch.ones(2, dtype=torch.float64))]))
    assert torch.equal(a.isnan(), b.isnan()) and bool(a[0].isnan())


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16, None, None),      # a half model output
                                    (torch.float16, torch.float32, None, None),      # a half state first
                                    (torch.bfloat16, torch.float16, None, None),     # two halves: float32
                                    (torch.float32, torch.float32, torch.float64, None),  # a float64 diffusion
                                    (torch.float16, torch.float16, torch.float16, torch.float32),  # given noise
                                    (torch.float64, torch.float32, torch.float16, torch.float16)])
def test_mixed_dtypes_promote_as_pytorch_on_both_backends(dtypes):
    """The result's dtype is PyTorch's promotion over every operand (the triton kernel took the first term's:
    a float16 state with a float32 derivative gave float16 there, float32 on torch)."""
    ty, tk, tg, tz = dtypes
    y, k = rnd((6, 5), ty, 0), rnd((6, 5), tk, 1)
    want = torch.promote_types(ty, tk)
    a, b = _both(lambda o: o.combine([(1.0, y), (0.3, k)]))
    assert a.dtype == b.dtype == want and torch.allclose(a.double(), b.double(), rtol=0, atol=TOL[want])
    a, b = _both(lambda o: o.lincomb(y, [(0.3, k)]))
    assert a.dtype == b.dtype == want and torch.allclose(a.double(), b.double(), rtol=0, atol=TOL[want])
    a, b = _both(lambda o: o.combine([(1.0, y), (0.0, k)]))  # a zero coefficient still promotes
    assert a.dtype == b.dtype == want and torch.equal(a, y.to(want)) and torch.equal(b, y.to(want))
    if tg is None:
        return
    g = rnd((6, 5), tg, 2)
    noise = rnd((6, 5), tz, 3) if tz is not None else PhiloxNoise(7)
    want = reference.result_dtype(y, k, g, noise if tz is not None else None)
    exact = y.double() + 0.3 * k.double() + 0.5 * g.double() * (
        noise.double() if tz is not None else philox_randn(7, 30, "cpu").double().reshape(6, 5))
    for nt in ("diagonal", "scalar"):
        gg, dw = (g, noise) if nt == "diagonal" else (g[..., None], noise if tz is None else noise[:, :1])
        if nt == "scalar":
            exact = y.double() + 0.3 * k.double() + 0.5 * g.double() * (
                dw.double() if tz is not None else philox_randn(7, 6, "cpu").double().reshape(6, 1))
        a, b = _both(lambda o: o.sde_update(y, [(0.3, k)], [(0.5, gg)], dw, nt))
        assert a.dtype == b.dtype == want, nt
        # drawn noise is float32 (the kernel's Box-Muller and the mirror's differ in the last bit)
        tol = want if tz is not None or want != torch.float64 else torch.float32
        assert close(a, exact, tol) and close(b, exact, tol), nt
    G, dw = rnd((6, 5, 2), tg, 4), (rnd((6, 2), tz, 5) if tz is not None else PhiloxNoise(9))
    a, b = _both(lambda o: o.sde_update(y, [(0.3, k)], [(0.5, G)], dw, "general"))
    assert a.dtype == b.dtype == reference.result_dtype(y, k, G, dw if tz is not None else None)
    assert torch.allclose(a.double(), b.double(), rtol=0, atol=TOL[tol] * 4)


def test_coefficients_the_kernel_cannot_hold_go_to_the_reference():
    y, k = rnd((40, 3), torch.float64, 0), rnd((40, 3), torch.float64, 1)
    h = torch.full((40, 1), 0.5, dtype=torch.float64)  # per-row device coefficients
    a, b = _both(lambda o: o.combine([(1.0, y), (h, k)]))
    assert torch.allclose(a, b, rtol=0, atol=1e-15)
    a, b = _both(lambda o: o.lerp(y, k, h))
    assert torch.allclose(a, b, rtol=0, atol=1e-15)
    for c in (1e39, 1e-44, float("inf"), 2.0 ** -101):  # outside what a float32 (hi, lo) pair holds
        a, b = _both(lambda o: o.lincomb(y, [(c, k)]))
        assert torch.equal(a.isnan(), b.isnan()) and torch.allclose(a, b, rtol=1e-15, atol=0, equal_nan=True), c
    y32, k32 = y.float(), k.float()
    for c in (float("inf"), 1e-44, float("nan"), 0.1):  # float32 data: the coefficient rounds as in PyTorch
        a, b = _both(lambda o: o.lincomb(y32, [(c, k32)]))
        assert torch.equal(a.isnan(), b.isnan()) and torch.allclose(a, b, rtol=1e-6, atol=0, equal_nan=True), c
    with pytest.raises(ValueError, match="overflows"):  # PyTorch refuses it too
        kernels.ops("triton", "cpu").lincomb(y32, [(1e39, k32)])


def test_the_int64_index_path_of_every_kernel_gives_the_same_results(monkeypatch):
    """Tensors of 2^31 elements or more are indexed in int64 (int32 indices would wrap and pass the bounds
    mask); that path is forced here on small tensors and must change nothing."""
    from flowsde.brownian import VirtualBrownianTree
    from flowsde.kernels import combine as C
    from flowsde.solvers.linear import solve_linear_sde
    tri = kernels.ops("triton", "cpu")
    y, f, g = (rnd((1100, 3), torch.float32, i) for i in range(3))
    G, dw = rnd((50, 3, 2), torch.float32, 5), rnd((50, 2), torch.float32, 6)
    bm = VirtualBrownianTree(0.0, 1.0, (600, 2), seed=2, dtype=torch.float64)
    t = torch.rand(600, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = [lambda: tri.sde_update(y, [(0.1, f)], [(0.2, g)], PhiloxNoise(3), "diagonal"),
             lambda: tri.combine([(1.0, y), (0.5, g[:, :1])], [(0.3, None)], PhiloxNoise(torch.tensor(4))),
             lambda: tri.normal(7, (1100, 3), torch.float32, "cpu"),
             lambda: tri.error_norm(y, f, g, 1e-3, 1e-6),
             lambda: tri.sde_update(y[:50], [(0.1, f[:50])], [(0.2, G)], dw, "general"),
             lambda: solve_linear_sde(y[:, 0], torch.tensor([0.0, 0.5, 1.0]), 1 / 8, a=-1.0, d=0.5, seed=1,
                                      backend="triton"),
             lambda: bm.at(t, ops=tri)]
    small = [fn() for fn in calls]
    monkeypatch.setattr(C, "LARGE_NUMEL", 0)
    for fn, expected in zip(calls, small):
        assert torch.equal(fn(), expected)


def test_constexprs_reach_the_fast_launch_in_the_kernels_order(monkeypatch):
    """On CUDA a cached compiled kernel is launched with the constexprs positionally (combine._launch): every
    launcher must pass all of them, in the kernel's signature order."""
    import inspect

    from flowsde.brownian import VirtualBrownianTree
    from flowsde.kernels import combine as C
    seen = []
    real = C._launch

    def spy(kernel, n_programs, args, consts, num_warps, cuda, **options):
        seen.append((kernel, list(consts)))
        return real(kernel, n_programs, args, consts, num_warps, cuda, **options)
    import flowsde.kernels.tree as T
    from flowsde.kernels import matrix_noise, norm
    for module in (C, T, matrix_noise, norm):
        monkeypatch.setattr(module, "_launch", spy)
    tri = kernels.ops("triton", "cpu")
    y, f, g = (rnd((40, 3), torch.float32, i) for i in range(3))
    tri.sde_update(y, [(0.1, f)], [(0.2, g)], PhiloxNoise(3), "diagonal")
    tri.error_norm(y, f, g, 1e-3, 1e-6)
    tri.sde_update(y[:8], [(0.1, f[:8])], [(0.2, rnd((8, 3, 2), torch.float32, 5))], rnd((8, 2), torch.float32, 6),
                   "general")
    VirtualBrownianTree(0.0, 1.0, (8, 2), seed=1).at(torch.rand(8, dtype=torch.float64), ops=tri)
    assert len({k for k, _ in seen}) == 4
    for kernel, names in seen:
        fn = getattr(kernel, "fn", kernel)
        order = [n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)]
        assert names == order, (fn.__name__, names, order)


def test_gradients_flow_through_the_triton_backend_as_through_torch():
    """Under autograd the fused combine runs with its adjoint and the kernels without a backward run the
    PyTorch ops, so odeint, sdeint and the whole-trajectory solver differentiate on either backend."""
    from flowsde.solvers.linear import solve_linear_sde
    lin = torch.nn.Linear(3, 3).double()
    torch.nn.init.normal_(lin.weight, std=0.5, generator=torch.Generator().manual_seed(0))

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return lin(y)

        def g(self, t, y):
            return 0.3 * torch.sin(y)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = {}
    for be in ("torch", "triton"):
        out = []
        for solve in (lambda y0: flowsde.sdeint(SDE(), y0, ts, bm=torchsde.BrownianInterval(
                          0.0, 1.0, size=(5, 3), dtype=torch.float64, entropy=2), dt=0.1, method="milstein",
                          options=dict(backend=be)),
                      lambda y0: flowsde.odeint(lambda t, y: lin(y), y0, ts, method="rk4",
                                                options=dict(step_size=0.1, backend=be))):
            y0 = rnd((5, 3), torch.float64, 1).requires_grad_(True)
            lin.zero_grad()
            solve(y0)[-1].pow(2).sum().backward()
            out += [y0.grad, lin.weight.grad.clone()]
        x0 = torch.ones(6, dtype=torch.float64, requires_grad=True)
        solve_linear_sde(x0, ts, 0.1, a=-1.0, c=0.2, d=0.5, seed=1, backend=be)[-1].sum().backward()
        grads[be] = out + [x0.grad]
    for a, b in zip(grads["torch"], grads["triton"]):
        assert b is not None and float(a.abs().max()) > 0.1 and float((a - b).abs().max()) < 1e-12
    with torch.no_grad():  # without autograd the kernels run (same numbers)
        y0 = rnd((5, 3), torch.float64, 1)
        a = flowsde.odeint(lambda t, y: lin(y), y0, ts, method="rk4", options=dict(step_size=0.1, backend="triton"))
        b = flowsde.odeint(lambda t, y: lin(y), y0, ts, method="rk4", options=dict(step_size=0.1, backend="torch"))
    assert float((a - b).abs().max()) < 1e-12


def test_error_norm_with_tolerances_beyond_the_kernels_coefficient_range(tri):
    y, e = torch.zeros(2, 3, dtype=torch.float64), torch.full((2, 3), 1e-300, dtype=torch.float64)
    got, want = tri.error_norm(y, y, e, 1e-3, 1e-200), reference.error_norm(y, y, e, 1e-3, 1e-200)
    assert torch.allclose(got, want) and torch.allclose(want, torch.full((2,), 1e-100, dtype=torch.float64))


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("case", ["terms", "broadcast", "given-noise", "rowwise", "philox", "philox-rowwise", "unit"])
def test_the_fused_combine_differentiates_twice_like_the_reference(tri, case):
    """The kernel's adjoint (flowsde.kernels.autograd) by finite differences (gradcheck, gradgradcheck in
    float64), and against autograd through the PyTorch ops, which the torch backend records: gradients,
    Hessian-vector products, forward-mode tangents (jvp) and torch.func.grad."""
    d = torch.float64
    x, k, g, dw = (rnd((3, 4), d, i) for i in range(4))
    row, one, dwr = rnd((3, 1), d, 5), rnd((1,), d, 6), rnd((3, 1), d, 7)
    key = PhiloxNoise(99)
    cases = {  # (tensors, call(ops, *tensors))
        "terms": ((x, k), lambda o, x, k: o.combine([(1.0, x), (0.3, k), (-0.7, x)])),
        "broadcast": ((x, row, one), lambda o, x, r, c: o.combine([(1.0, x), (0.5, r), (-2.0, c)])),
        "given-noise": ((x, k, g, dw), lambda o, x, k, g, w: o.combine([(1.0, x), (0.1, k)], [(0.5, g), (0.2, k)], w)),
        "rowwise": ((x, g, dwr), lambda o, x, g, w: o.combine([(1.0, x)], [(0.5, g)], w, rowwise=True)),
        "philox": ((x, g, row), lambda o, x, g, r: o.combine([(1.0, x)], [(0.5, g), (0.25, r)], key)),
        "philox-rowwise": ((x, g), lambda o, x, g: o.combine([(1.0, x)], [(0.5, g)], key, rowwise=True)),
        "unit": ((x, dw), lambda o, x, w: o.combine([(1.0, x)], [(0.5, None)], w)),
    }
    tensors, call = cases[case]
    ref = kernels.ops("torch")
    leaves = _leaves(*tensors)
    out = call(tri, *leaves)
    assert type(out.grad_fn).__name__ == "_FusedCombineBackward"  # the kernel ran, not the PyTorch ops
    assert torch.autograd.gradcheck(lambda *a: call(tri, *a), leaves)
    if "philox" not in case:  # (the Philox cases' second derivatives: the Hessian-vector products below)
        assert torch.autograd.gradgradcheck(lambda *a: call(tri, *a), leaves)
    weight = rnd(out.shape, d, 11)
    for ops in (tri, ref):  # first and second derivatives: the Hessian-vector product of <w, out>^2
        lv = _leaves(*tensors)
        y = call(ops, *lv)
        grads = torch.autograd.grad((y * weight).sum() ** 2, lv, create_graph=True)
        hvp = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, tensors)), lv)
        if ops is tri:
            got = [t.detach() for t in (y, *grads, *hvp)]
        else:
            want = [t.detach() for t in (y, *grads, *hvp)]
    tangents = [rnd(t.shape, d, 20 + i) for i, t in enumerate(tensors)]
    for ops in (tri, ref):  # forward mode: dual tensors (no requires_grad), the kernel's jvp
        with torch.autograd.forward_ad.dual_level():
            y = call(ops, *[torch.autograd.forward_ad.make_dual(t, v) for t, v in zip(tensors, tangents)])
            (got if ops is tri else want).append(torch.autograd.forward_ad.unpack_dual(y).tangent)
    for a, b in zip(got, want):  # the Philox cases: the mirror equals the kernel's stream to float32 rounding
        assert a.shape == b.shape and float((a - b).abs().max()) <= (1e-12 if "philox" not in case else 1e-5) * max(
            1.0, float(b.abs().max())), case
    # torch.func transforms wrap their tensors, which a kernel cannot read: the PyTorch ops run
    argnums = tuple(range(len(tensors)))
    for a, b in zip(torch.func.grad(lambda *a: call(tri, *a).sum(), argnums=argnums)(*tensors),
                    torch.func.grad(lambda *a: call(ref, *a).sum(), argnums=argnums)(*tensors)):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max())), case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_fused_combine_returns_gradients_in_each_inputs_dtype(tri, dtype):
    x, k, g = (rnd((33, 4), dtype, i) for i in range(3))
    lv = _leaves(x, k, g)
    tri.combine([(1.0, lv[0]), (0.5, lv[1])], [(0.3, lv[2])], PhiloxNoise(3)).float().pow(2).sum().backward()
    lw = _leaves(x, k, g)
    kernels.ops("torch").combine([(1.0, lw[0]), (0.5, lw[1])], [(0.3, lw[2])], PhiloxNoise(3)).float().pow(2).sum().backward()
    for a, b in zip(lv, lw):
        assert a.grad.dtype == dtype and close(a.grad, b.grad.double(), dtype)


def test_the_adjoint_draws_the_noise_of_the_forwards_key_even_if_its_memory_is_rewritten(tri):
    x, g = _leaves(rnd((5, 4), torch.float64, 0), rnd((5, 4), torch.float64, 1))
    key = torch.tensor(41, dtype=torch.int64)
    y = tri.combine([(1.0, x)], [(0.5, g)], PhiloxNoise(key))
    key.fill_(42)  # a loop's next step
    y.sum().backward()
    assert torch.equal(g.grad, 0.5 * tri.normal(41, (5, 4), torch.float64, "cpu"))


def test_forward_mode_tangents_flow_through_the_triton_backend_as_through_torch():
    """Dual tensors (torch.autograd.forward_ad) do not require grad: the triton backend once took them for
    constants (a zero tangent, silently). Now the fused combine pushes tangents through (jvp) and the
    kernels without one run the PyTorch ops: odeint (fixed and adaptive), sdeint on a given bm and the
    whole-trajectory solver give the torch backend's tangents."""
    import torch.autograd.forward_ad as fwAD
    from flowsde.solvers.linear import solve_linear_sde
    from flowsde.problems import OrnsteinUhlenbeck
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x = rnd((5, 3), torch.float64, 1)
    out = {}
    for be in ("torch", "triton"):
        o = dict(backend=be)
        with fwAD.dual_level():
            y = fwAD.make_dual(x, torch.ones_like(x))
            bm = torchsde.BrownianInterval(0.0, 1.0, size=(5, 3), dtype=torch.float64, entropy=2)
            runs = [flowsde.odeint(lambda t, z: torch.sin(z) - z, y, ts, method="rk4", options=dict(step_size=0.1, **o)),
                    flowsde.odeint(lambda t, z: torch.sin(z) - z, y, ts, method="dopri5", options=o),
                    flowsde.sdeint(OrnsteinUhlenbeck(1.0, 0.5), y, ts, bm=bm, dt=0.1, options=o),
                    solve_linear_sde(y, ts, 0.1, a=-1.0, c=0.2, d=0.5, seed=1, backend=be)]
            out[be] = [fwAD.unpack_dual(r[-1]).tangent for r in runs]
    for a, b in zip(out["torch"], out["triton"]):
        assert b is not None and float(a.abs().max()) > 0.1 and float((a - b).abs().max()) < 1e-12


def test_empty_batches_differentiate(tri):
    for shape, row in (((0, 4), (0, 1)), ((0,), (0,))):
        y, g, w = _leaves(torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64),
                          torch.zeros(row, dtype=torch.float64))
        tri.combine([(1.0, y)], [(0.3, g)], w, rowwise=True).sum().backward()
        assert y.grad.shape == shape and g.grad.shape == shape and w.grad.shape == row


def test_under_autograd_the_kernels_without_a_backward_run_the_pytorch_ops(tri):
    x, f = _leaves(rnd((4, 3), torch.float64, 0), rnd((4, 3), torch.float64, 1))
    G, dw = rnd((4, 3, 2), torch.float64, 2), rnd((4, 2), torch.float64, 3)
    y = tri.sde_update(x, [(0.1, f)], [(1.0, G)], dw, "general")  # the matrix-noise kernel
    assert type(y.grad_fn).__name__ != "_FusedCombineBackward"
    assert torch.allclose(y, reference.sde_update(x, [(0.1, f)], [(1.0, G)], dw, "general"))
    out = torch.empty(4, 3, dtype=torch.float64)
    y = tri.combine([(1.0, x), (2.0, f)], out=out)  # out= under autograd: the PyTorch op writes it
    assert y.grad_fn is not None and torch.allclose(out, x + 2 * f)
    with torch.no_grad():
        assert tri.combine([(1.0, x), (2.0, f)]).grad_fn is None


def test_backpropagation_through_sample_runs_the_fused_steps_and_matches_the_torch_backend():
    """Fine-tuning through the sampler (DDIM with guidance and eta noise from the Philox stream, the
    SDE-extension sampler): the fused steps and their adjoint give the torch backend's gradients on the
    same noise (the mirror); the model's output reaches the fused step (a _FusedCombineBackward node)."""
    from flowsde.paths.grids import time_grid
    from flowsde.sampling import PathField, _extension_em
    from flowsde.solvers.ddim import ddim
    lin = torch.nn.Linear(3, 2).double()
    model = lambda x, t, c: lin(torch.cat([x, c * t[:, None]], 1))  # noqa: E731
    x0 = rnd((10, 2), torch.float64, 3)
    cond, uncond = torch.full((10, 1), 2.0, dtype=torch.float64), torch.zeros(10, 1, dtype=torch.float64)
    path = flowsde.paths.VPCosine()
    grid = time_grid(path, 5, 0.05, 1.0)
    tg = torch.as_tensor(grid)
    alpha, beta = path.alpha(tg).tolist(), path.beta(tg).tolist()
    grads = {}
    for be in ("triton", "torch"):
        lin.zero_grad()
        field = PathField(model, path, "epsilon", x0, cond, uncond, 2.5, grid)
        out = ddim(field, x0, grid, alpha, beta, 1.0, 2, kernels.ops(be), stream="philox")
        ext = PathField(lambda x, t: lin(torch.cat([x, t[:, None]], 1)), flowsde.paths.CondOT(), "velocity", x0,
                        grid=time_grid(flowsde.paths.CondOT(), 5, 0.0, 0.9))
        out2 = _extension_em(ext, x0, time_grid(flowsde.paths.CondOT(), 5, 0.0, 0.9), 0.8, 5, kernels.ops(be),
                             stream="philox")
        assert be == "torch" or type(out.grad_fn).__name__ == "_FusedCombineBackward"
        (out.pow(2).sum() + out2.pow(2).sum()).backward()
        grads[be] = (lin.weight.grad.clone(), lin.bias.grad.clone())
    for a, b in zip(grads["triton"], grads["torch"]):
        assert float(b.abs().max()) > 1e-3 and float((a - b).abs().max()) < 1e-5 * float(b.abs().max())


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not on its arguments': each launcher makes the output's
    device current first (a state on cuda:1 while cuda:0 is current), as PyTorch's ops do."""
    import contextlib

    from flowsde.brownian import VirtualBrownianTree
    from flowsde.kernels import combine as C
    from flowsde.solvers.linear import solve_linear_sde
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("left")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    for same in (torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda")):
        assert isinstance(C._on_device(same), contextlib.nullcontext)
    with C._on_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    assert entered[-1] == "left"
    monkeypatch.undo()
    guarded = []
    real = C._on_device
    from flowsde.kernels import trajectory
    for module in (C, trajectory):  # (the whole-trajectory kernel's file enters the guard itself)
        monkeypatch.setattr(module, "_on_device", lambda device: (guarded.append(device), real(device))[1])
    tri = kernels.ops("triton", "cpu")
    y, f, g = (rnd((40, 3), torch.float32, i) for i in range(3))
    tri.sde_update(y, [(0.1, f)], [(0.2, g)], PhiloxNoise(3), "diagonal")
    tri.error_norm(y, f, g, 1e-3, 1e-6)
    tri.sde_update(y[:8], [(0.1, f[:8])], [(0.2, rnd((8, 3, 2), torch.float32, 5))], PhiloxNoise(4), "general")
    tri.normal(5, (7,), torch.float32, "cpu")
    solve_linear_sde(y[:, 0], torch.tensor([0.0, 1.0]), 0.5, a=-1.0, d=0.5, seed=1, backend="triton")
    VirtualBrownianTree(0.0, 1.0, (8, 2), seed=1).at(torch.rand(8, dtype=torch.float64), ops=tri)
    assert len(guarded) == 6 and all(d == torch.device("cpu") for d in guarded)


def test_operands_on_another_device_are_refused_by_name(tri, monkeypatch):
    """A kernel would dereference another device's pointer (an illegal address, or garbage) where PyTorch
    raises: every launcher checks its operands' devices; a 0-dim CPU tensor is taken, as PyTorch takes it."""
    from flowsde.kernels import combine as C
    y, f = rnd((6, 2), torch.float64, 0), rnd((6, 2), torch.float64, 1)
    meta = torch.empty(6, 2, dtype=torch.float64, device="meta")  # stands for a tensor on another device
    for call, what in ((lambda: C.combine([(1.0, y), (0.5, meta)]), "a term"),
                       (lambda: C.combine([(1.0, y)], [(0.5, meta)], None), "a diffusion value"),
                       (lambda: C.combine([(1.0, y)], [(0.5, f)], meta), "the noise"),
                       (lambda: C.combine([(1.0, y)], out=meta), "out must be"),
                       (lambda: C.error_norm(meta, y, f, 1e-3, 1e-6), "y0"),
                       (lambda: C.matrix_noise_update(y, [], [(1.0, torch.empty(6, 2, 3, dtype=torch.float64,
                                                                                   device="meta"))]),
                        "a diffusion matrix")):
        with pytest.raises(ValueError, match=what):
            call()
    got = C.combine([(1.0, y), (0.5, torch.tensor(2.0, dtype=torch.float64))])  # a scalar: broadcast
    assert torch.allclose(got, y + 1.0)
    assert C._on(torch.device("meta"), torch.tensor(2.0), "x").device.type == "meta"  # a CPU scalar: moved


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_states_accumulate_in_float32_on_both_backends(dtype):
    """The PyTorch ops rounded the first term to the half type before adding the rest (and float16 refused
    a coefficient beyond 65504): DDIM in float16 from t = 1e-5 was off by ~8 on the torch backend, Heun
    raised. Both backends now accumulate in float32 and round once."""
    x = torch.full((4,), 300.0, dtype=dtype)
    for be in ("torch", "triton"):
        assert torch.equal(kernels.ops(be, "cpu").combine([(1000.0, x), (-1000.0, x)]), torch.zeros(4, dtype=dtype))
    model = lambda x, t: x  # noqa: E731
    x0 = rnd((64, 2), torch.float64, 4)
    for method in ("ddim", "heun"):
        kw = dict(path=flowsde.paths.VPCosine(), prediction="epsilon", method=method, steps=10, t_start=1e-5)
        exact = flowsde.sample(model, x0, backend="torch", **kw)
        for be in ("torch", "triton"):
            got = flowsde.sample(model, x0.to(dtype), backend=be, **kw)
            assert got.dtype == dtype and float((got.double() - exact).abs().max()) < 0.05 * float(exact.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_channels_last_states_run_in_memory_order_without_copies(dtype, monkeypatch):
    """A channels_last state (dense, batch outermost) is computed in its memory order: operands laid out as
    it are read in place (not copied per step), the result keeps its strides as PyTorch's ops do, and the
    numbers (the drawn noise too, defined in logical order) equal the contiguous state's bit for bit."""
    from flowsde.kernels import combine as C
    cl = dict(memory_format=torch.channels_last)
    x, k = rnd((2, 3, 4, 5), dtype, 0).to(**cl), rnd((2, 3, 4, 5), dtype, 1).to(**cl)
    kc, row = rnd((2, 3, 4, 5), dtype, 2), rnd((2, 1, 1, 1), dtype, 3)
    read = []
    launch = C._launch
    monkeypatch.setattr(C, "_launch", lambda kern, n, args, *a, **kw: (
        read.append({t.data_ptr() for t in args if isinstance(t, torch.Tensor)}), launch(kern, n, args, *a, **kw))[1])
    tri, ref = kernels.ops("triton", "cpu"), kernels.ops("torch")
    cases = [([(1.0, x), (0.5, k)], (), None, False),
             ([(1.0, x), (0.5, kc), (2.0, row)], [(0.3, k)], PhiloxNoise(3), False),   # a contiguous term
             ([(1.0, x)], [(0.3, None)], rnd((2, 1), dtype, 4), True),                # per-row noise
             ([(1.0, x)], [(0.2, k)], rnd((2, 3, 4, 5), dtype, 5).to(**cl), False),  # given noise
             ([(1.0, x), (0.1, k)], [(0.3, row)], PhiloxNoise(5), True)]              # drawn per row
    for terms, diffusion, noise, rowwise in cases:
        read.clear()
        a = tri.combine(terms, diffusion, noise, rowwise)
        assert {x.data_ptr(), k.data_ptr()} & set().union(*read) == {x.data_ptr(), k.data_ptr()} & {
            t.data_ptr() for _, t in terms + [d for d in diffusion if d[1] is not None]}
        flat = tri.combine([(c, t.contiguous()) for c, t in terms],
                           [(s, None if g is None else g.contiguous()) for s, g in diffusion],
                           noise.contiguous() if isinstance(noise, torch.Tensor) else noise, rowwise)
        b = ref.combine(terms, diffusion, noise, rowwise)
        assert a.stride() == b.stride() == x.stride() and torch.equal(a, flat)
        drawn = isinstance(noise, PhiloxNoise) and dtype == torch.float64  # float32 draws: last-bit differences
        assert close(a, b.double(), torch.float32 if drawn else dtype)
    out = torch.empty_like(x)  # a preallocated result laid out as the state, the state itself too
    assert tri.combine([(1.0, x), (0.5, k)], out=out) is out and torch.equal(out, x + 0.5 * k.to(x.dtype))
    y = x.clone()
    tri.combine([(1.0, y), (-1.0, y)], out=y)
    assert y.stride() == x.stride() and not bool(y.any())
    e0, e1 = (tri.error_norm(x, k, kc.to(**cl), 1e-3, 1e-6), tri.error_norm(x.contiguous(), k.contiguous(), kc, 1e-3, 1e-6))
    assert torch.allclose(e0, e1, rtol=1e-6, atol=0)
    ys = flowsde.odeint(lambda t, v: -v, x.float(), torch.linspace(0, 1, 3), method="rk4",
                        options=dict(step_size=0.25, backend="triton"))
    want = flowsde.odeint(lambda t, v: -v, x.float().contiguous(), torch.linspace(0, 1, 3), method="rk4",
                          options=dict(step_size=0.25, backend="triton"))
    assert ys[-1].is_contiguous(memory_format=torch.channels_last) and torch.equal(ys, want)


def test_dtype_edge_cases_of_the_review_agree_with_pytorch_on_both_backends():
    """Zero terms of a wider dtype widen but are not read (0 * inf); out= of a narrower dtype is written
    as PyTorch's out= writes it; a 0-dim float64 tensor leaves a float32 result float32; a first partial
    sum of more than six terms is held in the accumulation dtype; a half state's drawn noise is float32 on
    the torch backend too (rounded once)."""
    x, inf = rnd((2, 3), torch.float32, 0), torch.full((2, 3), float("inf"), dtype=torch.float64)
    a, b = _both(lambda o: o.combine([(1.0, x), (0.0, inf)]))
    assert a.dtype == b.dtype == torch.float64 and torch.equal(a, x.double()) and torch.equal(b, x.double())
    h, f = rnd((2, 3), torch.float16, 1), rnd((2, 3), torch.float32, 2)
    outs = [h.clone(), h.clone()]
    for o, out in zip((kernels.ops("triton", "cpu"), kernels.ops("torch")), outs):
        assert o.combine([(1.0, out), (0.1, f)], out=out) is out
        assert out.dtype == torch.float16 and torch.equal(out, (h.float() + 0.1 * f).half())
        with pytest.raises(ValueError, match="cannot be written"):
            o.combine([(1.0, h), (0.1, f)], out=torch.empty(2, 3, dtype=torch.int64))
    s64 = torch.tensor(0.25, dtype=torch.float64)
    a, b = _both(lambda o: o.combine([(1.0, x), (2.0, s64)]))
    assert a.dtype == b.dtype == (x + 2.0 * s64).dtype == torch.float32 and torch.equal(a, b)
    y, ks = torch.ones(4), [(1e-9, torch.ones(4))] * 6  # f32 terms, a float64 diffusion: a float64 head
    a, b = _both(lambda o: o.sde_update(y, ks, [(1.0, torch.ones(4, dtype=torch.float64))], torch.zeros(4), "diagonal"))
    assert a.dtype == torch.float64 and torch.allclose(a - 1, b - 1, rtol=1e-6, atol=0) and float(a[0] - 1) > 5e-9
    y16 = torch.full((2,), 1000.0).half()
    ks = [(1.0, torch.full((2,), 0.05).half())] * 5 + [(1.0, torch.zeros(2).half()), (-1.0, y16)]
    a, b = _both(lambda o: o.lincomb(y16, ks))
    assert torch.equal(a, b) and float(a[0]) == 0.25
    yh, gh = rnd((8, 5), torch.float16, 3), rnd((8, 5), torch.float16, 4)
    got = kernels.ops("torch").sde_update(yh, [], [(0.5, gh)], PhiloxNoise(9), "diagonal")
    want = (yh.float() + 0.5 * gh.float() * philox_randn(9, 40).reshape(8, 5)).half()
    assert torch.equal(got, want)


def test_channels_last_path_refuses_terms_that_do_not_broadcast():
    x = rnd((2, 3, 4, 5), torch.float32, 0).to(memory_format=torch.channels_last)
    for o in (kernels.ops("triton", "cpu"), kernels.ops("torch")):
        with pytest.raises((ValueError, RuntimeError)):
            o.combine([(1.0, x), (1.0, rnd((2, 60), torch.float32, 1))])


def test_the_fast_launch_signature_is_the_specialisation_of_every_argument():
    """``_signature`` (inline, on every launch) gives what ``_spec`` gives for each argument: tensors (a
    Parameter too) by dtype and 16-byte alignment, floats alike, ints by divisibility, one and width."""
    from flowsde.kernels import combine as C
    x = torch.randn(9)
    args = [x, x[1:], torch.nn.Parameter(torch.randn(3)), 0.5, 0.0, 7, 16, 1, 2 ** 40, True, x.half()]
    assert C._signature(args) == tuple(C._spec(a) for a in args)
    assert C._signature([x])[0] != C._signature([x[1:]])[0]  # alignment is part of it


def test_the_combines_launch_key_separates_exactly_what_triton_specialises_on(monkeypatch):
    """combine keys its cached compiled kernels on the distinct tensors' dtypes and alignment and its ints
    (not every argument): two launches share a key exactly when their full argument specialisation (and
    constexprs) agree — misaligned views, other dtypes, sizes divisible by 16 or not, tensor keys."""
    from flowsde.kernels import combine as C
    seen = []
    real = C._launch_here

    class Record(dict):
        def get(self, key, default=None):
            return None

        def __setitem__(self, key, value):
            pass

    def here(kernel, n, args, consts, nw, cuda, index=None, sig=None, **options):
        full = (tuple(consts.values()), C._signature(args))
        mine = (tuple(consts.values()), sig if sig is not None else C._signature(args))
        seen.append((full, mine))
        return real(kernel, n, args, consts, nw, False, None, sig, **options)
    monkeypatch.setattr(C, "_launch_here", here)
    monkeypatch.setattr(C, "_COMPILED", Record())
    tri = kernels.ops("triton", "cpu")
    base = rnd((65,), torch.float32, 0)
    for x in (base[:64], base[1:], base[:48].double(), base[:47]):
        k = torch.ones_like(x)
        tri.combine([(1.0, x), (0.5, k)])
        tri.combine([(1.0, x), (0.5, k[:]), (2.0, x)])
        tri.combine([(1.0, x)], [(0.3, None)], PhiloxNoise(7))
        tri.combine([(1.0, x)], [(0.3, None)], PhiloxNoise(16))
        tri.combine([(1.0, x)], [(0.3, k)], PhiloxNoise(torch.tensor(3)))
        tri.combine([(1.0, x)], [(0.3, k)], torch.zeros_like(x))
    assert len(seen) == 24
    for fa, ma in seen:
        for fb, mb in seen:
            assert (fa == fb) == (ma == mb)


def test_the_fast_path_makes_the_general_paths_launch_argument_for_argument(monkeypatch):
    """combine's common case (contiguous operands of the state's shape, no out) takes a short path; its
    launch must equal the general path's exactly: arguments (the same tensors, the same floats and ints),
    constexprs and specialisation key — and so its result."""
    from flowsde.kernels import combine as C
    calls = []
    real = C._launch

    def spy(kernel, n, args, consts, nw, device, sig=None, **options):
        out = args[0]
        calls.append(([("out", a.dtype, tuple(a.shape)) if a is out else a for a in args], dict(consts), sig, nw, n))
        return real(kernel, n, args, consts, nw, device, sig=sig, **options)
    monkeypatch.setattr(C, "_launch", spy)
    tri = kernels.ops("triton", "cpu")
    y, f, g, h = (rnd((33, 3), torch.float32, i) for i in range(4))
    d = [t.double() for t in (y, f, g, h)]
    key7, yh, gh, v7 = torch.tensor(7), y.half(), g.half(), rnd((7,), torch.float64, 9)
    cases = [
        lambda: C.combine([(1.0, y), (0.5, f)]),
        lambda: C.combine([(1.0, y), (0.1, f), (0.2, g), (0.3, h), (0.4, y), (0.5, f)]),
        lambda: C.combine([(1.0, d[0]), (1 / 3, d[1])], [(0.2, d[2]), (0.1, d[3])], None, False, 12345),
        lambda: C.combine([(1.0, y)], [(0.3, None)], None, False, key7),
        lambda: C.combine([(1.0, y), (0.1, f)], [(0.3, g)], None, True, 3),                 # per-row draws
        lambda: C.combine([(1.0, y)], [(0.3, g)], h),                                      # given noise
        lambda: C.combine([(1.0, yh), (0.1, f)], [(0.2, gh)], None, False, 2 ** 40),
        lambda: C.combine([(1.0, y)], (), h),                                              # noise, no diffusion
        lambda: C.combine([(2.0, v7)], [(1.0, None)], None, False, 1),
    ]
    for case in cases:
        calls.clear()
        monkeypatch.setattr(C, "FAST_PATH", False)
        slow = case()
        monkeypatch.setattr(C, "FAST_PATH", True)
        fast = case()
        assert len(calls) == 2 and torch.equal(slow, fast)
        (a_args, a_consts, a_sig, a_nw, a_n), (b_args, b_consts, b_sig, b_nw, b_n) = calls
        assert a_consts == b_consts and a_sig == b_sig and (a_nw, a_n) == (b_nw, b_n)
        assert len(a_args) == len(b_args)
        for a, b in zip(a_args, b_args):  # tensors: the same memory (a flat view of it is the same operand)
            same = (a.data_ptr(), a.dtype, a.numel()) == (b.data_ptr(), b.dtype, b.numel()) \
                if isinstance(a, torch.Tensor) else (type(a) is type(b) and a == b)
            assert same


def test_the_host_overhead_benchmark_runs():
    """benchmarks/host_overhead.py stubs flowsde's launch internals, so it runs in a process of its own."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_overhead.py"), "--calls", "20",
                          "--rounds", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "µs" not in line and "---" not in line]
    assert len(rows) == 4 and all(float(r.split("|")[2]) > 0 for r in rows)


def test_twelve_or_more_terms_fold_as_often_as_needed():
    ys = [rnd((5, 3), torch.float64, i) for i in range(14)]
    terms = [(0.1 * (i + 1), y) for i, y in enumerate(ys)]
    a, b = _both(lambda o: o.combine(terms))
    assert torch.allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("noise_type", ["diagonal", "scalar", "additive"])
def test_srk_backends_agree_on_a_grid_motion_with_areas(noise_type):
    """srk (lincombs of its stages on the kernels, areas from the motion's own stream) on both backends."""
    from test_sde_parity import Nonlinear
    sde = Nonlinear(noise_type, "ito")
    y0 = rnd((5, 3), torch.float64, 0)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    shape = {"diagonal": (5, 3), "scalar": (5, 1)}.get(noise_type, (5, 2))
    out = [flowsde.sdeint(sde, y0, ts, method="srk", dt=0.1, options=dict(backend=be),
                          bm=flowsde.GridBrownian(t0=0.0, t1=1.0, steps=10, shape=shape, seed=3, dtype=torch.float64))
           for be in ("triton", "torch")]
    assert float((out[0] - out[1]).abs().max()) < 1e-12
