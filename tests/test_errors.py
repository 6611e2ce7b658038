"""Bad input gets a clear error naming the problem; inputs are never modified in place."""
import pytest
import torch

import flowsde
from flowsde.problems import GeometricBrownianMotion, LinearODE, OrnsteinUhlenbeck

Y0 = torch.ones(3, 2, dtype=torch.float64)
T = torch.linspace(0, 1, 4, dtype=torch.float64)


@pytest.mark.parametrize("t,match", [
    (torch.tensor([0.0, 0.5, 0.4, 1.0], dtype=torch.float64), "strictly increasing or strictly decreasing"),
    (torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), "strictly"),
    (torch.zeros(0, dtype=torch.float64), "at least one"),  # (one time returns y0, as torchdiffeq)
    (torch.zeros(2, 2, dtype=torch.float64), "one-dimensional"),
    (torch.tensor([0.0, float("nan")], dtype=torch.float64), "non-finite"),
])
def test_odeint_rejects_bad_time_grids(t, match):
    with pytest.raises(ValueError, match=match):
        flowsde.odeint(LinearODE(), Y0, t, method="euler")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="known methods.*rk4"):
        flowsde.odeint(LinearODE(), Y0, T, method="rk5")
    with pytest.raises(ValueError, match="known methods.*milstein"):
        flowsde.sdeint(GeometricBrownianMotion(), Y0, T, method="rk4")  # (an ODE method; srk is built)


def test_adaptive_sde_bad_input():
    from flowsde.brownian import GridBrownian
    y0, t = torch.ones(4, 1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    grid_bm = GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(4, 1), dtype=torch.float64)
    with pytest.raises(ValueError, match="queried at any time"):
        flowsde.sdeint(GeometricBrownianMotion(), y0, t, bm=grid_bm, adaptive=True)
    with pytest.raises(ValueError, match="cannot both be 0"):
        flowsde.sdeint(GeometricBrownianMotion(), y0, t, adaptive=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dt_min"):
        flowsde.sdeint(GeometricBrownianMotion(), y0, t, adaptive=True, dt_min=0.0)
    with pytest.raises(ValueError, match="unknown option"):
        flowsde.sdeint(GeometricBrownianMotion(), y0, t, adaptive=True, options=dict(step_size=0.1))


def test_field_with_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match=r"func returned shape \(3, 1\), expected \(3, 2\)"):
        flowsde.odeint(lambda t, y: y[:, :1], Y0, T, method="rk4")
    with pytest.raises(TypeError, match="func returned dtype torch.float32"):
        flowsde.odeint(lambda t, y: y.float(), Y0, T, method="euler")
    with pytest.raises(TypeError, match="must return a torch.Tensor"):
        flowsde.odeint(lambda t, y: 1.0, Y0, T, method="euler")


class BadSDE:
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, f_shape=None, g_shape=None):
        self.f_shape, self.g_shape = f_shape, g_shape

    def f(self, t, y):
        return y.new_zeros(self.f_shape) if self.f_shape else -y

    def g(self, t, y):
        return y.new_ones(self.g_shape) if self.g_shape else torch.ones_like(y)


def test_drift_and_diffusion_with_wrong_shapes():
    with pytest.raises(ValueError, match="sde.f \\(drift\\) returned shape"):
        flowsde.sdeint(BadSDE(f_shape=(3, 1)), Y0, T, dt=0.1)
    with pytest.raises(ValueError, match="sde.g \\(diffusion, diagonal noise\\) returned shape \\(3, 2, 1\\)"):
        flowsde.sdeint(BadSDE(g_shape=(3, 2, 1)), Y0, T, dt=0.1)
    sde = BadSDE(g_shape=(3, 2))
    sde.noise_type = "scalar"
    with pytest.raises(ValueError, match="scalar noise.*expected \\(3, 2, 1\\)"):
        flowsde.sdeint(sde, Y0, T, dt=0.1)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("inf"), float("nan")])
def test_non_positive_steps(bad):
    with pytest.raises(ValueError, match="dt must be a finite number > 0"):
        flowsde.sdeint(GeometricBrownianMotion(), Y0, T, dt=bad)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        flowsde.odeint(LinearODE(), Y0, T, method="euler", options=dict(step_size=bad))


