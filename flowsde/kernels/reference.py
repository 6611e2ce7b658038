"""Plain-PyTorch specification of every step op.

These functions are the reference the fused kernels are tested against, and what the ``torch`` backend
runs. Each op writes one new tensor and never modifies its inputs; where PyTorch offers a fused form
(``torch.add(..., alpha=)``, ``addcmul_``) it is used so that a step makes as few temporaries as it can.
Coefficients are Python floats (host side) or, in the adaptive drivers, device tensors that are only
ever multiplied in (a step size per row): no op reads a device tensor back. Also here: the virtual
Brownian tree's query (:func:`brownian_tree`), the specification of :mod:`flowsde.kernels.tree`.
"""
from __future__ import annotations

import math

from typing import Sequence, Tuple

import torch

Term = Tuple[float, torch.Tensor]


def is_zero(c) -> bool:
    """``c == 0`` for a host coefficient; a device coefficient (a tensor) is never taken for zero (reading
    it would synchronise)."""
    return not isinstance(c, torch.Tensor) and c == 0.0


def axpy_(out: torch.Tensor, k: torch.Tensor, c) -> torch.Tensor:
    """``out += c * k`` in place, for a host coefficient (a float) or a device one (a tensor that
    broadcasts against ``k``: a 0-dim step size, or one per batch row)."""
    return out.addcmul_(k, c) if isinstance(c, torch.Tensor) else out.add_(k, alpha=c)


_HALF = (torch.float16, torch.bfloat16)


def result_dtype(*tensors):
    """The dtype PyTorch's promotion gives a result of these operands (``None`` and non-tensors skipped):
    what every op here returns, on either backend — a float32 state with a float16 model output gives
    float32, as ``x + h * out`` written in PyTorch ops does. As there, a 0-dim tensor only widens the
    result when the dimensioned operands are not floating point (a float64 scalar tensor beside float32
    tensors leaves float32)."""
    dim = zero = None
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.dim():
                dim = t.dtype if dim is None else torch.promote_types(dim, t.dtype)
            else:
                zero = t.dtype if zero is None else torch.promote_types(zero, t.dtype)
    if dim is None or zero is None:
        return zero if dim is None else dim
    if dim.is_floating_point or dim.is_complex or not (zero.is_floating_point or zero.is_complex):
        return dim if dim != torch.bool else torch.promote_types(dim, zero)
    return torch.promote_types(dim, zero)


def _half_result(*tensors):
    """:func:`result_dtype` if it is a half type (float16 / bfloat16), else None. Half results are
    accumulated in float32 and rounded once, as the kernels do: rounding each partial sum (or a large
    coefficient times an operand) to the half type loses the small difference of large terms, and
    float16 refuses a coefficient beyond 65504."""
    dtype = result_dtype(*tensors)
    return dtype if dtype in _HALF else None


def _f32(t):
    return t.float() if t is not None and t.dtype in _HALF else t


def shares_memory(out: torch.Tensor, tensors) -> bool:
    """Whether ``out`` shares storage with one of ``tensors`` (``None`` entries skipped; host metadata only)."""
    ptr = out.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr for t in tensors)


