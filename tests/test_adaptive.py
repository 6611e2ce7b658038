"""Adaptive odeint (embedded pairs) against torchdiffeq, and its own controls."""
import math

import pytest
import torch
import torchdiffeq

import flowsde
from flowsde.problems import LinearODE

F64 = torch.float64


def nonlinear(t, y):
    return torch.stack([torch.sin(y[..., 1]) * t, -y[..., 0] * torch.cos(3 * t) + 0.1 * y[..., 1] ** 2], -1)


class Recorder:
    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, t, y):
        self.times.append(float(t))
        return self.fn(t, y)


@pytest.mark.parametrize("ours,theirs", [("dopri5", "dopri5"), ("dopri8", "dopri8"), ("bosh3", "bosh3"),
                                         ("fehlberg2", "fehlberg2"), ("heun_euler", "adaptive_heun")])
@pytest.mark.parametrize("fn", [LinearODE(), nonlinear], ids=["linear", "nonlinear"])
@pytest.mark.parametrize("t", [torch.linspace(0, 3, 7, dtype=F64), torch.tensor([2.0, 1.0, -0.5], dtype=F64)],
                         ids=["forwards", "backwards"])
@pytest.mark.parametrize("tol", [1e-4, 1e-7])
def test_matches_torchdiffeq_step_for_step(ours, theirs, fn, t, tol):
    if ours in ("heun_euler", "fehlberg2") and tol < 1e-5:
        tol = 1e-5  # a second-order pair takes ~10^4 steps at 1e-7: the same check, cheaper
    y0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ra, rb = Recorder(fn), Recorder(fn)
    a, stats = flowsde.odeint(ra, y0, t, method=ours, rtol=tol, atol=tol, options=dict(return_stats=True))
    b = torchdiffeq.odeint(rb, y0, t, method=theirs, rtol=tol, atol=tol)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-10
    assert stats["nfe"] == len(rb.times) and stats["status"] == "success"      # no more evaluations
    # the same steps, in order (dopri8's 8th-order error estimate cancels to ~1e-12 of its stages, so the
    # summation order — flowsde's fused combine, torchdiffeq's matmul — moves its steps by ~1e-7)
    assert max(abs(x - y) for x, y in zip(ra.times, rb.times)) < (1e-6 if ours == "dopri8" else 1e-9)
    assert stats["accepted"] + stats["rejected"] == stats["steps"]


def test_default_method_is_dopri5_and_error_shrinks_with_tolerance():
    lin = LinearODE()
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
    t = torch.linspace(0, 5, 6, dtype=F64)
    exact = lin.exact(y0, t)
    errs, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7, 1e-9):
        ys, st = flowsde.odeint(lin, y0, t, rtol=tol, atol=tol, options=dict(return_stats=True))
        errs.append(float((ys - exact).abs().max()))
        nfes.append(st["nfe"])
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])) and errs[-1] < 1e-7
    assert all(n1 < n2 for n1, n2 in zip(nfes, nfes[1:]))


def test_dopri8_reaches_tight_tolerances_in_fewer_evaluations_than_dopri5():
    """The eighth-order pair for reference solutions: at rtol = atol = 1e-12 on the linear system, its steps
    landing on the output times (clip_end, jump_t), it is within 1e-12 of the matrix exponential with a third
    of dopri5's evaluations or fewer. Outputs inside its steps come from torchdiffeq's fourth-order interpolant
    (3e-8 off here, torchdiffeq's too); fehlberg2's error falls with its tolerance."""
    lin = LinearODE()
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    t = torch.linspace(0, 5, 6, dtype=F64)
    exact = lin.exact(y0, t)
    got = {}
    for method in ("dopri8", "dopri5"):
        ys, st = flowsde.odeint(lin, y0, t, method=method, rtol=1e-12, atol=1e-12,
                                options=dict(return_stats=True, clip_end=True, jump_t=t[1:-1]))
        got[method] = (float((ys - exact).abs().max()), st["nfe"])
    assert got["dopri8"][0] < 1e-12 and got["dopri8"][1] * 3 < got["dopri5"][1], got
    inside = flowsde.odeint(lin, y0, t, method="dopri8", rtol=1e-12, atol=1e-12)
    assert 1e-9 < float((inside - exact).abs().max()) < 1e-6  # (the interpolant's error, measured 4e-8)
    errs = [float((flowsde.odeint(lin, y0, t, method="fehlberg2", rtol=tol, atol=tol) - exact).abs().max())
            for tol in (1e-4, 1e-6)]  # (global errors ~1e3 x the tolerance, as torchdiffeq's fehlberg2: 8e-2, 8e-4)
    assert errs[1] < 1e-2 and errs[1] < errs[0] / 30, errs


