"""Additive and general noise in one pass: ``y + sum c f + sum s (G dW)`` with a ``(batch, d, m)`` diffusion
matrix ``G``, the drift terms folded in and ``dW`` read from a tensor or drawn in registers
(specification: :func:`flowsde.kernels.reference.sde_update`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .combine import (CONFIG, _block_offsets, _cdiv, _flat, _group, _large, _launch, _on, _row_normals, _split,
                      _term, _unaliased, _zeros)
from .philox import KEY_MASK


@triton.jit
def matrix_noise_kernel(out_ptr, y_ptr, f0_ptr, f1_ptr, g0_ptr, g1_ptr, dw_ptr, key,
                        hy, ly, h0, l0, h1, l1, s0h, s0l, s1h, s1l, n, d, m,
                        NF: tl.constexpr, NG: tl.constexpr, NOISE: tl.constexpr, F64: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, LARGE: tl.constexpr = 0, GROUP: tl.constexpr = 1):
    """Additive / general noise in one pass: ``out[b, i] = cy y + sum_k c_k f_k + sum_j (s0 G0 + s1 G1)[b, i, j]
    dW[b, j]`` with ``dW`` read from a ``(batch, m)`` tensor (``NOISE == 1``) or drawn as the Philox stream
    at ``b m + j`` (``NOISE == 2``: the Philox stream laid out like the ``(batch, m)`` increments)."""
    offs = _block_offsets(BLOCK_SIZE, LARGE)
    mask = offs < n
    acc = _term(_zeros(BLOCK_SIZE, F64), y_ptr, offs, mask, hy, ly, F64)
    if NF > 0:
        acc = _term(acc, f0_ptr, offs, mask, h0, l0, F64)
    if NF > 1:
        acc = _term(acc, f1_ptr, offs, mask, h1, l1, F64)
    b = offs // d
    for j in range(m):
        gidx = offs * m + j
        gz = _term(_zeros(BLOCK_SIZE, F64), g0_ptr, gidx, mask, s0h, s0l, F64)
        if NG > 1:
            gz = _term(gz, g1_ptr, gidx, mask, s1h, s1l, F64)
        if NOISE == 1:
            z = tl.load(dw_ptr + b * m + j, mask=mask, other=0.0)
        else:
            z = _row_normals(key, d, m, j, BLOCK_SIZE, GROUP, LARGE)
        if F64:
            acc = acc + gz * z.to(tl.float64)
        else:
            acc = acc + gz * z.to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def matrix_noise_update(y, terms, diffusion, dw=None, key: int = 0, out=None):
    """Launch :func:`matrix_noise_kernel`: ``y + sum c f + sum s (G dW)`` for ``y`` of shape ``(batch, d)``,
    ``terms`` ``[(c, f)]`` (0 to 2), ``diffusion`` ``[(s, G)]`` (1 or 2; ``G`` of shape ``(batch, d, m)``),
    ``dw`` the ``(batch, m)`` increments or ``None`` to draw the Philox stream at ``b m + j``. ``out``: a
    preallocated contiguous ``(batch, d)`` result of the result's dtype (it may be ``y`` or a drift term;
    a matrix or the increments it overlaps are copied first)."""
    if y.dim() != 2 or len(terms) > 2 or not 1 <= len(diffusion) <= 2:
        raise ValueError("matrix_noise_update takes y (batch, d), 0..2 drift terms and 1..2 diffusion matrices")
    B, d = y.shape
    terms = [(c, _on(y.device, f, "a term")) for c, f in terms]
    diffusion = [(s, _on(y.device, g, "a diffusion matrix")) for s, g in diffusion]
    dw = None if dw is None else _on(y.device, dw, "the noise")
    m = diffusion[0][1].shape[-1]
    ys = _flat(y, (B, d))
    fs = [_flat(f, (B, d)) for _, f in terms]
    gs = [_flat(g, (B, d, m)) for _, g in diffusion]
    cs = [_split(float(c)) for c, _ in terms] + [(0.0, 0.0)] * (2 - len(terms))
    ss = [_split(float(s)) for s, _ in diffusion] + [(0.0, 0.0)] * (2 - len(diffusion))
    fs, gs = fs + [ys] * (2 - len(fs)), gs + [gs[0]] * (2 - len(gs))
    noise = ys if dw is None else _flat(dw, (B, m))
    dtype = reference.result_dtype(y, *(f for _, f in terms), *(g for _, g in diffusion), dw)
    if out is None:
        out = torch.empty(ys.shape, dtype=dtype, device=ys.device)
    else:
        if tuple(out.shape) != (B, d) or out.dtype != dtype or not out.is_contiguous() or out.device != ys.device:
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape ({B}, {d}) on {ys.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        # y and the drift terms are read elementwise (out itself is safe), the matrices and increments across
        # elements (any overlap copied: mode 1)
        ys, *fs = [_unaliased(t, 0, out) for t in [ys] + fs]
        gs, noise = [_unaliased(g, 1, out) for g in gs], _unaliased(noise, 1, out)
    n = out.numel()
    blk = CONFIG["block"]
    _launch(matrix_noise_kernel, _cdiv(n, blk),
            [out, ys, fs[0], fs[1], gs[0], gs[1], noise, int(key) & KEY_MASK, *_split(1.0), *cs[0], *cs[1],
             *ss[0], *ss[1], n, d, m],
            dict(NF=len(terms), NG=len(diffusion), NOISE=2 if dw is None else 1, F64=dtype == torch.float64,
                 BLOCK_SIZE=blk, LARGE=_large(n * m), GROUP=_group(d) if dw is None else 1), CONFIG["num_warps"],
            out.device)
    return out
