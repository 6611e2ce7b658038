"""Gaussian probability paths ``x_t = alpha_t z + beta_t eps`` and conversions between parametrisations.

Conventions of Holderrieth & Erives (arXiv 2506.02070): t=0 is noise (alpha_0 = 0, beta_0 = 1), t=1 is
data (alpha_1 = 1, beta_1 = 0); VE / EDM paths relax beta_0 (and VP-linear relaxes alpha_0).

A model's output may be any of five parametrisations, all affine in the output for fixed ``(x, t)``:

=============  =========================================================
``velocity``   ``u = alpha' z + beta' eps`` (the flow-matching target)
``epsilon``    the noise ``eps``
``data``       the clean sample ``z`` (x0-prediction)
``score``      ``grad log p_t(x) = -eps / beta``
``v``          ``v = alpha eps - beta z`` (v-prediction, Salimans & Ho)
=============  =========================================================
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

PREDICTIONS = ("velocity", "epsilon", "data", "score", "v")


HALF = (torch.float16, torch.bfloat16)


def _as_time(t, like=None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):  # (a half-type time: its coefficients in float32)
        return t.float() if t.dtype in HALF else t if t.is_floating_point() else t.to(torch.float64)
    if like is not None:  # (half states: the time and the coefficients in float32, rounded once at the end)
        dtype = torch.float32 if like.dtype in HALF else like.dtype
        return torch.as_tensor(t, dtype=dtype, device=like.device)
    return torch.as_tensor(t, dtype=torch.float64)


def _widen(*xs):
    """Half-type tensors as float32 (``(tensors, dtype to round the result to)``; ``None``: not half): a
    conversion is computed in float32 from the coefficients and rounded once at the end (rounding each
    coefficient to 8 bits first cost bfloat16 up to 40x the error)."""
    dt = xs[0].dtype
    for v in xs[1:]:
        dt = torch.promote_types(dt, v.dtype)
    if dt not in HALF:
        return xs, None
    return tuple(v.float() for v in xs), dt


def _narrow(r: torch.Tensor, dt) -> torch.Tensor:
    return r if dt is None else r.to(dt)


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Coefficients of shape ``()`` or ``(batch,)`` laid out to broadcast against ``x`` (``(batch, ...)``)."""
    if c.dim() == 0:
        return c.to(x.dtype)
    return c.to(x.dtype).reshape(c.shape[0], *([1] * (x.dim() - 1)))