def test_check_every_reads_the_host_less_often_with_the_same_answer(sync_counter):
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.linspace(0, 4, 3, dtype=F64)
    a, sa = flowsde.odeint(nonlinear, y0, t, method="dopri5", rtol=1e-6, atol=1e-6,
                           options=dict(return_stats=True))
    with sync_counter() as c:
        b, sb = flowsde.odeint(nonlinear, y0, t, method="dopri5", rtol=1e-6, atol=1e-6,
                               options=dict(return_stats=True, check_every=5))
    assert float((a - b).abs().max()) < 1e-12       # finished steps are masked no-ops
    assert sb["accepted"] == sa["accepted"] and sb["steps"] - sa["steps"] < 5
    reads_in_loop = [n for n in c.calls if n == "__float__"]
    assert len(reads_in_loop) <= sb["steps"] // 5 + 1


def test_max_num_steps_returns_partial_work_with_a_status():
    y0 = torch.ones(2, 2, dtype=F64)
    t = torch.linspace(0, 10, 5, dtype=F64)
    ys, st = flowsde.odeint(nonlinear, y0, t, rtol=1e-10, atol=1e-10,
                            options=dict(max_num_steps=20, return_stats=True))
    assert st["status"] == "max_num_steps" and st["steps"] == 20
    assert torch.equal(ys[0], y0) and torch.isnan(ys[-1]).all()
    with pytest.raises(RuntimeError, match="max_num_steps=20"):
        flowsde.odeint(nonlinear, y0, t, rtol=1e-10, atol=1e-10, options=dict(max_num_steps=20))


def test_adaptive_options_and_gradients():
    y0 = torch.ones(2, 2, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(ValueError, match="per_sample=True needs a tensor y0"):
        flowsde.odeint(lambda t, s: s, (y0, y0), t, options=dict(per_sample=True))
    with pytest.raises(ValueError, match="step_t and jump_t are supported with per_sample=False"):
        flowsde.odeint(nonlinear, y0.detach(), t, options=dict(step_t=[0.5], per_sample=True))
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        flowsde.odeint(nonlinear, y0, t, rtol=-1.0)
    ga = torch.autograd.grad(flowsde.odeint(nonlinear, y0, t).sum(), y0)[0]
    gb = torch.autograd.grad(torchdiffeq.odeint(nonlinear, y0, t).sum(), y0)[0]
    # step sizes are constants here (torchdiffeq lets its first step carry a gradient)
    assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-9)
    ys = flowsde.odeint(nonlinear, y0, t, method="bosh3", options=dict(first_step=0.01, max_step=0.05))
    ref = torchdiffeq.odeint(nonlinear, y0, t, method="bosh3", options=dict(first_step=0.01, max_step=0.05))
    assert torch.allclose(ys, ref, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(ys.detach().sum()))


def oscillators(B=8, fast=3, omega_fast=40.0):
    """Harmonic oscillators x'' = -w^2 x with w carried in the state (rows are independent)."""
    omega = torch.ones(B, dtype=F64)
    omega[fast] = omega_fast
    y0 = torch.stack([torch.ones(B, dtype=F64), torch.zeros(B, dtype=F64), omega], 1)

    def f(t, y):
        return torch.stack([y[:, 1], -y[:, 2] ** 2 * y[:, 0], torch.zeros_like(y[:, 0])], 1)
    return f, y0, omega


def test_per_sample_steps_follow_each_sample():
    f, y0, omega = oscillators()
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    calls = {"n": 0, "rows": 0}

    def counted(tt, y):
        calls["n"] += 1
        calls["rows"] += y.shape[0]
        return f(tt, y)
    shared = torchdiffeq.odeint(counted, y0, t, rtol=1e-6, atol=1e-6)
    ys, st = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-6, options=dict(per_sample=True, return_stats=True))
    exact = torch.cos(omega[None, :] * t[:, None])
    err_ours = float((ys[..., 0] - exact).abs().max())
    err_shared = float((shared[..., 0] - exact).abs().max())
    assert err_ours <= err_shared                                   # equal or better accuracy
    assert calls["n"] / float(st["nfe"].double().mean()) >= 3.0     # measured ~5x fewer evaluations per sample
    assert calls["rows"] / st["rows"] >= 2.0                        # measured ~5x fewer rows through the field
    assert st["status"] == ["success"] * 8 and bool((st["accepted"] > 0).all())
    slow = [i for i in range(8) if i != 3]
    assert int(st["nfe"][3]) > 10 * int(st["nfe"][slow].max())


