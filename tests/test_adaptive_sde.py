"""Adaptive SDE solves (step doubling on a virtual Brownian tree): convergence to the exact solution on
the same Brownian path as the tolerance shrinks, against torchsde's adaptive mode, outputs, stats."""
import math

import numpy as np
import pytest
import torch
import torchsde

import flowsde
from flowsde.brownian import SampledPath, VirtualBrownianTree
from flowsde.problems import GeometricBrownianMotion, OrnsteinUhlenbeck, PerSampleGBM

B = 128
Y0 = torch.ones(B, 1, dtype=torch.float64)


def tree(seed=3, shape=(B, 1), t1=1.0):
    return VirtualBrownianTree(0.0, t1, shape, seed=seed, dtype=torch.float64)


def gbm_error(method, sde_type, rtol, seed=3):
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5, sde_type=sde_type)
    bm = tree(seed)
    ys, st = flowsde.sdeint(sde, Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), bm=bm, dt=0.1,
                            method=method, adaptive=True, rtol=rtol, atol=rtol, dt_min=1e-7,
                            options=dict(return_stats=True))
    exact = sde.exact(Y0, 1.0, bm(0.0, 1.0))
    return float((ys[-1] - exact).pow(2).mean().sqrt()), st


def test_adaptive_euler_maruyama_converges_on_gbm_as_rtol_shrinks():
    errs = [gbm_error("euler", "ito", r)[0] for r in (1e-2, 1e-3, 1e-4)]
    assert errs[1] < 0.5 * errs[0] and errs[2] < 0.5 * errs[1], errs
    assert errs[2] < 0.02


@pytest.mark.parametrize("method,sde_type", [("milstein", "ito"), ("heun", "stratonovich")])
def test_adaptive_strong_order_one_methods_converge(method, sde_type):
    (e1, s1), (e2, s2) = gbm_error(method, sde_type, 1e-2), gbm_error(method, sde_type, 1e-4)
    assert e2 < 0.15 * e1 and e2 < 0.01, (e1, e2)
    assert s2["nfe"] > s1["nfe"] and s2["status"] == "success"
    assert s2["steps"] == s2["accepted"] + s2["rejected"]


def test_adaptive_euler_against_torchsde_on_the_same_path():
    """Same problem, tolerances and Brownian tree: flowsde's error and work are torchsde's, within 1.5x
    (the figures are printed by benchmarks/adaptive_sde.py and quoted in the README)."""
    class Counted(GeometricBrownianMotion):
        calls = 0

        def f(self, t, y):
            Counted.calls += 1
            return super().f(t, y)

    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    rows = []
    for lib in ("flowsde", "torchsde"):
        Counted.calls = 0
        sde, bm = Counted(mu=0.5, sigma=0.5), tree()
        solve = flowsde.sdeint if lib == "flowsde" else torchsde.sdeint
        with pytest.warns(UserWarning) if lib == "torchsde" else _nothing():
            ys = solve(sde, Y0, ts, bm=bm, dt=0.1, adaptive=True, rtol=3e-3, atol=3e-3, dt_min=1e-7,
                       method="euler")
        rows.append((float((ys[-1] - sde.exact(Y0, 1.0, bm(0.0, 1.0))).pow(2).mean().sqrt()), Counted.calls))
    (e_f, n_f), (e_t, n_t) = rows
    assert e_f < 1.5 * e_t and n_f < 1.5 * n_t, rows


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_outputs_land_on_the_requested_times_and_match_the_exact_path():
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5, sde_type="stratonovich")
    bm = tree(7)
    ts = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    ys = flowsde.sdeint(sde, Y0, ts, bm=bm, dt=0.05, method="heun", adaptive=True, rtol=1e-4, atol=1e-4)
    assert torch.equal(ys[0], Y0) and ys.shape == (4, B, 1)
    for i, t in enumerate(ts.tolist()[1:], start=1):
        exact = sde.exact(Y0, t, bm(0.0, t))
        assert float((ys[i] - exact).abs().max()) < 0.05


