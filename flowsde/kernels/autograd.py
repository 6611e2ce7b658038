"""Autograd for the fused combine kernel: the forward is one launch of
:func:`flowsde.kernels.combine.combine`, the backward its adjoint in PyTorch ops.

``out = sum_i c_i t_i + (sum_j s_j g_j) z`` is linear in each ``t_i`` and bilinear in ``(g_j, z)``, so
with ``G`` the gradient of ``out``:

- ``dt_i = c_i G`` (summed over the dimensions ``t_i`` was broadcast along),
- ``dg_j = s_j z G`` (``z`` the given noise, or the Philox stream drawn again from its key),
- ``dz = (sum_j s_j g_j) G`` (given noise only; summed along the row for scalar noise).

Forward mode (``jvp``, for ``torch.autograd.forward_ad`` dual tensors) is the same linear map pushed the
other way: ``d out = sum c_i dt_i + (sum s_j dg_j) z + (sum s_j g_j) dz``.

The backward is written in differentiable PyTorch ops on the saved operands, so it differentiates again
(``create_graph=True``: Hessian-vector products, Milstein-style double backward) like the PyTorch ops the
reference backend records. Arithmetic is in float32 for half types and in the operands' own dtype
otherwise, as the kernel's; every gradient is returned in its input's dtype.
"""
from __future__ import annotations

import torch


def _acc_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _reduce(grad, shape, dtype):
    """``grad`` (the result's shape) summed to ``shape``, the operand's, which was broadcast to the result
    (an operand with the result's element count is read reshaped, as the kernel reads it)."""
    if grad.numel() == shape.numel():
        return grad.reshape(shape).to(dtype)
    return grad.sum_to_size(shape).to(dtype)


class _FusedCombine(torch.autograd.Function):
    """``apply(spec, *tensors)``: ``spec`` holds the host coefficients, the layout and the Philox key (an
    int or a 0-dim int64 tensor: never differentiated); ``tensors`` are the terms, then the diffusion
    values (not the unit one), then the noise tensor when one is given. Reverse mode (``backward``) and
    forward mode (``jvp``: ``torch.autograd.forward_ad`` dual tensors)."""

    @staticmethod
    def forward(spec, *tensors):
        from . import combine as _c
        cs, ss, unit, rowwise, has_noise, key, dtype = spec
        ts, gs, noise = _split(spec, tensors)
        diffusion = [(ss[0], None)] if unit else list(zip(ss, gs))
        return _c.combine(list(zip(cs, ts)), diffusion, noise, rowwise, key, dtype=dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, tensors = inputs[0], inputs[1:]
        ts, gs, noise = _split(spec, tensors)
        ctx.spec = spec
        ctx.terms = [(t.shape, t.dtype) for t in ts]
        ctx.out_shape, ctx.out_dtype = output.shape, output.dtype
        saved = (*gs, *(() if noise is None else (noise,)))
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad):
        cs, ss, unit, rowwise, has_noise, key, _ = ctx.spec
        gs, noise = _saved(ctx)
        shape, acc = ctx.out_shape, _acc_dtype(ctx.out_dtype)
        needs = ctx.needs_input_grad[1:]
        need_g, need_z = needs[len(cs):len(cs) + len(gs)], has_noise and needs[-1]
        g = grad.to(acc)
        grads = [_reduce(g if c == 1.0 else g * c, *like) if need else None  # (the state: G itself)
                 for c, like, need in zip(cs, ctx.terms, needs)]
        if any(need_g):
            gz = g * _z(noise, key, shape, rowwise, acc, grad.device)
            grads += [_reduce(gz * s, d.shape, d.dtype) if need else None for s, d, need in zip(ss, gs, need_g)]
        else:
            grads += [None] * len(gs)
        if need_z:
            dz = g * _scale(ss, gs, shape, acc)
            if rowwise:  # one value per batch row: summed along it
                dz = dz.flatten(1).sum(1) if dz.dim() > 1 else dz
            grads.append(_reduce(dz, noise.shape, noise.dtype))
        elif has_noise:
            grads.append(None)
        return (None, *grads)

    @staticmethod
    def jvp(ctx, _spec_tangent, *tangents):
        """``d out = sum c_i dt_i + (sum s_j dg_j) z + (sum s_j g_j) dz``, in the result's shape and dtype."""
        cs, ss, unit, rowwise, has_noise, key, _ = ctx.spec
        gs, noise = _saved(ctx)
        shape, acc = ctx.out_shape, _acc_dtype(ctx.out_dtype)
        device = next(t for t in tangents if t is not None).device
        out = torch.zeros(shape, dtype=acc, device=device)
        dts, dgs = tangents[:len(cs)], tangents[len(cs):len(cs) + len(gs)]
        for c, dt in zip(cs, dts):
            if dt is not None:
                out = out + _spread(dt, shape).to(acc) * c
        if any(dg is not None for dg in dgs):
            dscale = sum(_spread(dg, shape).to(acc) * s for s, dg in zip(ss, dgs) if dg is not None)
            out = out + dscale * _z(noise, key, shape, rowwise, acc, device)
        if has_noise and tangents[-1] is not None:
            dz = tangents[-1].to(acc)
            out = out + _scale(ss, gs, shape, acc) * (_per_row(dz, shape) if rowwise else dz)
        return out.to(ctx.out_dtype)


