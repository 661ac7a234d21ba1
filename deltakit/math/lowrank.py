"""Low-rank factor pairs from singular triplets, and how to compute the triplets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltakit.math.factorize import SvdMethod, TruncatedSVD, truncated_svd


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                     scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r) and A (r, in) with scaling · B @ A = U·diag(s)·Vh, the singular values split evenly.

    B = U·√(s/scaling) and A = √(s/scaling)·Vh: each column of B and the matching row of A have the same norm,
    which keeps both factors in range when they are stored in 16 bits.
    """
    root = (s / scaling).sqrt()
    return u * root, root[:, None] * vh


def stored_relative_error(svd: TruncatedSVD, rank: int, b: torch.Tensor, a: torch.Tensor, scaling: float) -> float:
    """‖M − scaling·B@A‖ / ‖M‖ for factors as stored (rounded to their dtype), from ``svd`` alone (no dense M).

    M = U_r S_r Vh_r + R, with R the truncation residual (its energy known to ``svd``). The stored product
    differs from U_r S_r Vh_r by the rounding E = [U_r S_r, −scaling·B] @ [Vh_r; A], a rank-2r product whose
    energy is Σ (LᵀL) ∘ (R Rᵀ) over 2r×2r Gram matrices, in fp64 (the fp32 inputs are exact there, so no
    orthonormality is assumed). R is orthogonal to U_r's columns and to Vh_r's rows, so ⟨R, E⟩ is a product of
    two roundings (negligible) and the squared errors add.
    """
    if svd.total_energy == 0.0:
        return 0.0
    tail = svd.relative_error(rank) ** 2 * svd.total_energy
    device = svd.u.device
    u, s, vh = (t.to(device, torch.float64) for t in (svd.u[:, :rank], svd.s[:rank], svd.vh[:rank]))
    left = torch.cat([u * s, -scaling * b.to(device, torch.float64)], dim=1)  # (out, 2r)
    right = torch.cat([vh, a.to(device, torch.float64)], dim=0)  # (2r, in)
    rounding = max(0.0, float(((left.T @ left) * (right @ right.T)).sum()))
    return min(1.0, math.sqrt((tail + rounding) / svd.total_energy))


@dataclass(frozen=True)
class SvdOptions:
    """How to run the truncated SVD (:func:`~deltakit.math.factorize.truncated_svd`)."""

    method: SvdMethod = "auto"
    oversample: int | None = None  # None: factorize.py's tuned default
    niter: int | None = None
    seed: int = 0

    def run(self, matrix: torch.Tensor, rank: int, device: torch.device,
            total_energy: float | None = None) -> TruncatedSVD:
        """``total_energy``: ‖matrix‖_F² where the caller already has it (saves a pass over the matrix)."""
        extra = {k: v for k, v in (("oversample", self.oversample), ("niter", self.niter)) if v is not None}
        return truncated_svd(matrix, rank, method=self.method, seed=self.seed, device=device,
                             total_energy=total_energy, **extra)