def test_dtype_and_device_mismatch_between_y0_and_t():
    with pytest.raises(TypeError, match="less precise than y0"):
        flowsde.odeint(LinearODE(), Y0, T.float(), method="euler")
    with pytest.raises(TypeError, match="less precise than y0"):
        flowsde.sdeint(GeometricBrownianMotion(), Y0, T.float(), dt=0.1)
    with pytest.raises(ValueError, match="is on meta but y0 is on cpu"):
        flowsde.odeint(LinearODE(), Y0, torch.linspace(0, 1, 3, dtype=torch.float64, device="meta"), method="euler")
    with pytest.raises(TypeError, match="real floating dtype"):
        flowsde.odeint(LinearODE(), torch.ones(3, 2, dtype=torch.int64), T, method="euler")
    with pytest.raises(TypeError, match="bm has dtype torch.float32"):
        bm = flowsde.GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(3, 2), seed=0, dtype=torch.float32)
        flowsde.sdeint(GeometricBrownianMotion(), Y0, T, bm=bm, dt=0.125)


def test_method_and_sde_type_or_noise_type_combinations():
    with pytest.raises(ValueError, match="method 'heun' solves stratonovich SDEs, but sde.sde_type is 'ito'"):
        flowsde.sdeint(GeometricBrownianMotion(), Y0, T, method="heun")
    with pytest.raises(ValueError, match="method 'euler' solves ito SDEs"):
        flowsde.sdeint(GeometricBrownianMotion(sde_type="stratonovich"), Y0, T, method="euler")

    class General(BadSDE):
        noise_type = "general"

        def g(self, t, y):
            return torch.ones(*y.shape, 3, dtype=y.dtype)
    with pytest.raises(ValueError, match="method 'milstein' supports noise types.*'general'"):
        flowsde.sdeint(General(), Y0, T, method="milstein")
    bad = BadSDE()
    bad.noise_type = "weird"
    with pytest.raises(ValueError, match="sde.noise_type must be one of"):
        flowsde.sdeint(bad, Y0, T)


def test_sdeint_needs_increasing_times_and_batched_state():
    with pytest.raises(ValueError, match="ts must be strictly increasing"):
        flowsde.sdeint(GeometricBrownianMotion(), Y0, T.flip(0))
    with pytest.raises(ValueError, match=r"y0 must have shape \(batch, d\)"):
        flowsde.sdeint(GeometricBrownianMotion(), torch.ones(3, dtype=torch.float64), T)


def test_unknown_options_and_exclusive_options():
    with pytest.raises(ValueError, match="unknown option.*step_sise"):
        flowsde.odeint(LinearODE(), Y0, T, method="euler", options=dict(step_sise=0.1))
    with pytest.raises(ValueError, match="mutually exclusive"):
        flowsde.odeint(LinearODE(), Y0, T, method="euler",
                       options=dict(step_size=0.1, grid_constructor=lambda f, y, t: t))
    with pytest.raises(ValueError, match="grid_constructor must return a grid starting at"):
        flowsde.odeint(LinearODE(), Y0, T, method="euler",
                       options=dict(grid_constructor=lambda f, y, t: torch.linspace(0, 0.9, 5, dtype=t.dtype)))
    with pytest.raises(ValueError, match="backend must be one of"):
        flowsde.odeint(LinearODE(), Y0, T, method="euler", options=dict(backend="cuda"))


def test_inputs_are_never_modified():
    y0, t = Y0.clone(), T.clone()
    opts = dict(step_size=0.1, return_stats=True)
    for method in flowsde.ODE_METHODS:
        flowsde.odeint(LinearODE(), y0, t, method=method, options=opts)
    assert opts == dict(step_size=0.1, return_stats=True)
    for sde, method in [(GeometricBrownianMotion(), "euler"), (GeometricBrownianMotion(), "milstein"),
                        (GeometricBrownianMotion(sde_type="stratonovich"), "heun")]:
        flowsde.sdeint(sde, y0, t, method=method, dt=0.1, seed=1)
    assert torch.equal(y0, Y0) and torch.equal(t, T)
    ys = flowsde.odeint(LinearODE(), y0, t, method="euler")
    ys[0].add_(1.0)  # the solution does not alias y0
    assert torch.equal(y0, Y0)


def test_seed_reproducibility():
    sde = OrnsteinUhlenbeck()
    a = flowsde.sdeint(sde, Y0, T, dt=0.01, seed=42)
    b = flowsde.sdeint(sde, Y0, T, dt=0.01, seed=42)
    c = flowsde.sdeint(sde, Y0, T, dt=0.01, seed=43)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = flowsde.sdeint(sde, Y0, T, dt=0.01)
    torch.manual_seed(5)
    e = flowsde.sdeint(sde, Y0, T, dt=0.01)
    assert torch.equal(d, e)
    with pytest.raises(TypeError, match="seed must be an int"):
        flowsde.sdeint(sde, Y0, T, dt=0.01, seed=1.5)


