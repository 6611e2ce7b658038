"""FlowSDEScheduler inside diffusers: real pipelines with tiny random models (no downloads), step-by-step
parity with the schedulers it replaces, save/load, no host sync in step, and the flow SDE sampler's law."""
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowsde.integrations.diffusers import FlowSDEScheduler  # noqa: E402
from flowsde.paths import CondOT  # noqa: E402
from flowsde.problems import reference_mixture  # noqa: E402


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


DDIM_CONFIGS = [
    dict(),                                                                   # DDIMScheduler's defaults
    dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False),
    dict(prediction_type="sample", timestep_spacing="linspace"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
         steps_offset=1, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("cfg", range(len(DDIM_CONFIGS)))
def test_ddim_pipeline_images_match_ddim_scheduler(cfg, eta):
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(**DDIM_CONFIGS[cfg]))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=10, eta=eta, output_type="np")
    want = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    pipe.scheduler = FlowSDEScheduler.from_config(pipe.scheduler.config, method="ddim")
    got = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert abs(got - want).max() <= 1e-4


def _run(s, x, f, scale=True):
    for t in s.timesteps:
        x = s.step(f(s.scale_model_input(x, t) if scale else x, t), t, x).prev_sample
    return x


def _fake_model(x, t):
    return torch.tanh(0.5 * x + t / 1000.0)


@pytest.mark.parametrize("cls,method", [("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun"),
                                        ("FlowMatchEulerDiscreteScheduler", "euler"),
                                        ("FlowMatchHeunDiscreteScheduler", "heun")])
@pytest.mark.parametrize("cfg", [0, 1, 2])
def test_step_by_step_parity(cls, method, cfg):
    flow = cls.startswith("FlowMatch")
    kw = ([dict(), dict(shift=3.0), dict(shift=1.5, num_train_timesteps=500)] if flow else
          [dict(), dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
           dict(timestep_spacing="trailing", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)])[cfg]
    ref = getattr(diffusers, cls)(**kw)
    ours = FlowSDEScheduler.from_config(ref.config, method=method)
    for s in (ref, ours):
        s.set_timesteps(8)
    assert torch.allclose(ref.timesteps.double(), ours.timesteps.double(), atol=1e-3)
    assert ours.order == ref.order
    assert float(ours.init_noise_sigma) == pytest.approx(float(getattr(ref, "init_noise_sigma", 1.0)))
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(cfg)) * float(ours.init_noise_sigma)
    a, b = _run(ref, x0, _fake_model, not flow), _run(ours, x0, _fake_model, not flow)
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))


def test_flow_dynamic_shifting_and_custom_sigmas():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ours = FlowSDEScheduler.from_config(ref.config, method="euler")
    for s in (ref, ours):
        s.set_timesteps(6, mu=0.8)
    assert torch.allclose(ref.sigmas, ours.sigmas, atol=1e-6)
    x0 = torch.randn(2, 3, 4, 4)
    assert torch.allclose(_run(ref, x0, _fake_model, False), _run(ours, x0, _fake_model, False), atol=1e-5)
    with pytest.raises(ValueError, match="needs mu"):
        ours.set_timesteps(6)


def test_save_and_load_round_trip(tmp_path):
    s = FlowSDEScheduler.from_config(diffusers.DDIMScheduler(prediction_type="v_prediction").config,
                                     method="ddim", eta=0.3)
    s.save_pretrained(tmp_path)
    t = FlowSDEScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(t.config) == public(s.config) and t.config.eta == 0.3 and t.config.prediction_type == "v_prediction"
    for sch in (s, t):
        sch.set_timesteps(5)
    x0 = torch.randn(1, 3, 4, 4)
    gs = [torch.Generator().manual_seed(0) for _ in range(2)]
    outs = []
    for sch, g in zip((s, t), gs):
        x = x0
        for ts in sch.timesteps:
            x = sch.step(_fake_model(x, ts), ts, x, generator=g).prev_sample
        outs.append(x)
    assert torch.equal(*outs)


