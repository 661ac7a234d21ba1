"""Low-rank factor pairs from singular triplets, and how to compute the triplets."""

from __future__ import annotations

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