def test_additive_noise_adaptive_matches_a_fine_fixed_step_solve_on_the_same_tree():
    sde = OrnsteinUhlenbeck(theta=1.0, sigma=0.5, noise_type="additive")
    y0 = torch.ones(64, 2, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = sde.g(ts[0], y0).shape[-1]
    bm = tree(11, (64, m))
    a = flowsde.sdeint(sde, y0, ts, bm=bm, dt=0.1, adaptive=True, rtol=1e-5, atol=1e-5)
    level = 13  # the tree's own path at 2**13 + 1 dyadic times, drawn at once: a fine fixed-step solve on it
    fine = SampledPath(np.linspace(0.0, 1.0, 2 ** level + 1), bm.dyadic_path(level))
    b = flowsde.sdeint(sde, y0, ts, bm=fine, dt=2.0 ** -level)
    assert float((a - b).abs().max()) < 2e-3


def test_reproducible_from_a_seed_and_torchsde_brownian_objects_accepted():
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = dict(dt=0.1, adaptive=True, rtol=1e-3, atol=1e-3)
    a, b = flowsde.sdeint(sde, Y0, ts, seed=5, **kw), flowsde.sdeint(sde, Y0, ts, seed=5, **kw)
    c = flowsde.sdeint(sde, Y0, ts, seed=6, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    bi = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(B, 1), dtype=torch.float64, entropy=1)
    ys = flowsde.sdeint(sde, Y0, ts, bm=bi, **kw)
    assert torch.isfinite(ys).all()


def test_max_num_steps_returns_the_work_done_with_its_status():
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    ts = torch.tensor([0.0, 0.01, 1.0], dtype=torch.float64)
    ys, st = flowsde.sdeint(sde, Y0, ts, seed=1, dt=0.01, adaptive=True, rtol=1e-6, atol=1e-6,
                            options=dict(return_stats=True, max_num_steps=5))
    assert st["status"] == "max_num_steps" and st["steps"] == 5
    assert torch.equal(ys[0], Y0) and torch.isnan(ys[-1]).all()
    for per_sample in (False, True):  # without the stats: an error, as odeint's, not NaN outputs
        with pytest.raises(RuntimeError, match="max_num_steps=5"):
            flowsde.sdeint(sde, Y0, ts, seed=1, dt=0.01, adaptive=True, rtol=1e-6, atol=1e-6,
                           options=dict(max_num_steps=5, per_sample=per_sample))


def per_sample_problem(B=64, seed=3):
    """One sample in eight ten times as volatile as the rest (sigma 2 against 0.2)."""
    sig = torch.full((B,), 0.2, dtype=torch.float64)
    sig[::8] = 2.0
    y0 = PerSampleGBM.initial(torch.ones(B, dtype=torch.float64), sig)
    return PerSampleGBM(), y0, VirtualBrownianTree(0.0, 1.0, (B, 1), seed=seed, dtype=torch.float64)


def solve_per_sample(sde, y0, bm, per_sample, rtol=1e-3, **opts):
    return flowsde.sdeint(sde, y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), bm=bm, method="milstein",
                          dt=0.05, adaptive=True, rtol=rtol, atol=rtol, dt_min=1e-6,
                          options=dict(return_stats=True, per_sample=per_sample, **opts))


def test_per_sample_steps_spend_the_work_on_the_volatile_samples():
    """Milstein on one Brownian tree, 256 samples, one in eight ten times as volatile. At the same
    tolerance (1e-3) a step size per sample costs under half the evaluations per sample of the shared
    step (which every sample pays at the volatile samples' rate) and under a third of the rows (the calm
    samples are then less over-resolved, so less accurate: the tolerance is per sample); at a tighter
    tolerance (3e-4) it is more accurate than the shared step over all samples, and still cheaper.
    (Figures: README, benchmarks/adaptive_sde.py.)"""
    sde, y0, bm = per_sample_problem(256, seed=0)
    exact = sde.exact(y0, 1.0, bm.value(1.0))

    def rms_rel(ys):
        return float(((ys[-1, :, 0] - exact) / exact).pow(2).mean().sqrt())
    ys_s, st_s = solve_per_sample(sde, y0, bm, False, rtol=1e-3)
    ys_p, st_p = solve_per_sample(sde, y0, bm, True, rtol=1e-3)
    ys_t, st_t = solve_per_sample(sde, y0, bm, True, rtol=3e-4)
    rows_s = st_s["nfe"] * 256
    nfe_p = st_p["nfe"].double()
    assert st_p["nfe"].shape == st_p["accepted"].shape == (256,) and st_p["status"] == ["success"] * 256
    assert float(nfe_p.mean()) < st_s["nfe"] / 2 and st_p["rows"] < rows_s / 3, (nfe_p.mean(), st_s, st_p["rows"])
    assert st_p["rows"] >= int(nfe_p.sum())  # rows passed to the drift include finished, not yet compacted ones
    assert rms_rel(ys_t) < 0.75 * rms_rel(ys_s), (rms_rel(ys_t), rms_rel(ys_s))
    assert float(st_t["nfe"].double().mean()) < st_s["nfe"]
    assert st_t["rows"] < 0.75 * rows_s
    calm, wild = nfe_p[1::8].mean(), nfe_p[::8].mean()  # the volatile samples did the extra work
    assert float(wild) > 3 * float(calm)
    assert torch.equal(ys_p[1:, :, 1], y0[:, 1].expand(2, -1))  # s rides along unchanged


