"""The virtual Brownian tree query in one Triton pass: ``W(t) - W(t0)`` for every queried element, the
Lévy–Ciesielski sum over the tree's ``depth`` levels accumulated in registers, each level's normal drawn
in the kernel from Philox at offset ``node * 2**32 + element`` (see
:func:`flowsde.kernels.reference.brownian_tree`, its specification). A query reads a leaf index and fraction per row and writes the values: nothing else
touches memory, and the times never leave the device.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .combine import CONFIG, _block_offsets, _cdiv, _large, _launch


@triton.jit
def _normal(key, offset):
    """The tree's normal: ``tl.randn``'s Box–Muller on the same Philox uniforms, with log / cos / sqrt in
    float64 and one rounding to float32 (as :func:`flowsde.kernels.philox.tl_randn_at`), so the
    values match the PyTorch specification bit for bit, not only to float32 rounding."""
    i1, i2, _, _ = tl.randint4x(key, offset)
    u1 = tl.maximum(1.0e-7, tl.random.uint_to_uniform_float(i1)).to(tl.float64)
    th = tl.random.uint_to_uniform_float(i2).to(tl.float64) * 6.2831854820251465  # float32(2 pi), exact
    return (tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(th)).to(tl.float32).to(tl.float64)


@triton.jit
def tree_kernel(out_ptr, leaf_ptr, frac_ptr, rows_ptr, std_ptr, key, n, per_row, depth,
                PER_ROW_TIME: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, LARGE: tl.constexpr = 0):
    """``out[r, j] = W(t_r)`` of Brownian element ``rows[r] * per_row + j`` (``rows[r] = r`` without
    ``ROWS``); ``leaf`` / ``frac`` per row (``PER_ROW_TIME``) or one for all; ``std[0]`` is ``sqrt(span)``
    and ``std[1 + l]`` the bridge's standard deviation at level ``l``, ``sqrt(span / 2**l) / 2``."""
    offs = _block_offsets(BLOCK_SIZE, LARGE)
    mask = offs < n
    r = offs // per_row
    if ROWS:
        row = tl.load(rows_ptr + r, mask=mask, other=0)
    else:
        row = r.to(tl.int64)
    e = row * per_row + (offs % per_row)
    if PER_ROW_TIME:
        leaf = tl.load(leaf_ptr + r, mask=mask, other=0)
        frac = tl.load(frac_ptr + r, mask=mask, other=0.0)
    else:
        leaf = tl.load(leaf_ptr + r * 0, mask=mask, other=0)
        frac = tl.load(frac_ptr + r * 0, mask=mask, other=0.0)
    u = (leaf.to(tl.float64) + frac) / (1 << depth).to(tl.float64)
    w = _normal(key, e) * (u * tl.load(std_ptr))
    for lev in range(depth):
        below = depth - lev
        node = (leaf >> below) + (1 << lev)
        pos = ((leaf & ((1 << below) - 1)).to(tl.float64) + frac) / (1 << below).to(tl.float64)
        coef = (1.0 - tl.abs(2.0 * pos - 1.0)) * tl.load(std_ptr + 1 + lev)
        w += _normal(key, (node << 32) + e) * coef
    tl.store(out_ptr + offs, w, mask=mask)


def brownian_tree(key: int, leaf, frac, rows, n_rows: int, per_row: int, std, depth: int):
    """Launch :func:`tree_kernel`: ``(n_rows, per_row)`` float64 values. ``leaf`` (int64) and ``frac``
    (float64): ``(n_rows, 1)`` or ``(1, 1)``; ``rows``: int64 ``(n_rows,)`` or ``None`` for rows
    ``0 .. n_rows - 1``; ``std``: the float64 ``(depth + 1,)`` table of :func:`tree_kernel`."""
    import torch

    dev = leaf.device
    out = torch.empty((n_rows, per_row), dtype=torch.float64, device=dev)
    n = out.numel()
    if n == 0:
        return out
    leaf_c, frac_c = leaf.reshape(-1).contiguous(), frac.reshape(-1).to(torch.float64).contiguous()
    rows_c = leaf_c if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
    blk = CONFIG["block"]
    _launch(tree_kernel, _cdiv(n, blk),
            [out, leaf_c, frac_c, rows_c, std, int(key), n, per_row, int(depth)],
            dict(PER_ROW_TIME=leaf_c.numel() > 1 or n_rows == 1, ROWS=rows is not None, BLOCK_SIZE=blk,
                 LARGE=_large(n)),
            CONFIG["num_warps"], out.device, enable_fp_fusion=False)  # no FMA: the spec's roundings
    return out
