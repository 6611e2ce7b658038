"""One scheduler step, FlowSDEScheduler against the diffusers scheduler it replaces (same config, same
inputs), as a ratio of median times:

    python benchmarks/scheduler_step.py [--device cuda] [--shape 2 4 64 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusers  # noqa: E402

from flowsde.integrations.diffusers import FlowSDEScheduler  # noqa: E402

CASES = [("DDIMScheduler", dict(), "ddim", 0.0), ("DDIMScheduler", dict(), "ddim", 1.0),
         ("DDIMScheduler", dict(clip_sample=False, prediction_type="v_prediction"), "ddim", 0.0),
         ("EulerDiscreteScheduler", dict(), "euler", 0.0), ("HeunDiscreteScheduler", dict(), "heun", 0.0),
         ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), "euler", 0.0),
         ("DPMSolverMultistepScheduler", dict(), "dpmpp_2m", 0.0)]


def per_step(sched, x, out, eta, reps, device):
    sched.set_timesteps(reps)
    kw = dict(eta=eta, generator=torch.Generator(device=device).manual_seed(0)) if eta else {}
    times = []
    for t in sched.timesteps:
        if hasattr(sched, "scale_model_input"):  # as a pipeline does before each step (not timed)
            sched.scale_model_input(x, t)
        if device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        sched.step(out, t, x, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs="+", default=[2, 4, 64, 64])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median of their medians")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x = torch.randn(*args.shape, device=args.device)
    out = torch.randn(*args.shape, device=args.device)
    print(f"one step, sample {tuple(args.shape)} float32 on {args.device}, median of {args.reps} steps (median of {args.rounds} rounds), "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| scheduler | config | eta | diffusers µs | flowsde µs | diffusers / flowsde | flowsde lean µs | "
          "diffusers / lean |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, kw, method, eta in CASES:
        ref = getattr(diffusers, name)(**kw)
        ours = FlowSDEScheduler.from_config(ref.config, method=method)
        # lean: return_pred_original_sample=False skips the data estimate's pass (the FlowMatch schedulers
        # return none: the same update there)
        lean = FlowSDEScheduler.from_config(ref.config, method=method, return_pred_original_sample=False)
        rounds = [[per_step(s, x, out, eta, args.reps, args.device) for s in (ref, ours, lean)]
                  for _ in range(args.rounds)]  # interleaved rounds: a drifting machine hits all three
        t_ref, t_ours, t_lean = (sorted(col)[len(col) // 2] for col in zip(*rounds))
        print(f"| {name} | {kw or 'defaults'} | {eta:g} | {1e6 * t_ref:.0f} | {1e6 * t_ours:.0f} | "
              f"{t_ref / t_ours:.2f}× | {1e6 * t_lean:.0f} | {t_ref / t_lean:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
