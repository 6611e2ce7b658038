"""A plain-PyTorch mirror of Triton's counter-based generator (Philox 4x32, 10 rounds, then Box–Muller),
so the noise the kernels draw in registers can be reproduced and tested on any machine.

``philox_randn(key, n)`` equals, element by element, the noise the elementwise kernels draw for
``offset = 0 .. n-1``: four normals per Philox call, offset ``i`` lane ``i % 4`` of
``tl.randn4x(key, i // 4)`` (the integer stream exactly; the floats to rounding of log / cos / sin).
``tl_randn_at`` mirrors ``tl.randn`` (one normal per call), which the virtual Brownian tree uses.
uint32 arithmetic is emulated in int64 tensors: the product of two uint32 values is formed in int64,
where it wraps modulo 2**64 (two's complement), so its low and high 32-bit halves are exact.
"""
from __future__ import annotations

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_MASK = (1 << 63) - 1  # kernel keys are passed as int64 scalars


def _mul_hi_lo(a: int, b: torch.Tensor):
    """High and low 32 bits of ``a * b`` for a uint32 constant ``a`` and uint32 values ``b`` (int64): the
    64-bit product wraps in int64 but keeps its bits, and an arithmetic shift then a mask reads the top half."""
    p = b * a
    return (p >> 32) & _M32, p & _M32


def philox4x32(key, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               rounds: int = 10):
    """Philox-4x32 with a 64-bit key (an int or a 0-dim int64 tensor) on counters given as int64 tensors
    holding uint32 values."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) map: reinterpret as int32, fold negatives with ``~``, scale, in float32."""
    s = torch.where(x >= 2 ** 31, x - 2 ** 32, x)
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * 4.6566127342e-10


def philox_randint(key, n: int, device="cpu", start: int = 0):
    """The four uint32 streams (as int64) of ``tl.randint4x(key, offset)`` for ``offset = start ..
    start + n - 1``.

    ``key``: an int, or a 0-dim int64 tensor (read on the device, never on the host)."""
    return philox_randint_at(key, torch.arange(start, start + n, dtype=torch.int64, device=device))


def philox_randint_at(key, offsets: torch.Tensor):
    """``tl.randint4x(key, offsets)`` for any int64 ``offsets`` (non-negative): the low 32 bits of an
    offset are Philox's first counter word and the high bits its second, as in Triton."""
    zero = torch.zeros_like(offsets)
    # a host key is masked to the int64 the kernels are passed; a device key is used with all its 64 bits,
    # as the kernels read it (its high word by an arithmetic shift and a mask: the same bits)
    key = key if isinstance(key, torch.Tensor) else int(key) & KEY_MASK
    return philox4x32(key, offsets & _M32, (offsets >> 32) & _M32, zero, zero)


def philox_randn(key, n: int, device="cpu", start: int = 0) -> torch.Tensor:
    """The kernels' noise stream for ``offset = start .. start + n - 1``: float32 standard normals, four
    from each Philox call (see :func:`philox_randn_at`). Any slice of the stream can be drawn alone: how
    sharded studies share one path. Each counter of the slice is evaluated once."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    c0, c1 = start >> 2, (start + n - 1) >> 2
    counters = torch.arange(c0, c1 + 1, dtype=torch.int64, device=device)
    lanes = _four_normals(*philox_randint_at(key, counters))
    return torch.stack(lanes, dim=-1).reshape(-1)[start - 4 * c0:start - 4 * c0 + n]


def philox_randn_at(key, offsets: torch.Tensor) -> torch.Tensor:
    """The kernels' noise at any int64 ``offsets`` (non-negative; shape kept): float32 standard normals.

    Offset ``i`` is lane ``i % 4`` of the Philox call at counter ``i // 4`` (``tl.randn4x(key, i // 4)`` in
    a kernel): with that call's four uniforms ``u0 .. u3``, lanes 0 and 1 are the Box–Muller pair
    ``r cos(th), r sin(th)`` of ``(u0, u1)`` (``r = sqrt(-2 log max(u0, 1e-7))``, ``th = 2 pi u1``), lanes
    2 and 3 that of ``(u2, u3)``. One Philox-4x32 call and two logarithms give four normals, where
    ``tl.randn`` spends a call and a logarithm on each.

    The uniforms and ``th`` are Triton's float32 values exactly; log, sqrt, cos and sin run in float64 and
    the result is rounded once to float32, so a value does not depend on how many others are drawn with
    it (PyTorch's vectorised and scalar float32 log / cos differ in the last bit)."""
    ints = philox_randint_at(key, offsets >> 2)
    lane = offsets & 3
    first = lane < 2
    a, b = torch.where(first, ints[0], ints[2]), torch.where(first, ints[1], ints[3])
    r, th = _polar(a, b)
    return torch.where(lane % 2 == 0, r * torch.cos(th), r * torch.sin(th)).to(torch.float32)


def _polar(a: torch.Tensor, b: torch.Tensor):
    """Box–Muller's radius and angle (float64) from two uint32 streams, as ``pair_uniform_to_normal``:
    ``u0`` clamped at 1e-7, ``th`` the float32 product ``float32(2 pi) * u1``."""
    u0 = torch.clamp(_uniform(a), min=1.0e-7).to(torch.float64)
    th = (_uniform(b) * _TWO_PI_F32).to(torch.float64)
    return torch.log(u0).mul_(-2.0).sqrt_(), th


_TWO_PI_F32 = float(np.float32(6.283185307179586))


def _four_normals(i0, i1, i2, i3):
    """The four lanes of :func:`philox_randn_at` for one Philox call's outputs."""
    out = []
    for a, b in ((i0, i1), (i2, i3)):
        r, th = _polar(a, b)
        out += [(r * torch.cos(th)).to(torch.float32), (r * torch.sin(th)).to(torch.float32)]
    return out


def tl_randn_at(key, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(key, offsets)``: one normal per Philox call (the first of its Box–Muller pair), float32,
    for any int64 ``offsets`` (shape kept). The virtual Brownian tree draws its node normals this way.

    The uniforms are Triton's float32 values exactly; log, cos and sqrt run in float64 (``th`` too: the
    tree's kernel forms it in float64) and the result is rounded once to float32."""
    i1, i2, _, _ = philox_randint_at(key, offsets)
    u1 = torch.clamp(_uniform(i1), min=1.0e-7).to(torch.float64)
    th = _uniform(i2).to(torch.float64).mul_(_TWO_PI_F32)
    return torch.log(u1).mul_(-2.0).sqrt_().mul_(torch.cos(th)).to(torch.float32)
