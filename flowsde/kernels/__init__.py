"""Step ops the solvers call, dispatched to a backend.

Backends: ``torch`` (the plain-PyTorch specification in :mod:`flowsde.kernels.reference`) and
``triton`` (the fused kernel of :mod:`flowsde.kernels.combine`). The choice comes from the per-call
``backend=`` option, else the environment variable ``FLOWSDE_BACKEND`` (``auto`` | ``torch`` |
``triton``), else ``auto``: Triton for CUDA tensors of at least :data:`AUTO_TRITON_MIN_NUMEL` elements
(or inside a captured CUDA graph, where launches cost no host time) when triton imports, PyTorch otherwise.
Below that size a step is bound by host time per launch, where one PyTorch op (~8-11 µs on an H100
machine) is cheaper than a Triton launch (~30-75 µs); see benchmarks/RESULTS.md.
``triton`` on CPU tensors runs in Triton's interpreter and needs ``TRITON_INTERPRET=1`` (set before
flowsde first launches a kernel). :func:`ops` returns the op set for a backend; the solvers take one per
solve.
"""
from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as _forward_ad

from . import reference
from .philox import KEY_MASK, philox_randn

BACKENDS = ("auto", "torch", "triton")

try:  # triton is optional: the package imports and runs without it
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAS_TRITON = False


AUTO_TRITON_MIN_NUMEL = 1 << 20


def resolve_backend(backend=None, device=None, numel=None, captured=False) -> str:
    """Return the concrete backend (``"torch"`` or ``"triton"``) for a call on ``device``.

    ``backend`` wins over ``FLOWSDE_BACKEND``; ``auto`` is Triton on CUDA tensors (when triton imports)
    whose state has at least :data:`AUTO_TRITON_MIN_NUMEL` elements (``numel``; unknown counts as large)
    or whose loop is ``captured`` as a CUDA graph, and PyTorch otherwise.
    """
    name = backend if backend is not None else os.environ.get("FLOWSDE_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    name = name.lower()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "auto":
        large = numel is None or numel >= AUTO_TRITON_MIN_NUMEL or captured
        return "triton" if (HAS_TRITON and dev.type == "cuda" and large) else "torch"
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which does not import here")
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"backend='triton' on {dev.type} tensors runs in Triton's interpreter: set "
                               f"TRITON_INTERPRET=1 before starting Python, or use backend='torch'")
    return name


class PhiloxNoise:
    """Deferred standard normals ``z[i]`` of the Philox noise stream (four per Philox call, see
    :func:`flowsde.kernels.philox.philox_randn_at`): the triton backend draws them inside the
    kernel; the torch backend materialises them with the PyTorch mirror.

    ``key`` is a host int, or a 0-dim int64 tensor on the data's device that the kernel reads from memory
    when it runs: a captured CUDA graph then draws fresh noise when the key's memory is rewritten.
    """

    __slots__ = ("key",)

    def __init__(self, key):
        if isinstance(key, torch.Tensor):
            if key.dim() != 0 or key.dtype != torch.int64:
                raise TypeError(f"a tensor Philox key must be a 0-dim int64 tensor, got {key.dtype} {tuple(key.shape)}")
            self.key = key
        else:
            self.key = int(key) & KEY_MASK


class TorchOps:
    """The PyTorch backend: the reference ops."""

    name = "torch"
    lincomb = staticmethod(reference.lincomb)
    noise_prod = staticmethod(reference.noise_prod)
    lerp = staticmethod(reference.lerp)
    hermite = staticmethod(reference.hermite)
    error_norm = staticmethod(reference.error_norm)
    brownian_tree = staticmethod(reference.brownian_tree)

    def combine(self, terms, diffusion=(), noise=None, rowwise=False, out=None):
        """``sum c_i t_i + (sum s_j g_j) z`` (see :func:`flowsde.kernels.reference.combine`)."""
        if isinstance(noise, PhiloxNoise):
            return reference.combine(terms, diffusion, None, rowwise, noise.key, out)
        return reference.combine(terms, diffusion, noise, rowwise, out=out)

    def sde_update(self, y, terms, noise, dw, noise_type, out=None):
        """``y + sum c k + sum s (g dW)`` for any noise type (``dw`` a tensor or :class:`PhiloxNoise`);
        ``out``: a preallocated result (it may alias an input)."""
        if isinstance(dw, PhiloxNoise):  # drawn in float32 for a half result (the kernels' draws), kept out
            dtype = reference.result_dtype(y, *(k for _, k in terms), *(g for _, g in noise))  # of the dtype
            half = dtype in (torch.float16, torch.bfloat16)
            dw = self.normal(dw.key, _noise_shape(y, noise_type, noise), torch.float32 if half else dtype, y.device)
            if half:
                res = reference.sde_update(y, terms, noise, dw, noise_type).to(dtype)
                return res if out is None else reference.write_out(out, res)
        return reference.sde_update(y, terms, noise, dw, noise_type, out)

    def normal(self, key, shape, dtype, device):
        """The Philox noise stream ``z[i]``, ``i = 0 .. numel - 1``, laid out in ``shape``."""
        n = 1
        for s in shape:
            n *= int(s)
        return philox_randn(key, n, device).to(dtype).reshape(shape)


