"""The fixed-step driver: time grids, the step loop, save-at outputs and statistics.

The loop is pure host-side bookkeeping over a float64 time grid prepared before it starts: every time
value the user's function sees was moved to the device once, up front, so a step never reads a device
tensor back (no ``.item()``, no ``float(tensor)``): the loop is free of host-device synchronisation.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import kernels

# A step whose end lies within this fraction of a step of the final time is merged into the previous
# step instead of leaving a sliver step of size ~1e-16 (what a naive ceil((t1 - t0) / dt) produces
# when the division rounds up).
SLIVER = 1e-10


def sliver_tolerance(t0: float, t1: float, dt: float, time_dtype: Optional[torch.dtype] = None) -> float:
    """The fraction of a step below which a last step is a sliver: :data:`SLIVER`, or for times of a
    narrower dtype than float64 the rounding of the two ends in that dtype (one ulp each: float32 0.3 is
    0.30000001192, and ``0.3 / 0.1`` steps would otherwise end with a step of 1.2e-8), at most half a step."""
    if time_dtype is None or time_dtype == torch.float64 or not time_dtype.is_floating_point:
        return SLIVER
    fi = torch.finfo(time_dtype)

    def ulp(x):  # the spacing of time_dtype at x (each end is within half of it of the value meant)
        x = abs(x)
        return fi.eps * 2.0 ** math.floor(math.log2(x)) if x >= fi.tiny else fi.tiny
    return min(0.5, max(SLIVER, (ulp(t0) + ulp(t1)) / dt))


def uniform_grid(t0: float, t1: float, dt: float, time_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """The grid ``t0, t0 + dt, t0 + 2 dt, ...`` closed by ``t1`` (``dt > 0``; direction from t0 -> t1).

    The last step is at most ``dt`` long (up to the rounding of ``time_dtype``, the dtype the times came
    in); no step shorter than :func:`sliver_tolerance` of ``dt`` is produced.
    """
    span = abs(t1 - t0)
    n = max(1, math.ceil(span / dt - sliver_tolerance(t0, t1, dt, time_dtype)))
    sign = 1.0 if t1 > t0 else -1.0
    grid = t0 + sign * dt * np.arange(n + 1, dtype=np.float64)
    grid[-1] = t1
    return grid


def check_grid(grid: np.ndarray, t_out: np.ndarray, where: str) -> np.ndarray:
    """A custom grid must start and end at the output interval's ends and run the same way, strictly."""
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError(f"{where} must return a 1-D grid with at least two points, got shape {grid.shape}")
    if grid[0] != t_out[0] or grid[-1] != t_out[-1]:
        raise ValueError(f"{where} must return a grid starting at t[0]={t_out[0]} and ending at "
                         f"t[-1]={t_out[-1]}, got [{grid[0]}, ..., {grid[-1]}]")
    d = np.diff(grid) * np.sign(t_out[-1] - t_out[0])
    if not np.all(d > 0):
        raise ValueError(f"{where} must return a strictly monotone grid in the direction of t")
    return grid