def test_step_reads_nothing_back_from_the_device(sync_counter):
    s = FlowSDEScheduler.from_config(diffusers.DDIMScheduler().config, method="ddim")
    s.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    with sync_counter() as counter:
        for t in s.timesteps:  # tensor timesteps, as pipelines pass them
            x = s.step(_fake_model(x, t), t, x, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    assert counter.calls == []


def test_flow_euler_maruyama_has_the_flows_marginals():
    """The SDE sampler (sde_sigma > 0) on the exact CondOT field of a Gaussian mixture ends with the mixture's
    mean and covariance (within Monte Carlo error), like the ODE."""
    mix, path = reference_mixture(), CondOT()
    s = FlowSDEScheduler(family="flow", method="euler_maruyama", sde_sigma=0.8)
    s.set_timesteps(200)
    x = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for ts in s.timesteps:
        t = torch.full((x.shape[0],), 1.0 - float(ts) / 1000.0, dtype=torch.float64)
        x = s.step(-mix.velocity(x, t, path), ts, x, generator=g).prev_sample
    n = x.shape[0]
    se = (torch.diagonal(mix.covariance()) / n).sqrt()
    assert bool(((x.mean(0) - mix.mean()).abs() < 5 * se).all()), (x.mean(0), mix.mean())
    assert torch.allclose(x.T.cov(), mix.covariance(), atol=0.08)


def test_bad_input():
    with pytest.raises(ValueError, match="method must be one of"):
        FlowSDEScheduler(method="lms")
    with pytest.raises(ValueError, match="for flow models"):
        FlowSDEScheduler(method="euler_maruyama")
    s = FlowSDEScheduler()
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 0, x)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(1, 4), 0, x)
    s.step(x, s.timesteps[0], x)
    s.step(x, s.timesteps[1], x)
    with pytest.raises(IndexError, match="step called 3 times"):
        s.step(x, 0, x)


def test_adaptive_pipeline_sampler_converges_to_the_fixed_step_answer():
    """A diffusers UNet under flowsde's adaptive driver lands on the answer diffusers' Heun scheduler
    converges to (many steps), closer as the tolerance shrinks."""
    from flowsde.integrations.diffusers import AdaptivePipelineSampler
    unet = tiny_unet()
    heun = diffusers.HeunDiscreteScheduler(prediction_type="v_prediction", beta_schedule="linear",
                                           beta_start=0.0001, beta_end=0.02)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        heun.set_timesteps(400)
        x = noise * heun.init_noise_sigma
        for t in heun.timesteps:
            x = heun.step(unet(heun.scale_model_input(x, t), t).sample, t, x).prev_sample
    sampler = AdaptivePipelineSampler(unet, heun.config)
    errs, nfes = [], []
    for rtol in (1e-3, 1e-6):
        y, st = sampler(noise, rtol=rtol, atol=rtol, return_stats=True)
        errs.append(float((y - x).abs().max()))
        nfes.append(st["nfe"])
    assert errs[1] < 0.1 * errs[0] and errs[1] < 1e-3 * float(x.abs().max()), errs
    assert nfes[1] > nfes[0]


def test_adaptive_pipeline_sampler_on_a_flow_model():
    """A flow-matching 'transformer' (the exact CondOT field of a mixture, as diffusers' flow prediction)
    under the adaptive driver equals flowsde.sample's converged solution."""
    import flowsde
    from flowsde.integrations.diffusers import AdaptivePipelineSampler
    mix, path = reference_mixture(), CondOT()

    def transformer(x, timestep):  # diffusers' convention: flow prediction eps - z at sigma = timestep / 1000
        t = 1.0 - timestep / 1000.0
        return -mix.velocity(x, t, path)

    cfg = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    noise = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = AdaptivePipelineSampler(transformer, cfg)(noise, rtol=1e-8, atol=1e-8)
    ref = flowsde.sample(lambda x, t: mix.velocity(x, t, path), noise, path=path, method="rk4", steps=1000)
    assert float((y - ref).abs().max()) < 1e-5


def test_custom_timesteps_on_diffusion_configs():
    ours = FlowSDEScheduler.from_config(diffusers.DDIMScheduler(clip_sample=False).config, method="ddim")
    ours.set_timesteps(timesteps=[900, 500, 100, 0])
    assert ours.timesteps.tolist() == [900, 500, 100, 0]
    ac = ours.alphas_cumprod.double()
    x, out = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    got = ours.step(out, 900, x).prev_sample
    a, ap = ac[900], ac[500]  # DDIM from 900 to the next custom timestep, 500
    z = (x - (1 - a).sqrt() * out) / a.sqrt()
    assert torch.allclose(got.double(), (ap.sqrt() * z + (1 - ap).sqrt() * out).double(), atol=1e-5)
    eul = FlowSDEScheduler.from_config(diffusers.EulerDiscreteScheduler().config, method="euler")
    eul.set_timesteps(timesteps=[999, 600, 0])
    assert eul.timesteps.tolist() == [999.0, 600.0, 0.0] and len(eul.sigmas) == 4
    with pytest.raises(ValueError, match="custom sigmas are for flow-matching"):
        ours.set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        ours.set_timesteps(timesteps=[0, 500])


