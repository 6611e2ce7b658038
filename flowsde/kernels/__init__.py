"""Step ops the solvers call, dispatched to a backend.

Backends: ``torch`` (the plain-PyTorch reference in :mod:`flowsde.kernels.reference`) and, once the
fused kernels land, ``triton``. The choice comes from the per-call ``backend=`` option, else the
environment variable ``FLOWSDE_BACKEND`` (``auto`` | ``torch`` | ``triton``), else ``auto``.
"""
from __future__ import annotations

import os

from . import reference

BACKENDS = ("auto", "torch", "triton")

try:  # triton is optional: the package imports and runs without it
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAS_TRITON = False


def resolve_backend(backend=None, device=None) -> str:
    """Return the concrete backend (``"torch"`` or ``"triton"``) for a call on ``device``.

    ``backend`` wins over ``FLOWSDE_BACKEND``; ``auto`` picks the fastest available implementation.
    """
    name = backend if backend is not None else os.environ.get("FLOWSDE_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    name = name.lower()
    if name == "triton":
        raise NotImplementedError(
            "backend='triton' is not available in this version of flowsde: only the PyTorch reference "
            "ops are built. Use backend='torch' or 'auto'.")
    return "torch"


lincomb = reference.lincomb
noise_prod = reference.noise_prod
sde_update = reference.sde_update
lerp = reference.lerp
hermite = reference.hermite
ddim_update = reference.ddim_update

__all__ = ["resolve_backend", "lincomb", "noise_prod", "sde_update", "lerp", "hermite", "ddim_update", "HAS_TRITON",
           "BACKENDS", "reference"]