class TritonOps(TorchOps):
    """The Triton backend: every elementwise step is one launch of the fused kernel; additive and general
    noise (a batched matrix-vector product with the drift folded in) one launch of the matrix-noise kernel.
    Hermite output interpolation uses the PyTorch ops."""

    name = "triton"

    def __init__(self):
        from . import autograd as _grad
        from . import combine as _c  # imported on first use, after TRITON_INTERPRET is set
        self._c, self._grad = _c, _grad

    def combine(self, terms, diffusion=(), noise=None, rowwise=False, out=None):
        grad = _records_grad(terms, diffusion, noise)
        dtype = reference.result_dtype(*(t for _, t in terms), *(g for _, g in diffusion), noise)
        if not _fused_coefficients(dtype, terms, diffusion) or (
                grad and (out is not None or _transformed(terms, diffusion, noise))):
            return super().combine(terms, diffusion, noise, rowwise, out)
        launch = self._grad.combine if grad else self._c.combine  # autograd: the kernel and its adjoint
        key = noise.key if isinstance(noise, PhiloxNoise) else 0
        tensor = None if isinstance(noise, PhiloxNoise) else noise
        # zero terms are not read (the first, which fixes the shape, is kept), but still widen the dtype
        terms = terms[:1] + [(c, t) for c, t in terms[1:] if c != 0.0]
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # accumulation dtype
        while len(terms) > self._c.MAX_TERMS:  # fold the overflow into a first partial sum, held in the
            head = launch(terms[:self._c.MAX_TERMS], dtype=acc)
            terms = [(1.0, head)] + terms[self._c.MAX_TERMS:]
        if grad:
            return launch(terms, diffusion, tensor, rowwise, key, dtype=dtype)
        return launch(terms, diffusion, tensor, rowwise, key, out, dtype=dtype)

    def lincomb(self, y, terms, out=None):
        if not _fused_coefficients(reference.result_dtype(y, *(k for _, k in terms)), terms):
            return reference.lincomb(y, terms, out)
        return self.combine([(1.0, y)] + list(terms), out=out)

    def error_norm(self, y0, y1, err, rtol, atol, out=None):
        if not _fused_coefficients(y1.dtype, [(rtol, None), (atol, None)]) or _records_grad([(1, y0), (1, y1), (1, err)]):
            return reference.error_norm(y0, y1, err, rtol, atol, out)
        return self._c.error_norm(y0, y1, err, float(rtol), float(atol), out)

    def lerp(self, y0, y1, s):
        return self.combine([(1.0 - s, y0), (s, y1)])

    def sde_update(self, y, terms, noise, dw, noise_type, out=None):
        dtype = reference.result_dtype(y, *(k for _, k in terms), *(g for _, g in noise),
                                       dw if isinstance(dw, torch.Tensor) else None)
        if not _fused_coefficients(dtype, terms, noise):
            return super().sde_update(y, terms, noise, dw, noise_type, out)  # e.g. step sizes held on the device
        if noise_type not in ("diagonal", "scalar"):  # a (batch, d, m) diffusion matrix times dW: one pass
            if _records_grad([(1, y)], terms, noise, dw):  # this kernel has no backward: the PyTorch ops
                return super().sde_update(y, terms, noise, dw, noise_type, out)
            host_key = not (isinstance(dw, PhiloxNoise) and isinstance(dw.key, torch.Tensor))
            if y.dim() == 2 and len(terms) <= 2 and 1 <= len(noise) <= 2 and host_key and (
                    out is None or (out.dtype == dtype and out.is_contiguous())):
                key = dw.key if isinstance(dw, PhiloxNoise) else 0
                tensor = None if isinstance(dw, PhiloxNoise) else dw
                return self._c.matrix_noise_update(y, terms, noise, tensor, key, out)
            return super().sde_update(y, terms, noise, dw, noise_type, out)
        g = [(s, gg.squeeze(-1) if noise_type == "scalar" else gg) for s, gg in noise]
        return self.combine([(1.0, y)] + list(terms), g, dw, rowwise=noise_type == "scalar", out=out)

    def normal(self, key, shape, dtype, device):
        key = key if isinstance(key, torch.Tensor) else int(key) & KEY_MASK
        return self._c.randn(key, tuple(shape), dtype, device)

    def brownian_tree(self, key, leaf, frac, rows, n_rows, per_row, std, depth):
        from .tree import brownian_tree
        return brownian_tree(key, leaf, frac, rows, n_rows, per_row, std, depth)


