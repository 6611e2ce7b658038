"""Whole-trajectory Euler–Maruyama for linear SDEs ``dX = (a(t) X + b(t)) dt + (c(t) X + d(t)) dW``
(diagonal noise): OU, Brownian motion and GBM are all of this form. On the triton backend every step runs
in one kernel launch with the state in registers, so Monte Carlo studies with millions of paths cost one
pass per saved time; the torch backend runs the PyTorch specification (the same Philox noise)."""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

from .. import _checks, kernels
from ..brownian import default_seed, step_keys
from ..kernels.philox import KEY_MASK
from . import fixed

Coefficient = Union[float, Callable[[float], float]]


def solve_linear_sde(x0: torch.Tensor, ts, dt: float, a: Coefficient = 0.0, b: Coefficient = 0.0,
                     c: Coefficient = 0.0, d: Coefficient = 1.0, seed=None, backend=None) -> torch.Tensor:
    """Euler–Maruyama for ``dX = (a X + b) dt + (c X + d) dW`` from ``x0`` at ``ts[0]``; the state at every
    time of ``ts`` (shape ``(len(ts), *x0.shape)``).

    The grid steps by at most ``dt`` and contains every time of ``ts`` (each interval is split into equal
    steps). ``a``..``d`` are numbers or functions of a float time. The noise of step ``k`` at element ``i``
    is the Philox stream of ``key_k`` at ``i`` (:func:`flowsde.kernels.philox.philox_randn_at`), ``key_k``
    from ``(seed, k)``: the same stream as ``sdeint`` on the
    triton backend, so both give the same paths for the same seed and grid.
    """
    x0 = _checks.check_state("x0", x0)
    ts = _checks.check_times("ts", ts, x0)
    th = _checks.host_times("ts", ts, increasing_only=True)
    h = _checks.check_step("dt", dt)
    ops = kernels.ops(backend, x0.device)
    pieces, slots = [th[:1]], []
    for j in range(len(th) - 1):
        seg = fixed.uniform_grid(th[j], th[j + 1], h, ts.dtype)[1:]
        pieces.append(seg)
        slots += [-1] * (len(seg) - 1) + [j]
    grid = np.concatenate(pieces)
    t0s, hs = grid[:-1], np.diff(grid)
    for name, f in (("a", a), ("b", b), ("c", c), ("d", d)):
        if isinstance(f, torch.Tensor) and f.requires_grad:  # read as a number: a gradient would be lost silently
            raise ValueError(f"coefficient {name} requires grad: the whole-trajectory kernel takes numbers (or "
                             f"callables of t), no gradient flows to them; pass {name}.item() or use sdeint")
    ev = lambda f: np.array([f(float(t)) for t in t0s]) if callable(f) else np.full(len(t0s), float(f))  # noqa
    coef = np.stack([ev(a), ev(b), ev(c), ev(d), hs], axis=1)
    seed = _checks.check_seed(seed)
    seed = default_seed() if seed is None else seed
    keys = [k & KEY_MASK for k in step_keys(seed, len(hs))]
    dev = x0.device
    coef_t = torch.as_tensor(coef, dtype=torch.float64).to(dev)
    keys_t = torch.as_tensor(keys, dtype=torch.int64).to(dev)
    slots_t = torch.as_tensor(slots, dtype=torch.int64).to(dev)
    fused = ops.name == "triton" and not kernels.needs_autodiff(x0)  # the kernel has no backward
    fn = ops._c.linear_trajectory if fused else kernels.reference.linear_trajectory
    rest = fn(x0, coef_t, keys_t, slots_t, len(th) - 1)
    return torch.cat([x0.unsqueeze(0), rest], dim=0)