class StageTimes:
    """Per step ``k``, the times ``t_k + c_i h_k`` as 0-dim tensors: ``times[k] -> (t_k0, t_k1, ...)``.

    The whole table moves to the device once, before the loop; a step only takes views of it. A stage at
    ``c == 1`` gets the grid point itself, not ``t_k + h_k``, so it is exact. ``perturb`` (torchdiffeq's
    option of that name, for fields with jumps at grid points): a stage at ``c == 0`` sees the next time
    after ``t_k`` in ``dtype`` (towards the step's end) and one at ``c == 1`` the one before ``t_{k+1}``, so
    each step sees the field's one-sided values of its own interval.
    """

    def __init__(self, grid: np.ndarray, c: Sequence[float], dtype: torch.dtype, device: torch.device,
                 perturb: bool = False):
        t0, h = grid[:-1], np.diff(grid)
        cols = [grid[1:] if ci == 1.0 else t0 + ci * h for ci in c]
        table = np.stack(cols, axis=1)
        host = torch.as_tensor(table, dtype=torch.float64)
        if perturb:  # one-sided times, in the dtype the field sees
            host = host.to(dtype)
            start = torch.as_tensor(t0, dtype=torch.float64).to(dtype)
            end = torch.as_tensor(grid[1:], dtype=torch.float64).to(dtype)
            for i, ci in enumerate(c):
                if ci in (0.0, 1.0):
                    host[:, i] = torch.nextafter(host[:, i], end if ci == 0.0 else start)
        if torch.device(device).type == "cuda":  # an asynchronous copy from pinned memory: no host sync
            host = host.pin_memory()
        self.table = host.to(device=device, non_blocking=True).to(dtype)
        views = self.table.reshape(-1).unbind(0)  # all views made here, none in the loop
        s = len(c)
        self._rows = [views[k * s:(k + 1) * s] for k in range(len(t0))]

    def __getitem__(self, k: int):
        return self._rows[k]

    def __len__(self):
        return len(self._rows)