def _fused_coefficients(dtype, *term_lists) -> bool:
    """Whether the fused kernels take these coefficients exactly: host numbers (not device tensors: the
    PyTorch ops take those), and for float64 data finite ones in [2^-100, 2^100] (or 0), which the
    kernels' float32 (hi, lo) pair holds to ~48 bits (float32 and half data round a coefficient to
    float32, as PyTorch does)."""
    for terms in term_lists:
        for c, _ in terms:
            if isinstance(c, torch.Tensor):
                return False
            if dtype == torch.float64 and c != 0.0 and not 2.0 ** -100 <= abs(c) <= 2.0 ** 100:
                return False
    return True


def _records_grad(*parts) -> bool:
    """Whether an op on these operands (lists of ``(c, tensor)`` pairs, or tensors) must be differentiable:
    grad mode is on and one of them requires grad, a forward-mode dual level is open and one carries a
    tangent, or one is a ``torch.func`` (functorch) wrapper. Such a call of the fused combine runs the
    kernel with its adjoint (:mod:`flowsde.kernels.autograd`) — under ``torch.func`` transforms, whose
    wrapped tensors a kernel cannot read, the PyTorch ops (:func:`_transformed`); the kernels without a
    backward (matrix noise, the error norm, the whole trajectory, ``out=`` under autograd) run the PyTorch
    ops, so gradients and tangents reach ``y0`` and the model's parameters on either backend (host
    attribute reads only: no synchronisation)."""
    grad = torch.is_grad_enabled()
    dual = getattr(_forward_ad, "_current_level", 0) >= 0  # a dual level is open (unknown: look)
    wrapped = not _no_transform()  # a torch.func transform is active: operands may be its wrappers
    if not (grad or dual or wrapped):  # (a sampling loop under no_grad: nothing to look at)
        return False
    for t in _tensors(parts):
        if (grad and t.requires_grad) or (wrapped and _is_wrapped(t)) or (
                dual and _forward_ad.unpack_dual(t).tangent is not None):
            return True
    return False


def _transformed(*parts) -> bool:
    """Whether one of the operands is a ``torch.func`` (functorch) wrapper (``grad``, ``jvp``, ``vmap``)."""
    return any(_is_wrapped(t) for t in _tensors(parts))


def _tensors(parts):
    for part in parts:
        if isinstance(part, torch.Tensor):
            yield part
        elif isinstance(part, (list, tuple)):
            for _, t in part:
                if isinstance(t, torch.Tensor):
                    yield t


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)
_peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def _no_transform() -> bool:
    """Whether no ``torch.func`` transform is active (then no operand can be a functorch wrapper)."""
    return _peek is not None and _peek() is None


def _noise_shape(y, noise_type, noise=()):
    """The shape of the increments: ``y.shape`` (diagonal), ``(batch, 1)`` (scalar) or ``(batch, m)`` with
    ``m`` the last dimension of the ``(batch, d, m)`` diffusion (additive / general)."""
    if noise_type == "diagonal":
        return tuple(y.shape)
    m = noise[0][1].shape[-1] if noise_type in ("additive", "general") and noise else 1
    return (y.shape[0], m)


_OPS = {}


def ops(backend=None, device=None, numel=None, captured=False) -> TorchOps:
    """The op set of the backend resolved for ``device`` (see :func:`resolve_backend`)."""
    name = resolve_backend(backend, device, numel, captured)
    if name not in _OPS:
        _OPS[name] = TritonOps() if name == "triton" else TorchOps()
    return _OPS[name]


# the PyTorch ops, for callers that do not choose a backend
lincomb = reference.lincomb
noise_prod = reference.noise_prod
sde_update = reference.sde_update
lerp = reference.lerp
hermite = reference.hermite


def needs_autodiff(*tensors) -> bool:
    """Whether an op on ``tensors`` must be differentiable (reverse or forward mode, or a ``torch.func``
    transform): a kernel without a backward then runs the PyTorch ops."""
    return _records_grad(*tensors)


__all__ = ["resolve_backend", "needs_autodiff", "ops", "TorchOps", "TritonOps", "PhiloxNoise", "lincomb", "noise_prod",
           "sde_update", "lerp", "hermite", "HAS_TRITON", "BACKENDS", "AUTO_TRITON_MIN_NUMEL", "reference"]
