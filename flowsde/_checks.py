"""Input validation shared by the public entry points. Every check runs once, before any step loop."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

_FLOAT_RANK = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def check_state(name: str, y0) -> torch.Tensor:
    """``y0`` must be a real floating tensor with at least one dimension."""
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y0).__name__}")
    if y0.dtype not in _FLOAT_RANK:
        raise TypeError(f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
                        f"got {y0.dtype}")
    return y0


def check_times(name: str, t, y0: torch.Tensor, *, increasing_only: bool = False, at_least_two: bool = True) -> torch.Tensor:
    """Validate a time grid against the state ``y0`` and return it as a tensor.

    ``t`` must be 1-D with at least one (two when ``at_least_two``) finite, strictly monotone points, on ``y0``'s device or the CPU
    (host times are read without a device round trip: the way to call a solver inside a captured CUDA
    graph), with a
    floating dtype at least as precise as ``y0``'s (float64 times with a float32 state are fine; float32
    times with a float64 state would silently lose precision, so they are refused).
    """
    if isinstance(t, (list, tuple)):
        if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in t):
            raise TypeError(f"{name} must be a 1-D tensor or a list of floats")
        t = torch.tensor(t, dtype=y0.dtype)  # on the host: read there without a device round trip
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of times, got {type(t).__name__}")
    if t.dtype not in _FLOAT_RANK:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.numel() < (2 if at_least_two else 1):
        raise ValueError(f"{name} must hold at least {'two time points (start and end)' if at_least_two else 'one time point'}"
                         f", got {t.numel()}")
    if t.requires_grad and torch.is_grad_enabled():  # the grid is read on the host: no gradient would flow
        raise ValueError(f"gradients with respect to {name} are not supported (the time grid is read on the "
                         f"host); pass {name}.detach()" + ("; flowsde.odeint_adjoint gives gradients with respect "
                                                            "to t" if name == "t" else ""))
    if t.device != y0.device and t.device.type != "cpu":  # host times are fine for any state (never a sync)
        raise ValueError(f"{name} is on {t.device} but y0 is on {y0.device}: put both on the same device, "
                         f"or pass the times on the CPU")
    if _FLOAT_RANK[t.dtype] < _FLOAT_RANK[y0.dtype]:
        raise TypeError(f"{name} has dtype {t.dtype}, less precise than y0's {y0.dtype}: "
                        f"pass {name}.to({y0.dtype}) (times may be more precise than the state, not less)")
    return t


def host_times(name: str, t: torch.Tensor, *, increasing_only: bool = False) -> np.ndarray:
    """Copy a validated time tensor to the host as float64 (once, before the loop) and check monotonicity."""
    th = t.detach().to("cpu", torch.float64).numpy().copy()
    if not np.all(np.isfinite(th)):
        raise ValueError(f"{name} contains a non-finite time: {th.tolist()}")
    d = np.diff(th)
    if increasing_only:
        if not np.all(d > 0):
            raise ValueError(f"{name} must be strictly increasing, got {_preview(th)}")
    elif not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(f"{name} must be strictly increasing or strictly decreasing, got {_preview(th)}")
    return th


def check_step(name: str, dt) -> float:
    """A step size must be a finite positive number (its sign follows the direction of the time grid)."""
    if isinstance(dt, torch.Tensor):
        if dt.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(dt.shape)}")
        dt = float(dt.detach().cpu())
    if isinstance(dt, (bool, np.bool_)) or not isinstance(dt, numbers.Real):  # (NumPy numbers are Real)
        raise TypeError(f"{name} must be a positive float, got {type(dt).__name__}")
    dt = float(dt)
    if not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {dt}")
    return dt


def check_resolvable(rtol, atol, dtype, where: str) -> None:
    """Refuse tolerances far below what the state's dtype resolves (host numbers only: device tolerances
    are never read). Below them an adaptive step cannot change the state — ``y + h f`` rounds back to
    ``y``, the error estimate is rounding noise, steps alternate between "too small to move" and "too
    large to accept" and the time creeps on while the state stays put (a bfloat16 solve at torchdiffeq's
    defaults ended at y(1) = 1 for y' = -y, reported as a success). The bound is 1/16 of the dtype's
    epsilon (float16: 6.1e-5; bfloat16: 4.9e-4), for half types only: in float32 and float64 the embedded
    pairs' error estimate (``h sum e_i k_i``, not a difference of rounded states) still steers below it —
    float32 at rtol = atol = 1e-10 solves y' = -y to 2e-7, as torchdiffeq does."""
    if isinstance(rtol, torch.Tensor) or isinstance(atol, torch.Tensor) or dtype not in (torch.float16, torch.bfloat16):
        return
    floor = torch.finfo(dtype).eps / 16
    if rtol < floor and atol < floor:
        raise ValueError(f"{where}: rtol={rtol!r} and atol={atol!r} are below what a {dtype} state resolves "
                         f"(relative precision {torch.finfo(dtype).eps:.1e}): its steps could not change the state. "
                         f"Pass rtol or atol >= {floor:.1e}, or integrate in float32")


def check_seed(seed):
    """A seed is an int (NumPy integers too) or ``None``; a float or a bool is refused, not truncated."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return None if seed is None else int(seed)


def check_options(options: Optional[dict], allowed: Sequence[str], where: str) -> dict:
    """Copy ``options`` (never modify the caller's dict) and reject unknown keys, listing the known ones."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {where}; known options: {sorted(allowed)}")
    for key, value in options.items():  # switches are bools and counts ints, never coerced ("no" is truthy)
        if key in _FLAG_OPTIONS and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"option {key!r} must be True or False, got {value!r}")
        if key in _COUNT_OPTIONS and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))):
            raise TypeError(f"option {key!r} must be an int, got {value!r}")
    return dict(options)


_FLAG_OPTIONS = ("return_stats", "per_sample", "capturable", "clip_end", "grad_free", "perturb")
_COUNT_OPTIONS = ("max_num_steps", "check_every")


def check_output(name: str, out, like: torch.Tensor, expected_shape) -> torch.Tensor:
    """A user function's output must be a tensor of the expected shape, dtype and device.

    Runs on every call inside step loops, so the passing case is one comparison of metadata (never data).
    """
    try:
        if out.shape == expected_shape and out.dtype == like.dtype and out.device == like.device:
            return out
    except (AttributeError, TypeError):
        pass
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(expected_shape):
        raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {tuple(expected_shape)}")
    if out.dtype != like.dtype:
        raise TypeError(f"{name} returned dtype {out.dtype}, expected {like.dtype} (the state's dtype)")
    if out.device != like.device:
        raise ValueError(f"{name} returned a tensor on {out.device}, expected {like.device}")
    return out


def _preview(th: np.ndarray) -> str:
    vals = th.tolist()
    return str(vals) if len(vals) <= 8 else str(vals[:4])[:-1] + ", ..., " + str(vals[-2:])[1:]