class GaussianPath:
    """Base class of a Gaussian path; subclasses define ``alpha``, ``beta``, ``dalpha``, ``dbeta``.

    Every method takes ``t`` as a tensor (any shape; a float is taken as float64) and returns tensors of
    the same shape. ``beta_dbeta(t)`` is ``beta * beta'``, written where possible so it stays finite where
    ``beta'`` alone does not (VP paths at t=1).
    """

    name = "path"

    def alpha(self, t):  # pragma: no cover - interface
        """The data coefficient ``alpha_t``."""
        raise NotImplementedError

    def beta(self, t):  # pragma: no cover - interface
        """The noise coefficient ``beta_t``."""
        raise NotImplementedError

    def dalpha(self, t):  # pragma: no cover - interface
        """``d alpha_t / dt``."""
        raise NotImplementedError

    def dbeta(self, t):  # pragma: no cover - interface
        """``d beta_t / dt``."""
        raise NotImplementedError

    def beta_dbeta(self, t):
        """``beta_t * beta_t'``."""
        return self.beta(t) * self.dbeta(t)

    def coefficients(self, t) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, beta, alpha', beta')`` at ``t``."""
        t = _as_time(t)
        return self.alpha(t), self.beta(t), self.dalpha(t), self.dbeta(t)

    # ---- conditional path -----------------------------------------------------------------------
    def sample_conditional(self, z: torch.Tensor, t, eps: torch.Tensor = None, generator=None):
        """``x_t = alpha_t z + beta_t eps`` (``eps`` drawn if not given). ``t``: scalar or ``(batch,)``."""
        t = _as_time(t, z)
        if eps is None:
            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        (z, eps), dt = _widen(z, eps)
        return _narrow(_bcast(self.alpha(t), z) * z + _bcast(self.beta(t), z) * eps, dt)

    def conditional_velocity(self, x, z, t):
        """``u_t(x|z) = (alpha' - beta'/beta alpha) z + beta'/beta x`` (singular at beta = 0)."""
        t = _as_time(t, x)
        (x, z), dt = _widen(x, z)
        a, b, da, db = (_bcast(c, x) for c in self.coefficients(t))
        return _narrow((da - db / b * a) * z + db / b * x, dt)

    def conditional_score(self, x, z, t):
        """``grad log p_t(x|z) = (alpha z - x) / beta^2``."""
        t = _as_time(t, x)
        (x, z), dt = _widen(x, z)
        a, b = _bcast(self.alpha(t), x), _bcast(self.beta(t), x)
        return _narrow((a * z - x) / (b * b), dt)

    def target(self, z, eps, t, prediction: str = "velocity"):
        """The regression target for ``x_t = alpha z + beta eps`` under a parametrisation."""
        check_prediction(prediction)
        t = _as_time(t, z)
        if prediction in ("epsilon", "data"):
            return {"epsilon": eps, "data": z}[prediction]
        (z, eps), dt = _widen(z, eps)
        a, b, da, db = (_bcast(c, z) for c in self.coefficients(t))
        return _narrow({"velocity": lambda: da * z + db * eps, "score": lambda: -eps / b,
                        "v": lambda: a * eps - b * z}[prediction](), dt)

    # ---- conversions ----------------------------------------------------------------------------
    def convert(self, output, x, t, src: str = "epsilon", dst: str = "velocity", check: bool = True):
        """Convert a model ``output`` at ``(x, t)`` from parametrisation ``src`` to ``dst``.

        Every pair is supported. A conversion that divides by ``alpha`` (from ``epsilon`` or ``score`` to
        ``data``, ``velocity`` or ``v``), by ``beta`` (from ``data``; to ``score``) or by
        ``D = alpha beta' - alpha' beta`` (from ``velocity``) is singular where that quantity is 0; with
        ``check=True`` (the default) such a call raises ``ValueError`` naming the conversion and the
        time, instead of returning inf. The check reads ``t`` on the host: samplers validate their time
        grid once, before the loop, and pass ``check=False``. Conversions are written so that they stay
        finite where the algebra allows (velocity -> epsilon at t=0 gives ``-alpha' x / D``).
        """
        check_prediction(src, "src")
        check_prediction(dst, "dst")
        if src == dst:
            return output
        t = _as_time(t, x)
        a, b, da, db = self.coefficients(t)
        # score -> velocity needs beta beta', finite where beta' alone is not (a VP path at t = 1)
        bdb = self.beta_dbeta(t) if (src, dst) == ("score", "velocity") else None
        if check:
            self.check_conversion(src, dst, a, b, da, db, t, bdb)
        return self._convert_with(output, x, (a, b, da, db), src, dst, bdb)

    def singular_terms(self, src: str, dst: str) -> Tuple[str, ...]:
        """Which of ``alpha``, ``beta``, ``D`` must be nonzero for the conversion ``src -> dst``."""
        if src == dst:
            return ()
        need = []
        if src == "velocity":
            need.append("D")
        if src in ("epsilon", "score") and dst in ("data", "velocity", "v"):
            need.append("alpha")
        if src == "data" or dst == "score":
            need.append("beta")
        return tuple(need)

    def check_conversion(self, src, dst, a, b, da, db, t, bdb=None):
        """Raise ``ValueError`` if ``src -> dst`` is singular (not finite) at any of the times ``t``.

        Probes the conversion itself on unit inputs, so any cause is caught (a zero divisor, or a
        coefficient such as a VP path's ``beta'`` that is infinite at t=1); the message names the
        divisors that vanish.
        """
        if src == dst:
            return
        shape = a.shape if a.dim() else (1,)
        ones = torch.ones(*shape, 1, dtype=torch.float64, device=a.device)
        coef = [c.reshape(shape).to(torch.float64) for c in (a, b, da, db)]
        probe = self._convert_with(ones, ones, coef, src, dst, None if bdb is None else bdb.reshape(shape).to(torch.float64))
        bad = ~torch.isfinite(probe).all(-1)
        if not bool(bad.any()):
            return
        times = _as_time(t).reshape(-1)
        if times.numel() == bad.numel():
            times = times[bad]
        vals = {"alpha": coef[0], "beta": coef[1], "D": coef[0] * coef[3] - coef[2] * coef[1]}
        zero = [n for n in self.singular_terms(src, dst) if bool((vals[n][bad] == 0).any())]
        why = f"where {' and '.join(n + ' = 0' for n in zero)}" if zero else "(a path coefficient is infinite there)"
        raise ValueError(f"converting {src} -> {dst} on the {self.name} path is singular {why} "
                         f"(at t = {times[:4].tolist()}): choose other times (e.g. t_start > 0 or t_end < 1) "
                         f"or another prediction type")

    def _convert_with(self, output, x, coef, src, dst, bdb=None):
        (output, x), dt = _widen(output, x)
        return _narrow(self._convert_wide(output, x, coef, src, dst, bdb), dt)

    def _convert_wide(self, output, x, coef, src, dst, bdb=None):
        a, b, da, db = (_bcast(c, x) for c in coef)
        z, eps = _basis(output, x, a, b, da, db, src, dst)
        if dst == "data":
            return z
        if dst == "epsilon":
            return eps
        if dst == "velocity":
            if src == "score":  # beta' eps = -beta beta' score: finite where beta' alone is not
                return da * z - _bcast(coef[1] * coef[3] if bdb is None else bdb, x) * output
            return da * z + db * eps
        if dst == "score":
            return -eps / b
        return a * eps - b * z

    def __repr__(self):
        return f"{type(self).__name__}()"