def write_out(out: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``res`` copied into the preallocated ``out`` (PyTorch's ``out=`` rule: same shape, and the result's dtype
    must cast to ``out``'s)."""
    if tuple(out.shape) != tuple(res.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, the result {tuple(res.shape)}")
    if not torch.can_cast(res.dtype, out.dtype):
        raise ValueError(f"a {res.dtype} result cannot be written to a {out.dtype} out")
    return out.copy_(res)


def _direct(out, dtype, shape, operands, coefficients=()) -> bool:
    """Whether an op can accumulate straight into ``out``: its dtype and shape are the result's, it is not a
    half type (accumulated in float32 apart), it shares no memory with the operands and is not differentiated
    (PyTorch's ``out=`` ops have no derivative; the result computed apart is then copied in, ``copy_`` has)."""
    if _autodiff(out, *(t for t in operands if t is not None),  # (first: torch.func wrappers have no storage)
                 *(c for c in coefficients if isinstance(c, torch.Tensor))):
        return False
    return out.dtype == dtype and dtype not in _HALF and out.shape == shape and not shares_memory(out, operands)


def _autodiff(*tensors) -> bool:
    from . import needs_autodiff  # (the package imports this module first)

    return needs_autodiff(*tensors)


def lincomb(y: torch.Tensor, terms: Sequence[Term], out=None) -> torch.Tensor:
    """Return ``y + sum(c * k for c, k in terms)`` as a new tensor (zero host coefficients are skipped), or
    written into ``out`` (preallocated; it may alias an input).

    A coefficient is a Python float, or a tensor on the device that broadcasts against ``k`` (the adaptive
    SDE driver's step sizes, one per row); neither is ever read back. Half types accumulate in float32."""
    if out is not None:
        ks = [k for _, k in terms]
        if out.dtype in _HALF and result_dtype(y, *ks) == out.dtype:  # summed in float32, rounded as copied in
            return write_out(out, lincomb(_f32(y), [(c, _f32(k)) for c, k in terms]))
        if any(k.shape != y.shape for k in ks) or not _direct(out, result_dtype(y, *ks), y.shape, [y, *ks],
                                                               [c for c, _ in terms]):
            return write_out(out, lincomb(y, terms))
        return _accumulate(y, terms, out)
    half = _half_result(y, *(k for _, k in terms))
    if half is not None:
        return lincomb(_f32(y), [(c, _f32(k)) for c, k in terms]).to(half)
    y = y.to(result_dtype(y, *(k for _, k in terms)))  # (a term of a wider dtype: y widened first)
    return _accumulate(y, terms)


def _accumulate(y: torch.Tensor, terms: Sequence[Term], into=None) -> torch.Tensor:
    """:func:`lincomb` once ``y`` has the result's dtype (and no half type is involved); ``into``: a tensor of
    the result's shape and dtype, sharing no memory with the operands, to write it to."""
    terms = [(c, k) for c, k in terms if not is_zero(c)]
    out = None
    if into is not None and y.dtype != into.dtype:  # (widened first, as y.to(dtype) is: the sum in into's dtype)
        out = into.copy_(y)
    for c, k in terms:
        if out is None:
            kw = {} if into is None else {"out": into}
            out = torch.addcmul(y, k, c, **kw) if isinstance(c, torch.Tensor) else torch.add(y, k, alpha=c, **kw)
        else:
            axpy_(out, k, c)
    if out is None:
        return y.clone() if into is None else into.copy_(y)
    return out


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
               dw: torch.Tensor, noise_type: str, out=None) -> torch.Tensor:
    """Return ``y + sum(c * k) + sum(s * g dW)``: the combination of every explicit SDE step.

    ``terms`` are drift terms ``(c, k)`` (``c`` already holds the step ``dt``), ``noise`` are pairs
    ``(s, g)`` of a scale and a diffusion value all applied to the same increment ``dw``. Coefficients
    are floats or device tensors, as in :func:`lincomb` (half types accumulate in float32). ``out``: a
    preallocated result to write into (it may alias an input).
    """
    operands = [y, *(k for _, k in terms), *(g for _, g in noise), dw]
    half = _half_result(*operands)
    if half is not None:
        res = sde_update(_f32(y), [(c, _f32(k)) for c, k in terms], [(s, _f32(g)) for s, g in noise], _f32(dw),
                         noise_type)  # (summed in float32, rounded once: by .to, or as it is copied into out)
        return res.to(half) if out is None or out.dtype != half else write_out(out, res)
    dtype = result_dtype(*operands)
    direct = out is not None and _direct(out, dtype, y.shape, operands, [c for c, _ in list(terms) + list(noise)])
    res = lincomb(y.to(dtype), terms, out=out if direct else None)  # (no copy of y where its dtype is the result's)
    dw = dw.to(dtype)
    for s, g in noise:
        g = g.to(dtype)
        if noise_type == "diagonal" and not isinstance(s, torch.Tensor):
            res.addcmul_(g, dw, value=s)
        else:
            axpy_(res, noise_prod(g, dw, noise_type), s)
    return res if out is None or direct else write_out(out, res)


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

    operands = [*(t for _, t in terms), *(g for _, g in diffusion), noise]
    c0, t0 = terms[0]
    dtype = result_dtype(*operands)
    if out is not None:  # accumulated in out where it shares no memory with the operands (else copied in)
        if dtype in _HALF and out.dtype == dtype:  # summed in float32 apart, rounded once as it is copied in
            return write_out(out, combine([(c, _f32(t)) for c, t in terms], [(s, _f32(g)) for s, g in diffusion],
                                          _f32(noise), rowwise, key))
        if not _direct(out, dtype, t0.shape, operands, [c for c, _ in terms + list(diffusion)]):
            return write_out(out, combine(terms, diffusion, noise, rowwise, key))
        if t0.dtype == dtype and not isinstance(c0, torch.Tensor) and c0 == 1:
            _accumulate(t0, terms[1:], out)
        else:  # (the first term widened first, as t0.to(dtype) * c0 is, then scaled)
            torch.mul(t0, c0, out=out) if t0.dtype == dtype else out.copy_(t0).mul_(c0)
            for c, k in terms[1:]:
                if not is_zero(c):
                    axpy_(out, k, c)
    elif dtype in _HALF:  # accumulate in float32, round once (as the kernel)
        return combine([(c, _f32(t)) for c, t in terms], [(s, _f32(g)) for s, g in diffusion], _f32(noise),
                       rowwise, key).to(dtype)
    elif len(terms) > 1 and not isinstance(c0, torch.Tensor) and c0 == 1:  # (x + h k: no multiply by 1)
        out = _accumulate(t0.to(dtype), terms[1:])
    else:
        out = _accumulate(t0.to(dtype) * c0, terms[1:])
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


def error_norm(y0: torch.Tensor, y1: torch.Tensor, err: torch.Tensor, rtol: float, atol: float,
               out=None) -> torch.Tensor:
    """Per-sample scaled RMS error of an embedded pair: ``sqrt(mean_i (err_i / (atol + rtol max(|y0_i|,
    |y1_i|)))^2)`` over each batch row; shape ``(batch,)``, float32 for half inputs (``out``: a preallocated
    result to write into)."""
    if out is not None:
        return write_out(out, error_norm(y0, y1, err, rtol, atol))
    acc = torch.float64 if y1.dtype == torch.float64 else torch.float32
    scale = atol + rtol * torch.maximum(y0.to(acc).abs(), y1.to(acc).abs())
    row = math.prod(y1.shape[1:])
    return (err.to(acc) / scale).pow(2).reshape(y1.shape[0], row).mean(1).sqrt()


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


def tree_leaf(t: torch.Tensor, t0: float, span: float, depth: int):
    """The leaf of the tree of ``depth`` levels on ``[t0, t0 + span]`` that holds each time ``t`` (float64,
    any shape): its index ``0 .. 2**depth - 1`` (int64) and the fraction of the leaf before ``t``."""
    scaled = ((t.to(torch.float64) - t0) / span).clamp(0.0, 1.0) * float(2 ** depth)
    leaf = scaled.floor().clamp(max=float(2 ** depth - 1)).to(torch.int64)
    return leaf, scaled - leaf.to(torch.float64)


def tree_std(span: float, depth: int, device=None) -> torch.Tensor:
    """The standard deviations of the tree's draws (float64, ``(depth + 1,)``): ``sqrt(span)`` for the root
    (``W(t1)``), then the bridge midpoint's ``sqrt(span / 2**l) / 2`` for each level ``l < depth``."""
    vals = [span ** 0.5] + [0.5 * (span / 2 ** lev) ** 0.5 for lev in range(depth)]
    # one fill per entry, not a host-to-device copy: a tree may be built inside a captured CUDA graph
    return torch.stack([torch.full((), v, dtype=torch.float64, device=device) for v in vals])


def brownian_tree(key: int, leaf: torch.Tensor, frac: torch.Tensor, rows, n_rows: int, per_row: int,
                  std: torch.Tensor, depth: int) -> torch.Tensor:
    """Specification of the virtual Brownian tree query: ``W(t) - W(t0)`` on ``[t0, t0 + span]``.

    The tree: ``W(t0 + span) = sqrt(span) z_0``; the value at the midpoint of a dyadic interval of level
    ``l`` (heap node ``2**l + j``, length ``span / 2**l``) is the mean of its ends plus
    ``sqrt(span / 2**l) / 2`` times ``z_node``; inside a leaf (level ``depth``) the value is linear in
    ``t``. That is the Lévy–Ciesielski sum, evaluated here in one pass over the levels:

        W(t) = u sqrt(span) z_0 + sum_l sqrt(span / 2**l) / 2 * hat(p_l) z_{node_l(t)},

    with ``u = (t - t0) / span``, ``p_l`` the position of ``t`` in its level-``l`` interval and
    ``hat(p) = 1 - |2p - 1|``. ``z_node`` of Brownian element ``e`` is ``tl_randn_at(key, node * 2**32 +
    e)``: a pure function of (key, node, element), so a value does not depend on what was asked before.

    ``leaf``, ``frac``: from :func:`tree_leaf`, shape ``(n_rows, 1)`` or ``(1, 1)``; ``rows``: the int64
    ``(n_rows,)`` rows queried (``None``: rows ``0 .. n_rows - 1``), each of ``per_row`` elements (element
    ``e = row * per_row + j``); ``std``: :func:`tree_std`. Returns ``(n_rows, per_row)`` float64. The
    levels are drawn a few at a time (bounded memory).
    """
    from .philox import tl_randn_at

    dev = leaf.device
    rows = torch.arange(n_rows, dtype=torch.int64, device=dev) if rows is None else rows.to(torch.int64)
    elem = rows.reshape(-1, 1) * per_row + torch.arange(per_row, dtype=torch.int64, device=dev)
    std, frac = std.to(torch.float64), frac.to(torch.float64)
    u = (leaf.to(torch.float64) + frac) / float(2 ** depth)                                     # (R|1, 1)
    w = torch.zeros(elem.shape, dtype=torch.float64, device=dev)
    chunk = max(1, (1 << 22) // max(1, elem.numel()))
    for lo in range(0, depth + 1, chunk):  # k = 0: the root (W(t1), weight u); k = l + 1: level l
        k = torch.arange(lo, min(depth + 1, lo + chunk), dtype=torch.int64, device=dev).reshape(-1, 1, 1)
        lev = (k - 1).clamp_min(0)
        below = depth - lev                                                                       # (K, 1, 1)
        node = torch.where(k == 0, 0, (leaf >> below) + (1 << lev))                               # (K, R|1, 1)
        pos = ((leaf & ((1 << below) - 1)).to(torch.float64) + frac) / (1 << below).to(torch.float64)
        coef = torch.where(k == 0, u, 1.0 - (2.0 * pos - 1.0).abs()) * std[k]                     # (K, R|1, 1)
        z = tl_randn_at(key, (node << 32) + elem).to(torch.float64)                           # (K, R, n)
        for zk in z.mul_(coef).unbind(0):
            w.add_(zk)  # level by level, elementwise: a value is bitwise the same whatever else is asked
    return w
