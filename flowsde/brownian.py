"""Brownian motion for the SDE solvers.

:class:`BrownianMotion` is the interface: ``bm(ta, tb)`` is the increment ``W(tb) - W(ta)`` and
``bm(t)`` is ``W(t) - W(t0)``, exactly as torchsde's Brownian objects answer, so any torchsde object
(``BrownianInterval``, ``BrownianPath``, ``BrownianTree``) can be passed wherever flowsde takes a ``bm``.

:class:`GridBrownian` is flowsde's own: Brownian motion on a fixed time grid whose increment over grid
step ``k`` is drawn from a generator seeded by ``(seed, k)`` alone. Increments are therefore
reproducible, independent of the order in which they are asked for, and a query over several grid
steps is the sum of the fine increments: solving on a coarse grid that is a sub-grid of the Brownian
grid refines one and the same path (what convergence studies need).
"""
from __future__ import annotations

from typing import Optional, Sequence

import math

import numpy as np
import torch

from . import _checks, kernels
from .kernels import PhiloxNoise
from .kernels.philox import KEY_MASK, philox_randn, tl_randn_at
from .kernels.reference import tree_leaf, tree_std

_MASK = (1 << 64) - 1


def step_key(seed: int, step: int) -> int:
    """A 64-bit generator seed for grid step ``step`` of stream ``seed`` (splitmix64 finaliser)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(step) + 1) * 0xD1B54A32D192ED03) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def step_keys(seed: int, n: int) -> list:
    """``[step_key(seed, k) for k in range(n)]``, vectorised (uint64 arithmetic wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        k = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64((int(seed) * 0x9E3779B97F4A7C15) & _MASK) + k * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return [int(v) for v in z.tolist()]


def _resolved(device) -> torch.device:
    """``device`` as a tensor on it reports it (``"cuda"`` -> ``cuda:0``, ``"cpu:0"`` -> ``cpu``), so a motion
    built with either spelling compares equal to its state's device."""
    return torch.empty(0, device=device).device


def default_seed() -> int:
    """A fresh seed drawn from torch's global CPU generator (so ``torch.manual_seed`` makes runs repeat)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))


def _check_grid(grid) -> np.ndarray:
    """A Brownian grid as float64: finite, strictly increasing, 1-D, at least two times."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) > 0) or not np.all(np.isfinite(grid)):
        raise ValueError("the Brownian grid must be a finite, strictly increasing 1-D sequence of >= 2 times")
    return grid


class BrownianMotion:
    """Interface of a Brownian motion on ``[t0, t1]`` with values of shape ``shape``.

    Subclasses implement :meth:`increment`. ``bm(ta, tb)`` returns ``W(tb) - W(ta)``; ``bm(t)`` returns
    ``W(t) - W(t0)``. The adaptive solvers extend this interface with a virtual Brownian tree.
    """

    t0: float
    t1: float
    levy_area_approximation = "none"  # increments only (read by torchsde's solvers)
    shape: tuple
    dtype: torch.dtype
    device: torch.device

    def increment(self, ta: float, tb: float) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_A or (return_U and self.levy_area_approximation != "space-time"):
            raise NotImplementedError(f"this {type(self).__name__} gives "
                                      f"{'increments only' if not return_A else 'no Levy area A'} (its "
                                      f"levy_area_approximation is {self.levy_area_approximation!r})")
        loose = _narrow_time(ta) or _narrow_time(tb)  # float32 tensor times (torchsde's, for a float32 state)
        ta = _as_time(ta)
        if tb is None:
            ta, tb = self.t0, ta
        else:
            tb = _as_time(tb)
        if tb < ta:
            raise ValueError(f"Brownian increment needs ta < tb, got ta={ta}, tb={tb}")
        if tb == ta:  # (``bm(t0)``, or a step of zero length): W(t) - W(t) = 0, as torchsde's
            zero = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            return (zero, zero.clone()) if return_U else zero
        kw = dict(loose=True) if loose and hasattr(self, "_tol32") else {}  # (a grid motion: grid times as
        # float32 accumulates them)
        if return_U:
            return self.increment_and_area(ta, tb, **kw)
        return self.increment(ta, tb, **kw)


def _space_time_area(dw: torch.Tensor, h: float, z: torch.Tensor) -> torch.Tensor:
    """``U = int_0^h (W_s - W_0) ds`` of a step of length ``h`` with increment ``dw``: ``h dw / 2 + h H`` with
    ``H ~ N(0, h / 12)`` independent of ``dw`` (``z`` its standard normal)."""
    return dw * (0.5 * h) + z * (h * math.sqrt(h / 12.0))


def _area_over_steps(values_at, areas_at, grid, ia: int, ib: int) -> torch.Tensor:
    """``int_{t_ia}^{t_ib} (W_s - W_{t_ia}) ds`` from the grid values and each step's own area:
    ``sum_j [(W_j - W_ia) h_j + U_j]``."""
    w0 = values_at(ia)
    out = None
    for j in range(ia, ib):
        term = (values_at(j) - w0) * float(grid[j + 1] - grid[j]) + areas_at(j)
        out = term if out is None else out.add_(term)
    return out


class GridBrownian(BrownianMotion):
    """Brownian motion on a fixed grid, with the increment over step ``k`` keyed by ``(seed, k)``.

    Args:
        grid: increasing 1-D sequence of grid times (or pass ``t0``, ``t1`` and ``steps`` for a uniform
            grid of ``steps`` steps).
        shape: shape of ``W(t)``, e.g. ``(batch, noise_channels)``.
        seed: integer seed; ``None`` draws one from torch's global generator.
        dtype, device: of the increments.
        stream: ``"torch"`` (a ``torch.Generator`` seeded per step: fast on any device) or ``"philox"``
            (the counter-based Philox stream of key ``key_k`` that the fused kernels draw in registers,
            four normals per Philox call; here computed by its PyTorch mirror, slower but exact).
        row_start: on the philox stream, this motion is rows ``row_start ..`` of a larger batch with the
            same seed (the shards of a distributed study draw exactly the rows of a one-process run).

    ``bm.step(k)`` is the increment over grid step ``k``. ``bm(ta, tb)`` accepts any two grid times
    (within a relative tolerance of 1e-9 of the grid spacing; float32 tensor times, as torchsde's solvers
    accumulate them, within their accumulated rounding, see :func:`_grid_tols`) and sums the step increments
    in between.
    """

    def __init__(self, grid: Optional[Sequence[float]] = None, shape=(1,), seed: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device="cpu", *, t0: Optional[float] = None,
                 t1: Optional[float] = None, steps: Optional[int] = None, stream: str = "torch", row_start: int = 0):
        if grid is None:
            if t0 is None or t1 is None or steps is None:
                raise ValueError("GridBrownian needs either grid= or all of t0=, t1= and steps=")
            if not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive integer, got {steps!r}")
            grid = np.linspace(float(t0), float(t1), steps + 1)
            grid[-1] = float(t1)
        grid = _check_grid(grid)
        _checks.check_seed(seed)
        self.grid = grid
        self.t0, self.t1 = float(grid[0]), float(grid[-1])
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.device = _resolved(device)
        self.seed = default_seed() if seed is None else int(seed)
        self._sqrt_h = np.sqrt(np.diff(grid)).tolist()
        self._keys = step_keys(self.seed, grid.size - 1)
        if stream not in ("torch", "philox"):
            raise ValueError(f"stream must be 'torch' or 'philox', got {stream!r}")
        self.stream = stream
        self._gen = torch.Generator(device=self.device) if stream == "torch" else None
        if isinstance(row_start, bool) or not isinstance(row_start, (int, np.integer)) or row_start < 0:
            raise ValueError(f"row_start must be an int >= 0, got {row_start!r}")
        if row_start and stream != "philox":
            raise ValueError("row_start needs stream='philox' (a counter-based stream can be drawn in slices)")
        per_row = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        self._offset = int(row_start) * per_row
        self._tol, self._tol32 = _grid_tols(grid)
        self._area_keys = None

    def normal(self, k: int) -> torch.Tensor:
        """The standard normal draw behind step ``k`` (shape ``self.shape``)."""
        if self.stream == "philox":
            n = int(np.prod(self.shape)) if self.shape else 1
            return philox_randn(self.philox_key(k), n, self.device, self._offset).to(self.dtype).reshape(self.shape)
        self._gen.manual_seed(self._keys[k])
        return torch.randn(self.shape, generator=self._gen, dtype=self.dtype, device=self.device)

    def philox_key(self, k: int) -> int:
        """The Philox key of step ``k`` (63 bits: kernels take it as an int64 scalar)."""
        return self._keys[k] & KEY_MASK

    levy_area_approximation = "space-time"  # (torchsde's srk accepts it: the areas below are exact)

    def area(self, k: int, dw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The space-time Lévy area of step ``k``, ``U_k = int (W_s - W(grid[k])) ds`` over the step, given its
        increment ``dw`` (drawn if not given): ``h dw / 2 + h H``, ``H ~ N(0, h / 12)`` from a stream of its
        own keyed by ``(seed, k)``, independent of the increments (the same normal whatever the stream)."""
        if self._area_keys is None:
            self._area_keys = step_keys(step_key(self.seed, -5), self.grid.size - 1)
        n = int(np.prod(self.shape)) if self.shape else 1
        z = philox_randn(self._area_keys[k] & KEY_MASK, n, self.device, self._offset).to(self.dtype).reshape(self.shape)
        h = float(self.grid[k + 1] - self.grid[k])
        return _space_time_area(self.step(k) if dw is None else dw, h, z)

    def areas(self) -> torch.Tensor:
        """Every step's space-time area (:meth:`area`), shape ``(len(grid) - 1, *shape)``: with :meth:`path`,
        what a :class:`SampledPath` needs to answer ``return_U`` (the srk method) on this path."""
        return torch.stack([self.area(k) for k in range(self.grid.size - 1)])

    def increment_and_area(self, ta: float, tb: float, loose: bool = False):
        """``(W(tb) - W(ta), int_ta^tb (W_s - W_ta) ds)`` between grid times (torchsde's ``return_U``)."""
        ia, ib = self.index(ta, loose), self.index(tb, loose)
        if ib == ia:
            zero = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            return zero, zero.clone()
        steps = [self.step(k) for k in range(ia, ib)]
        values = [torch.zeros_like(steps[0])]
        for d in steps:
            values.append(values[-1] + d)
        u = _area_over_steps(lambda j: values[j - ia], lambda j: self.area(j, steps[j - ia]), self.grid, ia, ib)
        return values[-1], u

    def draw(self, k: int):
        """The standard normal draw of step ``k`` in the form a fused update takes: on the philox stream
        a deferred :class:`~flowsde.kernels.PhiloxNoise` (drawn inside the kernel), else a tensor."""
        # (a motion that is rows row_start.. of a larger batch draws at an offset: materialised here)
        return PhiloxNoise(self.philox_key(k)) if self.stream == "philox" and not self._offset else self.normal(k)

    def philox_keys(self) -> list:
        """Every step's Philox key, in step order."""
        return [k & KEY_MASK for k in self._keys]


    def step(self, k: int) -> torch.Tensor:
        """``W(grid[k+1]) - W(grid[k])``."""
        return self.normal(k).mul_(self._sqrt_h[k])

    def index(self, t: float, loose: bool = False) -> int:
        """The grid index of time ``t``; a ``ValueError`` if ``t`` is not a grid time (``loose``: as float32
        times accumulated step by step reach it, see :func:`_grid_tols`)."""
        return _grid_index(self, t, loose)

    def increment(self, ta: float, tb: float, loose: bool = False) -> torch.Tensor:
        ia, ib = self.index(ta, loose), self.index(tb, loose)
        if ib == ia:  # two times within the grid's tolerance of one grid time (a sliver step): no increment
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        out = self.step(ia)
        for k in range(ia + 1, ib):
            out.add_(self.step(k))
        return out

    def path(self) -> torch.Tensor:
        """``W(grid[k]) - W(t0)`` at every grid time: shape ``(len(grid), *shape)`` (``W(t0) = 0``)."""
        steps = [torch.zeros(self.shape, dtype=self.dtype, device=self.device)]
        steps += [self.step(k) for k in range(self.grid.size - 1)]
        return torch.cumsum(torch.stack(steps), dim=0)

    def __repr__(self):
        return (f"GridBrownian(t0={self.t0}, t1={self.t1}, steps={self.grid.size - 1}, shape={self.shape}, "
                f"seed={self.seed}, dtype={self.dtype}, device={self.device})")



def _grid_tols(grid: np.ndarray):
    """How far a query may lie from a grid time and still be it: 1e-9 of the smallest spacing for float64
    times; for float32 tensor times (torchsde steps a float32 state with float32 times ``t + dt``, whose
    rounding accumulates: 0.01 is 0.0099999998, and after k steps the time may be off by ~k float32 ulps)
    ``k_max`` float32 ulps of the largest time, at most a quarter of the smallest spacing (so a query
    still names one grid time)."""
    h = float(np.min(np.diff(grid)))
    ulp32 = float(np.finfo(np.float32).eps) * max(1.0, float(np.max(np.abs(grid))))
    return 1e-9 * h, min(0.25 * h, max(1e-9 * h, (grid.size - 1) * ulp32))


def _narrow_time(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _grid_index(bm, t: float, loose: bool = False) -> int:
    tol = bm._tol32 if loose else bm._tol
    i = int(np.searchsorted(bm.grid, t))
    for j in sorted((i - 1, i), key=lambda j: abs(bm.grid[j] - t) if 0 <= j < bm.grid.size else math.inf):
        if 0 <= j < bm.grid.size and abs(bm.grid[j] - t) <= tol:
            return j
    raise ValueError(f"time {t} is not a point of this {type(bm).__name__}'s grid "
                     f"([{bm.t0}, {bm.t1}] in {bm.grid.size - 1} steps): query grid times only")


class SampledPath(BrownianMotion):
    """A Brownian path known at the points of a grid: ``values[i] = W(grid[i]) - W(grid[0])`` (as
    :meth:`GridBrownian.path` returns). Increments between grid times are differences of stored values,
    so the many solves of a convergence study share one path without drawing it again."""

    def __init__(self, grid, values: torch.Tensor, areas: Optional[torch.Tensor] = None):
        grid = _check_grid(grid)
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a tensor, got {type(values).__name__}")
        if values.shape[0] != grid.size:
            raise ValueError(f"values must have one row per grid time ({grid.size}), got {values.shape[0]}")
        if areas is not None and (not isinstance(areas, torch.Tensor) or tuple(areas.shape) != (grid.size - 1,
                                                                                            *values.shape[1:])):
            raise ValueError(f"areas must hold one space-time area per grid step, shape "
                             f"{(grid.size - 1, *values.shape[1:])}")
        self.grid, self.values, self.areas = grid, values, areas
        self.t0, self.t1 = float(grid[0]), float(grid[-1])
        self.shape, self.dtype, self.device = tuple(values.shape[1:]), values.dtype, values.device
        self._tol, self._tol32 = _grid_tols(grid)
        self.levy_area_approximation = "none" if areas is None else "space-time"
        if areas is not None:  # prefix sums: the area between any two grid times in a few ops
            h = torch.as_tensor(np.diff(grid), dtype=values.dtype, device=values.device)
            h = h.reshape(-1, *([1] * (values.dim() - 1)))
            zero = torch.zeros_like(values[:1])
            self._cum_u = torch.cat([zero, torch.cumsum(areas, 0)])
            self._cum_wh = torch.cat([zero, torch.cumsum(values[:-1] * h, 0)])

    def increment(self, ta: float, tb: float, loose: bool = False) -> torch.Tensor:
        return self.values[_grid_index(self, tb, loose)] - self.values[_grid_index(self, ta, loose)]

    def increment_and_area(self, ta: float, tb: float, loose: bool = False):
        """``(W(tb) - W(ta), int_ta^tb (W_s - W_ta) ds)`` between grid times, from the stored step areas."""
        ia, ib = _grid_index(self, ta, loose), _grid_index(self, tb, loose)
        w = self.values[ib] - self.values[ia]
        u = (self._cum_u[ib] - self._cum_u[ia]) + (self._cum_wh[ib] - self._cum_wh[ia]) \
            - self.values[ia] * float(self.grid[ib] - self.grid[ia])
        return w, u


class DeviceKeys:
    """Per-step Philox keys held in a device tensor (``keys[k]``), drawn by the kernels from memory: the
    noise source of a captured CUDA graph, whose replays see whatever keys were last written there."""

    stream = "philox"

    def __init__(self, keys: torch.Tensor):
        if keys.dim() != 1 or keys.dtype != torch.int64:
            raise TypeError("DeviceKeys needs a 1-D int64 tensor")
        self.keys = keys
        self._views = keys.unbind(0)  # views made once, none in the loop

    def draw(self, k: int):
        return PhiloxNoise(self._views[k])

class VirtualBrownianTree(BrownianMotion):
    """Brownian motion on ``[t0, t1]`` queried at any time, reproducibly, from a seed and no stored path.

    ``W(t1)`` is drawn from the root's normal; the value at the midpoint of a dyadic interval is the
    Brownian bridge between its ends plus ``sqrt(length) / 2`` times the normal of that tree node, down
    ``depth`` levels to intervals shorter than ``tol``, linear inside those (an error of order
    ``sqrt(tol)``, far below any step an adaptive solver takes). A query evaluates this as its
    Lévy–Ciesielski sum, one term per level, all levels drawn at once. Every normal is a pure function of
    ``(seed, node, element)`` (counter-based Philox at offset ``node * 2**32 + element``),
    so ``W(t)`` does not depend on which times were asked for before, or in which order: a rejected step
    re-queries the same path, and each batch row has its own path whatever the batch size.

    Two ways to ask: ``bm(ta, tb)`` / :meth:`value` with host times (the interface torchsde's solvers use),
    and :meth:`at` with device times, one per row if need be (what flowsde's adaptive SDE driver uses: no
    host read, and per-sample times). Both compute the same values, as one Triton kernel on the triton
    backend or as its PyTorch specification (:func:`flowsde.kernels.reference.brownian_tree`).

    Args:
        t0, t1: the interval; shape: of ``W(t)``, ``(batch, ...)``; seed: int or ``None`` (from torch's
        generator); tol: the finest interval length (default ``(t1 - t0) * 2**-20``; at least
        ``(t1 - t0) * 2**-30``); dtype, device: of the values; backend: of the host-time queries
        (``None``: as :func:`flowsde.kernels.resolve_backend` decides).

    :meth:`dyadic_path` gives the values at all ``2**level + 1`` dyadic times of a level at once (one draw
    per tree node, no descent per time): the fine reference path of a convergence study on the same
    Brownian motion an adaptive solve used.
    """

    def __init__(self, t0: float, t1: float, shape=(1,), seed: Optional[int] = None, tol: Optional[float] = None,
                 dtype: torch.dtype = torch.float32, device="cpu", backend: Optional[str] = None):
        t0, t1 = float(t0), float(t1)
        if not (np.isfinite(t0) and np.isfinite(t1) and t1 > t0):
            raise ValueError(f"VirtualBrownianTree needs finite t0 < t1, got {t0}, {t1}")
        span = t1 - t0
        tol = span * 2.0 ** -20 if tol is None else float(tol)
        if not (span * 2.0 ** -30 <= tol < span):
            raise ValueError(f"tol must be in [(t1 - t0) * 2**-30, t1 - t0), got {tol}")
        _checks.check_seed(seed)
        self.t0, self.t1, self.tol = t0, t1, tol
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) < 1 or self.shape[0] < 1 or int(np.prod(self.shape)) >= 2 ** 32:
            raise ValueError(f"shape must be (batch, ...) with fewer than 2**32 elements, got {self.shape}")
        self.dtype, self.device = dtype, _resolved(device)
        self.seed = default_seed() if seed is None else int(seed)
        self.key = step_key(self.seed, -2) & KEY_MASK  # a stream of its own (grid steps use k >= 0)
        self.depth = int(np.ceil(np.log2(span / tol) - 1e-9))
        self.per_row = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        self._std = tree_std(span, self.depth, self.device)
        self._ops = kernels.ops(backend, self.device, int(np.prod(self.shape)))
        self._recent = {}  # the last few host-time values: consecutive increments share an end

    def at(self, t: torch.Tensor, rows: Optional[torch.Tensor] = None, ops=None) -> torch.Tensor:
        """``W(t) - W(t0)`` at device times, with no host read.

        ``t``: a 0-dim tensor (one time for the rows asked) or ``(R,)`` (one time per row); times outside
        ``[t0, t1]`` are clamped to it. ``rows``: ``None`` for every row, or an int64 ``(R,)`` tensor of
        the rows wanted. Returns ``(R, *shape[1:])`` in the tree's dtype. ``ops``: the backend's op set
        (default: the tree's own).
        """
        if t.dim() > 1:
            raise ValueError(f"query times must be 0-dim or (rows,), got shape {tuple(t.shape)}")
        n_rows = self.shape[0] if rows is None else rows.shape[0]
        if t.dim() == 1 and t.shape[0] != n_rows:
            raise ValueError(f"{t.shape[0]} query times for {n_rows} rows")
        leaf, frac = tree_leaf(t.reshape(-1, 1), self.t0, self.t1 - self.t0, self.depth)
        out = (ops or self._ops).brownian_tree(self.key, leaf, frac, rows, n_rows, self.per_row, self._std,
                                               self.depth)
        return out.to(self.dtype).reshape((n_rows,) + self.shape[1:])

    def value(self, t: float) -> torch.Tensor:
        """``W(t) - W(t0)`` at a host time."""
        return self._value(t).clone()

    def _value(self, t) -> torch.Tensor:
        t = float(t)
        w = self._recent.get(t)
        if w is None:
            # a time beyond an end by float32 rounding (torchsde passes float32 ts through) is that end; not
            # more than a thousandth of the interval (a short one, or one far from 0, clamped whole queries)
            tol = min(1e-6 * max(1.0, abs(self.t0), abs(self.t1)), 1e-3 * (self.t1 - self.t0))
            if not (self.t0 - tol <= t <= self.t1 + tol):
                raise ValueError(f"time {t} is outside the tree's interval [{self.t0}, {self.t1}]")
            t = min(max(t, self.t0), self.t1)
            w = self.at(torch.full((), t, dtype=torch.float64, device=self.device))
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))
            self._recent[t] = w
        return w

    def increment(self, ta: float, tb: float) -> torch.Tensor:
        return self._value(tb) - self._value(ta)

    def dyadic_path(self, level: int) -> torch.Tensor:
        """``W(t0 + (t1 - t0) k / 2**level) - W(t0)`` for ``k = 0 .. 2**level``: shape ``(2**level + 1,
        *shape)``, the values :meth:`value` gives at those times (to rounding), built level by level from
        the tree's node draws (``0 <= level <= depth``). With :class:`SampledPath` it drives a fixed-step
        solve on this tree's path."""
        if not (isinstance(level, int) and 0 <= level <= self.depth):
            raise ValueError(f"level must be an int in [0, {self.depth}], got {level!r}")
        n = int(np.prod(self.shape))
        elem = torch.arange(n, dtype=torch.int64, device=self.device).reshape(1, n)
        std = self._std.tolist()
        vals = torch.stack([torch.zeros(n, dtype=torch.float64, device=self.device),
                            tl_randn_at(self.key, elem[0]).to(torch.float64) * std[0]])
        for lev in range(level):
            nodes = torch.arange(1 << lev, 2 << lev, dtype=torch.int64, device=self.device).reshape(-1, 1)
            z = tl_randn_at(self.key, (nodes << 32) + elem).to(torch.float64)
            mid = (vals[:-1] + vals[1:]).mul_(0.5).add_(z, alpha=std[1 + lev])
            out = torch.empty((2 * vals.shape[0] - 1, n), dtype=torch.float64, device=self.device)
            out[0::2], out[1::2] = vals, mid
            vals = out
        return vals.to(self.dtype).reshape((vals.shape[0],) + self.shape)

    def __repr__(self):
        return (f"VirtualBrownianTree(t0={self.t0}, t1={self.t1}, shape={self.shape}, seed={self.seed}, "
                f"tol={self.tol:g}, depth={self.depth})")


def _as_time(t) -> float:
    # A caller that passes tensor times (torchsde's solvers do) pays one host read per query; flowsde's
    # own driver passes Python floats from its host-side grid, so its loop never comes here with a tensor.
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"a Brownian query time must be a scalar, got shape {tuple(t.shape)}")
        return float(t.detach().cpu())
    return float(t)