def test_sdeint_stats():
    _, stats = flowsde.sdeint(GeometricBrownianMotion(sde_type="stratonovich"), Y0, T, method="heun", dt=0.1,
                              options=dict(return_stats=True))
    assert stats == {"nfe": 20, "nge": 20, "steps": 10, "accepted": 10, "rejected": 0, "status": "success"}
    _, stats = flowsde.sdeint(GeometricBrownianMotion(), Y0, T, method="milstein", dt=0.1,
                              options=dict(return_stats=True, grad_free=True))
    assert stats == {"nfe": 10, "nge": 20, "steps": 10, "accepted": 10, "rejected": 0, "status": "success"}


def test_torchsde_brownian_objects_on_a_short_interval_or_of_the_wrong_shape_are_refused():
    import warnings

    import torchsde
    y0 = torch.zeros(4, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for bm in (torchsde.BrownianInterval(t0=0.0, t1=0.5, size=(4, 1), dtype=torch.float64),
               torchsde.BrownianTree(t0=0.0, t1=0.5, w0=torch.zeros(4, 1, dtype=torch.float64))):
        for adaptive in (False, True):
            with pytest.raises(ValueError, match=r"bm covers \[0.0, 0.5\] but ts spans \[0.0, 1.0\]"):
                flowsde.sdeint(OrnsteinUhlenbeck(), y0, ts, bm=bm, dt=0.01, adaptive=adaptive)
    bm = torchsde.BrownianPath(t0=0.0, w0=torch.zeros(4, 1, dtype=torch.float64))  # grows: no interval to check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert flowsde.sdeint(OrnsteinUhlenbeck(), y0, ts, bm=bm, dt=0.1).shape == (2, 4, 1)
    with pytest.raises(ValueError, match=r"bm \(Brownian increment\) returned shape \(4, 3\), expected \(4, 1\)"):
        flowsde.sdeint(GeometricBrownianMotion(), torch.ones(4, 1, dtype=torch.float64), ts, adaptive=True, dt=0.1,
                       bm=torchsde.BrownianInterval(0.0, 1.0, size=(4, 3), dtype=torch.float64))


def test_tuple_states_are_checked_part_by_part_and_t_gradients_are_refused():
    y0 = (torch.ones(2, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"part 0 of the tuple state, expected shape \(2,\)"):
        flowsde.odeint(lambda t, y: (torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)), y0, T,
                       method="rk4")
    with pytest.raises(TypeError, match=r"y0\[1\] must be a floating-point tensor"):
        flowsde.odeint(lambda t, y: y, (torch.ones(2), torch.ones(3, dtype=torch.int64)), T.float())
    t = T.clone().requires_grad_(True)
    for solve in (lambda: flowsde.odeint(lambda t, y: -y, Y0, t, method="rk4"),
                  lambda: flowsde.sdeint(OrnsteinUhlenbeck(), Y0, t, dt=0.1)):
        with pytest.raises(ValueError, match="gradients with respect to"):
            solve()
    with torch.no_grad():
        assert flowsde.odeint(lambda t, y: -y, Y0, t, method="rk4").shape == (4, 3, 2)


def test_sample_refuses_times_outside_the_path_and_an_uncond_without_cond():
    x = torch.randn(4, 2)
    for kw in (dict(t_end=2.0), dict(t_start=-0.5), dict(t_end=1.5, method="dopri5")):
        with pytest.raises(ValueError, match=r"t in \[0, 1\]"):
            flowsde.sample(lambda x, t: -x, x, **kw)
    with pytest.raises(ValueError, match="uncond is given without cond"):
        flowsde.sample(lambda x, t: -x, x, uncond=torch.zeros(4, 3))


@pytest.mark.parametrize("method", ["heun", "dopri5"])
def test_sample_checks_conditioning_and_scales_for_fixed_and_adaptive_methods(method):
    x, c, u = torch.ones(4, 2), torch.ones(4, 1), torch.zeros(1, 1)
    model = lambda x, t, *cond: -x  # noqa: E731
    cases = [(dict(cond=torch.ones(1, 1)), ValueError, "cond has batch 1"),
             (dict(cond=c, uncond=u, guidance_scale=True), TypeError, "guidance_scale must be a number"),
             (dict(cond=c, uncond=u, guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
             (dict(cond=c, uncond=u, guidance_scale=torch.tensor(2.0)), TypeError, "guidance_scale must be a number"),
             (dict(sigma=float("inf")), ValueError, "sigma must be a finite number")]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            flowsde.sample(model, x, method=method, **kw)
    if method == "dopri5":  # a captured loop has a fixed step count
        with pytest.raises(ValueError, match="cuda_graph=True captures a fixed-step loop"):
            flowsde.sample(model, x, method=method, cuda_graph=True)


def test_numpy_integers_and_floats_are_numbers_but_floats_are_not_seeds():
    import numpy as np

    from flowsde.solvers.linear import solve_linear_sde
    a = flowsde.sample(lambda x, t: -x, torch.ones(4, 2), method="euler", steps=np.int64(5), sigma=np.float32(0.5),
                       seed=np.int64(3))
    b = flowsde.sample(lambda x, t: -x, torch.ones(4, 2), method="euler", steps=5, sigma=0.5, seed=3)
    assert torch.equal(a, b)
    ts = torch.tensor([0.0, 1.0])
    for seed in (1.9, True):
        with pytest.raises(TypeError, match="seed must be an int"):
            solve_linear_sde(torch.ones(3), ts, 0.1, seed=seed)
    with pytest.raises(ValueError, match="coefficient a requires grad"):  # (its gradient was dropped silently)
        solve_linear_sde(torch.ones(3), ts, 0.1, a=torch.tensor(-1.0, requires_grad=True), seed=0)
    for row_start in (-1, 1.5):
        with pytest.raises(ValueError, match="row_start must be an int >= 0"):
            flowsde.GridBrownian(t0=0.0, t1=1.0, steps=4, shape=(2, 1), seed=0, stream="philox", row_start=row_start)


def test_option_switches_are_bools_and_counts_are_ints():
    sde = GeometricBrownianMotion()
    for opts, match in ((dict(per_sample="no"), "'per_sample' must be True or False"),
                        (dict(capturable="no", max_num_steps=10), "'capturable' must be True or False"),
                        (dict(max_num_steps=2.5), "'max_num_steps' must be an int"),
                        (dict(max_num_steps=True), "'max_num_steps' must be an int"),
                        (dict(check_every=2.9), "'check_every' must be an int")):
        with pytest.raises(TypeError, match=match):
            flowsde.sdeint(sde, Y0, T, dt=0.1, adaptive=True, options=opts)
        with pytest.raises(TypeError, match=match):
            flowsde.odeint(LinearODE(), Y0, T, options=opts)
    with pytest.raises(TypeError, match="'return_stats' must be True or False"):
        flowsde.odeint(LinearODE(), Y0, T, method="euler", options=dict(return_stats=1))


def test_sampled_paths_check_their_grid_and_are_refused_by_the_adaptive_solver():
    from flowsde.brownian import SampledPath
    with pytest.raises(ValueError, match="strictly increasing 1-D sequence of >= 2 times"):
        SampledPath([0.0, 0.5, 0.4], torch.zeros(3, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="strictly increasing 1-D sequence of >= 2 times"):
        SampledPath([0.0], torch.zeros(1, 3, 2, dtype=torch.float64))
    fine = flowsde.GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(3, 2), seed=0, dtype=torch.float64)
    bm = SampledPath(fine.grid, fine.path())
    with pytest.raises(ValueError, match="SampledPath only knows its grid"):
        flowsde.sdeint(GeometricBrownianMotion(), Y0, T, bm=bm, dt=0.1, adaptive=True)


def test_flowsde_brownian_motions_answer_torchsdes_reverse_time_wrapper():
    """torchsde's sdeint_adjoint calls bm(ta, tb, return_U=False, return_A=False)."""
    import torchsde

    from flowsde.brownian import VirtualBrownianTree
    sde = GeometricBrownianMotion()
    y0 = Y0.clone().requires_grad_(True)
    for bm in (flowsde.GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(3, 2), seed=0, dtype=torch.float64),
               VirtualBrownianTree(0.0, 1.0, (3, 2), seed=0, dtype=torch.float64)):
        ys = torchsde.sdeint_adjoint(sde, y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), bm=bm, dt=0.125,
                                     method="euler", adjoint_method="euler",
                                     adjoint_params=())
        (g,) = torch.autograd.grad(ys[-1].sum(), y0)
        assert torch.isfinite(g).all()
        if isinstance(bm, VirtualBrownianTree):  # (a GridBrownian gives its space-time areas: srk runs on it)
            with pytest.raises(NotImplementedError, match="increments only"):
                bm(0.0, 0.5, return_U=True)
        else:
            w, u = bm(0.0, 0.5, return_U=True)
            assert w.shape == u.shape == (3, 2)
        with pytest.raises(NotImplementedError, match="no Levy area A"):
            bm(0.0, 0.5, return_A=True)
