"""The fused Triton kernel behind every step: one pass over memory computing

    out = sum_i c_i * t_i  +  (sum_j s_j * g_j) * z

with up to six terms ``t_i`` (the state, stage derivatives, model outputs), up to two diffusion values
``g_j`` and a noise ``z`` that is read from a tensor (a user's Brownian increments) or drawn in registers
by Philox keyed by ``(key, element)`` (``key`` encodes ``(seed, step)``; four normals per Philox call,
:func:`_block_normals`). Scalar noise shares one draw per batch row (``ROWWISE``).

Every step family is this kernel with other coefficients, computed on the host in float64:
ODE stage inputs and updates (``y + h sum a_ij k_j``), Euler–Maruyama and stochastic Heun updates, the
DDIM-equivalent step (the prediction-type conversion and classifier-free guidance are affine in the
model outputs, so they fold into the coefficients of ``x``, ``out_cond`` and ``out_uncond``, plus the eta
noise), and the SDE-extension drift fused into the Euler–Maruyama update. Python floats reach Triton
as float32, so each float64 coefficient travels as a float32 pair (hi + lo, ~48 bits); half types
accumulate in float32, float64 in float64.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024
# elements per program and warps per program of the elementwise kernels (combine, randn); tuned on an
# H100 with benchmarks/gpu_kernels.py --tune (see benchmarks/RESULTS.md)
CONFIG = {"block": 1024, "num_warps": 4}
MAX_TERMS = 6
MAX_NOISE = 2


@triton.jit
def _coef(hi, lo, F64: tl.constexpr):
    if F64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def _zeros(BLOCK_SIZE: tl.constexpr, F64: tl.constexpr):
    if F64:
        return tl.zeros((BLOCK_SIZE,), dtype=tl.float64)
    else:
        return tl.zeros((BLOCK_SIZE,), dtype=tl.float32)


@triton.jit
def _block_offsets(BLOCK_SIZE: tl.constexpr, LARGE: tl.constexpr):
    """This program's ``BLOCK_SIZE`` consecutive indices, in int64 when ``LARGE`` (an indexed tensor of
    2^31 elements or more, where int32 indices would wrap)."""
    pid = tl.program_id(0)
    if LARGE:
        pid = pid.to(tl.int64)
    return pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)


@triton.jit
def _block_normals(key, BLOCK_SIZE: tl.constexpr, LARGE: tl.constexpr):
    """The noise of this program's elements (:func:`_block_offsets`): element ``i`` is lane ``i % 4`` of
    the Philox call at counter ``i // 4``, ``tl.randn4x(key, i // 4)`` — one Philox-4x32 call and two
    Box–Muller pairs make four normals (``tl.randn`` spends a call and a logarithm on each). Mirrored by
    :func:`flowsde.kernels.philox.philox_randn_at`."""
    n0, n1, n2, n3 = tl.randn4x(key, _block_offsets(BLOCK_SIZE // 4, LARGE))
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def _normal_at(key, idx):
    """The noise at any (non-negative) offsets ``idx``: the same stream as :func:`_block_normals`, one
    element at a time (a draw per batch row, the ``(batch, m)`` increments of matrix noise)."""
    i0, i1, i2, i3 = tl.randint4x(key, idx // 4)
    lane = idx % 4
    first = lane < 2
    u0 = tl.random.uint_to_uniform_float(tl.where(first, i0, i2))
    u1 = tl.random.uint_to_uniform_float(tl.where(first, i1, i3))
    c, s = tl.random.pair_uniform_to_normal(u0, u1)
    return tl.where(lane % 2 == 0, c, s)


@triton.jit
def _row_normals(key, row, m, j, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, LARGE: tl.constexpr):
    """Per element of this program's block: the noise at ``(element // row) m + j`` — one draw per batch
    row of ``row`` elements (``m`` draws per row, this is the ``j``-th). When ``GROUP`` (1, 2 or 4)
    divides ``row``, each run of ``GROUP`` consecutive elements lies in one row: the draw is made once per
    run and spread over it in registers (``tl.interleave``), not once per element."""
    start = _block_offsets(BLOCK_SIZE // GROUP, LARGE) * GROUP  # the first element of each run
    z = _normal_at(key, (start // row) * m + j)
    if GROUP >= 2:
        z = tl.interleave(z, z)
    if GROUP >= 4:
        z = tl.interleave(z, z)
    return z


@triton.jit
def _index(offs, row, MODE: tl.constexpr):
    """Where element ``offs`` of the result reads an operand: itself (``MODE`` 0, a full tensor), its batch
    row (1: one value per row, broadcast along it) or the one value (2: a scalar broadcast everywhere)."""
    if MODE == 1:
        return offs // row
    elif MODE == 2:
        return offs * 0
    else:
        return offs


@triton.jit
def _term(acc, ptr, offs, mask, hi, lo, F64: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if F64:
        return acc + _coef(hi, lo, F64) * x.to(tl.float64)
    else:
        return acc + _coef(hi, lo, F64) * x.to(tl.float32)


@triton.jit
def combine_kernel(out_ptr, p0, p1, p2, p3, p4, p5,
                   h0, l0, h1, l1, h2, l2, h3, l3, h4, l4, h5, l5,
                   g0, g1, sh0, sl0, sh1, sl1, dw_ptr, key, n, row,
                   NT: tl.constexpr, NG: tl.constexpr, NOISE: tl.constexpr, ROWWISE: tl.constexpr,
                   UNIT: tl.constexpr, F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   B0: tl.constexpr = 0, B1: tl.constexpr = 0, B2: tl.constexpr = 0, B3: tl.constexpr = 0,
                   B4: tl.constexpr = 0, B5: tl.constexpr = 0, BG0: tl.constexpr = 0, BG1: tl.constexpr = 0,
                   LARGE: tl.constexpr = 0, GROUP: tl.constexpr = 1):
    """``out = sum_{i<NT} c_i p_i + (sum_{j<NG} s_j g_j) z`` over ``n`` elements (see the module doc);
    ``B<i>`` / ``BG<j>``: how each operand is laid out (:func:`_index`: full, per row of ``row``
    elements, or one scalar), so a broadcast operand is read where it lies instead of copied out;
    ``GROUP``: drawn scalar noise is drawn once per ``GROUP`` elements (:func:`_row_normals`)."""
    offs = _block_offsets(BLOCK_SIZE, LARGE)
    mask = offs < n
    acc = _term(_zeros(BLOCK_SIZE, F64), p0, _index(offs, row, B0), mask, h0, l0, F64)
    if NT > 1:
        acc = _term(acc, p1, _index(offs, row, B1), mask, h1, l1, F64)
    if NT > 2:
        acc = _term(acc, p2, _index(offs, row, B2), mask, h2, l2, F64)
    if NT > 3:
        acc = _term(acc, p3, _index(offs, row, B3), mask, h3, l3, F64)
    if NT > 4:
        acc = _term(acc, p4, _index(offs, row, B4), mask, h4, l4, F64)
    if NT > 5:
        acc = _term(acc, p5, _index(offs, row, B5), mask, h5, l5, F64)
    if NG > 0:
        if ROWWISE:
            nidx = offs // row
        else:
            nidx = offs
        gz = _zeros(BLOCK_SIZE, F64)
        if UNIT:
            gz = gz + _coef(sh0, sl0, F64)
        else:
            gz = _term(gz, g0, _index(offs, row, BG0), mask, sh0, sl0, F64)
        if NG > 1:
            gz = _term(gz, g1, _index(offs, row, BG1), mask, sh1, sl1, F64)
        if NOISE == 1:
            z = tl.load(dw_ptr + nidx, mask=mask, other=0.0)
        else:
            if NOISE == 3:  # the key read from device memory (a captured graph's replays see new keys)
                k = tl.load(key)
            else:
                k = key
            if ROWWISE:
                z = _row_normals(k, row, 1, 0, BLOCK_SIZE, GROUP, LARGE)
            else:
                z = _block_normals(k, BLOCK_SIZE, LARGE)
        if F64:
            acc = acc + gz * z.to(tl.float64)
        else:
            acc = acc + gz * z.to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def randn_kernel(out_ptr, key, n, KEY_IN_MEMORY: tl.constexpr, BLOCK_SIZE: tl.constexpr, LARGE: tl.constexpr = 0):
    """``out[i]`` = the noise stream at ``i`` (:func:`_block_normals`; ``key`` read from memory when
    ``KEY_IN_MEMORY``)."""
    offs = _block_offsets(BLOCK_SIZE, LARGE)
    mask = offs < n
    if KEY_IN_MEMORY:
        z = _block_normals(tl.load(key), BLOCK_SIZE, LARGE)
    else:
        z = _block_normals(key, BLOCK_SIZE, LARGE)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launch wrappers ---------------------------------------------------------------------------------

import contextlib  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import reference  # noqa: E402
from .philox import KEY_MASK  # noqa: E402

# Triton's own launch path (binding every argument, building a specialisation key) costs ~75 µs of host
# time per launch on an H100 machine (benchmarks/RESULTS.md), ~7x a PyTorch op: per-step loops are host
# bound on it. After the first launch of a specialisation, flowsde keeps the compiled kernel under its own
# key, which has everything Triton specialises on (dtypes, 16-byte alignment of every pointer, integers'
# divisibility by 16, ==1 and width; the constexprs; num_warps), and launches it directly.
# FLOWSDE_FAST_LAUNCH=0 turns this off.
FAST_LAUNCH = os.environ.get("FLOWSDE_FAST_LAUNCH", "1") != "0"
_COMPILED = {}


def _spec(a):
    if type(a) is float:
        return 0
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return "b", a
    if isinstance(a, int):
        return "i", a % 16 == 0, a == 1, -2 ** 31 <= a < 2 ** 31
    return type(a).__name__


_Tensor = torch.Tensor


def _signature(args) -> tuple:
    """``tuple(_spec(a) for a in args)``, with the two common kinds (tensors, floats) inline: this runs on
    every launch (a loop's host time per step)."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if type(a) is _Tensor else 0 if type(a) is float else _spec(a)
                  for a in args])


