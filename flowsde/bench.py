"""``flowsde bench``: accuracy against cost (wall time and NFE), flowsde and its peers in one run.

Three problems, every contender on the same inputs:

* **OU, Euler–Maruyama** (``dX = -X dt + dW``, strong error at T = 1 on one shared Brownian path against
  the path-wise exact solution): ``flowsde.sdeint``, ``torchsde.sdeint`` (same path object), and a
  hand-written PyTorch loop.
* **linear ODE** (damped rotation, max error at T = 2 against the matrix exponential): ``flowsde.odeint``
  and ``torchdiffeq.odeint`` with RK4 over step counts and dopri5 over tolerances, and a hand-written RK4.
* **sampling a DDPM-schedule model that is the exact mixture** (linear betas, epsilon prediction): diffusers'
  DDIM, Euler, Heun, DPM-Solver++ 2M and UniPC (trailing spacing) and flowsde's Karras Euler and Heun,
  against the probability-flow ODE solved at 1e-9 (1e-7 with --quick);
* **sampling on the exact Gaussian-mixture flow** (CondOT, the exact marginal velocity of
  :func:`~flowsde.problems.reference_mixture`, RMS error at t = 1 against a 2048-step RK4 solve from the
  same noise) at NFE 10, 20, 50: ``flowsde.sample`` (Euler, Heun, RK4, DDIM), and, when diffusers is
  installed, its flow-matching schedulers on the same field (FlowMatchEuler, FlowMatchHeun,
  DPM-Solver++ 2M and UniPC with flow sigmas); diffusers' timestep grid is its own.

Each row: problem, library, method, setting (steps or tolerance), NFE (field evaluations), error, and
the median wall time of 3 runs (1 with ``--quick``).
"""
from __future__ import annotations

import time
from typing import List

import torch

from .brownian import GridBrownian, SampledPath
from .problems import LinearODE, OrnsteinUhlenbeck, reference_mixture

NFE_BUDGETS = (10, 20, 50)