def _basis(out, x, a, b, da, db, src, dst):
    """``(z_hat, eps_hat)`` from an output; only the one ``dst`` needs is guaranteed finite."""
    if src == "data":
        return out, ((x - a * out) / b if dst != "data" else None)
    if src in ("epsilon", "score"):
        eps = out if src == "epsilon" else -b * out
        return ((x - b * eps) / a if dst in ("data", "velocity", "v") else None), eps
    if src == "velocity":
        D = a * db - da * b
        return (db * x - b * out) / D, (a * out - da * x) / D
    # v = alpha eps - beta z and x = alpha z + beta eps
    n = a * a + b * b
    return (a * x - b * out) / n, (a * out + b * x) / n


def check_prediction(prediction: str, name: str = "prediction") -> str:
    """Return ``prediction`` if it is one of :data:`PREDICTIONS`, else raise ``ValueError``."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"{name} must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


class CondOT(GaussianPath):
    """Conditional optimal transport / rectified flow: ``alpha = t``, ``beta = 1 - t``."""

    name = "CondOT"

    def alpha(self, t):
        return _as_time(t) * 1.0

    def beta(self, t):
        return 1.0 - _as_time(t)

    def dalpha(self, t):
        return torch.ones_like(_as_time(t))

    def dbeta(self, t):
        return -torch.ones_like(_as_time(t))


class VPCosine(GaussianPath):
    """Variance-preserving cosine path: ``alpha = sin(pi t / 2)``, ``beta = sin(pi (1 - t) / 2)``
    (``= cos(pi t / 2)``, written so that ``beta_1 = 0`` exactly)."""

    name = "VPCosine"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * _as_time(t))

    def beta(self, t):
        return torch.sin(0.5 * math.pi * (1.0 - _as_time(t)))

    def dalpha(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * _as_time(t))

    def dbeta(self, t):
        return -0.5 * math.pi * torch.cos(0.5 * math.pi * (1.0 - _as_time(t)))


class VPLinear(GaussianPath):
    """The continuous DDPM path (VP SDE with linear beta(s) from ``beta_min`` to ``beta_max``).

    With diffusion time ``s = 1 - t``: ``log alpha = -(beta_max - beta_min) s^2 / 4 - beta_min s / 2``,
    ``beta = sqrt(1 - alpha^2)``. ``alpha_0`` is small but not 0 (e^{-5.05} for the defaults).
    """

    name = "VPLinear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 <= beta_min < beta_max):
            raise ValueError(f"VPLinear needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t):
        s = 1.0 - _as_time(t)
        return -0.25 * (self.beta_max - self.beta_min) * s * s - 0.5 * self.beta_min * s

    def _dlog_alpha(self, t):
        s = 1.0 - _as_time(t)
        return 0.5 * (self.beta_max - self.beta_min) * s + 0.5 * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def beta(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def dalpha(self, t):
        return self.alpha(t) * self._dlog_alpha(t)

    def dbeta(self, t):
        return self.beta_dbeta(t) / self.beta(t)

    def beta_dbeta(self, t):
        a = self.alpha(t)
        return -a * a * self._dlog_alpha(t)

    def __repr__(self):
        return f"VPLinear(beta_min={self.beta_min}, beta_max={self.beta_max})"


class EDM(GaussianPath):
    """Variance-exploding path with the EDM (Karras et al.) noise levels: ``alpha = 1``,
    ``beta = sigma(t) = (sigma_max^{1/rho} + t (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho``.

    A uniform grid in t is the Karras spacing in sigma. Start sampling from ``x ~ N(0, sigma_max^2 I)``.
    """

    name = "EDM"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not (0 < sigma_min < sigma_max) or rho <= 0:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self._a = self.sigma_max ** (1.0 / self.rho)
        self._b = self.sigma_min ** (1.0 / self.rho)

    def alpha(self, t):
        return torch.ones_like(_as_time(t))

    def dalpha(self, t):
        return torch.zeros_like(_as_time(t))

    def beta(self, t):
        return (self._a + _as_time(t) * (self._b - self._a)) ** self.rho

    def dbeta(self, t):
        return self.rho * (self._a + _as_time(t) * (self._b - self._a)) ** (self.rho - 1.0) * (self._b - self._a)

    def __repr__(self):
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"


VE = EDM


class Schedule(GaussianPath):
    """A path from user callables ``alpha(t)`` and ``beta(t)`` (elementwise torch functions); the
    derivatives come from autograd."""

    name = "Schedule"

    def __init__(self, alpha: Callable, beta: Callable):
        if not callable(alpha) or not callable(beta):
            raise TypeError("Schedule needs two callables alpha(t) and beta(t)")
        self._alpha, self._beta = alpha, beta

    def alpha(self, t):
        return self._alpha(_as_time(t))

    def beta(self, t):
        return self._beta(_as_time(t))

    @staticmethod
    def _derivative(fn, t):
        t = _as_time(t)
        # autograd, also under torch.inference_mode() (which enable_grad alone does not lift)
        with torch.inference_mode(False), torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            y = fn(tt)
            if not (isinstance(y, torch.Tensor) and y.requires_grad):  # a constant (e.g. torch.ones_like(t))
                return torch.zeros_like(t)
            (d,) = torch.autograd.grad(y.sum(), tt, allow_unused=True)
        return torch.zeros_like(t) if d is None else d

    def dalpha(self, t):
        return self._derivative(self._alpha, t)

    def dbeta(self, t):
        return self._derivative(self._beta, t)