def test_add_noise_and_scale_noise_match_the_replaced_schedulers():
    """img2img entry points, in each scheduler's own coordinates: DDIM (abar at the timestep), Euler / Heun on
    a diffusion model (x0 + sigma noise, sigma looked up from the timestep; float timesteps), FlowMatch
    (sigma noise + (1 - sigma) x0, from the timestep or from the begin index)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    for ref, method in ((diffusers.DDIMScheduler(), "ddim"), (diffusers.EulerDiscreteScheduler(), "euler"),
                        (diffusers.HeunDiscreteScheduler(), "heun"),
                        (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), "euler")):
        ours = FlowSDEScheduler.from_config(ref.config, method=method)
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        ts = ref.timesteps[[1, 4, 6]]
        assert torch.equal(ours.timesteps.float(), ref.timesteps.float())
        if isinstance(ref, diffusers.FlowMatchEulerDiscreteScheduler):
            want, got = ref.scale_noise(x0, ts, noise), ours.scale_noise(x0, ts, noise)
            assert torch.allclose(got, want, atol=1e-6)
            ref.set_begin_index(3)
            ours.set_begin_index(3)
            want, got = ref.scale_noise(x0, ts, noise), ours.scale_noise(x0, ts, noise)
        else:
            want, got = ref.add_noise(x0, noise, ts), ours.add_noise(x0, noise, ts)
        assert torch.allclose(got, want, atol=1e-5), (type(ref).__name__, float((got - want).abs().max()))


def test_flow_match_custom_timesteps_are_shifted_as_in_diffusers():
    import numpy as np
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = FlowSDEScheduler.from_config(ref.config, method="euler")
    ts = list(np.linspace(1000, 50, 8))
    ref.set_timesteps(timesteps=ts)
    ours.set_timesteps(timesteps=ts)
    assert torch.allclose(ours.timesteps.float(), ref.timesteps.float())
    assert torch.allclose(ours.sigmas.float(), ref.sigmas.float(), atol=1e-6)


@pytest.mark.parametrize("cls,key,value", [
    ("DDIMScheduler", "thresholding", True), ("DDIMScheduler", "rescale_betas_zero_snr", True),
    ("EulerDiscreteScheduler", "use_karras_sigmas", True), ("EulerDiscreteScheduler", "timestep_type", "continuous"),
    ("FlowMatchEulerDiscreteScheduler", "shift_terminal", 0.1), ("FlowMatchEulerDiscreteScheduler", "invert_sigmas", True),
])
def test_schedule_changing_options_it_does_not_implement_are_refused(cls, key, value):
    ref = getattr(diffusers, cls)(**{key: value})
    with pytest.raises(ValueError, match=key):
        FlowSDEScheduler.from_config(ref.config)


def test_ddim_step_options_the_pipelines_pass():
    """use_clipped_model_output (DDIM with clip_sample), a list of generators (one per row, as randn_tensor),
    and a config eta that the pipeline's default eta=0.0 does not switch off."""
    ref = diffusers.DDIMScheduler(clip_sample_range=0.5)
    mine = FlowSDEScheduler.from_config(ref.config)
    ref.set_timesteps(5)
    mine.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, o = torch.randn(2, 4, generator=g), 5 * torch.randn(2, 4, generator=g)
    for t in ref.timesteps[:3]:
        want = ref.step(o, t, x, use_clipped_model_output=True).prev_sample
        got = mine.step(o, t, x, use_clipped_model_output=True).prev_sample
        assert torch.allclose(got, want, atol=1e-5)
    for sched in (diffusers.DDIMScheduler(), FlowSDEScheduler()):
        sched.set_timesteps(5)
        gens = [torch.Generator().manual_seed(i) for i in (3, 4)]
        out = sched.step(o, sched.timesteps[0], x, eta=1.0, generator=gens).prev_sample
        if isinstance(sched, diffusers.DDIMScheduler):
            want = out
    assert torch.allclose(out, want, atol=1e-5)
    sched = FlowSDEScheduler(eta=1.0)
    sched.set_timesteps(5)
    a = sched.step(o, sched.timesteps[0], x, eta=0.0, generator=torch.Generator().manual_seed(1)).prev_sample
    sched.set_timesteps(5)
    b = sched.step(o, sched.timesteps[0], x, eta=0.0, generator=torch.Generator().manual_seed(2)).prev_sample
    assert not torch.allclose(a, b)  # the config's eta = 1 draws noise


def test_from_config_refuses_options_it_would_drop():
    cfg = diffusers.EulerDiscreteScheduler().config
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        FlowSDEScheduler.from_config(cfg, method="euler", use_karras_sigmas=True)
    with pytest.raises(TypeError, match="unknown FlowSDEScheduler option"):
        FlowSDEScheduler.from_config(cfg, methd="euler")
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        FlowSDEScheduler.from_config(diffusers.UniPCMultistepScheduler(use_flow_sigmas=True).config)


def test_flow_timesteps_given_with_sigmas_are_kept():
    sched = FlowSDEScheduler(family="flow", method="euler")
    sched.set_timesteps(sigmas=[1.0, 0.7, 0.4, 0.1], timesteps=[999.0, 700.0, 400.0, 100.0])
    assert sched.timesteps.tolist() == [999.0, 700.0, 400.0, 100.0]
    import numpy as np
    for s in (sched, FlowSDEScheduler()):  # a NumPy count is a count
        s.set_timesteps(np.int64(6))
        assert len(s.timesteps) == 6


