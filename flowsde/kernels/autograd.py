"""Autograd for the fused combine kernel: the forward is one launch of
:func:`flowsde.kernels.combine.combine`, the backward its adjoint in PyTorch ops.

``out = sum_i c_i t_i + (sum_j s_j g_j) z`` is linear in each ``t_i`` and bilinear in ``(g_j, z)``, so
with ``G`` the gradient of ``out``:

- ``dt_i = c_i G`` (summed over the dimensions ``t_i`` was broadcast along),
- ``dg_j = s_j z G`` (``z`` the given noise, or the Philox stream drawn again from its key),
- ``dz = (sum_j s_j g_j) G`` (given noise only; summed along the row for scalar noise).

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
    values (not the unit one), then the noise tensor when one is given."""

    @staticmethod
    def forward(ctx, spec, *tensors):
        from . import combine as _c
        cs, ss, unit, rowwise, has_noise, key = spec
        nt, ng = len(cs), 0 if unit else len(ss)
        ts, gs = tensors[:nt], tensors[nt:nt + ng]
        noise = tensors[nt + ng] if has_noise else None
        diffusion = [(ss[0], None)] if unit else list(zip(ss, gs))
        out = _c.combine(list(zip(cs, ts)), diffusion, noise, rowwise, key)
        ctx.spec = spec
        ctx.terms = [(t.shape, t.dtype) for t in ts]
        ctx.save_for_backward(*gs, *(() if noise is None else (noise,)))
        ctx.out_shape, ctx.out_dtype = out.shape, out.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        cs, ss, unit, rowwise, has_noise, key = ctx.spec
        saved = ctx.saved_tensors
        gs = saved[:len(saved) - int(has_noise)]
        noise = saved[-1] if has_noise else None
        shape, acc = ctx.out_shape, _acc_dtype(ctx.out_dtype)
        needs = ctx.needs_input_grad[1:]
        need_g, need_z = needs[len(cs):len(cs) + len(gs)], has_noise and needs[-1]
        g = grad.to(acc)
        grads = [_reduce(g if c == 1.0 else g * c, *like) if need else None  # (the state: G itself)
                 for c, like, need in zip(cs, ctx.terms, needs)]
        if any(need_g):
            z = noise.to(acc) if noise is not None else _philox(key, shape, rowwise, acc, grad.device)
            gz = g * (z.reshape((shape[0],) + (1,) * (len(shape) - 1)) if rowwise else z)
            grads += [_reduce(gz * s, d.shape, d.dtype) if need else None for s, d, need in zip(ss, gs, need_g)]
        else:
            grads += [None] * len(gs)
        if need_z:
            scale = sum((d.reshape(shape) if d.numel() == g.numel() else d).to(acc) * s for s, d in zip(ss, gs)) \
                if gs else ss[0]
            dz = g * scale
            grads.append(_reduce(dz.reshape(shape[0], -1).sum(1) if rowwise else dz, noise.shape, noise.dtype))
        elif has_noise:
            grads.append(None)
        return (None, *grads)


def _philox(key, shape, rowwise, dtype, device):
    """The Philox normals the forward drew (the kernel's own stream, :func:`flowsde.kernels.combine.randn`):
    one per element, or one per batch row when ``rowwise``."""
    from . import combine as _c
    return _c.randn(key, (shape[0],) if rowwise else tuple(shape), dtype, device)


def combine(terms, diffusion=(), noise=None, rowwise: bool = False, key=0):
    """:func:`flowsde.kernels.combine.combine` (no ``out=``) recorded by autograd."""
    cs = tuple(float(c) for c, _ in terms)
    ss = tuple(float(s) for s, _ in diffusion)
    unit = len(diffusion) == 1 and diffusion[0][1] is None
    tensors = [t for _, t in terms] + ([] if unit else [g for _, g in diffusion])
    has_noise = bool(diffusion) and noise is not None
    if has_noise:
        tensors.append(noise)
    if isinstance(key, torch.Tensor):  # a key in device memory may be rewritten (the next step's) before the
        key = key.clone()              # backward draws the stream again: keep this step's (8 bytes, no sync)
    return _FusedCombine.apply((cs, ss, unit, bool(rowwise), has_noise, key), *tensors)
