"""``flowsde.sample``: turn any model output into the field of a Gaussian path and integrate it."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from . import _checks, kernels
from .paths.gaussian import EDM, CondOT, GaussianPath, VPCosine, VPLinear, check_prediction
from .paths.grids import time_grid
from .solvers import ddim as ddim_solver
from .solvers.ode import ADAPTIVE_ODE_METHODS, ODE_METHODS, odeint
from .solvers.sde import solve_on_grid
from .solvers.sde_methods import EULER as EULER_MARUYAMA

SAMPLE_METHODS = tuple(sorted(ODE_METHODS)) + ("ddim", "dpmpp_2m")


class PathField:
    """A model seen through a path: its output at ``(x, t)`` (with classifier-free guidance applied) and
    that output as a velocity, a score, or data and noise estimates.

    The model is called as ``model(x, t)`` with ``t`` of shape ``(batch,)``, or ``model(x, t, c)`` when a
    condition is given; under guidance, one batched call on ``[x, x]`` with ``[cond, uncond]`` gives both
    outputs and the guided output is ``uncond + w (cond - uncond)``.
    """

    def __init__(self, model, path: GaussianPath, prediction: str, x_like: torch.Tensor, cond=None, uncond=None,
                 guidance_scale=None, grid=None):
        self.model, self.path, self.prediction = model, path, prediction
        self.batch = x_like.shape[0]
        self.shape = tuple(x_like.shape)
        self.like = x_like
        self.cond, self.w = cond, guidance_scale
        self.nfe = 0
        self.pair = None
        if guidance_scale is not None:
            if uncond.shape[0] == 1 and self.batch > 1:
                uncond = uncond.expand(self.batch, *uncond.shape[1:])
            self.pair = torch.cat([cond, uncond.to(cond.dtype)], dim=0)
        self._affine = self._coef = None
        if grid is not None:  # host tables of the path on the grid, for the fused steps
            a, b, da, db = (c.tolist() for c in path.coefficients(torch.as_tensor(grid, dtype=torch.float64)))
            self._coef = list(zip(a, b, da, db))
            # steps use the tables at their start, never at the last grid time (where a divisor may vanish,
            # e.g. beta = 0 at t = 1 for a data prediction)
            self._affine = [denoise_affine(prediction, *v) for v in self._coef[:-1]]

    def set_condition(self, cond: torch.Tensor, uncond=None):
        """Copy a new condition (and unconditional input) into this field's buffers, in place: how a
        captured sampling loop takes new conditions."""
        if self.pair is None:
            self.cond.copy_(cond)
            return
        self.pair[:self.batch].copy_(cond)
        self.pair[self.batch:].copy_(uncond.expand(self.batch, *uncond.shape[1:]) if uncond.shape[0] == 1
                                     else uncond)

    def outputs(self, t: torch.Tensor, x: torch.Tensor):
        """``[(weight, output)]``: the model output, or under guidance ``[(1 - w, uncond), (w, cond)]``
        from one batched call (the DDIM step's protocol: it folds the weights into its fused update)."""
        self.nfe += 1
        tv = t.expand(self.batch)
        if self.pair is None:
            out = self.model(x, tv) if self.cond is None else self.model(x, tv, self.cond)
            return [(1.0, _checks.check_output("model", out, self.like, self.shape))]
        out = self.model(torch.cat([x, x]), torch.cat([tv, tv]), self.pair)
        out = _checks.check_output("model (guided batch)", out, self.like, (2 * self.batch,) + self.shape[1:])
        oc, ou = out.chunk(2)
        w = float(self.w)
        return [(1.0 - w, ou), (w, oc)]

    def denoise_coefficients(self, k: int):
        """``(p1, p2, q1, q2)`` at grid time ``k``: ``z_hat = p1 x + p2 out``, ``eps_hat = q1 x + q2 out``."""
        return self._affine[k]

    def drift_coefficients(self, k: int, sigma: float):
        """``(cx, co)`` with ``u + sigma^2/2 score = cx x + co out`` at grid time ``k`` (the extension drift)."""
        a, b, da, db = self._coef[k]
        p1, p2, q1, q2 = self._affine[k]
        half = 0.5 * sigma * sigma
        return (da * p1 + db * q1 - half * q1 / b), (da * p2 + db * q2 - half * q2 / b)

    def output(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The (guided) model output at ``x`` and the 0-dim time ``t``."""
        outs = self.outputs(t, x)
        if len(outs) == 1:
            return outs[0][1]
        return torch.lerp(outs[0][1], outs[1][1], outs[1][0])

    def velocity(self, t, x):
        """The model's velocity at ``(x, t)``: an ODE field ``f(t, x)`` for :func:`flowsde.odeint`."""
        return self.path.convert(self.output(t, x), x, t, self.prediction, "velocity", check=False)


def denoise_affine(prediction: str, a: float, b: float, da: float, db: float):
    """``(p1, p2, q1, q2)`` with ``z_hat = p1 x + p2 out`` and ``eps_hat = q1 x + q2 out`` for a model output
    of type ``prediction`` on a path with coefficients ``alpha, beta, alpha', beta'`` (host floats; the
    sampler has checked the divisors are nonzero at the times it uses)."""
    if prediction == "velocity":
        D = a * db - da * b
        return db / D, -b / D, -da / D, a / D
    if prediction == "epsilon":
        return 1.0 / a, -b / a, 0.0, 1.0
    if prediction == "data":
        return 0.0, 1.0, 1.0 / b, -a / b
    if prediction == "score":
        return 1.0 / a, b * b / a, 0.0, -b
    n = a * a + b * b  # v = alpha eps - beta z
    return a / n, -b / n, b / n, a / n


class _ExtendedSDE:
    """``dX = [u + sigma^2/2 score] dt + sigma dW``: the same marginals as the flow for any sigma >= 0."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, field: PathField, sigma):
        self.field, self.sigma = field, sigma
        self._g = None

    def _sig(self, t, x):
        if callable(self.sigma):
            return torch.as_tensor(self.sigma(t), dtype=x.dtype, device=x.device)
        if self._g is None:
            self._g = torch.tensor(float(self.sigma), dtype=x.dtype, device=x.device)
        return self._g

    def f(self, t, x):
        fl = self.field
        out = fl.output(t, x)
        u = fl.path.convert(out, x, t, fl.prediction, "velocity", check=False)
        score = fl.path.convert(out, x, t, fl.prediction, "score", check=False)
        s = self._sig(t, x)
        return torch.addcmul(u, score, 0.5 * s * s)

    def g(self, t, x):
        return self._sig(t, x).expand(x.shape)


def sample(model, x_init, path=None, prediction="velocity", method="heun", steps=20, t_start=0.0, t_end=1.0,
           sigma=0.0, cond=None, uncond=None, guidance_scale=None, seed=None, backend=None, *, eta=0.0,
           spacing="uniform", rho=7.0, rtol=1e-5, atol=1e-5, return_stats=False, cuda_graph=False):
    """Sample a flow or diffusion model: integrate its field from ``t_start`` (noise) to ``t_end`` (data).

    Args:
        model: called as ``model(x, t)`` (``t`` of shape ``(batch,)``), or ``model(x, t, c)`` with a
            condition; it returns a prediction of type ``prediction`` with ``x``'s shape.
        x_init: the starting state at ``t_start`` (for t_start = 0: ``beta_0 * N(0, I)``; note
            ``beta_0 = sigma_max`` on EDM / VE paths). Never modified.
        path: a :class:`~flowsde.paths.GaussianPath` (default ``CondOT()``).
        prediction: ``velocity`` | ``epsilon`` | ``data`` | ``score`` | ``v``.
        method: an ODE method (``euler``, ``midpoint``, ``heun``, ``heun3``, ``rk4``, ``rk4_classic``) or
            ``ddim`` (the DDIM-equivalent step for any Gaussian path; ``eta`` > 0 for its stochastic form), or
            ``dpmpp_2m`` (DPM-Solver++(2M), second order on Karras steps); an adaptive pair (``dopri5``, ...).
            With ``sigma > 0``: ``euler`` (Euler–Maruyama).
        steps: number of steps; the grid is ``steps + 1`` times, ``spacing`` ``"uniform"`` or ``"karras"``
            (equal steps in ``(beta/alpha)^{1/rho}``).
        sigma: > 0 samples the SDE ``dX = [u + sigma^2/2 score] dt + sigma dW`` with the same marginals
            (a float, or a function of the 0-dim time tensor).
        cond, uncond, guidance_scale: classifier-free guidance ``uncond + w (cond - uncond)`` from one
            batched model call (``guidance_scale=None``: the conditional model alone, if ``cond`` is given).
        seed: the noise of ``sigma > 0`` and ``eta > 0`` (same seed, same result).
        backend: ``auto`` | ``torch`` | ``triton`` (see :mod:`flowsde.kernels`).
        rtol, atol: tolerances of the adaptive methods (``dopri5``, ``bosh3``, ``heun_euler``), which
            choose their own steps between ``t_start`` and ``t_end`` (``steps`` is then ignored).
        return_stats: also return ``{"nfe": model calls, "steps": steps}``.
        cuda_graph: capture the whole fixed-step loop as a CUDA graph on the first call and replay it on
            later calls with the same model, path, settings and shapes (CUDA tensors; not the adaptive
            methods or a time-dependent ``sigma``). The model must be capturable (no host syncs, no
            data-dependent control flow). Stochastic samplers read their per-step noise keys from device
            memory, so a new ``seed`` needs no new capture; the noise is the Philox stream on either
            backend (the same numbers the triton backend draws without a graph). No gradients flow
            through a captured loop. :func:`flowsde.graphs.clear_graph_cache` frees the graphs.

    Returns the state at ``t_end``.
    """
    path = CondOT() if path is None else path
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a flowsde.paths.GaussianPath, got {type(path).__name__}")
    check_prediction(prediction)
    x_init = _checks.check_state("x_init", x_init)
    if x_init.dim() < 1:
        raise ValueError("x_init must have a batch dimension")
    ops = kernels.ops(backend, x_init.device, x_init.numel(), captured=bool(cuda_graph))
    if method not in SAMPLE_METHODS and method not in ADAPTIVE_ODE_METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {SAMPLE_METHODS}")
    if not callable(sigma):
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 <= sigma < math.inf:
            raise ValueError(f"sigma must be a finite number >= 0 or a function of t, got {sigma!r}")
        sigma = float(sigma)
    stochastic = callable(sigma) or sigma > 0
    guidance_scale = _check_guidance(x_init, cond, uncond, guidance_scale)
    if method in ADAPTIVE_ODE_METHODS:
        time_grid(path, 1, t_start, t_end)  # the same checks of t_start / t_end as the fixed-step samplers
        if stochastic or eta:
            raise ValueError(f"adaptive method {method!r} integrates the ODE: sigma and eta must be 0")
        if cuda_graph:
            raise ValueError(f"cuda_graph=True captures a fixed-step loop; adaptive method {method!r} has none "
                             f"(its step count is decided as it runs)")
        probe = np.linspace(float(t_start), float(t_end), 257)
        _validate_conversions(path, prediction, "heun", False, probe)  # every probe time, both ends included
        field = PathField(model, path, prediction, x_init, cond, uncond, guidance_scale)
        t = torch.as_tensor([float(t_start), float(t_end)], dtype=torch.float64).to(x_init.device)
        ys, st = odeint(field.velocity, x_init, t, method=method, rtol=rtol, atol=atol,
                        options=dict(backend=ops.name, return_stats=True, clip_end=True))
        if st["status"] != "success":
            raise RuntimeError(f"adaptive sampling stopped with status {st['status']}")
        return (ys[-1], {"nfe": field.nfe, "steps": st["steps"]}) if return_stats else ys[-1]
    if stochastic and method != "euler":
        raise ValueError(f"sigma > 0 samples an SDE with Euler–Maruyama: pass method='euler' (got {method!r}); "
                         f"for stochastic DDIM pass method='ddim' with eta > 0")
    if not (0.0 <= float(eta) <= 1.0) or (eta and method != "ddim"):
        raise ValueError(f"eta must be in [0, 1] and only applies to method='ddim', got eta={eta}")
    grid = time_grid(path, steps, t_start, t_end, spacing, rho)
    _validate_conversions(path, prediction, method, stochastic, grid)
    if cuda_graph and callable(sigma):
        raise ValueError("cuda_graph=True needs a constant sigma (a float), not a function of t")

    def build(x_like, c, u, noise=None):
        field = PathField(model, path, prediction, x_like, c, u, guidance_scale,
                          grid if method in ("ddim", "dpmpp_2m") or stochastic else None)
        if method == "ddim":
            tg = torch.as_tensor(grid)
            run = ddim_solver.ddim_loop(field, grid, path.alpha(tg).tolist(), path.beta(tg).tolist(), float(eta),
                                        x_like, ops, seed=seed, noise=noise)
        elif method == "dpmpp_2m":
            tg = torch.as_tensor(grid)
            run = ddim_solver.dpmpp_2m_loop(field, grid, path.alpha(tg).tolist(), path.beta(tg).tolist(), x_like, ops)
        elif stochastic and not callable(sigma):
            run = _extension_em_loop(field, grid, sigma, ops, x_like, seed=seed, noise=noise)
        elif stochastic:
            def run(x0):
                return solve_on_grid(_ExtendedSDE(field, sigma), x0, grid, grid[[0, -1]], EULER_MARUYAMA,
                                     x0.dtype, seed=seed, ops=ops)[-1]
        else:
            run = _ode_loop(field, grid, method, ops, x_like)
        return field, run

    if cuda_graph:
        builtin = type(path) in (CondOT, VPCosine, VPLinear, EDM)  # fully described by their repr
        path_key = repr(path) if builtin else id(path)
        x, nfe = _sample_graphed(build, x_init, cond, uncond, seed, grid, (
            id(model), path_key, prediction, method, int(steps), float(t_start), float(t_end), sigma, float(eta),
            spacing, float(rho), guidance_scale, ops.name), (model,) if builtin else (model, path),
            stochastic or bool(eta))
    else:
        field, run = build(x_init, cond, uncond)
        x = run(x_init)
        nfe = field.nfe
    if return_stats:
        return x, {"nfe": nfe, "steps": steps}
    return x


def _sample_graphed(build, x_init, cond, uncond, seed, grid, settings, refs, noisy):
    """Run ``build``'s loop through a cached CUDA graph; returns ``(x_end, nfe)``."""
    from . import graphs
    from .brownian import default_seed, step_keys
    from .kernels.philox import KEY_MASK

    if x_init.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors; x_init is on {x_init.device}")
    _checks.check_seed(seed)
    meta = lambda t: None if t is None else (tuple(t.shape), t.dtype, t.device)  # noqa: E731
    key = settings + (meta(x_init), meta(cond), meta(uncond))
    loop = graphs.captured(key, refs, build, x_init, cond, uncond, n_keys=len(grid) - 1)
    keys = None
    if noisy:
        keys = [k & KEY_MASK for k in step_keys(default_seed() if seed is None else int(seed), len(grid) - 1)]
    return loop(x_init, cond, uncond, keys), loop.nfe


def velocity_affine(prediction: str, a: float, b: float, da: float, db: float, bdb: float):
    """``(cx, co)`` with ``velocity = cx x + co out`` for a model output of type ``prediction``; written
    with ``bdb = beta beta'`` where that keeps it finite (score output on a VP path at t = 1)."""
    if prediction == "velocity":
        return 0.0, 1.0
    if prediction == "epsilon":
        return da / a, db - da * b / a
    if prediction == "data":
        return db / b, da - db * a / b
    if prediction == "score":
        return da / a, da * b * b / a - bdb
    n = a * a + b * b
    return (da * a + bdb) / n, (db * a - da * b) / n


def _ode_sample(field: PathField, x0: torch.Tensor, grid, method: str, ops) -> torch.Tensor:
    """An explicit RK method over ``grid`` on the model's velocity (see :func:`_ode_loop`)."""
    return _ode_loop(field, grid, method, ops, x0)(x0)


def _ode_loop(field: PathField, grid, method: str, ops, like: torch.Tensor):
    """Prepare an explicit RK method over ``grid`` on the model's velocity and return ``run(x0) -> x``.

    Each field value is one fused launch: ``u = cx x + sum_i w_i co out_i`` (conversion and guidance
    folded into host coefficients, computed here, before the loop)."""
    from .solvers import fixed
    from .solvers.rk import rk_step

    tab = ODE_METHODS[method]
    h = np.diff(grid)
    stage_t = np.stack([grid[1:] if c == 1.0 else grid[:-1] + c * h for c in tab.c], axis=1)
    tt = torch.as_tensor(stage_t.reshape(-1), dtype=torch.float64)
    path = field.path
    cols = [v.tolist() for v in (path.alpha(tt), path.beta(tt), path.dalpha(tt), path.dbeta(tt),
                                 path.beta_dbeta(tt))]
    coef = [velocity_affine(field.prediction, *v) for v in zip(*cols)]
    s = tab.stages
    times = fixed.StageTimes(grid, tab.c, like.dtype, like.device)
    hs = [float(v) for v in h]

    def run(x0):
        x, pool = x0, fixed.StatePool(x0)  # (states and stage inputs written into preallocated buffers)
        for k in range(len(hs)):
            stage = iter(coef[k * s:(k + 1) * s])

            def velocity(t, y, _stage=stage):
                cx, co = next(_stage)
                outs = field.outputs(t, y)
                if cx == 0.0 and len(outs) == 1 and outs[0][0] * co == 1.0:
                    return outs[0][1]  # the model already outputs the velocity
                return ops.combine([(cx, y)] + [(w * co, o) for w, o in outs])

            x, _ = rk_step(velocity, times[k], x, hs[k], tab, ops, pool)
        return x
    return run


def _extension_em(field: PathField, x0: torch.Tensor, grid, sigma: float, seed, ops, stream=None) -> torch.Tensor:
    """Euler–Maruyama on the SDE extension (see :func:`_extension_em_loop`)."""
    return _extension_em_loop(field, grid, sigma, ops, x0, seed=seed, stream=stream)(x0)


def _extension_em_loop(field: PathField, grid, sigma: float, ops, like: torch.Tensor, seed=None, stream=None,
                       noise=None):
    """Prepare Euler–Maruyama on ``dX = [u + sigma^2/2 score] dt + sigma dW`` and return ``run(x0) -> x``:
    the drift's conversion, the guidance and the noise fused into one update per step, ``x' = (1 + h cx) x
    + sum_i w_i h co out_i + sigma sqrt(h) z`` (the noise drawn in the kernel on the triton backend).
    ``noise``: a source with ``draw(k)`` (default: a grid Brownian motion from ``seed`` on ``stream``)."""
    from .brownian import GridBrownian
    from .solvers import fixed

    times = fixed.StageTimes(grid, (0.0,), like.dtype, like.device)
    if noise is None:
        noise = GridBrownian(grid, tuple(like.shape), seed, like.dtype, like.device,
                             stream=stream or ("philox" if ops.name == "triton" else "torch"))
    steps = []
    for k in range(len(grid) - 1):
        h = float(grid[k + 1] - grid[k])
        cx, co = field.drift_coefficients(k, sigma)
        steps.append((1.0 + h * cx, h * co, sigma * h ** 0.5))

    def run(x0):
        x, pool = x0, fixed.StatePool(x0)  # (each new state written into one of two buffers, in turn)
        for k, (cx, co, s) in enumerate(steps):
            outs = field.outputs(times[k][0], x)
            terms = [(cx, x)] + [(w * co, o) for w, o in outs]
            x = ops.combine(terms, [(s, None)], noise.draw(k), out=pool.take(terms))
        return x
    return run


def _check_guidance(x_init, cond, uncond, guidance_scale):
    """The conditioning inputs of :func:`sample`, checked for every method; returns the guidance scale as
    a float (or ``None``), so the loop never converts a tensor on the host."""
    if uncond is not None and cond is None:
        raise ValueError("uncond is given without cond: classifier-free guidance needs both (and guidance_scale)")
    for name, c in (("cond", cond), ("uncond", uncond)):
        if c is not None and (not isinstance(c, torch.Tensor) or c.dim() < 1):
            raise TypeError(f"{name} must be a tensor with a batch dimension")
    if cond is not None and cond.shape[0] != x_init.shape[0]:
        raise ValueError(f"cond has batch {cond.shape[0]}, x_init has batch {x_init.shape[0]}")
    if uncond is not None and uncond.shape[0] not in (1, x_init.shape[0]):
        raise ValueError(f"uncond must have batch 1 or {x_init.shape[0]}, got {uncond.shape[0]}")
    if guidance_scale is None:
        return None
    if cond is None or uncond is None:
        raise ValueError("classifier-free guidance needs both cond and uncond")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    return float(guidance_scale)


def _validate_conversions(path, prediction, method, stochastic, grid):
    """Check, once and on the host, that no conversion the run needs is singular at its evaluation times."""
    if method in ("ddim", "dpmpp_2m"):
        times, dsts = grid[:-1], ("data", "epsilon") if method == "ddim" else ("data",)
    elif stochastic:
        times, dsts = grid[:-1], ("velocity", "score")
    else:
        tab = ODE_METHODS[method]
        h = np.diff(grid)
        times = np.concatenate([grid[1:] if c == 1.0 else grid[:-1] + c * h for c in tab.c])
        dsts = ("velocity",)
    t = torch.as_tensor(times, dtype=torch.float64)
    a, b, da, db = path.coefficients(t)
    for dst in dsts:  # score -> velocity through beta beta', finite where beta' is not (VP at t = 1)
        bdb = path.beta_dbeta(t) if (prediction, dst) == ("score", "velocity") else None
        path.check_conversion(prediction, dst, a, b, da, db, t, bdb=bdb)