def test_per_sample_with_one_sample_is_the_shared_step_run():
    f, y0, _ = oscillators(B=1, fast=0, omega_fast=3.0)
    t = torch.linspace(0, 2, 5, dtype=F64)
    a, sa = flowsde.odeint(f, y0, t, method="bosh3", rtol=1e-6, atol=1e-6,
                           options=dict(per_sample=True, return_stats=True))
    b, sb = flowsde.odeint(f, y0, t, method="bosh3", rtol=1e-6, atol=1e-6, options=dict(return_stats=True))
    assert float((a - b).abs().max()) < 1e-12
    assert int(sa["nfe"][0]) == sb["nfe"] and int(sa["accepted"][0]) == sb["accepted"]


def test_per_sample_checks_compaction_status_and_backends():
    f, y0, _ = oscillators()
    t = torch.tensor([0.0, 2.0], dtype=F64)
    a = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-6, options=dict(per_sample=True))
    b = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-6, options=dict(per_sample=True, check_every=4))
    assert float((a - b).abs().max()) < 1e-12
    small = (f, y0[:4], torch.tensor([0.0, 0.5], dtype=F64))   # the interpreter is slow: a short run
    c = flowsde.odeint(*small, rtol=1e-3, atol=1e-3, options=dict(per_sample=True, backend="triton"))
    d = flowsde.odeint(*small, rtol=1e-3, atol=1e-3, options=dict(per_sample=True, backend="torch"))
    assert float((c - d).abs().max()) < 1e-10
    ys, st = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-6,
                            options=dict(per_sample=True, max_num_steps=30, return_stats=True))
    assert st["status"][3] == "max_num_steps" and st["status"][0] == "success"
    assert torch.isnan(ys[-1, 3]).all() and not torch.isnan(ys[-1, 0]).any()
    with pytest.raises(RuntimeError, match="max_num_steps"):
        flowsde.odeint(f, y0, t, options=dict(per_sample=True, max_num_steps=30))


@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("opt", ["jump_t", "step_t", "both"])
def test_step_t_and_jump_t_match_torchdiffeq_step_for_step(opt, backwards):
    """A field with a jump in time at t = 0.5: without jump_t both libraries crawl over it with hundreds of
    evaluations; with it, each steps onto the jump, re-evaluates the field just after it and goes on.
    flowsde gives torchdiffeq's numbers with the same number of evaluations."""
    calls = {"n": 0}

    def f(t, y):
        calls["n"] += 1
        return torch.where(t < 0.5, -y, 2.0 * y) + torch.sin(3 * t)

    y0 = torch.tensor([[1.0], [0.5]], dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.5, 0.8, 1.0], dtype=F64)
    t = t.flip(0) if backwards else t
    jump = torch.tensor([0.5], dtype=F64)
    steps = torch.tensor([0.25, 0.7], dtype=F64)
    o = {"jump_t": dict(jump_t=jump), "step_t": dict(step_t=torch.cat([steps, jump])),
         "both": dict(jump_t=jump, step_t=steps)}[opt]
    a = flowsde.odeint(f, y0, t, rtol=1e-7, atol=1e-9, options=o)
    n_flowsde, calls["n"] = calls["n"], 0
    b = torchdiffeq.odeint(f, y0, t, rtol=1e-7, atol=1e-9, options=o)
    assert float((a - b).abs().max()) < 1e-12
    assert n_flowsde == calls["n"]
    calls["n"] = 0
    flowsde.odeint(f, y0, t, rtol=1e-7, atol=1e-9)
    if opt != "step_t":
        assert calls["n"] > 3 * n_flowsde  # the jump, unannounced, costs many more evaluations


