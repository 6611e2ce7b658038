"""Training losses for any Gaussian path: conditional flow matching and denoising score matching, with
optional minibatch optimal-transport pairing of data and noise."""
from __future__ import annotations

import numpy as np
import torch

from .gaussian import CondOT, GaussianPath, _bcast, check_prediction


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
        lo, hi = t_range
        t = lo + (hi - lo) * torch.rand(B, generator=generator, dtype=z.dtype, device=z.device)
    if eps is None:
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    return t, eps


def flow_matching_loss(model, z: torch.Tensor, path: GaussianPath = None, prediction: str = "velocity",
                       t: torch.Tensor = None, eps: torch.Tensor = None, cond=None, generator=None,
                       ot: bool = False, t_range=(0.0, 1.0)) -> torch.Tensor:
    """Conditional flow matching: ``mean ||model(x_t, t) - target||^2`` with ``x_t = alpha z + beta eps``.

    ``target`` is the conditional quantity of the chosen parametrisation (``velocity``:
    ``alpha' z + beta' eps``; ``epsilon``: ``eps``; ``data``: ``z``; ``v``: ``alpha eps - beta z``;
    ``score``: ``-eps / beta``). ``t`` ~ U(t_range) and ``eps`` ~ N(0, I) are drawn when not given;
    ``ot=True`` re-pairs the batch's noise with its data by exact minibatch optimal transport.
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
    return (out - target).pow(2).mean()


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
        return (out - eps).pow(2).mean()
    b = _bcast(path.beta(t), z)
    return (b * out + eps).pow(2).mean()