def test_adaptive_pipeline_sampler_refuses_configs_it_would_misread():
    from flowsde.integrations.diffusers import AdaptivePipelineSampler
    unet = tiny_unet()
    for cfg, match in ((dict(prediction_type="v-prediction"), "prediction_type must be"),
                       (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True")):
        with pytest.raises(ValueError, match=match):
            AdaptivePipelineSampler(unet, diffusers.DDIMScheduler(**cfg).config)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_heun_with_clip_sample_matches_heun_discrete_scheduler(prediction_type):
    """HeunDiscreteScheduler's clip_sample clamps the data estimate of each stage (here with a range the
    outputs exceed, so the clamp acts)."""
    ref = diffusers.HeunDiscreteScheduler(prediction_type=prediction_type, clip_sample=True, clip_sample_range=0.5)
    ours = FlowSDEScheduler.from_config(ref.config, method="heun")
    for s in (ref, ours):
        s.set_timesteps(8)

    def model(x, t):
        return 3.0 * torch.tanh(0.5 * x + t / 1000.0)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)) * float(ours.init_noise_sigma)
    a, b = _run(ref, x0, model), _run(ours, x0, model)
    unclipped = diffusers.HeunDiscreteScheduler(prediction_type=prediction_type)
    unclipped.set_timesteps(8)
    c = _run(unclipped, x0, model)
    assert float((a - c).abs().max()) > 1e-2  # the clamp changes the result
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls,method,kw", [("DDIMScheduler", "ddim", dict(eta=1.0)),
                                           ("EulerDiscreteScheduler", "euler", {}),
                                           ("HeunDiscreteScheduler", "heun", {}),
                                           ("FlowMatchEulerDiscreteScheduler", "euler", {}),
                                           ("FlowMatchHeunDiscreteScheduler", "heun", {})])
def test_a_float32_sample_with_a_float16_model_output_keeps_the_replaced_schedulers_dtype(cls, method, kw, backend):
    """DDIM and the diffusion Heun promote (float32 out), Euler and the flow schedulers return the model
    output's dtype, as diffusers' schedulers do; the DDIM noise is drawn in the output's dtype, as DDIMScheduler draws it. (The DDIM step used to
    cast the sample to float16 first; the triton backend returned the first operand's dtype.)"""
    from flowsde import kernels
    if backend == "triton" and not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    ref = getattr(diffusers, cls)()
    ours = FlowSDEScheduler.from_config(ref.config, method=method, backend=backend)
    for s in (ref, ours):
        s.set_timesteps(6)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in (ref, ours):
        x, g = x0, torch.Generator().manual_seed(5)
        for t in s.timesteps:
            x32 = x.float()
            model_in = s.scale_model_input(x32, t) if hasattr(s, "scale_model_input") else x32
            extra = dict(kw, generator=g) if "generator" in inspect.signature(s.step).parameters else kw
            x = s.step(_fake_model(model_in, t).half(), t, x32, **extra).prev_sample
        outs.append(x)
    a, b = outs
    assert a.dtype == b.dtype
    assert float((a.double() - b.double()).abs().max()) <= 2e-3 * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("name,method", [("FlowMatchEulerDiscreteScheduler", "euler"),
                                         ("FlowMatchHeunDiscreteScheduler", "heun"), ("DDIMScheduler", "ddim"),
                                         ("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")])
def test_a_sliced_schedule_without_set_begin_index_starts_where_its_timestep_is(name, method, sync_counter):
    """img2img / video2video loops that slice the timesteps and never call set_begin_index (Wan v2v,
    Kandinsky img2img, ...): the first step is located from its timestep as diffusers does (it started at
    index 0: differences up to 334); an element of ``timesteps`` is located without a device read."""
    ref = getattr(diffusers, name)()
    ours = FlowSDEScheduler.from_config(ref.config, method=method)
    n, start = 10, 4
    for s in (ref, ours):
        s.set_timesteps(n)
    ts = ref.timesteps[start * ref.order:]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    outs = [torch.randn(2, 4, 8, 8, generator=g) for _ in ts]
    xr = xo = x
    with sync_counter() as counter:
        for t, to, o in zip(ts, ours.timesteps[start * ours.order:], outs):
            xo = ours.step(o, to, xo).prev_sample
    assert counter.calls == []
    for t, o in zip(ts, outs):
        xr = ref.step(o, t, xr).prev_sample
    assert float((xr - xo).abs().max()) <= 1e-4 * max(1.0, float(xr.abs().max()))
    again = FlowSDEScheduler.from_config(ref.config, method=method)
    again.set_timesteps(n)
    again.step(outs[0], float(ts[0]), x)  # a number (or another tensor) is looked up by value
    assert again.step_index == ours.step_index - len(ts) + 1
    bad = FlowSDEScheduler.from_config(ref.config, method=method)
    bad.set_timesteps(n)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        bad.step(outs[0], 12345.5, x)