def test_capturable_fixed_budget_reads_nothing_back_and_matches(sync_counter):
    """options=dict(capturable=True, max_num_steps=N): the whole budget runs with no host read (the loop is
    safe under CUDA-graph capture; tests/test_gpu.py captures it), outputs equal the ordinary solve when the
    budget suffices, NaN where it does not; the counts stay on the device."""
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.3]], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    want, st = flowsde.odeint(nonlinear, y0, t, rtol=1e-6, atol=1e-8, options=dict(return_stats=True))
    with sync_counter() as counter:
        got, cst = flowsde.odeint(nonlinear, y0, t, rtol=1e-6, atol=1e-8,
                                  options=dict(capturable=True, max_num_steps=st["steps"] + 5, return_stats=True))
    assert counter.calls in ([], ["numpy"])  # at most the read of the (host) time grid, once
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert cst["status"] == "budget" and bool(cst["finished"]) and int(cst["accepted"]) == st["accepted"]
    short = flowsde.odeint(nonlinear, y0, t, rtol=1e-6, atol=1e-8, options=dict(capturable=True, max_num_steps=3))
    assert torch.isnan(short[-1]).all() and torch.equal(short[0], y0)
    with pytest.raises(ValueError, match="pass max_num_steps"):
        flowsde.odeint(nonlinear, y0, t, options=dict(capturable=True))


def _stiff(t, y):  # y' = -500 (y - cos t): explicit steps are limited by stability, not accuracy
    c = torch.cos(t)
    return -500.0 * (y - (c.reshape(-1, 1) if c.dim() else c))  # t: 0-dim, or (rows,) per sample


