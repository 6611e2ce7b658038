"""Explicit Runge–Kutta methods as data: a Butcher tableau and a declared order, fed to one step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

from .. import kernels


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method.

    ``c`` are the stage times (fractions of the step), ``a`` the strictly lower-triangular stage weights
    (row ``i`` has ``i`` entries), ``b`` the solution weights and ``order`` the classical order.
    """

    name: str
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    order: int

    def __post_init__(self):
        s = len(self.c)
        if len(self.a) != s or len(self.b) != s:
            raise ValueError(f"tableau {self.name}: c, a and b must describe the same number of stages")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau {self.name}: row {i} of a must have {i} entries (explicit method)")
            if abs(sum(row) - self.c[i]) > 1e-14:
                raise ValueError(f"tableau {self.name}: row {i} of a must sum to c[{i}]")
        if abs(sum(self.b) - 1.0) > 1e-14:
            raise ValueError(f"tableau {self.name}: the weights b must sum to 1")

    @property
    def stages(self) -> int:
        return len(self.c)


EULER = ButcherTableau("euler", (0.0,), ((),), (1.0,), order=1)
MIDPOINT = ButcherTableau("midpoint", (0.0, 0.5), ((), (0.5,)), (0.0, 1.0), order=2)
HEUN2 = ButcherTableau("heun", (0.0, 1.0), ((), (1.0,)), (0.5, 0.5), order=2)
HEUN3 = ButcherTableau("heun3", (0.0, 1 / 3, 2 / 3), ((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75), order=3)
# Kutta's 3/8 rule: what torchdiffeq calls "rk4".
RK4 = ButcherTableau("rk4", (0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                     (1 / 8, 3 / 8, 3 / 8, 1 / 8), order=4)
RK4_CLASSIC = ButcherTableau("rk4_classic", (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                             (1 / 6, 1 / 3, 1 / 3, 1 / 6), order=4)

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rk_step(func: Field, times: Sequence[torch.Tensor], y: torch.Tensor, h: float,
            tab: ButcherTableau, ops=kernels.ops("torch"), pool=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """One explicit RK step of size ``h`` from ``y``.

    ``times`` holds the stage times ``t0 + c_i h`` as tensors (prepared before the loop, so the step
    never builds or reads a device scalar); ``ops`` is the backend's op set; ``pool`` an optional
    :class:`~flowsde.solvers.fixed.StatePool` the stage inputs and the new state are written into.
    Returns ``(y1, ks)``; ``ks[0]`` is the field at the start.
    """
    ks: List[torch.Tensor] = []
    take = (lambda *live: None) if pool is None else pool.take
    for i in range(tab.stages):
        yi = y if i == 0 else ops.lincomb(y, [(h * a, k) for a, k in zip(tab.a[i], ks)], out=take(y, ks))
        ks.append(func(times[i], yi))
    y1 = ops.lincomb(y, [(h * b, k) for b, k in zip(tab.b, ks)], out=take(y, ks))
    return y1, ks