def _split(spec, tensors):
    """``(terms, diffusion values, noise or None)`` of ``apply``'s tensors."""
    cs, ss, unit, _, has_noise, _, _ = spec
    nt, ng = len(cs), 0 if unit else len(ss)
    return tensors[:nt], tensors[nt:nt + ng], (tensors[nt + ng] if has_noise else None)


def _saved(ctx):
    saved = ctx.saved_tensors
    has_noise = ctx.spec[4]
    return saved[:len(saved) - int(has_noise)], (saved[-1] if has_noise else None)


def _spread(t, shape):
    """An operand as the kernel reads it against the result's ``shape``: reshaped when it has the result's
    element count, else broadcast."""
    return t.reshape(shape) if t.numel() == shape.numel() else t


def _per_row(z, shape):
    """One value per batch row, laid out to broadcast along the row."""
    return z.reshape((shape[0],) + (1,) * (len(shape) - 1)) if len(shape) else z.reshape(())


def _z(noise, key, shape, rowwise, dtype, device):
    """The noise the forward multiplied in, broadcastable to ``shape``: the given tensor, or the Philox
    stream drawn again."""
    z = noise.to(dtype) if noise is not None else _philox(key, shape, rowwise, dtype, device)
    return _per_row(z, shape) if rowwise else z


def _scale(ss, gs, shape, dtype):
    """``sum_j s_j g_j`` (``s_0`` alone for the unit diffusion)."""
    if not gs:
        return ss[0]
    return sum(_spread(d, shape).to(dtype) * s for s, d in zip(ss, gs))


def _philox(key, shape, rowwise, dtype, device):
    """The Philox normals the forward drew (the kernel's own stream, :func:`flowsde.kernels.combine.randn`):
    one per element, or one per batch row when ``rowwise``."""
    from . import combine as _c
    return _c.randn(key, (shape[0],) if rowwise else tuple(shape), dtype, device)


def combine(terms, diffusion=(), noise=None, rowwise: bool = False, key=0, *, dtype=None):
    """:func:`flowsde.kernels.combine.combine` (no ``out=``; ``dtype`` the result's) recorded by autograd."""
    cs = tuple(float(c) for c, _ in terms)
    ss = tuple(float(s) for s, _ in diffusion)
    unit = len(diffusion) == 1 and diffusion[0][1] is None
    tensors = [t for _, t in terms] + ([] if unit else [g for _, g in diffusion])
    has_noise = bool(diffusion) and noise is not None
    if has_noise:
        tensors.append(noise)
    if isinstance(key, torch.Tensor):  # a key in device memory may be rewritten (the next step's) before the
        key = key.clone()              # backward draws the stream again: keep this step's (8 bytes, no sync)
    return _FusedCombine.apply((cs, ss, unit, bool(rowwise), has_noise, key, dtype), *tensors)