def _stiff_exact(t):
    a = 500.0
    return a * a / (a * a + 1) * math.cos(t) + a / (a * a + 1) * math.sin(t)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_pi_controller_damps_the_stability_limited_oscillation(method):
    """Where the step is bounded by stability the I-controller (torchdiffeq's) keeps overshooting and being
    rejected; Gustafsson's PI controller (pcoeff 0.4, icoeff 0.3) settles, with a small fraction of the
    rejections, fewer evaluations and no worse error. The explicit I settings are the default exactly."""
    y0 = torch.zeros(3, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    runs = {}
    for name, opts in (("default", {}), ("I", dict(pcoeff=0.0, icoeff=1.0)), ("PI", dict(pcoeff=0.4, icoeff=0.3))):
        runs[name] = flowsde.odeint(_stiff, y0, t, method=method, rtol=1e-4, atol=1e-4,
                                    options=dict(return_stats=True, **opts))
    assert torch.equal(runs["default"][0], runs["I"][0]) and runs["default"][1] == runs["I"][1]
    (ys_i, st_i), (ys_p, st_p) = runs["I"], runs["PI"]
    err = {k: float((v[0][-1] - _stiff_exact(2.0)).abs().max()) for k, v in runs.items()}
    assert st_p["rejected"] * 5 < st_i["rejected"], (st_p, st_i)
    assert st_p["nfe"] < st_i["nfe"] and err["PI"] <= 2 * err["I"], (st_p, st_i, err)
    # per sample: the same controller, per row
    ys_ps, st_ps = flowsde.odeint(_stiff, y0, t, method=method, rtol=1e-4, atol=1e-4,
                                  options=dict(return_stats=True, per_sample=True, pcoeff=0.4, icoeff=0.3))
    assert int(st_ps["rejected"].max()) * 5 < st_i["rejected"]
    assert float((ys_ps[-1] - _stiff_exact(2.0)).abs().max()) <= 2 * err["I"]


def test_controller_options_are_checked():
    y0 = torch.zeros(1, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="pcoeff >= 0 and icoeff > 0"):
        flowsde.odeint(_stiff, y0, t, options=dict(icoeff=0.0))
    with pytest.raises(ValueError, match="safety"):
        flowsde.odeint(_stiff, y0, t, options=dict(safety=1.5))


# ---- a step size that collapses stops the solve (torchdiffeq: "underflow in dt"), never loops forever -----

_T5 = torch.linspace(0, 1, 5, dtype=torch.float64)


@pytest.mark.parametrize("case", ["nan y0", "blow-up", "field turns nan", "backwards blow-up"])
def test_a_collapsing_step_stops_with_a_clear_error(case):
    f, y0, t = {
        "nan y0": (lambda t, y: -y, torch.tensor([[float("nan")]]), _T5),
        "blow-up": (lambda t, y: y ** 2, torch.ones(1, 1), torch.tensor([0.0, 2.0])),  # y = 1/(1-t)
        "field turns nan": (lambda t, y: -y if t < 0.5 else y * float("nan"), torch.ones(1, 1), _T5),
        "backwards blow-up": (lambda t, y: -y ** 2, torch.ones(1, 1), torch.tensor([0.0, -2.0])),
    }[case]
    with pytest.raises(RuntimeError, match="underflow"):
        flowsde.odeint(f, y0, t)
    ys, stats = flowsde.odeint(f, y0, t, options=dict(return_stats=True))
    assert stats["status"] == "dt_underflow" and bool(ys[-1].isnan().all())
    if case == "blow-up":  # it stops just before the singularity at t = 1, what it computed is kept
        assert stats["steps"] < 2000 and float(ys[0]) == 1.0


def test_per_sample_a_collapsing_sample_stops_alone():
    y0 = torch.tensor([[float("nan")], [1.0], [2.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"underflowed for samples \[0\]"):
        flowsde.odeint(lambda t, y: -y, y0, _T5, options=dict(per_sample=True))
    ys, st = flowsde.odeint(lambda t, y: -y, y0, _T5, rtol=1e-8, atol=1e-10,
                            options=dict(per_sample=True, return_stats=True))
    assert st["status"] == ["dt_underflow", "success", "success"]
    assert torch.allclose(ys[-1, 1:, 0], torch.tensor([1.0, 2.0], dtype=torch.float64) * math.exp(-1), atol=1e-7)


def test_tolerances_and_step_bounds_that_cannot_work_are_refused():
    y0 = torch.ones(1, 2)
    for kw, msg in [(dict(rtol=0, atol=0), "cannot both be 0"), (dict(rtol=float("nan")), "finite"),
                    (dict(atol=float("inf")), "finite"), (dict(options=dict(max_step=0.0)), "max_step must be >"),
                    (dict(options=dict(min_step=-1.0)), "min_step must be"),
                    (dict(options=dict(min_step=0.5, max_step=0.1)), "max_step must be >")]:
        with pytest.raises(ValueError, match=msg):
            flowsde.odeint(lambda t, y: -y, y0, _T5, **kw)


def test_empty_states_and_half_precision():
    ys = flowsde.odeint(lambda t, y: -y, torch.zeros(0, 2), _T5)
    assert ys.shape == (5, 0, 2)
    ys, st = flowsde.odeint(lambda t, y: -y, torch.zeros(0, 2), _T5, options=dict(per_sample=True, return_stats=True))
    assert ys.shape == (5, 0, 2) and st["status"] == []
    # error norms in float32: err / atol would overflow float16; bfloat16 keeps 8 bits, its rounding at
    # each of the many small steps dominates
    for dt, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        ys = flowsde.odeint(lambda t, y: -y, torch.ones(3, 2, dtype=dt), _T5.to(torch.float32), rtol=1e-3, atol=1e-4)
        assert ys.dtype == dt and torch.allclose(ys[-1].double(), torch.full((3, 2), math.exp(-1), dtype=torch.float64),
                                                 atol=tol)


@pytest.mark.parametrize("per_sample", [False, True])
def test_clip_end_never_evaluates_the_field_past_the_end(per_sample):
    seen = []

    def f(t, y):
        seen.append(float(t.max()))
        return -y + torch.cos(3 * t).reshape(-1, *([1] * (y.dim() - 1)))
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 0.8], dtype=torch.float64)
    ref = flowsde.odeint(f, y0, t, rtol=1e-10, atol=1e-12, options=dict(per_sample=per_sample))
    assert max(seen) > 0.8  # the ordinary last step overshoots the end and interpolates back
    seen.clear()
    got = flowsde.odeint(f, y0, t, rtol=1e-10, atol=1e-12, options=dict(per_sample=per_sample, clip_end=True))
    assert max(seen) <= 0.8 and torch.allclose(got, ref, rtol=0, atol=1e-8)  # (rtol 1e-10 per step)


def test_adaptive_sampling_stays_inside_the_paths_time_interval():
    from flowsde.paths import VPLinear
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    seen = []

    def model(x, t):
        seen.append(float(t.max()))
        return mu.expand_as(x)
    for t_end in (0.5, 0.999):  # VPLinear's beta is NaN past t = 1 (this stopped with dt_underflow)
        seen.clear()
        x = flowsde.sample(model, torch.randn(4, 2, dtype=torch.float64), path=VPLinear(), prediction="data",
                           t_start=1e-3, t_end=t_end, method="dopri5")
        assert max(seen) <= t_end and bool(torch.isfinite(x).all())
    assert torch.allclose(x, mu.expand_as(x), atol=0.05)


def test_edges_of_the_adaptive_loop_review():
    """Step cuts at and beyond the end, float32 jumps, the budget across pieces and at its last step, no
    evaluation past the end by the attempts after it, and NaN at min_step: as torchdiffeq, or refused."""
    import torchdiffeq

    def f(t, y):
        return torch.where(t < 0.5, -y, 2.0 * y) + torch.sin(3 * t)

    def count(fn):
        calls = []

        def g(t, y):
            calls.append(float(t))
            return fn(t, y)
        return g, calls
    y0 = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    for opts in (dict(step_t=t), dict(step_t=torch.tensor([1.0], dtype=torch.float64)),
                 dict(step_t=torch.tensor([1.3], dtype=torch.float64))):
        g1, c1 = count(f)
        g2, c2 = count(f)
        a = flowsde.odeint(g1, y0, t, rtol=1e-6, atol=1e-8, options=opts)
        b = torchdiffeq.odeint(g2, y0, t, rtol=1e-6, atol=1e-8, options=opts)
        assert float((a - b).abs().max()) < 1e-10 and len(c1) == len(c2), opts
    g1, c1 = count(f)
    g2, c2 = count(f)
    jump = torch.tensor([0.5])
    a = flowsde.odeint(g1, y0.float(), t.float(), rtol=1e-5, atol=1e-6, options=dict(jump_t=jump))
    b = torchdiffeq.odeint(g2, y0.float(), t.float(), rtol=1e-5, atol=1e-6, options=dict(jump_t=jump))
    assert len(c1) == len(c2) and 0.5 not in c1 and float((a - b).abs().max()) < 1e-5
    _, st = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-8, options=dict(return_stats=True))
    n = st["steps"]
    for extra in range(0, 8):  # the budget runs out anywhere between two host checks: still a success
        _, s2 = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-8,
                               options=dict(return_stats=True, max_num_steps=n + extra, check_every=8))
        assert s2["status"] == "success", (extra, s2)
    _, s3 = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-8, options=dict(return_stats=True, step_t=t))
    m = s3["steps"]
    _, s3 = flowsde.odeint(f, y0, t, rtol=1e-6, atol=1e-8,
                           options=dict(return_stats=True, max_num_steps=m - 2, step_t=t))
    assert s3["status"] == "max_num_steps" and s3["steps"] == m - 2  # one budget over the pieces
    g1, c1 = count(lambda t, y: -torch.sqrt(1 - t) * y)
    y = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    out = flowsde.odeint(g1, y, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=1e-8,
                         options=dict(clip_end=True, check_every=8))
    (grad,) = torch.autograd.grad(out[-1].sum(), y)
    assert max(c1) <= 1.0 and torch.isfinite(grad).all()
    nan_after = lambda t, y: torch.where(t < 0.5, -y, torch.full_like(y, float("nan")))  # noqa: E731
    _, s4 = flowsde.odeint(nan_after, y0, t, options=dict(min_step=1e-3, return_stats=True))
    assert s4["status"] == "dt_underflow"
    with pytest.raises(TypeError, match="rtol must be a number or a tensor"):
        flowsde.odeint(f, (y0, y0), t, rtol=(1e-6, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tolerances_below_the_states_precision_are_refused(dtype):
    """bfloat16 at torchdiffeq's defaults (rtol=1e-7) ended y' = -y at y(1) = 1, 'success': no step could
    change the state. Such tolerances are refused; float32 at the defaults is not."""
    y0, t = torch.ones(1, dtype=dtype), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="below what a"):
        flowsde.odeint(lambda t, y: -y, y0, t, method="bosh3")
    from flowsde.problems import OrnsteinUhlenbeck
    with pytest.raises(ValueError, match="below what a"):
        flowsde.sdeint(OrnsteinUhlenbeck(), y0.reshape(1, 1), t, dt=0.1, adaptive=True, rtol=1e-6, atol=1e-6)
    ys = flowsde.odeint(lambda t, y: -y, torch.ones(1), t)  # float32 at the defaults: fine
    assert abs(float(ys[-1]) - math.exp(-1)) < 1e-5
    ys = flowsde.odeint(lambda t, y: -y, torch.ones(2), t, rtol=1e-10, atol=1e-10)  # and below its epsilon
    assert abs(float(ys[-1, 0]) - math.exp(-1)) < 1e-6
