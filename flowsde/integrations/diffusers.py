"""``FlowSDEScheduler``: flowsde's steps as a diffusers scheduler.

Swap it into a pipeline in one line, for both families of models::

    pipe.scheduler = FlowSDEScheduler.from_config(pipe.scheduler.config, method="ddim")

* **diffusion** configs (DDPM-trained: ``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2,
  ``prediction_type`` epsilon / v_prediction / sample): the discrete VP path ``x = sqrt(abar) z +
  sqrt(1 - abar) eps`` of the model's training schedule; timesteps with ``timestep_spacing`` leading /
  trailing / linspace and ``steps_offset``; ``set_alpha_to_one``; ``clip_sample``.
* **flow** configs (``FlowMatchEulerDiscreteScheduler``'s: ``sigma`` from 1 to 0, ``shift``, dynamic
  shifting with ``mu``): the CondOT path ``x = (1 - sigma) z + sigma eps``, the model predicting
  ``eps - z`` (diffusers' flow prediction).

Methods: ``ddim`` (diffusion; ``eta`` for its stochastic form), ``euler`` (flow: the flow-match Euler
step; diffusion: DDIM with eta = 0, the exact Euler step of the probability-flow ODE in its natural
coordinates) and ``euler_maruyama`` (flow: the SDE with the flow's marginals, ``dX = [u + s^2/2 score] dt
+ s dW``, noise level ``sde_sigma``, noise from the ``generator``) and ``dpmpp_2m`` (diffusion:
``DPMSolverMultistepScheduler``'s DPM-Solver++(2M), ``solver_order`` 1 or 2). Every update is one fused flowsde
combine (the Triton kernel on CUDA tensors of 2^20 elements or more), plus one for the data estimate
``pred_original_sample`` that diffusion steps return (``return_pred_original_sample=False`` skips it);
``step`` reads nothing back from the
device: the step index is a host counter, never the value of the ``timestep`` tensor (no ``.item()``, no
``nonzero()``).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    from diffusers.utils import BaseOutput
except Exception as exc:  # pragma: no cover - diffusers is an optional extra
    raise ImportError("flowsde.integrations.diffusers needs diffusers: pip install 'flowsde[diffusers]'") from exc

from .. import kernels

METHODS = ("ddim", "euler", "heun", "euler_maruyama", "dpmpp_2m")
#: DPMSolverMultistepScheduler's options that change its update, with the only value method="dpmpp_2m" reproduces
DPM_ONLY = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "use_lu_lambdas": False,
            "lambda_min_clipped": -float("inf"), "variance_type": None}
FAMILIES = ("diffusion", "flow")


def training_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                            trained_betas=None) -> torch.Tensor:
    """``abar_t`` of a DDPM training schedule (float32, as the models were trained with)."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, beta capped at 0.999
        abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                             dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class StepOutput(BaseOutput):
    """``step``'s output on diffusion models, as DDIM's / Euler's / Heun's: the new sample and the data
    estimate ``pred_original_sample`` the step was built from (clamped with ``clip_sample``)."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normals shaped like ``x`` from ``generator`` (drawn on the generator's device, as diffusers'
    ``randn_tensor`` does, then moved to ``x``'s); a list of generators draws one batch row from each."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: pass one per row")
        return torch.cat([_randn(x[i:i + 1], g) for i, g in enumerate(generator)])
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


# config options of the schedulers FlowSDEScheduler replaces that change their schedule or update, with the
# only value it reproduces: another value is refused rather than silently ignored
UNSUPPORTED_CONFIG = {"thresholding": False, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
                      "use_exponential_sigmas": False, "use_beta_sigmas": False, "timestep_type": "discrete",
                      "shift_terminal": None, "invert_sigmas": False, "time_shift_type": "exponential",
                      "interpolation_type": "linear", "final_sigmas_type": "zero", "stochastic_sampling": False}


#: options whose default is the sampling method's (DDIM's / Euler's / Heun's), not the replaced config's
SAMPLER_DEFAULTS = ("timestep_spacing", "clip_sample")


def _check_supported(cfg: dict, where: str):
    """Refuse the options that would change the schedule or the update to a value not implemented here."""
    for key, default in UNSUPPORTED_CONFIG.items():
        if key in cfg and cfg[key] != default and cfg[key] is not None and not (default is None and not cfg[key]):
            raise ValueError(f"{where} has {key}={cfg[key]!r}, which FlowSDEScheduler does not implement (it "
                             f"changes the schedule or the update); only {key}={default!r} is supported")


#: ``step``'s options by position after ``sample``, per (family, method): the order of the scheduler each
#: reproduces (DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
#: FlowMatchHeunDiscreteScheduler; the flow SDE sampler takes FlowMatch Euler's)
_FLOW_EULER = ("s_churn", "s_tmin", "s_tmax", "s_noise", "generator", "per_token_timesteps", "return_dict")
STEP_POSITIONAL = {
    ("diffusion", "ddim"): ("eta", "use_clipped_model_output", "generator", "variance_noise", "return_dict"),
    ("diffusion", "euler"): ("s_churn", "s_tmin", "s_tmax", "s_noise", "generator", "return_dict"),
    ("diffusion", "heun"): ("return_dict",),
    ("diffusion", "dpmpp_2m"): ("generator", "variance_noise", "return_dict"),
    ("flow", "euler"): _FLOW_EULER,
    ("flow", "euler_maruyama"): _FLOW_EULER,
    ("flow", "heun"): ("s_churn", "s_tmin", "s_tmax", "s_noise", "generator", "return_dict"),
    ("flow", "ddim"): ("eta", "use_clipped_model_output", "generator", "variance_noise", "return_dict"),
}


class FlowSDEScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running flowsde's fused steps (see the module docstring)."""

    _compatibles = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[list] = None,
                 prediction_type: str = "epsilon", timestep_spacing: Optional[str] = None, steps_offset: int = 0,
                 set_alpha_to_one: bool = True, clip_sample: Optional[bool] = None, clip_sample_range: float = 1.0,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 family: str = "diffusion", method: str = "ddim", eta: float = 0.0, sde_sigma: float = 0.5,
                 backend: Optional[str] = None, return_pred_original_sample: bool = True, solver_order: int = 2):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if clip_sample is None:  # the replaced scheduler's default: DDIMScheduler clips, HeunDiscreteScheduler
            # not (a config without the key, e.g. Euler's or DPM-Solver's, clamped Heun's latents to [-1, 1])
            self.register_to_config(clip_sample=method == "ddim")
        if timestep_spacing is None:  # likewise: DDIMScheduler's "leading", Euler's and Heun's "linspace" (an
            # SD-1.x config, whose spacing is PNDM's default, started Euler at timestep 801 instead of 999)
            timestep_spacing = "leading" if method == "ddim" else "linspace"
            self.register_to_config(timestep_spacing=timestep_spacing)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if family == "flow" and method == "ddim" and eta:
            raise ValueError("eta applies to method='ddim' on diffusion models; use method='euler_maruyama'")
        if family == "diffusion" and method == "euler_maruyama":
            raise ValueError("method='euler_maruyama' is for flow models; on diffusion models use ddim with eta")
        if method == "dpmpp_2m" and (family != "diffusion" or solver_order not in (1, 2) or self.config.clip_sample):
            raise ValueError(f"method='dpmpp_2m' reproduces DPMSolverMultistepScheduler on diffusion models with "
                             f"solver_order 1 or 2 and no clip_sample, got family={family!r}, solver_order="
                             f"{solver_order!r}, clip_sample={self.config.clip_sample!r}")
        if family == "diffusion":
            if prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
            if timestep_spacing not in ("leading", "trailing", "linspace"):
                raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {timestep_spacing!r}")
            self.alphas_cumprod = training_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                          trained_betas)
            self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.order = 2 if method == "heun" else 1
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self.sigmas = None
        self._host_sigmas: List[float] = []
        self._coefs: List[tuple] = []
        self._step_index = None
        self._begin_index = None
        self._ops = {}
        self._initial_schedule()

    def _initial_schedule(self):
        """The schedule the replaced scheduler holds before ``set_timesteps``, every training timestep (training
        scripts call ``add_noise`` and read ``sigmas`` / ``timesteps`` without ``set_timesteps``): DDIM's
        integer timesteps; Euler's float32 ones with the training sigmas and a final 0; Heun's
        ``set_timesteps(T)``, as ``HeunDiscreteScheduler`` calls it; a flow's ``T`` sigmas ``1, (T-1)/T, ...,
        1/T``, shifted (unless the shift is dynamic), without the final 0 ``set_timesteps`` appends, and
        timesteps ``T sigma`` — diffusers' float32 arithmetic, value for value."""
        cfg, T = self.config, self.config.num_train_timesteps
        if cfg.method == "heun" and cfg.family == "diffusion":
            self.set_timesteps(T)
            return
        if cfg.family == "flow":
            sig = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
            if not cfg.use_dynamic_shifting:
                sig = cfg.shift * sig / (1 + (cfg.shift - 1) * sig)
            self.timesteps, self.sigmas = sig * T, sig
            self._host_sigmas = [float(v) for v in sig.tolist()] + [0.0]
        elif cfg.method == "euler":
            self._set_karras_style(T, np.linspace(0, T - 1, T, dtype=np.float64)[::-1].astype(np.float32))
        elif cfg.method == "dpmpp_2m":  # (DPMSolverMultistepScheduler: float32 timesteps, the sigmas ascending)
            self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
            self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self._finish_schedule(None)

    def _finish_schedule(self, device):
        """The host copies every step reads, the timesteps moved to ``device``, and a fresh run's counters."""
        self._host_timesteps = [float(v) for v in self.timesteps.tolist()]  # (on the host still: no device read)
        self.timesteps = self.timesteps.to(device)
        self._calls = len(self.timesteps)
        self._first = None  # Heun's first-stage state: (sample, output, its coefficients, dt)
        self._step_index = None
        self._begin_index = None

    # ---- diffusers' scheduler protocol --------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As diffusers' ``from_config``; a ``FlowMatch*`` scheduler's config selects the flow family."""
        cfg = dict(config or {})
        _check_supported(cfg, cfg.get("_class_name", "the scheduler") + " config")
        _check_supported(kwargs, "from_config's keyword arguments")
        params = inspect.signature(cls.__init__).parameters
        dpm = kwargs.get("method") == "dpmpp_2m"
        unknown = sorted(k for k in kwargs if k not in params and k not in UNSUPPORTED_CONFIG
                         and not (dpm and k in DPM_ONLY))
        if unknown:  # (diffusers would drop them without a word: a typo such as methd= would go unseen)
            raise TypeError(f"unknown FlowSDEScheduler option(s) {unknown}; known: {sorted(k for k in params if k != 'self')}")
        if kwargs.get("method") == "dpmpp_2m":  # DPMSolverMultistepScheduler's own options, as reproduced
            for key, want in DPM_ONLY.items():
                got = kwargs.get(key, cfg.get(key, want))
                if got != want and not (want is None and got is None):
                    raise ValueError(f"method='dpmpp_2m' reproduces DPMSolverMultistepScheduler with {key}={want!r}; "
                                     f"the config has {key}={got!r}")
            kwargs = {k: v for k, v in kwargs.items() if k not in DPM_ONLY}
        if cfg.get("use_flow_sigmas") or kwargs.get("use_flow_sigmas"):
            raise ValueError("use_flow_sigmas=True (a flow-matching model run by DPM-Solver / UniPC): pass "
                             "family='flow' and a FlowMatch scheduler's shift instead")
        # the replaced scheduler's defaults describe its model (betas, prediction type, shift): carry them over
        # instead of ours; the sampler's own choices that default per scheduler (spacing, clipping) take the
        # defaults of the scheduler the method reproduces, as that scheduler's from_config would
        for key in cfg.get("_use_default_values", []) or []:
            if key in SAMPLER_DEFAULTS:
                cfg.pop(key, None)
            elif key in params and key in cfg and key not in kwargs:
                kwargs[key] = cfg[key]
        if "family" not in kwargs and "family" not in cfg:
            flow = str(cfg.get("_class_name", "")).startswith("FlowMatch") or (
                "shift" in cfg and "beta_schedule" not in cfg)
            kwargs["family"] = "flow" if flow else "diffusion"
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at this index of the timesteps (img2img pipelines)."""
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model's input: ``sample`` itself, or ``sample / sqrt(sigma^2 + 1)`` for Euler / Heun on a
        diffusion model (variance-exploding coordinates)."""
        if self.config.family == "flow" or self.config.method in ("ddim", "dpmpp_2m"):
            return sample
        if self._step_index is None:
            self._init_step_index(timestep)
        return sample / (self._host_sigmas[self._step_index] ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, timesteps=None,
                      mu: Optional[float] = None):
        """Choose the inference timesteps (and the host tables every step reads)."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if isinstance(num_inference_steps, np.integer):  # (a NumPy count is a count)
            num_inference_steps = int(num_inference_steps)
        if cfg.family == "flow":
            self._set_flow(num_inference_steps, sigmas, timesteps, mu)
        else:
            if sigmas is not None:
                raise ValueError("custom sigmas are for flow-matching configs; for a diffusion config pass "
                                 "timesteps= (training timesteps, strictly decreasing)")
            custom = timesteps is not None
            if custom:  # (float64 first: an int64 cast would truncate 999.5 to 999 without a word)
                ts = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                                dtype=np.float64).reshape(-1)
                if ts.size < 1 or np.any(np.diff(ts) >= 0) or ts.min() < 0 or ts.max() > T - 1:
                    raise ValueError(f"custom timesteps must be strictly decreasing, in [0, {T - 1}], got {ts}")
                if cfg.method in ("ddim", "dpmpp_2m"):  # these index the training schedule; Euler / Heun interpolate
                    if np.any(ts != np.round(ts)):
                        raise ValueError(f"custom timesteps for method='ddim' index the training schedule and must "
                                         f"be integers, got {ts} (Euler / Heun take fractional ones)")
                    ts = ts.astype(np.int64)
                num_inference_steps = len(ts)
            else:
                if not isinstance(num_inference_steps, int) or not 0 < num_inference_steps <= T:
                    raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {num_inference_steps!r}")
                ts = self._diffusion_timesteps(num_inference_steps)
            self.num_inference_steps = num_inference_steps
            if cfg.method == "ddim":
                self._set_diffusion(ts, custom)
                self.timesteps = torch.from_numpy(ts)  # (moved to the device below, after the host copy)
            elif cfg.method == "dpmpp_2m":
                self._set_dpm(num_inference_steps, ts if custom else None)
            else:
                self._set_karras_style(num_inference_steps, ts.astype(np.float32) if custom else None)  # (as
                # EulerDiscreteScheduler and HeunDiscreteScheduler keep custom timesteps: float32)
        if cfg.method == "heun":  # every step but the last evaluates twice (diffusers' Heun layout)
            t, sg = self.timesteps, self._host_sigmas
            self.timesteps = torch.cat([t[:1], t[1:].repeat_interleave(2)])
            self._host_sigmas = sg[:1] + [v for v in sg[1:-1] for _ in (0, 1)] + sg[-1:]
            self.sigmas = torch.tensor(self._host_sigmas, dtype=torch.float32)
        self._finish_schedule(device)

    def _set_karras_style(self, n: int, custom=None):
        """Euler / Heun on a diffusion model, in the variance-exploding coordinates ``x / sqrt(abar)`` with
        ``sigma = sqrt((1 - abar) / abar)`` interpolated at (fractional) timesteps, as diffusers' Euler and
        Heun schedulers do: the model sees ``x / sqrt(sigma^2 + 1)`` (``scale_model_input``)."""
        cfg, T = self.config, self.config.num_train_timesteps
        if custom is not None:
            ts = custom
        elif cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + cfg.steps_offset
        else:
            ts = np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1
        train = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sig = np.interp(ts, np.arange(0, len(train)), train)
        self._host_sigmas = [float(v) for v in sig] + [0.0]
        self.sigmas = torch.tensor(self._host_sigmas, dtype=torch.float32)
        self.timesteps = torch.from_numpy(ts)
        top = float(np.float32(sig.max()))
        self.init_noise_sigma = top if cfg.timestep_spacing in ("linspace", "trailing") else float(  # (float32,
            (torch.tensor(top, dtype=torch.float32) ** 2 + 1) ** 0.5)  # as diffusers computes it)

    def _set_dpm(self, n: int, custom=None):
        """DPMSolverMultistepScheduler's schedule: integer timesteps (its own spacing rules: ``n + 1`` points
        of which the last is dropped), the variance-exploding sigmas interpolated there and a final 0, in
        float32 as there; the multistep memory cleared."""
        cfg, T = self.config, self.config.num_train_timesteps
        if custom is not None:
            ts = custom
        elif cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
        else:
            ts = np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1
        train = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sig = np.concatenate([np.interp(ts, np.arange(0, len(train)), train), [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sig)
        self._host_sigmas = [float(v) for v in sig]
        self.timesteps = torch.from_numpy(ts)
        self._dpm = (None, 0)  # (the last data estimate, how many steps have run: the first is first order)

    def _dpm_step(self, ops, k, out, x):
        """DPM-Solver++(2M) as DPMSolverMultistepScheduler runs it (Lu et al. 2022, Algorithm 2; its "midpoint"
        form): in the VP coordinates ``alpha = 1/sqrt(s^2 + 1)``, ``sigma = s alpha``, ``lambda = -log s``,
        ``x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D`` with ``D`` the data estimate ``m0`` (first order: the
        first step, the last one to 0, ``solver_order=1``) or ``m0 + (m0 - m1) / (2 r)``, ``r = h_prev / h`` —
        one fused update from ``x``, the model output and the previous estimate; plus the estimate itself for
        the next step (one more fused pass, skipped where no step follows)."""
        cfg, sg = self.config, self._host_sigmas
        n = len(self._host_timesteps)
        s0, s1 = sg[k], sg[k + 1]
        a0, a1 = (s0 * s0 + 1.0) ** -0.5, (s1 * s1 + 1.0) ** -0.5
        b0, b1 = s0 * a0, s1 * a1
        pt = cfg.prediction_type  # the data estimate m0 = p1 x + p2 out
        p1, p2 = (1.0 / a0, -b0 / a0) if pt == "epsilon" else (0.0, 1.0) if pt == "sample" else (a0, -b0)
        h = math.log(s0 / s1) if s1 > 0 else math.inf
        c = -a1 * math.expm1(-h)
        prev, runs = self._dpm
        h_prev = math.log(sg[k - 1] / s0) if k else 0.0
        # (a repeated sigma — set_timesteps(T) rounds two timesteps onto one — has no step to extrapolate
        # from: first order there, where diffusers divides by zero and returns NaN)
        second = cfg.solver_order == 2 and runs >= 1 and k < n - 1 and prev is not None and h_prev > 0
        w = 0.5 * h / h_prev if second else 0.0  # 1 / (2 r)
        terms = [(b1 / b0 + c * (1.0 + w) * p1, x), (c * (1.0 + w) * p2, out)] + ([(-c * w, prev)] if second else [])
        x1 = ops.combine(terms)
        m0 = None
        if cfg.solver_order == 2 and k < n - 1:
            m0 = out if pt == "sample" else ops.combine([(p1, x), (p2, out)])
        self._dpm = (m0, min(runs + 1, cfg.solver_order))
        return x1

    def _diffusion_timesteps(self, n: int) -> np.ndarray:
        cfg, T = self.config, self.config.num_train_timesteps
        if cfg.timestep_spacing == "leading":
            ts = (np.arange(n) * (T // n)).round()[::-1].astype(np.int64) + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        return ts.copy()

    def _set_diffusion(self, ts: np.ndarray, custom: bool = False):
        """Per step: ``(abar, abar')`` at the step's two timesteps (host floats). The next timestep is
        ``t - T // n`` (DDIMScheduler's rule), or the next one of a custom list."""
        T = self.config.num_train_timesteps
        ac = self.alphas_cumprod.double().tolist()
        stride = T // len(ts)
        self._coefs = []
        tl = ts.tolist()
        for i, t in enumerate(tl):
            prev = (tl[i + 1] if i + 1 < len(tl) else -1) if custom else t - stride
            a2 = ac[t]
            a2p = ac[prev] if prev >= 0 else self.final_alpha_cumprod
            self._coefs.append((a2, a2p))
        self.sigmas = torch.tensor([((1 - a) / a) ** 0.5 for a, _ in self._coefs] + [0.0], dtype=torch.float32)

    def _set_flow(self, n, sigmas, timesteps, mu):
        cfg, T = self.config, self.config.num_train_timesteps
        given = {k: len(v) for k, v in (("sigmas", sigmas), ("timesteps", timesteps)) if v is not None}
        if n is not None and given:
            given["num_inference_steps"] = n
        if len(set(given.values())) > 1:  # (diffusers refuses these too; the last step would have run off)
            raise ValueError(f"set_timesteps: the lengths disagree: {given}")
        if sigmas is not None:
            s = np.asarray(sigmas, dtype=np.float64)
            n = len(s)
        elif timesteps is not None:
            s = np.asarray(timesteps, dtype=np.float64) / T
            n = len(s)
        else:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
            s_min = 1.0 / T if cfg.use_dynamic_shifting else cfg.shift / T / (1 + (cfg.shift - 1) / T)
            s = np.linspace(1.0, s_min, n)
        # the shift applies to every schedule, custom sigmas and custom timesteps included (diffusers
        # 0.42: given timesteps are kept as they are, their sigmas shifted)
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting needs mu in set_timesteps")
            s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
        else:
            s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
        self.num_inference_steps = n
        self._host_sigmas = [float(v) for v in s] + [0.0]
        self.sigmas = torch.tensor(self._host_sigmas, dtype=torch.float32)
        if timesteps is not None:  # given timesteps are kept as they are (with or without given sigmas)
            self.timesteps = torch.tensor(np.asarray(timesteps, dtype=np.float32))
        else:  # float32 sigmas times T in float32, as diffusers rounds them (timesteps are looked up exactly)
            self.timesteps = torch.tensor(s, dtype=torch.float32) * T

    def _init_step_index(self, timestep=None):
        """The first step's index: ``begin_index`` if set, else where ``timestep`` lies in the schedule, as
        diffusers' ``index_for_timestep`` finds it (its second occurrence when it occurs twice) — a pipeline
        that slices the timesteps without ``set_begin_index`` (img2img / video2video) starts there, not at 0.
        A timestep that is an element of ``self.timesteps`` (what pipelines iterate) is located by its storage
        offset, without reading the device; another tensor is read once, at the first step of a run."""
        if self._begin_index is not None or timestep is None:
            self._step_index = self._begin_index if self._begin_index is not None else 0
            return
        ts, host = self.timesteps, self._host_timesteps
        if (isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep.device == ts.device
                and ts.dim() == 1 and ts.stride(0) == 1
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()
                and 0 <= timestep.storage_offset() - ts.storage_offset() < len(host)):
            value = host[timestep.storage_offset() - ts.storage_offset()]
        else:
            value = float(timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else timestep)
            if ts.dtype == torch.float32:  # compared in the schedule's float32, as diffusers' (timesteps == t)
                # does: 998.7 given is 998.70001220703125 there
                value = float(np.float32(value))
        hits = [i for i, v in enumerate(host) if v == value]
        if not hits:
            raise ValueError(f"timestep {value} is not one of this scheduler's timesteps (set_timesteps made "
                             f"{host[:3]}...): pass the schedule's own timesteps, or call set_begin_index")
        self._step_index = hits[1] if len(hits) > 1 else hits[0]

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor, *args,
             eta: Optional[float] = None, generator: Optional[torch.Generator] = None, return_dict: bool = True,
             use_clipped_model_output: bool = False, variance_noise: Optional[torch.Tensor] = None,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             per_token_timesteps: Optional[torch.Tensor] = None) -> Union[SchedulerOutput, Tuple]:
        """Advance ``sample`` by one step: one fused update, and one for ``pred_original_sample`` (diffusion
        models, unless ``return_pred_original_sample=False``; with ``clip_sample`` the update reads it). The
        keywords are the replaced schedulers' (DDIM's ``use_clipped_model_output`` / ``variance_noise``; Euler's churn
        ``s_churn`` etc., which must stay 0: churn is not implemented; FlowMatch Euler's
        ``per_token_timesteps``, not implemented) — an option that would change the update is refused, never
        ignored, and an unknown keyword is a ``TypeError``. Options passed by position after ``sample`` are
        read in the order of the scheduler the method reproduces (:data:`STEP_POSITIONAL`: DDIM's ``eta,
        use_clipped_model_output, generator, ...``, Heun's ``return_dict``, ...)."""
        if args:
            names = STEP_POSITIONAL[self.config.family, self.config.method]
            if len(args) > len(names):
                raise TypeError(f"step takes {len(names)} option(s) by position after sample for method "
                                f"{self.config.method!r} ({', '.join(names)}), got {len(args)}")
            given = dict(zip(names, args))
            defaults = {k: p.default for k, p in inspect.signature(FlowSDEScheduler.step).parameters.items()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY}
            scope = locals()  # (taken here: a comprehension has its own)
            here = {k: scope[k] for k in defaults}
            twice = [k for k in given if here[k] is not defaults[k] and here[k] != defaults[k]]
            if twice:
                raise TypeError(f"step got {twice} both by position and by keyword")
            here.update(given)
            return self.step(model_output, timestep, sample, **here)
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if s_churn and (self.config.method != "euler" or self.config.family != "flow"):  # (FlowMatch Euler
            # ignores it in diffusers too)
            raise ValueError(f"s_churn={s_churn!r}: Euler / Heun churn (Karras et al.'s stochastic step) is not "
                             f"implemented; use method='ddim' with eta, or sde_sigma on a flow")
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps (a timestep per token) is not implemented by FlowSDEScheduler")
        if generator is not None and variance_noise is not None:
            raise ValueError("pass either generator or variance_noise to step, not both (as DDIMScheduler)")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, sample {tuple(sample.shape)}")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= self._calls:
            raise IndexError(f"step called {k + 1} times for {self._calls} model evaluations")
        key = (sample.device, sample.numel())
        ops = self._ops.get(key)
        if ops is None:
            ops = self._ops[key] = kernels.ops(self.config.backend, sample.device, sample.numel())
        x0 = None
        if self.config.method == "euler_maruyama":
            out = self._flow_step(ops, k, model_output, sample, generator)
        elif self.config.method == "dpmpp_2m":
            out = self._dpm_step(ops, k, model_output, sample.float() if sample.dtype in (torch.float16,
                                                                                        torch.bfloat16) else sample)
        elif self.config.method != "ddim" or self.config.family == "flow":  # (DDIM on CondOT is Euler)
            out, x0 = self._sigma_step(ops, k, model_output, sample)
        else:  # pipelines pass eta=0.0 by default: a nonzero config eta is not overridden by that
            eta = eta if eta else self.config.eta
            out, x0 = self._ddim_step(ops, k, model_output, sample, eta, generator, variance_noise,
                                      bool(use_clipped_model_output))
        if (self.config.method in ("euler", "dpmpp_2m") or self.config.family == "flow") and \
                out.dtype != model_output.dtype:
            # EulerDiscrete and the FlowMatch schedulers return the model output's dtype (DDIM and the
            # diffusion Heun promote)
            out = out.to(model_output.dtype)
        self._step_index += 1
        if self.config.family == "flow" or self.config.method == "dpmpp_2m":  # the FlowMatch schedulers and
            # DPMSolverMultistepScheduler return the new sample alone
            return SchedulerOutput(prev_sample=out) if return_dict else (out,)
        # DDIM / Euler / Heun also return their data estimate (previews, LCM-style pipelines read it) unless
        # return_pred_original_sample=False saves its pass
        if not self.config.return_pred_original_sample:
            x0 = None
        if return_dict:
            return StepOutput(prev_sample=out, pred_original_sample=x0)
        return (out,) if x0 is None else (out, x0)

    def _ddim_step(self, ops, k, out, x, eta, generator, variance_noise, use_clipped=False):
        cfg = self.config
        a2, a2p = self._coefs[k]
        a, b, ap = a2 ** 0.5, (1 - a2) ** 0.5, a2p ** 0.5
        # z_hat = p1 x + p2 out, eps_hat = q1 x + q2 out for the prediction type
        if cfg.prediction_type == "epsilon":
            p1, p2, q1, q2 = 1 / a, -b / a, 0.0, 1.0
        elif cfg.prediction_type == "sample":
            p1, p2, q1, q2 = 0.0, 1.0, 1 / b, -a / b
        else:  # v = a eps - b z
            p1, p2, q1, q2 = a, -b, b, a
        var = (1 - a2p) / (1 - a2) * (1 - a2 / a2p) if eta else 0.0
        std = eta * max(var, 0.0) ** 0.5
        c = max(1 - a2p - std * std, 0.0) ** 0.5
        # the data estimate z (returned as pred_original_sample) is one pass; the update reads it with
        # clip_sample (z clamped; the noise estimate the unclamped one, or with use_clipped_model_output the
        # one recomputed from the clamped estimate, (x - a z) / b), else x and out directly
        z = None
        if cfg.clip_sample or cfg.return_pred_original_sample:  # ('sample': the model output itself, as DDIM's)
            z = out if cfg.prediction_type == "sample" else ops.combine([(p1, x), (p2, out)])
        if cfg.clip_sample:
            z = z.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
            terms = [(ap - c * a / b, z), (c / b, x)] if use_clipped else [(ap, z), (c * q1, x), (c * q2, out)]
        else:
            terms = [(ap * p1 + c * q1, x), (ap * p2 + c * q2, out)]
        if eta > 0:  # drawn in the model output's dtype, as DDIMScheduler draws it (same generator, same numbers),
            # even on a step of zero variance, where it adds nothing: the generator advances as there
            noise = variance_noise if variance_noise is not None else _randn(out, generator)
            if std > 0:
                return ops.combine(terms, [(std, None)], noise), z
        return ops.combine(terms), z

    def _derivative(self, sigma: float):
        """``(cx, co)`` with ``dx/dsigma = cx x + co out`` at ``sigma``: the flow prediction itself, or a
        diffusion model's output in variance-exploding coordinates."""
        if self.config.family == "flow":
            return 0.0, 1.0
        pt = self.config.prediction_type
        if pt == "epsilon":
            return 0.0, 1.0
        if pt == "sample":
            return 1.0 / sigma, -1.0 / sigma
        n = sigma * sigma + 1.0  # v-prediction: x0 = x / n - sigma out / sqrt(n)
        return sigma / n, 1.0 / n ** 0.5

    def _stage(self, ops, sigma: float, x, out):
        """``(cx, co, o, x0)`` with ``dx/dsigma = cx x + co o``: ``o`` the model output; ``x0 = x - sigma
        dx/dsigma`` the data estimate (diffusion models; one fused op; None on flows). For Heun with
        ``clip_sample`` (HeunDiscreteScheduler's option) ``x0`` is clamped and the derivative is then
        ``(x - clamp(x0)) / sigma`` as there."""
        cx, co = self._derivative(sigma)
        cfg = self.config
        clip = cfg.method == "heun" and cfg.clip_sample
        if cfg.family == "flow" or not (clip or cfg.return_pred_original_sample):
            return cx, co, out, None
        if cfg.prediction_type == "sample":  # the model output itself, as diffusers returns it
            x0 = out
        else:  # (EulerDiscreteScheduler computes it from a float32 sample: a half sample is widened first)
            xs = x.float() if cfg.method == "euler" and x.dtype in (torch.float16, torch.bfloat16) else x
            x0 = ops.combine([(1.0 - sigma * cx, xs), (-sigma * co, out)])
        if clip:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
            return 1.0 / sigma, -1.0 / sigma, x0, x0
        return cx, co, out, x0

    def _sigma_step(self, ops, k, out, x):
        """Euler, or Heun's two stages, in sigma: each a single fused update; and the stage's data estimate."""
        sg = self._host_sigmas
        if self.config.method == "euler" or self._first is None:
            s, s1 = sg[k], sg[k + 1]
            cx, co, out, est = self._stage(ops, s, x, out)
            dt = s1 - s
            x1 = ops.combine([(1.0 + dt * cx, x), (dt * co, out)])
            if self.config.method == "heun" and s1 != 0.0:
                self._first = (x, out, cx, co, dt)
            return x1, est
        x0, out0, cx0, co0, dt = self._first  # second stage at the first stage's end point
        cx1, co1, out, est = self._stage(ops, sg[k], x, out)
        self._first = None
        h = 0.5 * dt
        return ops.combine([(1.0 + h * cx0, x0), (h * co0, out0), (h * cx1, x), (h * co1, out)]), est

    def _flow_step(self, ops, k, out, x, generator):
        """Euler–Maruyama on the flow's SDE (the last step, to sigma = 0, is the ODE's Euler step).

        With ``t = 1 - sigma``, ``x = t z + (1 - t) eps`` and ``out = eps - z``: ``u = -out``,
        ``eps_hat = x + t out`` and ``score = -eps_hat / (1 - t)``, all affine in ``x`` and ``out``."""
        s, s1 = self._host_sigmas[k], self._host_sigmas[k + 1]
        if s1 == 0.0:
            return ops.combine([(1.0, x), (s1 - s, out)])
        t, h, g = 1.0 - s, s - s1, float(self.config.sde_sigma)
        half = 0.5 * g * g / s  # g^2/2 * score = -half * eps_hat
        noise = _randn(x, generator)
        return ops.combine([(1.0 - h * half, x), (-h - h * half * t, out)], [(g * h ** 0.5, None)], noise)

    def _step_sigmas(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """The schedule's sigma for each of ``timesteps``, shaped to broadcast against ``like``, found as
        diffusers' Euler / Heun / FlowMatch schedulers find it: by looking each timestep up in the schedule
        (the second match where it repeats, as Heun's do) unless a begin index is set, in which case the
        current (or first) step's."""
        if not self._host_sigmas:
            raise ValueError("call set_timesteps before add_noise / scale_noise")
        ts = torch.as_tensor(timesteps).reshape(-1).cpu()
        sched = self.timesteps.cpu()
        if self._begin_index is None:
            idx = []
            for t in ts.tolist():
                hits = (sched == t).nonzero().flatten().tolist()
                if not hits:
                    raise ValueError(f"timestep {t} is not one of the scheduler's timesteps")
                idx.append(hits[1] if len(hits) > 1 else hits[0])
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * ts.numel()
        sig = torch.tensor([self._host_sigmas[i] for i in idx], dtype=like.dtype, device=like.device)
        return sig.reshape((-1,) + (1,) * (like.dim() - 1))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """Noise ``original_samples`` to ``timesteps``, in the coordinates this scheduler's steps use, as the
        diffusers scheduler it replaces does: DDIM ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (``abar`` at
        the integer training timestep); Euler / Heun on a diffusion model ``x0 + sigma noise``
        (variance-exploding); a flow ``sigma noise + (1 - sigma) x0`` (as :meth:`scale_noise`)."""
        cfg = self.config
        if cfg.family == "flow":
            return self.scale_noise(original_samples, timesteps, noise)
        if cfg.method in ("ddim", "dpmpp_2m"):
            idx = torch.as_tensor(timesteps).to(device=self.alphas_cumprod.device, dtype=torch.long)
            ac = self.alphas_cumprod[idx].to(device=original_samples.device, dtype=original_samples.dtype)
            shape = (-1,) + (1,) * (original_samples.dim() - 1)
            return ac.sqrt().reshape(shape) * original_samples + (1 - ac).sqrt().reshape(shape) * noise
        return original_samples + self._step_sigmas(timesteps, original_samples) * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """``sigma noise + (1 - sigma) sample`` at ``timestep`` (flow family, img2img; looked up as in
        :meth:`_step_sigmas`)."""
        s = self._step_sigmas(timestep, sample)
        return s * noise + (1.0 - s) * sample

    def __len__(self):
        return self.config.num_train_timesteps


class AdaptivePipelineSampler:
    """A diffusers model and its scheduler config as an ODE for flowsde's adaptive driver.

    A scheduler owns a fixed timestep list; this instead integrates the model's probability-flow ODE with
    an embedded Runge–Kutta pair and error control (``flowsde.odeint``: ``dopri5``, ``bosh3``,
    ``heun_euler``), choosing its own steps::

        sampler = AdaptivePipelineSampler(pipe.unet, pipe.scheduler.config)
        images, stats = sampler(torch.randn(2, 3, 32, 32), rtol=1e-3, atol=1e-3, return_stats=True)

    * diffusion configs: in the variance-exploding coordinates of the training schedule, ``sigma =
      sqrt((1 - abar) / abar)``, integrated in ``log sigma`` from the largest training sigma to the smallest
      (``dx/d log sigma = x - D(x, sigma)``, ``D`` the data estimate from the model output of type
      ``prediction_type``), then one last denoising to sigma = 0, as Euler/Heun-type schedulers end. The
      model sees ``x / sqrt(sigma^2 + 1)`` and the fractional training timestep of ``sigma`` (sigma linear
      between the training steps, as diffusers' Euler and Heun schedulers interpolate), on the device;
    * flow configs: ``dx/dsigma`` = the model's flow prediction, from sigma = 1 to 0, timestep ``sigma *
      num_train_timesteps`` (the shift only reparametrises time, which an adaptive solver does not need).

    ``model(x, timestep, **model_kwargs)`` may return a tensor or an object with ``.sample`` (diffusers'
    ``UNet2DModel`` output). The result is the data sample (``(x, stats)`` with ``return_stats``).
    """

    def __init__(self, model, scheduler_config, model_kwargs: Optional[dict] = None):
        cfg = dict(scheduler_config)
        self.model, self.kwargs = model, dict(model_kwargs or {})
        self.flow = str(cfg.get("_class_name", "")).startswith("FlowMatch") or (
            "shift" in cfg and "beta_schedule" not in cfg)
        self.T = int(cfg.get("num_train_timesteps", 1000))
        self.prediction = cfg.get("prediction_type", "epsilon") or "epsilon"
        _check_supported(cfg, cfg.get("_class_name", "the scheduler") + " config")
        if cfg.get("use_flow_sigmas"):
            raise ValueError("use_flow_sigmas=True: pass a FlowMatch scheduler's config for a flow model")
        if not self.flow and self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction!r}")
        if not self.flow:
            ac = training_alphas_cumprod(self.T, cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02),
                                         cfg.get("beta_schedule", "linear"), cfg.get("trained_betas"))
            self.sigmas = ((1 - ac) / ac).double().sqrt()
            self.log_sigmas = self.sigmas.log()
        self.nfe = 0

    def _call(self, x, t):
        self.nfe += 1
        out = self.model(x, t, **self.kwargs)
        return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)

    def _timestep(self, log_sigma):
        """The fractional training timestep of ``sigma`` (a device tensor; no host read): the inverse of the
        sigma-linear interpolation between training steps that diffusers' Euler and Heun schedulers use."""
        sg = self.sigmas.to(log_sigma.device)
        sig = torch.exp(log_sigma).reshape(1)
        i = torch.searchsorted(sg, sig).clamp(1, sg.numel() - 1)
        lo, hi = sg[i - 1], sg[i]
        w = ((sig - lo) / (hi - lo)).clamp(0, 1)
        return (i - 1 + w).reshape(())

    def denoised(self, x, log_sigma):
        """``D(x, sigma)``: the model's data estimate in variance-exploding coordinates."""
        sig = torch.exp(log_sigma).to(x.dtype)
        n = sig * sig + 1
        t = self._timestep(log_sigma).to(x.dtype).expand(x.shape[0])
        out = self._call(x / n.sqrt(), t)
        if self.prediction == "epsilon":
            return x - sig * out
        if self.prediction == "sample":
            return out
        return x / n - sig * out / n.sqrt()

    def __call__(self, noise: torch.Tensor, rtol: float = 1e-3, atol: float = 1e-3, method: str = "dopri5",
                 return_stats: bool = False):
        from ..solvers import odeint

        self.nfe = 0
        dev = noise.device
        with torch.no_grad():
            if self.flow:
                def field(s, x):
                    return self._call(x, (s * self.T).to(x.dtype).expand(x.shape[0]))
                span = torch.tensor([1.0, 0.0], dtype=torch.float64, device=dev)
                ys, st = odeint(field, noise, span, method=method, rtol=rtol, atol=atol,
                                options=dict(return_stats=True, clip_end=True))
                x = ys[-1]
            else:
                lo, hi = float(self.log_sigmas[0]), float(self.log_sigmas[-1])
                x0 = noise * (math.exp(2 * hi) + 1) ** 0.5

                def field(s, x):
                    return x - self.denoised(x, s.to(torch.float64))
                span = torch.tensor([hi, lo], dtype=torch.float64, device=dev)
                ys, st = odeint(field, x0, span, method=method, rtol=rtol, atol=atol,
                                options=dict(return_stats=True, clip_end=True))
                x = self.denoised(ys[-1], span[-1])
        if st["status"] != "success":
            raise RuntimeError(f"adaptive sampling stopped with status {st['status']}")
        stats = {"nfe": self.nfe, "steps": st["steps"], "accepted": st["accepted"], "rejected": st["rejected"]}
        return (x, stats) if return_stats else x


__all__ = ["FlowSDEScheduler", "StepOutput", "AdaptivePipelineSampler", "training_alphas_cumprod", "METHODS", "FAMILIES"]
