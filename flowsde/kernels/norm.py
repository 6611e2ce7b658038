"""The per-sample error norm of the adaptive drivers in one pass: the RMS of ``err / (atol + rtol
max(|y0|, |y1|))`` over each batch row (specification: :func:`flowsde.kernels.reference.error_norm`)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .combine import BLOCK, _block_offsets, _cdiv, _coef, _flat, _in_layout, _large, _launch, _layout, _on, _split


@triton.jit
def error_norm_kernel(out_ptr, y0_ptr, y1_ptr, e_ptr, n_rows, row, rtol_h, rtol_l, atol_h, atol_l,
                      F64: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, LARGE: tl.constexpr = 0):
    """Per sample: RMS of err / (atol + rtol max(|y0|, |y1|)) over each of ``n_rows`` rows of ``row``
    elements. A program reduces ``ROWS`` rows as a ``(ROWS, BLOCK_SIZE)`` tile, in chunks of
    ``BLOCK_SIZE`` along the row: small rows (a 2-D state) share a program instead of leaving most of
    its threads idle."""
    rows = _block_offsets(ROWS, LARGE)
    rmask = rows < n_rows
    base = rows * row
    rtol = _coef(rtol_h, rtol_l, F64)
    atol = _coef(atol_h, atol_l, F64)
    if F64:
        acc = tl.zeros((ROWS, BLOCK_SIZE), dtype=tl.float64)
    else:
        acc = tl.zeros((ROWS, BLOCK_SIZE), dtype=tl.float32)
    for start in range(0, row, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = rmask[:, None] & (cols < row)[None, :]
        idx = base[:, None] + cols[None, :]
        y0 = tl.load(y0_ptr + idx, mask=mask, other=0.0).to(acc.dtype)
        y1 = tl.load(y1_ptr + idx, mask=mask, other=0.0).to(acc.dtype)
        e = tl.load(e_ptr + idx, mask=mask, other=0.0).to(acc.dtype)
        r = e / (atol + rtol * tl.maximum(tl.abs(y0), tl.abs(y1)))
        acc += tl.where(mask, r * r, 0.0)
    tl.store(out_ptr + rows, tl.sqrt(tl.sum(acc, axis=1) / row), mask=rmask)


def error_norm(y0, y1, err, rtol: float, atol: float, out=None):
    """Launch :func:`error_norm_kernel`: the per-sample scaled RMS error, shape ``(batch,)`` (written into
    ``out`` when given: contiguous, of that shape and the accumulation dtype — float64 for float64 data,
    else float32)."""
    shape = tuple(y1.shape)
    y0, err = _on(y1.device, y0, "y0"), _on(y1.device, err, "the error estimate")
    order = _layout(y1)
    if order is not None:  # each row is still one block of memory: reduced in memory order, not copied
        y0, y1, err = (_in_layout(t, shape, order) for t in (y0, y1, err))
        shape = tuple(y1.shape)
    y0, y1, err = (_flat(t, shape) for t in (y0, y1, err))
    B = shape[0]
    row = max(1, math.prod(shape[1:]))
    acc_dtype = torch.float64 if y1.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty(B, dtype=acc_dtype, device=y1.device)
    elif tuple(out.shape) != (B,) or out.dtype != acc_dtype or not out.is_contiguous() or out.device != y1.device:
        raise ValueError(f"out must be a contiguous {acc_dtype} tensor of shape ({B},) on {y1.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if B == 0:
        return out
    if y1.numel() == 0:  # rows of no elements: the mean of nothing, as the reference gives
        return out.fill_(float("nan"))
    rh, rl = _split(rtol)
    ah, al = _split(atol)
    block = min(BLOCK, triton.next_power_of_2(row))
    rows = BLOCK // block  # about BLOCK elements per program
    _launch(error_norm_kernel, _cdiv(B, rows), [out, y0, y1, err, B, row, rh, rl, ah, al],
            dict(F64=acc_dtype == torch.float64, ROWS=rows, BLOCK_SIZE=block, LARGE=_large(y1.numel())), 4,
            out.device)
    return out
