"""The whole-trajectory kernel for linear SDEs ``dX = (a X + b) dt + (c X + d) dW``: every Euler–Maruyama
step in one launch, the state in registers, the noise drawn in the kernel, only the saved times written
(specification: :func:`flowsde.kernels.reference.linear_trajectory`; driver:
:func:`flowsde.solve_linear_sde`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .combine import BLOCK, _block_normals, _block_offsets, _cdiv, _large, _on_device


@triton.jit
def linear_trajectory_kernel(out_ptr, x0_ptr, coef_ptr, key_ptr, slot_ptr, n, steps,
                             F64: tl.constexpr, BLOCK_SIZE: tl.constexpr, LARGE: tl.constexpr = 0):
    """All Euler–Maruyama steps of ``dX = (a X + b) dt + (c X + d) dW`` in one launch: the state stays in
    registers, the noise is the Philox stream of ``key_k`` at the element (:func:`_block_normals`), the
    state is written only at the saved steps. ``coef`` holds ``(a, b, c, d, h)`` per step (float64), ``slot[k]`` the output row after step k or -1."""
    offs = _block_offsets(BLOCK_SIZE, LARGE)
    mask = offs < n
    if F64:
        x = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        x = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in range(steps):
        a = tl.load(coef_ptr + 5 * k).to(x.dtype)
        b = tl.load(coef_ptr + 5 * k + 1).to(x.dtype)
        c = tl.load(coef_ptr + 5 * k + 2).to(x.dtype)
        d = tl.load(coef_ptr + 5 * k + 3).to(x.dtype)
        h = tl.load(coef_ptr + 5 * k + 4).to(x.dtype)
        key = tl.load(key_ptr + k)
        slot = tl.load(slot_ptr + k)
        z = _block_normals(key, BLOCK_SIZE, LARGE).to(x.dtype)
        x = x + (a * x + b) * h + (c * x + d) * tl.sqrt(h) * z
        rows = offs * 0 + slot  # the output row, as a block (-1: not saved)
        tl.store(out_ptr + rows * n + offs, x.to(out_ptr.dtype.element_ty), mask=mask & (rows >= 0))


def linear_trajectory(x0, coef, keys, slots, n_out):
    """Launch :func:`linear_trajectory_kernel`; ``coef`` is ``(steps, 5)`` float64, ``keys`` and ``slots``
    are ``(steps,)`` int64 (all on the device). Returns ``(n_out, *x0.shape)``."""
    x0c = x0 if x0.is_contiguous() else x0.contiguous()
    out = torch.empty((n_out,) + tuple(x0.shape), dtype=x0.dtype, device=x0.device)
    n = x0c.numel()
    with _on_device(out.device):
        linear_trajectory_kernel[(_cdiv(n, BLOCK),)](out, x0c, coef, keys, slots, n, coef.shape[0],
                                                     F64=x0.dtype == torch.float64, BLOCK_SIZE=BLOCK,
                                                     LARGE=_large(n, out.numel()))
    return out