def test_heun_from_a_config_without_clip_sample_does_not_clip_and_step_refuses_what_it_would_ignore():
    """HeunDiscreteScheduler's default is clip_sample=False: a config without the key (Euler's, DPM-Solver's)
    clamped every Heun stage's data estimate to [-1, 1]. Step keywords that change the update and are not
    implemented are refused (they were dropped), unknown ones are a TypeError."""
    cfg = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    ref, ours = diffusers.HeunDiscreteScheduler.from_config(cfg), FlowSDEScheduler.from_config(cfg, method="heun")
    assert ours.config.clip_sample is False and FlowSDEScheduler(method="ddim").config.clip_sample is True
    for s in (ref, ours):
        s.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    xr = xo = torch.randn(1, 4, 8, 8, generator=g) * ref.init_noise_sigma
    for t in ref.timesteps:
        o = torch.randn(1, 4, 8, 8, generator=g)
        xr, xo = ref.step(o, t, xr).prev_sample, ours.step(o, t, xo).prev_sample
    assert float(xo.abs().max()) > 2 and float((xr - xo).abs().max()) <= 1e-4 * float(xr.abs().max())
    s = FlowSDEScheduler.from_config(diffusers.EulerDiscreteScheduler().config, method="euler")
    s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="s_churn"):
        s.step(x, s.timesteps[0], x, s_churn=1.0)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        s.step(x, s.timesteps[0], x, per_token_timesteps=torch.ones(1))
    with pytest.raises(TypeError):
        s.step(x, s.timesteps[0], x, etta=1.0)
    s.step(x, s.timesteps[0], x, s_churn=0.0, s_noise=1.0)  # the defaults pipelines pass are taken


def test_flow_set_timesteps_refuses_lengths_that_disagree():
    s = FlowSDEScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler().config)
    for kw in (dict(num_inference_steps=10, sigmas=[1.0, 0.5, 0.2]), dict(sigmas=[1.0, 0.5], timesteps=[1000.0, 600.0, 200.0])):
        with pytest.raises(ValueError, match="lengths disagree"):
            s.set_timesteps(**kw)
    s.set_timesteps(num_inference_steps=3, sigmas=[1.0, 0.5, 0.2])
    assert s.num_inference_steps == 3


@pytest.mark.parametrize("cls,method,kw", [
    ("DDIMScheduler", "ddim", dict()),                                       # clip_sample on (its default)
    ("DDIMScheduler", "ddim", dict(prediction_type="v_prediction", clip_sample=False)),
    ("DDIMScheduler", "ddim", dict(prediction_type="sample", clip_sample=False)),
    ("EulerDiscreteScheduler", "euler", dict()),
    ("EulerDiscreteScheduler", "euler", dict(prediction_type="v_prediction")),
    ("HeunDiscreteScheduler", "heun", dict()),
    ("HeunDiscreteScheduler", "heun", dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5)),
    ("FlowMatchEulerDiscreteScheduler", "euler", dict())])
def test_step_output_carries_pred_original_sample_as_the_replaced_scheduler(cls, method, kw):
    """DDIM / Euler / Heun return (prev_sample, pred_original_sample), as an output or with return_dict=False
    a 2-tuple (a pipeline indexing [1] got an IndexError); the FlowMatch schedulers return the sample alone."""
    ref = getattr(diffusers, cls)(**kw)
    ours = FlowSDEScheduler.from_config(ref.config, method=method)
    for s in (ref, ours):
        s.set_timesteps(6)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * float(ours.init_noise_sigma)
    xr, xo = x.clone(), x.clone()
    scale = (lambda s, x, t: x) if cls.startswith("FlowMatch") else (lambda s, x, t: s.scale_model_input(x, t))
    for t in ref.timesteps:
        oa = 2.0 * torch.tanh(0.5 * scale(ref, xr, t) + t / 1000.0)
        ob = 2.0 * torch.tanh(0.5 * scale(ours, xo, t) + t / 1000.0)
        a = ref.step(oa, t, xr, return_dict=False)
        b = ours.step(ob, t, xo, return_dict=False)
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert u.shape == v.shape and float((u - v).abs().max()) <= 1e-4 * max(1.0, float(u.abs().max()))
        xr, xo = a[0], b[0]
    out = ours.step  # the output object has the same fields
    ours.set_timesteps(6)
    t = ours.timesteps[0]
    res = out(torch.tanh(x), t, x)
    assert torch.equal(res.prev_sample, res[0])
    if cls.startswith("FlowMatch"):
        assert list(res.keys()) == ["prev_sample"]
    else:
        assert torch.equal(res.pred_original_sample, res[1])


