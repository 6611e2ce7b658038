"""Gaussian-mixture data with exact marginal fields under any Gaussian path: ground truth "learned
fields" for accuracy studies.

Data ``sum_k pi_k N(mu_k, S_k)``; under the path ``p_t = sum_k pi_k N(alpha mu_k, C_k)`` with
``C_k = alpha^2 S_k + beta^2 I``; responsibilities ``r_k(x) ∝ pi_k N(x; alpha mu_k, C_k)``;
``score = sum_k r_k C_k^{-1} (alpha mu_k - x)`` and
``velocity = sum_k r_k [alpha' mu_k + (alpha' alpha S_k + beta' beta I) C_k^{-1} (x - alpha mu_k)]``.
"""
from __future__ import annotations

import math

import torch

from .gaussian import GaussianPath, _as_time


class GaussianMixture:
    """A mixture of ``K`` Gaussians in ``d`` dimensions.

    Args:
        weights: ``(K,)`` nonnegative, normalised here.
        means: ``(K, d)``.
        covs: ``(K, d, d)`` symmetric positive definite (or ``(K,)`` / ``(K, d)`` for isotropic /
            diagonal covariances).
    """

    def __init__(self, weights, means, covs, dtype=torch.float64):
        w = torch.as_tensor(weights, dtype=dtype)
        mu = torch.as_tensor(means, dtype=dtype)
        S = torch.as_tensor(covs, dtype=dtype)
        if mu.dim() != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(mu.shape)}")
        K, d = mu.shape
        if w.shape != (K,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {K} nonnegative numbers with a positive sum")
        if S.dim() == 1:
            S = S[:, None, None] * torch.eye(d, dtype=dtype)
        elif S.dim() == 2:
            S = torch.diag_embed(S)
        if S.shape != (K, d, d):
            raise ValueError(f"covs must have shape (K, d, d) = {(K, d, d)}, got {tuple(S.shape)}")
        if not torch.allclose(S, S.transpose(-1, -2)) or bool((torch.linalg.eigvalsh(S) <= 0).any()):
            raise ValueError("covs must be symmetric positive definite")
        self.weights, self.means, self.covs = w / w.sum(), mu, S
        self.K, self.d = K, d

    def to(self, device) -> "GaussianMixture":
        """The same mixture with its parameters on ``device`` (its fields then take tensors there)."""
        import copy
        out = copy.copy(self)
        out.weights, out.means, out.covs = (v.to(device) for v in (self.weights, self.means, self.covs))
        return out

    def mean(self) -> torch.Tensor:
        """The mixture's mean ``sum_k pi_k mu_k``."""
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """The mixture's covariance."""
        m = self.mean()
        dev = self.means - m
        return (self.weights[:, None, None] * (self.covs + dev[:, :, None] * dev[:, None, :])).sum(0)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """``n`` samples, shape ``(n, d)``."""
        dev = generator.device if generator is not None else self.means.device  # draws where the generator is
        k = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator).to(self.means.device)
        L = torch.linalg.cholesky(self.covs)
        e = torch.randn(n, self.d, 1, dtype=self.means.dtype, generator=generator, device=dev).to(self.means.device)
        return self.means[k] + (L[k] @ e).squeeze(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of the data distribution at ``x`` (``(batch, d)``)."""
        one = torch.ones((), dtype=self.means.dtype, device=self.means.device)
        return self._marginal_log_prob(x, one, torch.zeros_like(one))[0]

    # ---- under a path ------------------------------------------------------------------------------
    def _cov_t(self, a, b):
        """``C_k = a^2 S_k + b^2 I`` per batch element: ``(B or 1, K, d, d)``."""
        a, b = a.reshape(-1, 1, 1, 1), b.reshape(-1, 1, 1, 1)
        eye = torch.eye(self.d, dtype=self.means.dtype, device=self.means.device)
        return a * a * self.covs[None] + b * b * eye

    def _marginal_log_prob(self, x, a, b):
        """``(log p_t(x), responsibilities, C, x - alpha mu)``."""
        x = x.to(self.means.dtype)
        C = self._cov_t(a, b)                                    # (B|1, K, d, d)
        diff = x[:, None, :] - a.reshape(-1, 1, 1) * self.means[None]   # (B, K, d)
        L = torch.linalg.cholesky(C)
        sol = torch.cholesky_solve(diff.unsqueeze(-1), L).squeeze(-1)   # C^{-1} (x - a mu)
        maha = (diff * sol).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logc = torch.log(self.weights)[None] - 0.5 * (maha + logdet + self.d * math.log(2 * math.pi))
        lp = torch.logsumexp(logc, dim=1)
        return lp, torch.softmax(logc, dim=1), C, sol

    def _coeffs(self, x, t, path):
        t = _as_time(t).to(self.means.dtype)
        if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) == 0:
            t = t[:1]  # one time for the whole batch (a sampler's t.expand(batch)): factor C_k once
        elif t.dim() == 0:
            t = t.reshape(1)
        return t, path.alpha(t), path.beta(t)

    def log_prob_t(self, x: torch.Tensor, t, path: GaussianPath) -> torch.Tensor:
        """``log p_t(x)`` of the marginal under ``path`` at time ``t`` (scalar or ``(batch,)``)."""
        _, a, b = self._coeffs(x, t, path)
        return self._marginal_log_prob(x, a, b)[0].to(x.dtype)

    def score(self, x: torch.Tensor, t, path: GaussianPath) -> torch.Tensor:
        """Exact marginal score ``grad_x log p_t(x)``."""
        _, a, b = self._coeffs(x, t, path)
        _, r, _, sol = self._marginal_log_prob(x, a, b)
        return -(r[..., None] * sol).sum(1).to(x.dtype)

    def velocity(self, x: torch.Tensor, t, path: GaussianPath) -> torch.Tensor:
        """Exact marginal velocity field of the flow that carries noise (t=0) to the mixture (t=1)."""
        t, a, b = self._coeffs(x, t, path)
        da, bdb = path.dalpha(t), path.beta_dbeta(t)
        _, r, _, sol = self._marginal_log_prob(x, a, b)
        eye = torch.eye(self.d, dtype=self.means.dtype, device=self.means.device)
        M = (da * a).reshape(-1, 1, 1, 1) * self.covs[None] + bdb.reshape(-1, 1, 1, 1) * eye  # (B, K, d, d)
        per = da.reshape(-1, 1, 1) * self.means[None] + (M @ sol.unsqueeze(-1)).squeeze(-1)
        return (r[..., None] * per).sum(1).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact denoiser of the variance-exploding convention (k-diffusion / EDM): ``E[z | z + sigma eps
        = x]`` = ``x + sigma^2 grad log p_sigma(x)``; ``sigma`` a number or ``(batch,)``; 0 gives ``x``."""
        s = torch.as_tensor(sigma, dtype=self.means.dtype).to(self.means.device).reshape(-1)
        one = torch.ones_like(s)
        _, r, _, sol = self._marginal_log_prob(x, one, s)
        score = -(r[..., None] * sol).sum(1)
        return (x.to(self.means.dtype) + (s * s)[:, None] * score).to(x.dtype)

    def __repr__(self):
        return f"GaussianMixture(K={self.K}, d={self.d})"
