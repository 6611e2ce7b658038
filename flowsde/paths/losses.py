"""Training losses for any Gaussian path: conditional flow matching and denoising score matching, with
optional minibatch optimal-transport pairing of data and noise."""
from __future__ import annotations

import numpy as np
import torch

from .gaussian import HALF, CondOT, GaussianPath, _bcast, check_prediction


def ot_pairing(z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` minimising ``sum_i ||z_i - eps[perm[i]]||^2`` (exact, by the Hungarian
    algorithm of ``scipy.optimize.linear_sum_assignment``; runs on the host, once per training batch)."""
    from scipy.optimize import linear_sum_assignment

    if z.shape != eps.shape:
        raise ValueError(f"z and eps must have the same shape, got {tuple(z.shape)} and {tuple(eps.shape)}")
    cost = torch.cdist(z.reshape(z.shape[0], -1).double(), eps.reshape(eps.shape[0], -1).double()) ** 2
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, device=z.device)


def _draw(z, t, eps, generator, t_range):
    B = z.shape[0]
    if t is None:
        lo, hi = _check_range(t_range)
        half = z.dtype in HALF  # drawn in float32, rounded once into the range's representable part
        t = lo + (hi - lo) * torch.rand(B, generator=generator, dtype=torch.float32 if half else z.dtype,
                                        device=z.device)
        if half:
            t = t.to(z.dtype).clamp(*_inside(lo, hi, z.dtype))
    if eps is None:
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    return t, eps


def _mse(r: torch.Tensor) -> torch.Tensor:
    """The mean square, in float32 for half types (float16 squares overflow at 256: a score target near
    t = 1 is -eps / beta)."""
    return (r.float() if r.dtype in HALF else r).pow(2).mean()


def _check_range(t_range):
    try:
        lo, hi = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise TypeError(f"t_range must be a pair of numbers (lo, hi), got {t_range!r}") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1 (times of the path), got {t_range!r}")
    return lo, hi


def _inside(lo: float, hi: float, dtype: torch.dtype):
    """The smallest and largest ``dtype`` values in ``[lo, hi]`` (bfloat16 rounds 0.9999 to 1.0, where a VP
    path's velocity target is infinite): the bit pattern of a non-negative float orders as the float."""
    a, b = torch.tensor([lo, hi], dtype=dtype).unbind(0)
    if float(a) < lo:
        a = (a.view(torch.int16) + 1).view(dtype)
    if float(b) > hi:
        b = (b.view(torch.int16) - 1).view(dtype)
    if not float(a) <= float(b):
        raise ValueError(f"t_range ({lo}, {hi}) holds no {dtype} time: widen it or pass t")
    return float(a), float(b)


def flow_matching_loss(model, z: torch.Tensor, path: GaussianPath = None, prediction: str = "velocity",
                       t: torch.Tensor = None, eps: torch.Tensor = None, cond=None, generator=None,
                       ot: bool = False, t_range=(0.0, 1.0)) -> torch.Tensor:
    """Conditional flow matching: ``mean ||model(x_t, t) - target||^2`` with ``x_t = alpha z + beta eps``.

    ``target`` is the conditional quantity of the chosen parametrisation (``velocity``:
    ``alpha' z + beta' eps``; ``epsilon``: ``eps``; ``data``: ``z``; ``v``: ``alpha eps - beta z``;
    ``score``: ``-eps / beta``). ``t`` ~ U(t_range) and ``eps`` ~ N(0, I) are drawn when not given;
    ``ot=True`` re-pairs the batch's noise with its data by exact minibatch optimal transport. Half-type
    data: the times are drawn in float32 and rounded to the data's dtype inside ``t_range`` (whose ends
    must satisfy ``0 <= lo < hi <= 1``), and the mean square is taken (and returned) in float32.
    """
    path = CondOT() if path is None else path
    check_prediction(prediction)
    t, eps = _draw(z, t, eps, generator, t_range)
    if ot:
        eps = eps[ot_pairing(z, eps)]
    x = path.sample_conditional(z, t, eps)
    target = path.target(z, eps, t, prediction)
    out = model(x, t) if cond is None else model(x, t, cond)
    if out.shape != target.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)}, expected {tuple(target.shape)}")
    return _mse(out - target)


def score_matching_loss(model, z: torch.Tensor, path: GaussianPath = None, parametrization: str = "epsilon",
                        t: torch.Tensor = None, eps: torch.Tensor = None, cond=None, generator=None,
                        t_range=(0.0, 1.0)) -> torch.Tensor:
    """Denoising score matching. ``epsilon``: ``mean ||eps_theta(x_t, t) - eps||^2``; ``score``:
    ``mean beta^2 ||s_theta(x_t, t) + eps / beta||^2`` (the same objective, as eps = -beta score)."""
    path = CondOT() if path is None else path
    if parametrization not in ("epsilon", "score"):
        raise ValueError(f"parametrization must be 'epsilon' or 'score', got {parametrization!r}")
    t, eps = _draw(z, t, eps, generator, t_range)
    x = path.sample_conditional(z, t, eps)
    out = model(x, t) if cond is None else model(x, t, cond)
    if out.shape != z.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)}, expected {tuple(z.shape)}")
    if parametrization == "epsilon":
        return _mse(out - eps)
    b = _bcast(path.beta(t), z)
    return _mse(b * out + eps)