def test_fractional_custom_timesteps_are_interpolated_by_euler_and_heun_and_refused_by_ddim():
    for cls, method in (("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")):
        ref = getattr(diffusers, cls)()
        ours = FlowSDEScheduler.from_config(ref.config, method=method)
        ts = [998.5, 700.25, 300.75, 10.5]
        for s in (ref, ours):
            s.set_timesteps(timesteps=ts)
        assert torch.equal(ours.timesteps.float(), ref.timesteps.float())
        assert torch.allclose(ours.sigmas.double(), ref.sigmas.double(), rtol=1e-6)
        x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(6)) * float(ref.init_noise_sigma)
        a, b = _run(ref, x0, _fake_model), _run(ours, x0, _fake_model)
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))
    ddim = FlowSDEScheduler.from_config(diffusers.DDIMScheduler().config, method="ddim")
    with pytest.raises(ValueError, match="must be integers"):
        ddim.set_timesteps(timesteps=[900.5, 100])
    with pytest.raises(ValueError, match=r"in \[0, 999\]"):
        ddim.set_timesteps(timesteps=[999.5, 100])


@pytest.mark.parametrize("cls,method,kw", [("DDIMScheduler", "ddim", dict(clip_sample=False)),
                                           ("DDIMScheduler", "ddim", dict()),
                                           ("EulerDiscreteScheduler", "euler", dict()),
                                           ("HeunDiscreteScheduler", "heun", dict(clip_sample=True))])
def test_return_pred_original_sample_false_gives_the_same_samples_without_the_estimate(cls, method, kw):
    cfg = getattr(diffusers, cls)(**kw).config
    full = FlowSDEScheduler.from_config(cfg, method=method)
    lean = FlowSDEScheduler.from_config(cfg, method=method, return_pred_original_sample=False)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)) * float(full.init_noise_sigma)
    for s in (full, lean):
        s.set_timesteps(5)
    xa, xb = x, x
    for t in full.timesteps:
        a = full.step(_fake_model(full.scale_model_input(xa, t), t), t, xa)
        b = lean.step(_fake_model(lean.scale_model_input(xb, t), t), t, xb, return_dict=False)
        assert len(b) == 1 and a.pred_original_sample is not None
        assert torch.equal(a.prev_sample, b[0])
        xa, xb = a.prev_sample, b[0]


def test_pred_original_sample_dtypes_are_the_replaced_schedulers():
    """Euler widens a half sample to float32 for its data estimate; 'sample' prediction returns the model output
    itself (its dtype); both as diffusers'."""
    ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = FlowSDEScheduler.from_config(ref.config, method="euler")
    for s in (ref, ours):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(8)
    x, o = (torch.randn(1, 4, 8, 8, generator=g) * 14.6).half(), torch.randn(1, 4, 8, 8, generator=g).half()
    a, b = ref.step(o, ref.timesteps[0], x), ours.step(o, ours.timesteps[0], x)
    assert b.pred_original_sample.dtype == a.pred_original_sample.dtype == torch.float32
    # diffusers multiplies sigma (a 0-dim float32 tensor) by the half output in half precision; flowsde does not
    exact = x.double() - float(ref.sigmas[0]) * o.double()
    err_ref = float((a.pred_original_sample.double() - exact).abs().max())
    err_ours = float((b.pred_original_sample.double() - exact).abs().max())
    assert err_ours < 1e-4 < err_ref < 0.05
    assert b.prev_sample.dtype == a.prev_sample.dtype == torch.float16
    for cls, method in (("DDIMScheduler", "ddim"), ("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")):
        ref = getattr(diffusers, cls)(prediction_type="sample", **({} if method == "euler" else dict(clip_sample=False)))
        ours = FlowSDEScheduler.from_config(ref.config, method=method)
        for s in (ref, ours):
            s.set_timesteps(10)
        x, o = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g).half()
        a = ref.step(o, ref.timesteps[0], x, return_dict=False)
        b = ours.step(o, ours.timesteps[0], x, return_dict=False)
        assert b[1].dtype == a[1].dtype == torch.float16 and torch.equal(a[1], b[1])


def test_fractional_timesteps_given_as_python_floats_find_their_step():
    ts = [998.7, 500.3, 1.2]
    for cls, method in (("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")):
        ref = getattr(diffusers, cls)()
        ours = FlowSDEScheduler.from_config(ref.config, method=method)
        for s in (ref, ours):
            s.set_timesteps(timesteps=ts)
        x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(9))
        for s in (ref, ours):
            s.scale_model_input(x, ts[0])
        assert ours.step_index == ref.step_index == 0
        a = ref.step(torch.tanh(x), torch.tensor(ts[0], dtype=torch.float64), x).prev_sample
        b = ours.step(torch.tanh(x), torch.tensor(ts[0], dtype=torch.float64), x).prev_sample
        assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta_advances_the_generator_as_ddim_scheduler_and_refuses_two_noise_sources():
    """A step of zero variance (the last one, with set_alpha_to_one) draws its noise all the same in diffusers:
    the generator's state after a run must agree, or reusing it gives other images from the second run on."""
    ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = FlowSDEScheduler.from_config(ref.config, method="ddim")
    states = []
    for s in (ref, ours):
        s.set_timesteps(5)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        for t in s.timesteps:
            x = s.step(torch.tanh(x), t, x, eta=1.0, generator=gen).prev_sample
        states.append((x, torch.randn(1, generator=gen)))
    assert torch.allclose(states[0][0], states[1][0], atol=1e-4) and torch.equal(states[0][1], states[1][1])
    ours.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        ours.step(x, ours.timesteps[0], x, eta=1.0, generator=torch.Generator(), variance_noise=x)


