"""A plain-PyTorch mirror of Triton's counter-based generator (Philox 4x32, 10 rounds, then Box–Muller),
so the noise the kernels draw in registers can be reproduced and tested on any machine.

``philox_randn(key, n)`` equals, element by element, what ``tl.randn(key, offset)`` returns for
``offset = 0 .. n-1`` inside a kernel (the integer stream exactly; the floats to rounding of log / cos).
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
    """``tl.randn(key, offset)`` for ``offset = start .. start + n - 1``: float32 standard normals
    (Box–Muller). Any slice of the stream can be drawn alone: how sharded studies share one path."""
    return philox_randn_at(key, torch.arange(start, start + n, dtype=torch.int64, device=device))


def philox_randn_at(key, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(key, offsets)`` for any int64 ``offsets`` (shape kept): float32 standard normals.

    The uniforms are Triton's float32 values exactly; log, cos and sqrt run in float64 and the result is
    rounded once to float32, so a value does not depend on how many others are drawn with it (PyTorch's
    vectorised and scalar float32 log / cos differ in the last bit)."""
    i1, i2, _, _ = philox_randint_at(key, offsets)
    u1 = torch.clamp(_uniform(i1), min=1.0e-7).to(torch.float64)
    th = _uniform(i2).to(torch.float64).mul_(float(np.float32(6.283185307179586)))
    return torch.log(u1).mul_(-2.0).sqrt_().mul_(torch.cos(th)).to(torch.float32)