def _on_device(device):
    """A context making ``device`` the current CUDA device for a launch when it is another one. Triton
    launches on the current device's current stream, not on its arguments' device: a state on ``cuda:1``
    while ``cuda:0`` is current would be read by a kernel on the wrong device, unordered with the stream
    that wrote it (PyTorch's own ops switch to their tensors' device; so does flowsde)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _launch(kernel, n_programs: int, args: list, consts: dict, num_warps: int, device, sig=None, **options):
    """``kernel[(n_programs,)](*args, **consts, num_warps=num_warps, **options)`` on ``device`` (the
    output's: :func:`_on_device`), through the fast path on CUDA (``options``: compile options such as
    ``enable_fp_fusion``). ``sig``: the arguments' specialisation when the caller has it cheaper than
    :func:`_signature` (it must determine ``_signature(args)`` given ``consts``)."""
    with _on_device(device):
        _launch_here(kernel, n_programs, args, consts, num_warps, device.type == "cuda", device.index, sig, **options)


def _launch_here(kernel, n_programs, args, consts, num_warps, cuda, device_index=None, sig=None, **options):
    grid = (n_programs, 1, 1)
    if not (FAST_LAUNCH and cuda):
        kernel[grid](*args, **consts, num_warps=num_warps, **options)
        return
    values = consts.values_key if type(consts) is _Consts else tuple(consts.values())
    key = (kernel, num_warps, values, tuple(options.items()) if options else (),
           torch.cuda.current_device() if device_index is None else device_index,
           _signature(args) if sig is None else sig)
    compiled = _COMPILED.get(key)
    if compiled is None:  # Triton's path compiles (or finds) the kernel and launches it
        _COMPILED[key] = kernel[grid](*args, **consts, num_warps=num_warps, **options)
        return
    compiled[grid](*args, *values)


class _Consts(dict):
    """A kernel's constexprs (a read-only dict, in its signature's order) with their values as a tuple,
    made once: the fast launch keys on it and passes it positionally."""

    __slots__ = ("values_key",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values_key = tuple(self.values())


# indexed tensors of this many elements or more are indexed in int64 (``LARGE``); tests lower it
LARGE_NUMEL = 1 << 31


def _large(*counts) -> bool:
    return any(c >= LARGE_NUMEL for c in counts)


_F32_MAX = 3.4028234663852886e38


def _split(c: float):
    """``c`` as a float32 pair ``hi + lo`` (~48 bits), for float64 kernels (beyond float32's range: an
    infinity)."""
    if abs(c) > _F32_MAX:
        return math.copysign(math.inf, c), 0.0
    hi = float(np.float32(c))
    return hi, float(np.float32(c - hi))


def _coefficients(cs, f64: bool):
    """Kernel coefficient pairs: :func:`_split` for float64 data; for other data ``(c, 0.0)``, which the
    launch rounds to float32 as PyTorch rounds a scalar for float32 and half tensors (and, as PyTorch, a
    finite coefficient beyond float32's range is refused)."""
    if f64:
        return [_split(float(c)) for c in cs]
    for c in cs:
        if _F32_MAX < abs(c) < math.inf:
            raise ValueError(f"coefficient {c!r} overflows the float32 arithmetic of a float32 / half state")
    return [(float(c), 0.0) for c in cs]


def _group(row: int) -> int:
    """Elements per draw of per-row noise (:func:`_row_normals`): the largest of 4, 2, 1 dividing ``row``."""
    return 4 if row % 4 == 0 else (2 if row % 2 == 0 else 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _operand(t: torch.Tensor, shape):
    """``(tensor, mode)`` for a combine operand broadcast to ``shape`` without copying it out: mode 0 a
    contiguous tensor of ``shape`` (copied only when the input is laid out otherwise), 1 one value per
    batch row (``(batch, 1, ...)`` or an expanded view of one), 2 a single value."""
    if t.shape == shape and t.is_contiguous():  # (torch.Size equals a tuple)
        return t, 0
    te = t.expand(shape)
    if all(te.stride(i) == 0 or shape[i] == 1 for i in range(len(shape))):
        return te[(0,) * len(shape)].reshape(1), 2
    if len(shape) > 1 and all(te.stride(i) == 0 or shape[i] == 1 for i in range(1, len(shape))):
        rows = te[(slice(None),) + (0,) * (len(shape) - 1)]
        return (rows if rows.is_contiguous() else rows.contiguous()), 1
    return te.contiguous(), 0


def _layout(t: torch.Tensor):
    """The order of ``t``'s dimensions in memory, outermost first, when ``t`` is dense but not contiguous
    with its batch dimension outermost (``channels_last``, or any permuted layout of that kind): then
    ``t.permute(order)`` is contiguous, and the kernels run over memory in that order — each batch row
    still one block — instead of copying ``t`` out. ``None`` for a contiguous tensor, or one laid out
    otherwise (copied, as before)."""
    if t.dim() < 3 or t.is_contiguous():
        return None
    order = [0] + sorted(range(1, t.dim()), key=lambda i: -t.stride(i))
    return order if t.permute(order).is_contiguous() else None


def _in_layout(t: torch.Tensor, shape, order) -> torch.Tensor:
    """Operand ``t`` broadcast to ``shape`` (or reshaped to it: one with the result's element count) and
    viewed in the state's memory order ``order`` (:func:`_layout`): a view, never a copy — an operand laid
    out as the state is then contiguous, a broadcast one keeps its zero strides."""
    if t.dim() == 0:  # a scalar (perhaps a CPU one beside CUDA tensors, which is moved as it is)
        return t
    n = math.prod(shape)
    t = t.reshape(shape) if t.numel() == n and tuple(t.shape) != tuple(shape) else t.expand(shape)
    return t.permute(order)


def _flat(t: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous tensor of ``shape`` (broadcast and copied only where the input is not already one)."""
    if tuple(t.shape) != tuple(shape):
        t = t.expand(shape)
    return t if t.is_contiguous() else t.contiguous()


@functools.lru_cache(maxsize=512)
def _combine_consts(nt, ng, noise, rowwise, unit, f64, blk, modes, g_modes, large, group=1) -> dict:
    """The constexprs of :func:`combine_kernel`, all of them, in its signature's order (the fast launch
    passes them positionally); cached, as a loop launches the same few configurations. Read only."""
    consts = dict(NT=nt, NG=ng, NOISE=noise, ROWWISE=rowwise, UNIT=unit, F64=f64, BLOCK_SIZE=blk)
    consts.update({f"B{i}": m for i, m in enumerate(modes + (0,) * (MAX_TERMS - len(modes)))})
    consts.update({f"BG{j}": m for j, m in enumerate(g_modes)})
    consts["LARGE"] = large
    consts["GROUP"] = group
    return _Consts(consts)


def _broadcasts(a, shape) -> bool:
    """Whether a tensor of shape ``a`` broadcasts to ``shape`` (PyTorch's rule, without a result)."""
    return len(a) <= len(shape) and all(x in (1, y) for x, y in zip(a[::-1], shape[::-1]))


def _apart_or_same(t: torch.Tensor, out: torch.Tensor) -> bool:
    """For a contiguous operand of ``out``'s shape: whether the kernel may read it while writing ``out`` —
    its bytes lie apart from ``out``'s, or it is ``out`` itself (each element is read before it is written,
    by one thread)."""
    a, b = t.data_ptr(), out.data_ptr()
    if a == b:
        return t.dtype == out.dtype
    return a + t.numel() * t.element_size() <= b or b + out.numel() * out.element_size() <= a


def _unaliased(t: torch.Tensor, mode: int, out: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when the kernel would read it where ``out`` is being written: only a full
    operand that is ``out`` itself is safe (each element is read before it is written, by one thread); a
    broadcast operand or any other overlap is read by programs that run after others have written."""
    if t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        return t
    return t if mode == 0 and t.data_ptr() == out.data_ptr() and t.dtype == out.dtype else t.clone()


def _on(device, t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` if it lies on ``device``; a 0-dim CPU tensor (a scalar, which PyTorch's ops take beside
    CUDA tensors) copied there; else a ``ValueError``: a kernel would dereference another device's
    pointer (an illegal address, or garbage) where PyTorch raises."""
    if t.device == device:
        return t
    if t.dim() == 0 and t.device.type == "cpu":
        return t.to(device)
    raise ValueError(f"{what} is on {t.device} but the state is on {device}: every operand must be on one device")


def result_dtype(terms, diffusion=(), noise=None) -> torch.dtype:
    """The dtype of a combine's result: PyTorch's promotion over every tensor operand (the terms, the
    diffusion values, the given noise; :func:`flowsde.kernels.reference.result_dtype`)."""
    return reference.result_dtype(*(t for _, t in terms), *(g for _, g in diffusion), noise)


# the common call — every operand a contiguous tensor of the state's shape on its device, no ``out`` — takes
# :func:`_fast_combine`, which prepares the same launch with a fraction of the checks (a step loop's host time
# per step is this wrapper plus the launch); FLOWSDE_FAST_PATH=0 sends every call the general way
FAST_PATH = os.environ.get("FLOWSDE_FAST_PATH", "1") != "0"


def _fast_combine(terms, diffusion, noise, rowwise, key, dtype, out=None):
    """:func:`combine` for its common case, or ``None`` (then the general path runs): 1 to 6 terms, 0 to 2
    diffusion values and a noise tensor, each a contiguous tensor of the first term's shape on its device
    (a unit diffusion alone, or drawn noise: per element, or per row with ``rowwise``), and no ``out`` or
    one of that shape, contiguous, of the result's dtype, that is one of the operands or shares no memory
    with them. The launch is the one the general path makes, argument for argument (tested)."""
    like = terms[0][1]
    shape, nt, ng = like.shape, len(terms), len(diffusion)
    n = like.numel()
    if nt > MAX_TERMS or ng > MAX_NOISE or n == 0 or not like.is_contiguous() or (noise is not None and rowwise):
        return None
    dev = like.device
    ts = [like]
    for _, t in terms[1:]:
        if t.shape != shape or not t.is_contiguous() or t.device != dev:
            return None
        ts.append(t)
    unit = ng == 1 and diffusion[0][1] is None
    gs = []
    if not unit:
        for _, g in diffusion:
            if g is None or g.shape != shape or not g.is_contiguous() or g.device != dev:
                return None
            gs.append(g)
    if noise is not None and (noise.shape != shape or not noise.is_contiguous() or noise.device != dev):
        return None
    key_in_memory = isinstance(key, torch.Tensor)
    if key_in_memory and (key.dtype != torch.int64 or key.numel() != 1 or key.device != dev):
        return None
    if dtype is None:
        dtype = result_dtype(terms, diffusion, noise)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=dev)
    elif out.shape != shape or out.dtype != dtype or out.device != dev or not out.is_contiguous() or not all(
            _apart_or_same(t, out) for t in ts + gs + ([noise] if noise is not None and ng else [])):
        return None
    f64 = dtype == torch.float64
    cs = _coefficients([c for c, _ in terms], f64)
    ss = _coefficients([s for s, _ in diffusion], f64) + [(0.0, 0.0)] * (MAX_NOISE - ng)
    pad = MAX_TERMS - nt
    t0 = ts[0]
    mode = 0 if not ng else (1 if noise is not None else (3 if key_in_memory else 2))
    batch = shape[0] if shape else 1
    row = max(1, n // batch)
    kv = key if key_in_memory else int(key) & KEY_MASK
    args = [out, *ts, *([t0] * pad), *[v for hl in cs for v in hl], *([0.0] * (2 * pad)),
            gs[0] if gs else t0, gs[1] if ng == 2 and gs else t0, ss[0][0], ss[0][1], ss[1][0], ss[1][1],
            t0 if noise is None or not ng else noise, kv, n, row]
    blk = CONFIG["block"]
    consts = _combine_consts(nt, ng, mode, bool(rowwise), unit, f64, blk, (0,) * nt, (0,) * MAX_NOISE, _large(n),
                             _group(row) if rowwise and mode >= 2 else 1)
    _launch_combine(args, consts, [out, *ts, *gs] + ([noise] if noise is not None and ng else []), dev)
    return out


def combine(terms, diffusion=(), noise=None, rowwise: bool = False, key: int = 0, out=None, *, dtype=None):
    """Launch :func:`combine_kernel`: ``sum c_i t_i + (sum s_j g_j) z`` (see the module docstring).

    ``terms``: ``[(c, tensor)]`` (1 to 6; the first fixes the shape; the dtype is PyTorch's promotion
    over every operand, :func:`result_dtype`), ``diffusion``:
    ``[(s, g or None)]`` (0 to 2; ``None`` means ``g = 1``, allowed alone), ``noise``: a tensor (the
    increments: broadcastable to the result, or one value per batch row with ``rowwise``) or ``None`` to
    draw the Philox stream at element ``i`` (:func:`_block_normals`); ``key`` an int, or a 0-dim int64 tensor on the data's device that the
    kernel reads when it runs. ``out``: an optional preallocated contiguous result (it may be one of the
    inputs; an input that overlaps it otherwise is copied first), so a loop need not allocate per step;
    ``dtype``: the result's, when the caller has fixed it (else :func:`result_dtype`).

    A state laid out densely in another memory order with its batch dimension outermost (``channels_last``)
    is computed in that order, without copying the operands laid out as it (:func:`_layout`); the result
    (and an ``out`` laid out as the state) has the state's strides, as PyTorch's elementwise ops give.
    """
    if FAST_PATH:
        res = _fast_combine(terms, diffusion, noise, rowwise, key, dtype, out)
        if res is not None:
            return res
    like = terms[0][1]
    order = _layout(like)
    if order is not None and (out is None or out.stride() == like.stride()):  # run in the state's memory order
        shape = tuple(like.shape)
        n = like.numel()
        if all(_broadcasts(tuple(t.shape), shape) for _, t in terms) and all(  # (a diffusion value may be
                g is None or g.numel() == n or _broadcasts(tuple(g.shape), shape) for _, g in diffusion) and (  # reshaped)
                noise is None or rowwise or _broadcasts(tuple(noise.shape), shape)):
            dtype = result_dtype(terms, diffusion, noise) if dtype is None else dtype
            if out is None:  # laid out as the state (empty_like keeps a dense tensor's strides)
                out = torch.empty_like(like, dtype=dtype)
            if diffusion and noise is None and not rowwise:
                # the stream is defined in the logical (row-major) order, which memory order is not here:
                # drawn into a tensor first (float32, the kernel's own draws: the same values), so the
                # numbers do not depend on the layout
                noise = randn(key, shape, torch.float32, like.device)
            combine([(c, _in_layout(t, shape, order)) for c, t in terms],
                    [(s, None if g is None else _in_layout(g, shape, order)) for s, g in diffusion],
                    noise if noise is None or rowwise else _in_layout(noise, shape, order), rowwise, key,
                    out.permute(order), dtype=dtype)
            return out
    shape, dev = tuple(like.shape), like.device
    dtype = result_dtype(terms, diffusion, noise) if dtype is None else dtype
    terms = [(c, _on(dev, t, "a term")) for c, t in terms]
    diffusion = [(s, None if g is None else _on(dev, g, "a diffusion value")) for s, g in diffusion]
    noise = None if noise is None else _on(dev, noise, "the noise")
    if not 1 <= len(terms) <= MAX_TERMS or len(diffusion) > MAX_NOISE:
        raise ValueError(f"combine takes 1..{MAX_TERMS} terms and 0..{MAX_NOISE} diffusion terms")
    unit = len(diffusion) == 1 and diffusion[0][1] is None
    if any(g is None for _, g in diffusion) and not unit:
        raise ValueError("a unit diffusion (g = None) must be the only diffusion term")
    key_in_memory = isinstance(key, torch.Tensor)
    if key_in_memory and (key.dtype != torch.int64 or key.numel() != 1 or key.device != like.device):
        raise ValueError(f"a tensor key must be one int64 element on {like.device}")
    given = out is not None
    if not given:
        out = torch.empty(shape, dtype=dtype, device=dev)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.device != dev:
        raise ValueError(f"out must be a contiguous tensor of shape {shape} on {dev}")
    elif not torch.can_cast(dtype, out.dtype):  # computed in ``dtype``, stored in out's (PyTorch's out= rule)
        raise ValueError(f"a {dtype} result cannot be written to a {out.dtype} out")
    n = out.numel()
    batch = shape[0] if shape else 1
    if diffusion and noise is not None:
        if rowwise and noise.numel() != batch:
            raise ValueError(f"scalar (rowwise) noise holds one value per batch row: {batch} values, got shape "
                             f"{tuple(noise.shape)}")
        if not rowwise and not _broadcasts(tuple(noise.shape), shape):
            raise ValueError(f"noise of shape {tuple(noise.shape)} does not broadcast to the state's {shape}")
    if n == 0:
        return out
    operands = [_operand(t, shape) for _, t in terms]
    g_ops = [] if unit else [_operand(g.reshape(shape) if g.numel() == n else g, shape) for _, g in diffusion]
    dw = None
    if diffusion and noise is not None:
        dw = noise.reshape(batch) if rowwise else _flat(noise, shape).reshape(-1)
        dw = dw if dw.is_contiguous() else dw.contiguous()
    if given:  # a fresh ``out`` shares memory with nothing
        operands = [(_unaliased(t, m, out), m) for t, m in operands]
        g_ops = [(_unaliased(g, m, out), m) for g, m in g_ops]
        dw = None if dw is None else _unaliased(dw, 1 if rowwise else 0, out)
    ts, modes = [t for t, _ in operands], [m for _, m in operands]
    f64 = dtype == torch.float64
    cs = _coefficients([c for c, _ in terms], f64)
    pad = MAX_TERMS - len(ts)
    ptrs = ts + [ts[0]] * pad
    coefs = [v for hl in cs + [(0.0, 0.0)] * pad for v in hl]
    gs = [g for g, _ in g_ops] + [ts[0]] * (MAX_NOISE - len(g_ops))
    g_modes = [m for _, m in g_ops] + [0] * (MAX_NOISE - len(g_ops))
    ss = _coefficients([s for s, _ in diffusion], f64) + [(0.0, 0.0)] * (MAX_NOISE - len(diffusion))
    mode = 0 if not diffusion else (1 if noise is not None else (3 if key_in_memory else 2))
    row = max(1, n // batch)  # elements per batch row
    blk = CONFIG["block"]
    args = [out, *ptrs, *coefs, gs[0], gs[1], ss[0][0], ss[0][1], ss[1][0], ss[1][1], ts[0] if dw is None else dw,
            key if key_in_memory else int(key) & KEY_MASK, n, row]
    group = _group(row) if rowwise and mode >= 2 else 1
    consts = _combine_consts(len(ts), len(diffusion), mode, bool(rowwise), unit, f64, blk, tuple(modes), tuple(g_modes),
                             _large(n), group)
    _launch_combine(args, consts, [out, *ts, *(g for g, _ in g_ops)] + ([] if dw is None else [dw]), dev)
    return out


def _launch_combine(args, consts, tensors, device):
    """Launch :func:`combine_kernel` on ``args``, keyed on the specialisation of its distinct operand
    ``tensors`` (out, the terms, the diffusion values, the noise: the padding slots repeat the first term,
    as ``consts`` fix) and its ints (the key, the element and row counts: the last three arguments)."""
    key, n, row = args[-3:]
    sig = (tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors]),
           (key.dtype, key.data_ptr() % 16 == 0) if isinstance(key, torch.Tensor) else _spec(key), _spec(n), _spec(row))
    _launch(combine_kernel, _cdiv(n, consts["BLOCK_SIZE"]), args, consts, CONFIG["num_warps"], device, sig=sig)


def randn(key, shape, dtype, device) -> torch.Tensor:
    """The Philox noise stream at ``i = 0 .. numel-1`` (:func:`_block_normals`), laid out in ``shape`` (``key``: an
    int, or a 0-dim int64 tensor on ``device``)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    n = out.numel()
    in_memory = isinstance(key, torch.Tensor)
    blk = CONFIG["block"]
    with _on_device(out.device):
        randn_kernel[(_cdiv(n, blk),)](out, key if in_memory else int(key) & KEY_MASK, n, KEY_IN_MEMORY=in_memory,
                                       BLOCK_SIZE=blk, LARGE=_large(n), num_warps=CONFIG["num_warps"])
    return out


# the other kernel families, in files of their own (imported here too: ``combine.error_norm`` etc.)
from .matrix_noise import matrix_noise_kernel, matrix_noise_update  # noqa: E402,F401
from .norm import error_norm, error_norm_kernel  # noqa: E402,F401
from .trajectory import linear_trajectory, linear_trajectory_kernel  # noqa: E402,F401