def test_spacing_and_clipping_defaults_are_the_reproduced_schedulers():
    """A config that took its scheduler's default spacing / clipping (an SD-1.x PNDM config, a bare DDIM one)
    gets Euler's / Heun's defaults under method='euler' / 'heun', as EulerDiscreteScheduler.from_config gives
    (leading spacing had started Euler at timestep 801, not 999); the model's schedule is carried over."""
    pndm = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   skip_prk_steps=True, steps_offset=1)
    cfg = dict(pndm.config)
    cfg["_use_default_values"] = ["timestep_spacing", "clip_sample", "prediction_type"]
    for cls, method in (("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")):
        ref = getattr(diffusers, cls).from_config(cfg)
        ours = FlowSDEScheduler.from_config(cfg, method=method)
        assert ours.config.timestep_spacing == ref.config.timestep_spacing == "linspace"
        for s in (ref, ours):
            s.set_timesteps(10)
        assert torch.allclose(ours.timesteps.double(), ref.timesteps.double(), atol=1e-3)
        assert float(ours.timesteps[0]) == 999.0 and ours.config.beta_start == 0.00085
    heun = FlowSDEScheduler.from_config(diffusers.DDIMScheduler().config, method="heun")
    assert heun.config.clip_sample is False  # (as HeunDiscreteScheduler.from_config of that config)
    assert diffusers.HeunDiscreteScheduler.from_config(diffusers.DDIMScheduler().config).config.clip_sample is False
    ddim = FlowSDEScheduler.from_config(cfg, method="ddim")
    assert ddim.config.timestep_spacing == "leading" and ddim.config.clip_sample is True
    ddim.set_timesteps(4, device="meta")  # the host tables are built before the move: no read-back
    assert ddim.timesteps.device.type == "meta"


@pytest.mark.parametrize("cls,method,kw", [
    ("DDIMScheduler", "ddim", {}), ("EulerDiscreteScheduler", "euler", {}),
    ("EulerDiscreteScheduler", "euler", dict(timestep_spacing="leading", beta_schedule="scaled_linear")),
    ("HeunDiscreteScheduler", "heun", {}), ("FlowMatchEulerDiscreteScheduler", "euler", dict(shift=3.0)),
    ("FlowMatchEulerDiscreteScheduler", "euler", dict(use_dynamic_shifting=True)),
    ("FlowMatchHeunDiscreteScheduler", "heun", {}), ("DPMSolverMultistepScheduler", "dpmpp_2m", {})])
def test_before_set_timesteps_the_schedule_is_the_replaced_schedulers(cls, method, kw):
    """Training scripts noise with add_noise / scale_noise and read sigmas and timesteps without set_timesteps:
    the schedule a fresh scheduler holds is the replaced one's, tensor for tensor (dtype included), and so is
    the noised sample."""
    ref = getattr(diffusers, cls)(**kw)
    ours = FlowSDEScheduler.from_config(ref.config, method=method)
    for attr in ("timesteps", "sigmas"):
        want, got = getattr(ref, attr, None), getattr(ours, attr)
        if want is None:  # (DDIM keeps no sigmas)
            continue
        assert got.dtype == want.dtype and torch.equal(got, want), attr
    assert ours.num_inference_steps == getattr(ref, "num_inference_steps", None)
    if hasattr(ref, "init_noise_sigma"):
        assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    if cls.startswith("FlowMatch"):
        t = ref.timesteps[7:8]
        want, got = ref.scale_noise(x, t, noise), ours.scale_noise(x, t, noise)
    else:
        t = ref.timesteps[torch.tensor([3, 500])].to(torch.int64 if method == "ddim" else ref.timesteps.dtype)
        want, got = ref.add_noise(x, noise, t), ours.add_noise(x, noise, t)
        if method == "dpmpp_2m":  # diffusers' DPMSolverMultistepScheduler pairs its descending timesteps with
            # its ascending sigmas here (timestep 996 noised as timestep 3): flowsde noises at the timestep asked
            ac = ref.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
            want = ac.sqrt() * x + (1 - ac).sqrt() * noise
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    if not (method == "heun" and not cls.startswith("FlowMatch")):  # (Heun's own init runs set_timesteps(T))
        with pytest.raises(ValueError, match="call set_timesteps before step"):
            ours.step(x, t[0], x)


