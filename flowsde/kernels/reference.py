"""Plain-PyTorch specification of every step op.

These functions are the reference the fused kernels are tested against, and what the ``torch`` backend
runs. Each op writes one new tensor and never modifies its inputs; where PyTorch offers a fused form
(``torch.add(..., alpha=)``, ``addcmul_``) it is used so that a step makes as few temporaries as it can.
Scalar coefficients are Python floats (host side), so no op reads a device tensor back.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

Term = Tuple[float, torch.Tensor]


def lincomb(y: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """Return ``y + sum(c * k for c, k in terms)`` as a new tensor (zero coefficients are skipped)."""
    out = None
    for c, k in terms:
        if c == 0.0:
            continue
        if out is None:
            out = torch.add(y, k, alpha=c)
        else:
            out.add_(k, alpha=c)
    return y.clone() if out is None else out


def noise_prod(g: torch.Tensor, dw: torch.Tensor, noise_type: str) -> torch.Tensor:
    """The diffusion applied to a Brownian increment, ``g dW``, for each torchsde noise type.

    Shapes: diagonal ``g`` is ``y.shape`` and ``dw`` is ``y.shape``; scalar ``g`` is ``(*y.shape, 1)`` and
    ``dw`` is ``(batch, 1)``; additive/general ``g`` is ``(batch, d, m)`` and ``dw`` is ``(batch, m)``.
    """
    if noise_type == "diagonal":
        return g * dw
    if noise_type == "scalar":
        return g.squeeze(-1) * dw.reshape(dw.shape[0], *([1] * (g.dim() - 2)))
    return torch.bmm(g, dw.unsqueeze(-1)).squeeze(-1)


def sde_update(y: torch.Tensor, terms: Sequence[Term], noise: Sequence[Tuple[float, torch.Tensor]],
               dw: torch.Tensor, noise_type: str) -> torch.Tensor:
    """Return ``y + sum(c * k) + sum(s * g dW)``: the combination of every explicit SDE step.

    ``terms`` are drift terms ``(c, k)`` (``c`` already holds the step ``dt``), ``noise`` are pairs
    ``(s, g)`` of a scale and a diffusion value all applied to the same increment ``dw``.
    """
    out = torch.add(y, terms[0][1], alpha=terms[0][0]) if len(terms) == 1 else lincomb(y, terms)
    if noise_type == "diagonal":
        for s, g in noise:
            out.addcmul_(g, dw, value=s)
        return out
    for s, g in noise:
        out.add_(noise_prod(g, dw, noise_type), alpha=s)
    return out


def lerp(y0: torch.Tensor, y1: torch.Tensor, s: float) -> torch.Tensor:
    """Linear interpolation ``y0 + s (y1 - y0)`` between the two ends of a step."""
    return torch.lerp(y0, y1, s)


def hermite(y0: torch.Tensor, f0: torch.Tensor, y1: torch.Tensor, f1: torch.Tensor, s: float,
            dt: float) -> torch.Tensor:
    """Cubic Hermite interpolation at fraction ``s`` of a step of size ``dt`` (as torchdiffeq's ``cubic``)."""
    h00 = (1 + 2 * s) * (1 - s) * (1 - s)
    h10 = s * (1 - s) * (1 - s)
    h01 = s * s * (3 - 2 * s)
    h11 = s * s * (s - 1)
    return lincomb(y0 * h00, [(h10 * dt, f0), (h01, y1), (h11 * dt, f1)])


def combine(terms: Sequence[Term], diffusion=(), noise=None, rowwise: bool = False, key: int = 0, out=None):
    """Specification of the fused kernel: ``sum c_i t_i + (sum s_j g_j) z``.

    ``diffusion`` holds ``(s, g)`` pairs (``g = None`` means 1); ``z`` is ``noise`` (shape of the result,
    or ``(batch, 1)`` with ``rowwise``: one draw per batch row) or, when ``noise`` is None, the Philox
    stream ``philox_randn(key, i)`` over the noise elements (see :mod:`flowsde.kernels.philox`).
    ``out``: an optional tensor to write the result into (it may alias an input).
    """
    from .philox import philox_randn

    if out is not None:
        return out.copy_(combine(terms, diffusion, noise, rowwise, key))
    out = lincomb(terms[0][1] * terms[0][0], terms[1:])
    if not diffusion:
        return out
    shape = out.shape
    if noise is None:
        n = shape[0] if rowwise else out.numel()
        noise = philox_randn(key, n, out.device).to(out.dtype)
        noise = noise.reshape(shape[0], 1) if rowwise else noise.reshape(shape)
    z = noise.reshape(shape[0], *([1] * (len(shape) - 1))) if rowwise else noise
    for s, g in diffusion:
        if g is None:
            out.add_(z, alpha=s)
        else:
            out.addcmul_(g.reshape(shape) if g.numel() == out.numel() else g, z, value=s)
    return out


def error_norm(y0: torch.Tensor, y1: torch.Tensor, err: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-sample scaled RMS error of an embedded pair: ``sqrt(mean_i (err_i / (atol + rtol max(|y0_i|,
    |y1_i|)))^2)`` over each batch row; shape ``(batch,)``, float32 for half inputs."""
    acc = torch.float64 if y1.dtype == torch.float64 else torch.float32
    scale = atol + rtol * torch.maximum(y0.to(acc).abs(), y1.to(acc).abs())
    return (err.to(acc) / scale).pow(2).reshape(y1.shape[0], -1).mean(1).sqrt()


def linear_trajectory(x0: torch.Tensor, coef: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor,
                      n_out: int) -> torch.Tensor:
    """Specification of the whole-trajectory kernel: Euler–Maruyama for ``dX = (a X + b) dt + (c X + d) dW``
    with ``(a, b, c, d, h)`` per step in ``coef``, noise ``philox_randn(keys[k], i)``, the state written to
    row ``slots[k]`` after step ``k`` when ``slots[k] >= 0``."""
    from .philox import philox_randn

    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x = x0.to(acc)
    out = torch.empty((n_out,) + tuple(x0.shape), dtype=x0.dtype, device=x0.device)
    cf, ks, sl = coef.tolist(), keys.tolist(), slots.tolist()
    for k, (a, b, c, d, h) in enumerate(cf):
        z = philox_randn(ks[k], x.numel(), x.device).to(acc).reshape(x.shape)
        x = x + (a * x + b) * h + (c * x + d) * (h ** 0.5) * z
        if sl[k] >= 0:
            out[sl[k]] = x.to(x0.dtype)
    return out