def test_per_sample_results_do_not_depend_on_the_rest_of_the_batch_or_the_checks():
    sde, y0, bm = per_sample_problem(16)
    full, st = solve_per_sample(sde, y0, bm, True, rtol=1e-2)
    again, _ = solve_per_sample(sde, y0, bm, True, rtol=1e-2, check_every=5)
    assert torch.equal(full, again)  # bitwise: a rough path turns any rounding into other steps
    _, y0_half, bm_half = per_sample_problem(8)
    half, st_half = solve_per_sample(sde, y0_half, bm_half, True, rtol=1e-2)
    assert torch.equal(half, full[:, :8]) and torch.equal(st_half["nfe"], st["nfe"][:8])


def test_per_sample_max_num_steps_keeps_the_finished_samples():
    sde, y0, bm = per_sample_problem(16)
    _, st = solve_per_sample(sde, y0, bm, True, rtol=1e-3)
    budget = int((st["accepted"] + st["rejected"]).median())  # some samples finish within it, some not
    ys, st = solve_per_sample(sde, y0, bm, True, rtol=1e-3, max_num_steps=budget)
    stopped = [s == "max_num_steps" for s in st["status"]]
    assert any(stopped) and not all(stopped)
    for r, s in enumerate(stopped):
        assert bool(torch.isnan(ys[-1, r]).all()) == s
    assert torch.isfinite(ys[:, ~torch.tensor(stopped)]).all()


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_loop_reads_the_host_only_at_its_checks(sync_counter, per_sample):
    """capturable=True: a fixed budget and no host read at all in the loop (the reads there are stay the
    same for any budget), with the results of the checked loop; check_every=k: one read per k steps."""
    sde, y0, bm = per_sample_problem(8)

    def run(**opts):
        with sync_counter() as c:
            out = solve_per_sample(sde, y0, bm, per_sample, rtol=1e-2, **opts)
        return out, c.calls
    (ys, st), reads = run()
    steps = st["steps"]
    (ys_a, st_a), reads_a = run(capturable=True, max_num_steps=steps + 5)
    (ys_b, _), reads_b = run(capturable=True, max_num_steps=steps + 50)
    assert reads_a == reads_b and len(reads_a) <= 3, (reads_a, reads_b)
    assert torch.equal(ys_a, ys) and torch.equal(ys_b, ys)
    assert st_a["status"] == "budget" and bool(st_a["finished"].all())
    assert torch.equal(st_a["accepted"], torch.as_tensor(st["accepted"]))
    (_, st_c), reads_c = run(check_every=4)
    assert len(reads_c) - len(reads_a) <= st_c["steps"] // 4 + 4, (reads_c, st_c["steps"])


