"""Fréchet distance between Gaussians, exact and in float64 (pure math, no I/O).

    d² = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2)

tr √(Σ1 Σ2) is computed as Σ √λ over the eigenvalues λ of the symmetric PSD
matrix √Σ1 Σ2 √Σ1 (same spectrum as Σ1 Σ2). Both square roots use `eigh` on
symmetric matrices, so there are no complex parts, no iteration and none of the
scipy.linalg.sqrtm bugs (1.11.2–1.12 gave huge imaginary parts / negative FVD).
Rank-deficient covariances (fewer samples than dimensions) are fine: their
tiny negative rounding eigenvalues are clipped to zero before the square root.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def mean_cov_from_sums(n, total: torch.Tensor, outer: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance from n, Σx and ΣxxT (the metric's summable states).

    biased divides by n (StyleGAN-V, np.cov(bias=True)); unbiased by n − 1.
    """
    n = float(n)
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {int(n)}")
    total, outer = _f64(total), _f64(outer)
    mu = total / n
    cov = (outer - n * torch.outer(mu, mu)) / (n - 1 if unbiased else n)
    return mu, (cov + cov.T) / 2  # exact symmetry; the sums round asymmetrically


def mean_cov(features: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of rows of features [N, D] (two-pass, float64)."""
    x = _f64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D] for a covariance, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1 if unbiased else x.shape[0])
    return mu, (cov + cov.T) / 2


def sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via eigh."""
    evals, evecs = torch.linalg.eigh(_f64(a))
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def trace_sqrt_product(cov1: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """tr √(Σ1 Σ2) = Σ √eig(√Σ1 Σ2 √Σ1)."""
    s1 = sqrt_psd(cov1)
    m = s1 @ _f64(cov2) @ s1
    evals = torch.linalg.eigvalsh((m + m.T) / 2)
    return evals.clamp_min(0).sqrt().sum()


def frechet_distance(mu1, cov1, mu2, cov2) -> torch.Tensor:
    """Squared Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2), float64 scalar tensor."""
    mu1, mu2, cov1, cov2 = map(_f64, (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, cov {tuple(cov1.shape)}/{tuple(cov2.shape)}")
    for name, t in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
    diff = mu1 - mu2
    d = diff @ diff + cov1.trace() + cov2.trace() - 2 * trace_sqrt_product(cov1, cov2)
    # rounding can leave a tiny negative value where the true distance is 0
    return d.clamp_min(0)


def frechet_distance_features(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    return frechet_distance(*mean_cov(x, unbiased), *mean_cov(y, unbiased))


@dataclass(frozen=True)
class BootstrapInterval:
    low: float
    high: float
    level: float
    num_resamples: int
    method: str = "centred-percentile"


def bootstrap_interval(
    x: torch.Tensor, y: torch.Tensor, unbiased: bool = False, num_resamples: int = 100,
    level: float = 0.95, seed: int = 0,
) -> BootstrapInterval:
    """Bootstrap interval for the sampling variability of the distance at this N.

    Each resample draws both sets with replacement and recomputes the distance.
    Resampling duplicates rows, which shrinks the covariances' effective rank
    and inflates FD (strongly when N is not much larger than D), so the plain
    percentile interval can miss the estimate altogether. We keep the spread of
    the bootstrap distribution and centre it on the estimate: [d + q_lo − m, d + q_hi − m]
    with m the bootstrap mean. It says how much the number would move with
    another sample of the same size; it is not an interval for the N→∞ distance
    (FD is biased upward at small N, which is why N must be reported with it).
    """
    x, y = _f64(x), _f64(y)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    values = []
    for _ in range(num_resamples):
        ix = torch.randint(len(x), (len(x),), generator=gen).to(x.device)
        iy = torch.randint(len(y), (len(y),), generator=gen).to(y.device)
        values.append(frechet_distance_features(x[ix], y[iy], unbiased))
    v = torch.stack(values).cpu()
    alpha = (1 - level) / 2
    q_lo, q_hi = torch.quantile(v, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    d = float(frechet_distance_features(x, y, unbiased))
    shift = d - float(v.mean())
    return BootstrapInterval(max(q_lo + shift, 0.0), max(q_hi + shift, 0.0), level, num_resamples)