def test_step_options_by_position_follow_the_replaced_schedulers_order():
    """step(model_output, timestep, sample, *options) reads the options in the order of the scheduler the method
    reproduces (DDIM: eta, use_clipped_model_output, generator, ...; Heun: return_dict; Euler: s_churn, ...,
    generator, return_dict), as a pipeline calling that scheduler positionally expects; eta and generator stay in
    the signature (pipelines inspect it); too many, or one given twice, is a TypeError."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    o = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    params = inspect.signature(FlowSDEScheduler.step).parameters
    assert "eta" in params and "generator" in params
    ref, ours = diffusers.DDIMScheduler(), FlowSDEScheduler.from_config(diffusers.DDIMScheduler().config)
    for s in (ref, ours):
        s.set_timesteps(10)
    t = ref.timesteps[2]
    want = ref.step(o, t, x, 1.0, False, torch.Generator().manual_seed(3)).prev_sample
    got = ours.step(o, t, x, 1.0, False, torch.Generator().manual_seed(3)).prev_sample
    assert torch.allclose(got, want, atol=1e-5)
    for name, method in (("HeunDiscreteScheduler", "heun"), ("EulerDiscreteScheduler", "euler"),
                         ("FlowMatchEulerDiscreteScheduler", "euler")):
        ref = getattr(diffusers, name)()
        ours = FlowSDEScheduler.from_config(ref.config, method=method)
        for s in (ref, ours):
            s.set_timesteps(10)
        t = ref.timesteps[0]
        tail = (False,) if method == "heun" else (0.0, 0.0, float("inf"), 1.0, None) + (
            (None, False) if name.startswith("FlowMatch") else (False,))  # (FlowMatch Euler: per_token_timesteps)
        a, b = ref.step(o, t, x, *tail), ours.step(o, t, x, *tail)
        assert isinstance(b, tuple) and isinstance(a, tuple) and torch.allclose(a[0], b[0], atol=1e-5), name
    with pytest.raises(TypeError, match="by position after sample"):
        ours.step(o, t, x, 0.0, 0.0, float("inf"), 1.0, None, None, False, 1)
    with pytest.raises(TypeError, match="both by position and by keyword"):
        ours.step(o, t, x, 0.0, 0.0, float("inf"), 1.0, None, None, False, return_dict=False)


@pytest.mark.parametrize("cfg", [dict(), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
                                 dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      timestep_spacing="leading", steps_offset=1),
                                 dict(solver_order=1), dict(prediction_type="sample")])
def test_dpmpp_2m_reproduces_dpm_solver_multistep_step_by_step(cfg):
    """method='dpmpp_2m' is DPMSolverMultistepScheduler (DPM-Solver++(2M), its defaults: midpoint form, final
    sigma 0): the same timesteps and sigmas, and every step's sample to 1e-5 (float32 arithmetic there) over 10
    and 20 steps, returned alone as there; its own options of another value are refused by name."""
    for n in (10, 20):
        ref = diffusers.DPMSolverMultistepScheduler(**cfg)
        ours = FlowSDEScheduler.from_config(ref.config, method="dpmpp_2m")
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
        xr = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        xo = xr.clone()
        for t in ref.timesteps:
            xr = ref.step(_fake_model(xr, t), t, xr).prev_sample
            out = ours.step(_fake_model(xo, t), t, xo)
            assert out.keys() == {"prev_sample"}
            xo = out.prev_sample
            assert float((xr - xo).abs().max()) <= 1e-5 * float(xr.abs().max())
    base = diffusers.DPMSolverMultistepScheduler().config
    for key, bad in (("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun"), ("lambda_min_clipped", -5.1)):
        with pytest.raises(ValueError, match=f"with {key}="):
            FlowSDEScheduler.from_config({**base, key: bad}, method="dpmpp_2m")
    FlowSDEScheduler.from_config({**base, "algorithm_type": "sde-dpmsolver++"}, method="ddim")  # (other methods:
    # DPM-Solver's own options do not apply)
    with pytest.raises(ValueError, match="with algorithm_type="):  # (as a keyword too; the supported value passes)
        FlowSDEScheduler.from_config(base, method="dpmpp_2m", algorithm_type="dpmsolver")
    FlowSDEScheduler.from_config(base, method="dpmpp_2m", algorithm_type="dpmsolver++")
    every = FlowSDEScheduler.from_config(base, method="dpmpp_2m")  # every training step: two timesteps round
    every.set_timesteps(1000)  # onto one sigma — a first-order step there, not diffusers' division by zero (NaN)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in every.timesteps[:503]:  # (the repeat: steps 499 and 500)
        x = every.step(_fake_model(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="solver_order 1 or 2 and no clip_sample"):
        FlowSDEScheduler.from_config(base, method="dpmpp_2m", solver_order=3)
    with pytest.raises(ValueError, match="solver_order 1 or 2 and no clip_sample"):
        FlowSDEScheduler.from_config(diffusers.DDIMScheduler().config, method="dpmpp_2m", clip_sample=True)