class StatePool:
    """Preallocated states that a step loop writes its updates into (the ops' ``out=``), so that a step
    allocates no state of its own: :meth:`take` hands out a buffer that none of the tensors still in use
    shares memory with (a loop of one update per step alternates between two; a Runge–Kutta step takes one
    per stage input, reused once free). ``take`` returns ``None`` — the op then allocates its result, as
    without a pool — where the update is recorded by autograd, forward-mode AD or a ``torch.func``
    transform (``out=`` has no derivative), where the result would have another dtype than ``like``, or
    once ``limit`` buffers are all in use. Each buffer is ``empty_like(like)`` for a contiguous or
    ``channels_last`` state (its strides kept), contiguous for any other layout; made on first need; a loop makes its pool when it starts, so the state it returns is the caller's alone.
    Only host metadata is read (storage addresses, ``requires_grad``): no synchronisation.

    The states a loop hands to the user's function (``func``, ``sde.f`` / ``sde.g``, the model) then live
    in these buffers and are overwritten a step or two later: a function that keeps a reference to its
    input (a recorder of the states it is called at) must keep a copy — or set ``FLOWSDE_STATE_POOL=0``,
    which turns every pool off.

    States smaller than :attr:`MIN_BYTES` get no pool (``take`` always declines): there the pool's few
    µs of host bookkeeping per update are not small beside the update itself (on the CPU the pooled loops of
    a free field ran 5-20 % slower at 2^10-2^16 elements), while above it they are a few per cent of the
    update's memory traffic and save an allocation that on the CPU can cost page faults (1.2-1.5x faster
    at 2^18-2^22 float32 elements in one run, Heun 1.3-3.5x over three; ``benchmarks/state_pool.py``, benchmarks/RESULTS.md)."""

    #: the smallest state (in bytes) a pool is kept for (1 MiB: 2^18 float32 elements)
    MIN_BYTES = 1 << 20

    def __init__(self, like: torch.Tensor, limit: int = 8):
        self.like, self.limit = like, limit
        self.enabled = like.numel() * like.element_size() >= self.MIN_BYTES and os.environ.get(
            "FLOWSDE_STATE_POOL", "1") != "0"
        self.buffers = []
        self._order = []  # the buffers' storage addresses, in order
        self._ptrs = set()

    def take(self, *parts):
        """A free buffer for an op on ``parts`` (tensors, or lists of ``(c, tensor)`` pairs: every tensor
        the loop still needs), or ``None``."""
        if not self.enabled:
            return None
        tensors = _tensors(parts, [])
        if kernels.needs_autodiff(*tensors):  # (first: a torch.func wrapper has no storage to look at)
            return None
        dtype = self.like.dtype
        live = set()
        for t in tensors:
            if t.dtype != dtype and t.dim():
                return None
            live.add(t.untyped_storage().data_ptr())
        for b, ptr in zip(self.buffers, self._order):
            if ptr not in live:
                return b
        if len(self.buffers) >= self.limit:
            return None
        like = self.like
        if like.is_contiguous() or like.is_contiguous(memory_format=torch.channels_last) or (
                like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d)):
            b = torch.empty_like(like)  # laid out as the state (the kernels run channels_last in place)
        else:  # any other layout: contiguous, as the fused kernel writes its results
            b = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self.buffers.append(b)
        self._order.append(b.untyped_storage().data_ptr())
        self._ptrs.add(self._order[-1])
        return b

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in one of the pool's buffers (then a loop that keeps it copies it)."""
        return bool(self._ptrs) and not kernels.needs_autodiff(t) and t.untyped_storage().data_ptr() in self._ptrs

    def kept(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a loop may keep it past the next steps: a copy when it lives in a buffer."""
        return t.clone() if self.owns(t) else t


def _tensors(parts, into: list) -> list:
    """The tensors in ``parts`` (tensors, ``(c, tensor)`` pairs, and lists or tuples of either) appended to
    ``into`` (a plain loop, not a generator: it runs once per update)."""
    for p in parts:
        if isinstance(p, torch.Tensor):
            into.append(p)
        elif isinstance(p, (list, tuple)):
            _tensors(p, into)
    return into


def output_plan(grid: np.ndarray, t_out: np.ndarray):
    """Which outputs each step of ``grid`` makes: per step ``k`` the list of ``(j, s)``, output ``j`` at the
    fraction ``s`` of the step (``0``: its start, ``1``: its end, exactly; else inside it). Output 0 is the
    start of the grid itself."""
    sign = 1.0 if grid[-1] > grid[0] else -1.0
    plan = [[] for _ in range(len(grid) - 1)]
    j, n_out = 1, len(t_out)
    for k in range(len(grid) - 1):
        ta, tb = grid[k], grid[k + 1]
        while j < n_out and sign * (tb - t_out[j]) >= 0.0:
            tj = t_out[j]
            plan[k].append((j, 1.0 if tj == tb else 0.0 if tj == ta else (tj - ta) / (tb - ta)))
            j += 1
    return plan


def output_weights(grid: np.ndarray, t_out: np.ndarray):
    """How :func:`integrate` makes each output from the grid values: per grid point ``j`` the list of
    ``(i, w)`` with output ``i`` holding ``w`` times the value at ``j`` (``1`` on a grid point; ``1 - s`` and
    ``s`` for the linear interpolation inside a step) — the transpose a backward pass applies."""
    at = [[] for _ in grid]
    at[0].append((0, 1.0))
    for k, outs in enumerate(output_plan(grid, t_out)):
        for i, s in outs:
            if s != 1.0:
                at[k].append((i, 1.0 - s))
            if s != 0.0:
                at[k + 1].append((i, s))
    return at


def integrate(step: Callable, y0: torch.Tensor, grid: np.ndarray, t_out: np.ndarray,
              interp: Optional[Callable] = None, lerp: Callable = kernels.lerp,
              pool: Optional[StatePool] = None) -> torch.Tensor:
    """Run ``step(k, y) -> (y_next, aux)`` over ``grid`` and return the solution at every ``t_out``.

    An output time inside a step is interpolated between the step's ends: linearly by default (as
    torchdiffeq and torchsde do), or by ``interp(k, y, y_next, aux, s)`` with ``s`` the fraction of the
    step (:func:`output_plan`). ``pool``: the :class:`StatePool` the steps write into (a saved state that
    lives in one of its buffers is copied out). Returns a tensor of shape ``(len(t_out), *y0.shape)``.
    """
    keep = (lambda v: v) if pool is None else pool.kept
    outs = [y0]
    y = y0
    for k, made in enumerate(output_plan(grid, t_out)):
        y1, aux = step(k, y)
        for _, s in made:
            outs.append(keep(y1) if s == 1.0 else keep(y) if s == 0.0 else
                        lerp(y, y1, s) if interp is None else interp(k, y, y1, aux, s))
        y = y1
    return torch.stack(outs, dim=0)