def test_adaptive_sde_errors_name_the_problem():
    sde, y0, bm = per_sample_problem(8)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    bi = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(8, 1), dtype=torch.float64, entropy=1)
    with pytest.raises(ValueError, match="per_sample=True needs flowsde's VirtualBrownianTree"):
        flowsde.sdeint(sde, y0, ts, bm=bi, method="milstein", adaptive=True, options=dict(per_sample=True))
    wrong = VirtualBrownianTree(0.0, 1.0, (8, 2), seed=1, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        flowsde.sdeint(sde, y0, ts, bm=wrong, method="milstein", adaptive=True)
    with pytest.raises(ValueError, match="max_num_steps"):
        flowsde.sdeint(sde, y0, ts, bm=bm, method="milstein", adaptive=True, options=dict(capturable=True))
    with pytest.raises(ValueError, match="check_every"):
        flowsde.sdeint(sde, y0, ts, bm=bm, method="milstein", adaptive=True, options=dict(check_every=0))


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_pi_controller_for_sdes_rejects_less_at_the_same_accuracy(method):
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = {}
    for name, opts in (("I", {}), ("PI", dict(pcoeff=0.4, icoeff=0.3))):
        bm = tree(3)
        ys, st = flowsde.sdeint(sde, Y0, ts, bm=bm, method=method, dt=0.1, adaptive=True, rtol=1e-3, atol=1e-3,
                                options=dict(return_stats=True, **opts))
        out[name] = (float((ys[-1] - sde.exact(Y0, 1.0, bm(0.0, 1.0))).pow(2).mean().sqrt()), st)
    (e_i, s_i), (e_p, s_p) = out["I"], out["PI"]
    assert s_p["rejected"] * 3 < s_i["rejected"] and s_p["nfe"] <= 1.1 * s_i["nfe"], (s_p, s_i)
    assert e_p < 1.25 * e_i, (e_p, e_i)


def test_a_step_at_dt_min_is_taken_even_when_the_leaf_grid_rounds_it_up():
    """dt_min smaller than the tree's leaf (here 0.6 of it): the proposal at dt_min ends a leaf away, and
    is taken however large its error, so a demanding tolerance cannot stall the solve."""
    sde = GeometricBrownianMotion(mu=0.5, sigma=2.0)
    bm = VirtualBrownianTree(0.0, 1.0, (4, 1), seed=1, tol=2.0 ** -8, dtype=torch.float64)
    ys, st = flowsde.sdeint(sde, torch.ones(4, 1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                            bm=bm, dt=0.1, adaptive=True, rtol=1e-9, atol=1e-9, dt_min=0.6 * 2.0 ** -8,
                            options=dict(return_stats=True, max_num_steps=2000))
    assert st["status"] == "success" and torch.isfinite(ys).all() and st["accepted"] <= 2 ** 8


@pytest.mark.parametrize("method,sde_type,per_attempt", [("euler", "ito", 2), ("heun", "stratonovich", 5)])
def test_the_full_and_the_first_half_step_share_their_first_evaluation(method, sde_type, per_attempt):
    sde = GeometricBrownianMotion(mu=0.5, sigma=0.5, sde_type=sde_type)
    _, st = flowsde.sdeint(sde, Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), seed=2, dt=0.1, method=method,
                           adaptive=True, rtol=1e-3, atol=1e-3, options=dict(return_stats=True))
    assert st["nfe"] == per_attempt * st["steps"] and st["nge"] == per_attempt * st["steps"]


def test_a_step_that_cannot_shrink_below_a_leaf_never_stalls_and_single_path_euler_warns():
    """Review cases. A coarse tree (leaf 2^-8) at a loose tolerance: a rejected step rounded back to the
    same leaf end was retried forever (accepted 0 of 3000); now a rejected step is retried strictly shorter
    and a one-leaf step is taken. Per-sample (or batch-of-one) adaptive Euler–Maruyama with multiplicative
    noise warns: its step choice biases it."""
    import warnings

    from flowsde.brownian import VirtualBrownianTree
    sde = GeometricBrownianMotion(mu=0.5, sigma=2.0)
    y0 = torch.ones(4, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for rtol in (1e-2, 3e-3, 1e-3):
        bm = VirtualBrownianTree(0.0, 1.0, (4, 1), seed=1, tol=2.0 ** -8, dtype=torch.float64)
        _, st = flowsde.sdeint(sde, y0, ts, bm=bm, dt=0.1, adaptive=True, rtol=rtol, atol=rtol, dt_min=0.6 * 2.0 ** -8,
                               method="milstein", options=dict(return_stats=True, max_num_steps=3000))
        assert st["status"] == "success" and st["accepted"] <= 256, (rtol, st)
    with pytest.warns(UserWarning, match="Gaines & Lyons"):
        flowsde.sdeint(sde, y0, ts, seed=0, dt=0.1, adaptive=True, rtol=1e-2, atol=1e-2, options=dict(per_sample=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shared steps over a batch: no warning
        flowsde.sdeint(sde, y0, ts, seed=0, dt=0.1, adaptive=True, rtol=1e-2, atol=1e-2)


def test_milstein_attempts_share_the_start_points_diffusion_and_derivative():
    """Adaptive Milstein: the full step and the first half step start at one point, so g (with its
    derivative) is evaluated there once: two diffusion evaluations per attempt (start, midpoint)."""
    calls = []

    class Counted(GeometricBrownianMotion):
        def g(self, t, y):
            calls.append(1)
            return super().g(t, y)
    y0 = torch.ones(64, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    _, st = flowsde.sdeint(Counted(mu=0.5, sigma=0.5), y0, ts, seed=0, dt=0.1, adaptive=True, rtol=1e-3, atol=1e-3,
                           method="milstein", options=dict(return_stats=True))
    assert st["nge"] == len(calls) == 2 * st["steps"], (st, len(calls))


def test_steps_on_the_leaf_grid_always_advance_from_a_start_that_does_not_divide_exactly():
    """A tree on [0.3, 1]: t = t0 + k leaf can divide back to k - eps, and the next leaf point must still
    lie strictly after t (it was t itself: zero-length steps, accepted one after another, for ever)."""
    from flowsde.brownian import VirtualBrownianTree

    class GBM:
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self):
            self.ts = []

        def f(self, t, y):
            self.ts.append(float(t))
            return 0.5 * y

        def g(self, t, y):
            return y
    sde = GBM()
    ts = torch.tensor([0.3, 1.0], dtype=torch.float64)
    bm = VirtualBrownianTree(0.3, 1.0, (4, 1), seed=0, dtype=torch.float64)
    _, st = flowsde.sdeint(sde, torch.ones(4, 1, dtype=torch.float64), ts, bm=bm, method="milstein", dt=1e-7,
                           adaptive=True, rtol=1e-10, atol=1e-10, dt_min=1e-9,
                           options=dict(return_stats=True, max_num_steps=120))
    starts = sde.ts[::2]  # f at each attempt's start and its midpoint
    assert st["accepted"] > 40
    assert len(set(starts)) >= st["accepted"] and max(starts) > 0.3 + 40 * (0.7 * 2.0 ** -bm.depth)


def test_a_tree_and_times_in_another_spelling_or_float32_are_accepted():
    """A tree built on device "cpu:0" serves a state on "cpu"; float32 ts = [0, 0.1] ends at 0.10000000149,
    past a [0, 0.1] tree or BrownianInterval by float32 rounding only: clipped onto it, as torchsde does."""
    from flowsde.brownian import VirtualBrownianTree
    from flowsde.problems import OrnsteinUhlenbeck
    sde = OrnsteinUhlenbeck(1.0, 0.5)
    y0 = torch.ones(4, 2, dtype=torch.float64)
    bm = VirtualBrownianTree(0.0, 1.0, (4, 2), seed=1, dtype=torch.float64, device="cpu:0")
    a = flowsde.sdeint(sde, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), bm=bm, dt=0.1, adaptive=True)
    assert torch.isfinite(a).all()
    y32, ts32 = y0.float(), torch.tensor([0.0, 0.1])
    for bm in (VirtualBrownianTree(0.0, 0.1, (4, 2), seed=1),
               torchsde.BrownianInterval(0.0, 0.1, size=(4, 2), entropy=1)):
        for adaptive in (False, True):
            ys = flowsde.sdeint(sde, y32, ts32, bm=bm, dt=0.01, adaptive=adaptive)
            assert ys.shape == (2, 4, 2) and torch.isfinite(ys).all()
    with pytest.raises(ValueError, match="bm covers"):
        flowsde.sdeint(sde, y32, torch.tensor([0.0, 0.1001]), bm=VirtualBrownianTree(0.0, 0.1, (4, 2), seed=1),
                       dt=0.01)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_states_with_no_elements_return_at_once(shape, per_sample):
    """An empty batch was refused with a misleading message (from the tree's shape check) and rows of no
    elements looped for ever (no error norm to accept a step on); now, as odeint, nothing is integrated."""
    y0 = torch.zeros(shape, dtype=torch.float64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    ys, stats = flowsde.sdeint(OrnsteinUhlenbeck(1.0, 0.5), y0, ts, dt=0.25, seed=1, adaptive=True, method="milstein",
                               options=dict(per_sample=per_sample, return_stats=True))
    assert ys.shape == (3, *shape) and stats["steps"] == 0
    assert stats["status"] == (["success"] * shape[0] if per_sample else "success")
    assert flowsde.sdeint(OrnsteinUhlenbeck(1.0, 0.5), y0, ts, adaptive=True, seed=1).shape == (3, *shape)


@pytest.mark.parametrize("opts", [dict(check_every=8), dict(capturable=True, max_num_steps=200)])
def test_grad_free_milstein_gradients_stay_finite_after_the_end(opts):
    """Attempts after the end (before the host check, or a captured budget) are zero-length steps: the
    derivative-free Milstein correction was 0.5 / sqrt(0) = inf there, masked in the values but NaN in every
    gradient (zero times inf)."""
    class GBM(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self):
            super().__init__()
            self.sig = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def f(self, t, y):
            return 0.5 * y

        def g(self, t, y):
            return self.sig * y
    grads = []
    for o in (dict(check_every=1), opts):
        sde = GBM()
        y0 = torch.ones(16, 1, dtype=torch.float64, requires_grad=True)
        ys = flowsde.sdeint(sde, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="milstein", dt=0.1,
                            adaptive=True, rtol=1e-3, atol=1e-3, seed=0, options=dict(grad_free=True, **o))
        ys[-1].sum().backward()
        grads.append((float(sde.sig.grad), y0.grad.clone()))
    assert math.isfinite(grads[1][0]) and bool(torch.isfinite(grads[1][1]).all())
    assert abs(grads[0][0] - grads[1][0]) < 1e-9 * abs(grads[0][0])