def _timed(fn, reps):
    """``(result, median seconds of reps calls)``, after one untimed call: every contender's first-call costs
    (imports, caches, compilation; flowsde's were ~7 ms against ~1 ms a call) stay out of its time."""
    out, times = fn(), []
    for _ in range(reps):
        s = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - s)
    return out, sorted(times)[len(times) // 2]


def _calls(reps: int) -> int:
    """How many times :func:`_timed` calls its function (the untimed first call included): the divisor of
    an evaluation counter shared by the calls."""
    return reps + 1


def _row(problem, library, method, setting, nfe, error, seconds):
    return {"problem": problem, "library": library, "method": method, "setting": setting, "nfe": int(nfe),
            "error": float(error), "seconds": float(seconds)}


def bench_ou(quick=False, device="cpu", reps=3, seed=0) -> List[dict]:
    import torchsde

    import flowsde

    paths, n_fine = (500, 256) if quick else (2000, 1024)
    steps = [8, 32, 128] if quick else [8, 16, 32, 64, 128]
    dt = torch.float64
    fine = GridBrownian(t0=0.0, t1=1.0, steps=n_fine, shape=(paths, 1), seed=seed, dtype=dt, device=device,
                        stream="philox")
    bm = SampledPath(fine.grid, fine.path())
    sde = OrnsteinUhlenbeck(1.0, 1.0)
    y0 = torch.ones(paths, 1, dtype=dt, device=device)
    ref = sde.pathwise(y0, bm.grid, bm.values)
    ts = torch.tensor([0.0, 1.0], dtype=dt, device=device)
    rows = []
    for n in steps:
        h = 1.0 / n

        def hand(n=n, h=h):
            x = y0
            for k in range(n):
                x = x - x * h + (bm.values[(k + 1) * (n_fine // n)] - bm.values[k * (n_fine // n)])
            return x
        for lib, fn in (("flowsde", lambda: flowsde.sdeint(sde, y0, ts, bm=bm, dt=h, method="euler")[-1]),
                        ("torchsde", lambda: torchsde.sdeint(sde, y0, ts, bm=bm, dt=h, method="euler")[-1]),
                        ("hand loop", hand)):
            x, sec = _timed(fn, reps)
            rows.append(_row("ou (SDE)", lib, "euler", f"{n} steps", n, (x - ref).abs().mean(), sec))
    return rows


class _Counted:
    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, y):
        self.n += 1
        return self.f(t, y)


def bench_linear(quick=False, device="cpu", reps=3, seed=0) -> List[dict]:
    import torchdiffeq

    import flowsde

    lin = LinearODE()
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=torch.float64, device=device)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64, device=device)
    exact = lin.exact(y0, 2.0).to(device)
    rows = []
    for n in ([8, 32] if quick else [8, 16, 32, 64]):
        h = 2.0 / n

        def hand(f, n=n, h=h):
            y, tt = y0, torch.zeros((), dtype=torch.float64, device=device)
            for _ in range(n):
                k1 = f(tt, y)
                k2 = f(tt + h / 2, y + h / 2 * k1)
                k3 = f(tt + h / 2, y + h / 2 * k2)
                k4 = f(tt + h, y + h * k3)
                y, tt = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tt + h
            return y
        for lib, solve in (("flowsde", lambda f: flowsde.odeint(f, y0, t, method="rk4", options=dict(step_size=h))[-1]),
                           ("torchdiffeq", lambda f: torchdiffeq.odeint(f, y0, t, method="rk4",
                                                                        options=dict(step_size=h))[-1]),
                           ("hand loop", hand)):
            f = _Counted(lin)
            y, sec = _timed(lambda: solve(f), reps)
            rows.append(_row("linear (ODE)", lib, "rk4", f"{n} steps", f.n // _calls(reps), (y - exact).abs().max(), sec))
    for tol in ([1e-4, 1e-8] if quick else [1e-4, 1e-6, 1e-8, 1e-10]):
        for lib, solve in (("flowsde", flowsde.odeint), ("torchdiffeq", torchdiffeq.odeint)):
            f = _Counted(lin)
            y, sec = _timed(lambda: solve(f, y0, t, method="dopri5", rtol=tol, atol=tol)[-1], reps)
            rows.append(_row("linear (ODE)", lib, "dopri5", f"tol {tol:g}", f.n // _calls(reps), (y - exact).abs().max(), sec))
    return rows


def _diffusers_schedulers():
    """diffusers' flow-matching schedulers by name (empty if diffusers is not installed)."""
    try:
        import diffusers
    except Exception:  # pragma: no cover - optional
        return {}
    return {
        "FlowMatchEuler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        "FlowMatchHeun": lambda: diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        "DPM-Solver++ 2M": lambda: diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
            solver_order=2, algorithm_type="dpmsolver++"),
        "UniPC": lambda: diffusers.UniPCMultistepScheduler(
            num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0),
    }


def _run_diffusers(make, field, x0, nfe):
    """Sample with a diffusers scheduler on the exact field; the scheduler's model output is its flow
    prediction ``noise - data = dx/dsigma = -u(x, t)`` with ``t = 1 - sigma``. Returns ``(x, calls)``."""
    sched = make()
    order = getattr(sched, "order", 1)
    steps = max(1, nfe // order) if order == 2 and "Heun" in type(sched).__name__ else nfe
    sched.set_timesteps(steps, device=x0.device)
    x, calls = x0, 0
    for ts in sched.timesteps:
        # the scheduler's own sigma at this step: its timesteps may be rounded (DPM-Solver++ and UniPC with
        # use_flow_sigmas hold integers), and the model must be asked at the sigma the update assumes
        i = sched.step_index if sched.step_index is not None else (getattr(sched, "begin_index", None) or 0)
        sigma = float(sched.sigmas[i])
        t = torch.full((x.shape[0],), 1.0 - sigma, dtype=x.dtype, device=x.device)
        out = -field(x, t)
        calls += 1
        x = sched.step(out, ts, x).prev_sample
    return x, calls


def bench_mixture(quick=False, device="cpu", reps=3, seed=0) -> List[dict]:
    import flowsde
    from .paths import CondOT

    mix, path = reference_mixture().to(device), CondOT()
    calls = {"n": 0}

    def field(x, t):
        calls["n"] += 1
        return mix.velocity(x, t, path)
    n_pts = 256 if quick else 1024
    x0 = torch.randn(n_pts, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5 + seed)).to(device)
    ref = flowsde.sample(field, x0, path=path, method="rk4", steps=2048)
    rows = []
    for make in _diffusers_schedulers().values():  # import and first-call costs out of the timings
        _run_diffusers(make, field, x0[:4], 4)
    flowsde_methods = {"euler": 1, "heun": 2, "rk4": 4, "ddim": 1}
    for nfe in NFE_BUDGETS:
        for m, per_step in flowsde_methods.items():
            calls["n"] = 0
            x, sec = _timed(lambda: flowsde.sample(field, x0, path=path, method=m, steps=max(1, nfe // per_step)),
                            reps)
            rows.append(_row("mixture (sampling)", "flowsde", m, f"NFE {nfe}", calls["n"] // _calls(reps),
                             (x - ref).pow(2).mean().sqrt(), sec))
        for name, make in _diffusers_schedulers().items():
            (x, n_calls), sec = _timed(lambda: _run_diffusers(make, field, x0, nfe), reps)
            rows.append(_row("mixture (sampling)", "diffusers", name, f"NFE {nfe}", n_calls,
                             (x - ref).pow(2).mean().sqrt(), sec))
    return rows


def _vp_eps_model(mix, sig_train):
    """The exact epsilon prediction of a mixture under a DDPM schedule, in diffusers' convention: input
    ``x`` in VP coordinates at (fractional) timestep ``t``; sigma linear in t between training steps."""
    def model(x, t):
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1].clamp(0, sig_train.numel() - 1)
        i = tt.floor().long().clamp(max=sig_train.numel() - 2)
        w = tt - i
        sig = float(sig_train[i] * (1 - w) + sig_train[i + 1] * w)
        x_ve = x * (sig * sig + 1) ** 0.5
        return (x_ve - mix.denoise(x_ve, sig)) / sig
    return model


def bench_mixture_vp(quick=False, device="cpu", reps=3, seed=0) -> List[dict]:
    """Sampling a DDPM-schedule (linear betas, epsilon) model that is the exact mixture: diffusers' DDIM,
    Euler, Heun, DPM-Solver++ 2M and UniPC (trailing spacing, so all start at the last training step)
    against flowsde's Karras Euler and Heun (k-diffusion style) at NFE 10, 20, 50. Error: RMS against the
    probability-flow ODE solved by flowsde's sample_dpm_adaptive (dopri5) at 1e-9 (1e-7 with --quick) down to sigma = 1e-4, then denoised."""
    from .integrations import kdiffusion as K
    from .integrations.diffusers import training_alphas_cumprod

    mix = reference_mixture().to(device)
    ac = training_alphas_cumprod(1000, 0.0001, 0.02, "linear").double()
    sig_train = ((1 - ac) / ac).sqrt()
    s_max, s_min = float(sig_train[-1]), float(sig_train[0])
    n_pts = 128 if quick else 1024
    noise = torch.randn(n_pts, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6 + seed)).to(device)
    calls = {"n": 0}

    def den(x, s):
        calls["n"] += 1
        return mix.denoise(x, s)
    x_ve = noise * (s_max ** 2 + 1) ** 0.5
    tol = 1e-7 if quick else 1e-9  # far below the errors compared (>= 1e-3)
    ref = mix.denoise(K.sample_dpm_adaptive(lambda x, s: mix.denoise(x, s), x_ve, 1e-4, s_max, order=5,
                                            rtol=tol, atol=tol), 1e-4)
    eps = _vp_eps_model(mix, sig_train)
    rows = []
    scheds = {}
    try:
        import diffusers
        common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                      timestep_spacing="trailing", prediction_type="epsilon")
        scheds = {"DDIM": lambda: diffusers.DDIMScheduler(clip_sample=False, **common),
                  "Euler": lambda: diffusers.EulerDiscreteScheduler(**common),
                  "Heun": lambda: diffusers.HeunDiscreteScheduler(**common),
                  "DPM-Solver++ 2M": lambda: diffusers.DPMSolverMultistepScheduler(solver_order=2, **common),
                  "UniPC": lambda: diffusers.UniPCMultistepScheduler(**common)}
    except Exception:  # pragma: no cover - optional
        pass

    def run_diffusers(make, nfe):
        sched = make()
        sched.set_timesteps((nfe + 1) // 2 if sched.order == 2 and "Heun" in type(sched).__name__ else nfe)
        x, n = noise * float(getattr(sched, "init_noise_sigma", 1.0)), 0
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x = sched.step(eps(inp, t), t, x).prev_sample
            n += 1
        return x, n
    for make in scheds.values():  # import and first-call costs out of the timings
        run_diffusers(make, 2)
    for nfe in NFE_BUDGETS:
        for name, per, fn in (("euler (Karras)", 1, K.sample_euler), ("heun (Karras)", 2, K.sample_heun)):
            steps = nfe if per == 1 else (nfe + 1) // 2
            sig = K.get_sigmas_karras(steps, s_min, s_max, device=device)
            calls["n"] = 0
            x, sec = _timed(lambda: fn(den, x_ve, sig), reps)
            rows.append(_row("mixture VP (sampling)", "flowsde", name, f"NFE {nfe}", calls["n"] // _calls(reps),
                             (x - ref).pow(2).mean().sqrt(), sec))
        for name, make in scheds.items():
            (x, n), sec = _timed(lambda: run_diffusers(make, nfe), reps)
            rows.append(_row("mixture VP (sampling)", "diffusers", name, f"NFE {nfe}", n,
                             (x - ref).pow(2).mean().sqrt(), sec))
    return rows


def run_bench(quick=False, device="cpu", progress=False, seed=0) -> List[dict]:
    """Every problem's rows (see the module docstring); ``seed`` moves every random input (0: the
    figures in README.md)."""
    from tqdm.auto import tqdm

    reps = 1 if quick else 3
    rows = []
    for fn in tqdm((bench_ou, bench_linear, bench_mixture, bench_mixture_vp), desc="bench", disable=not progress,
                   leave=False):
        rows += fn(quick, device, reps, seed=seed)
    return rows


def winners(rows: List[dict]) -> dict:
    """On each sampling problem, the most accurate method at each NFE budget:
    ``{(problem, nfe): (library, method, error)}``."""
    best = {}
    for r in rows:
        if r["problem"].startswith("mixture"):
            key = (r["problem"], int(r["setting"].split()[-1]))
            if key not in best or r["error"] < best[key][2]:
                best[key] = (r["library"], r["method"], r["error"])
    return best


def format_bench(rows: List[dict]) -> str:
    """A markdown table of the rows, then the winner at each NFE budget on the sampling problem."""
    lines = ["| problem | library | method | setting | NFE | error | ms |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['library']} | {r['method']} | {r['setting']} | {r['nfe']} | "
                     f"{r['error']:.2e} | {1e3 * r['seconds']:.1f} |")
    lines.append("")
    for (prob, nfe), (lib, m, err) in sorted(winners(rows).items()):
        lines.append(f"Most accurate on {prob} at NFE {nfe}: {lib} {m} (error {err:.2e})")
    return "\n".join(lines)


def plot_bench(rows: List[dict], filename: str) -> None:
    """Work-precision diagrams (PNG): error against wall time for the OU and linear problems, error
    against NFE for the sampling problem; one curve per library and method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .studies import save_figure, style_axes

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.4), dpi=100, squeeze=False)
    for ax, prob in zip(axes[0], problems):
        sampling = prob.startswith("mixture")
        curves = {}
        for r in rows:
            if r["problem"] == prob:
                curves.setdefault(f"{r['library']} {r['method']}", []).append(
                    (r["nfe"] if sampling else 1e3 * r["seconds"], r["error"]))
        for label, pts in curves.items():  # in the order of the settings (coarse to fine)
            ax.loglog([p[0] for p in pts], [max(p[1], 1e-300) for p in pts], "o-", label=label)
        style_axes(ax, "NFE" if sampling else "wall time (ms)", prob, 7)
    save_figure(fig, filename)


__all__ = ["run_bench", "format_bench", "plot_bench", "winners", "bench_ou", "bench_linear", "bench_mixture"]
