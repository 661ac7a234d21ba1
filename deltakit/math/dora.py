"""DoRA's math, in PEFT's convention: W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖, norms per row of the (out, in) matrix.

Everything here works on (out, in) fp32 matrices (see layers.py for how Linear, Conv1D and embedding weights map
onto that orientation; PEFT's embedding magnitude is per embedding dimension, which is a row there).

Extraction. After the least-squares magnitude m_i = ⟨u_i, w_ft,i⟩ (u_i the unit row of V = W0 + s·BA), a row's
error is the distance from w_ft,i to the line through v_i, which only depends on v_i's direction. So V only has
to point the right way, row by row, and may be any positive multiple of W_ft. Two fits are tried per module and
the better one kept:

- projected: with e_i = ⟨w_ft,i, w0,i⟩ / ‖w0,i‖² (the multiple of the base row closest to the fine-tuned row;
  1 where that is not positive), factorize M = W_ft − diag(e)·W0 to rank r as L, and set s·BA = diag(1/e)·L.
  Then V = diag(1/e)·(diag(e)·W0 + L) points along the rows of diag(e)·W0 + L ≈ W_ft, and each row's error is
  at most ‖(M − L)_i‖. M is the smallest residual a per-row rescaled base leaves, so it is usually far easier
  to approximate than ΔW = W_ft − W0.
- plain: s·BA = the rank-r truncation of ΔW, as for LoRA. With the optimal m this is never worse than LoRA at
  the same rank (the distance to a line is at most the distance to a point on it).

Both are exact at full rank. (DESIGN.md §5 proposed rescaling the fine-tuned rows by ⟨w_ft, w0⟩/‖w_ft‖² and
factorizing diag(d)·W_ft − W0 unweighted; that weights each row's error by 1/d_i and lost to plain LoRA on
strongly changed pairs, so it was replaced.)
"""

from __future__ import annotations

import torch


def row_norms(matrix: torch.Tensor) -> torch.Tensor:
    """‖row_i‖ for each row of an (out, in) matrix, computed in fp32 at least."""
    return torch.linalg.vector_norm(matrix.float(), dim=1)


def projection_scales(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """e_i = ⟨w_ft,i, w0,i⟩ / ‖w0,i‖², or 1 where the base row is zero or the scale would not be positive."""
    dots = (finetuned * base).sum(dim=1)
    squares = (base * base).sum(dim=1)
    scales = dots / torch.where(squares > 0, squares, torch.ones_like(squares))
    return torch.where((squares > 0) & (scales > 0), scales, torch.ones_like(scales))


def fit_magnitude(direction: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """m_i = ⟨v_i / ‖v_i‖, w_ft,i⟩: the least-squares magnitudes for the direction V = W0 + s·BA.
    A zero direction row gets magnitude 0 (its output row is 0 whatever m is)."""
    norms = row_norms(direction)
    return _quotient_or_zero((direction * finetuned).sum(dim=1), norms, norms > 0)


def _quotient_or_zero(numerator: torch.Tensor, denominator: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """numerator / denominator per row where ``valid``, 0 elsewhere, without a NaN ever being formed."""
    safe = torch.where(valid, denominator, torch.ones_like(denominator))
    return torch.where(valid, numerator / safe, torch.zeros_like(safe))


def rescaling(norms: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ‖·‖ per row, the factor DoRA multiplies each row of W0 + ΔW by; a zero-norm row gets 0 instead of NaN
    (PEFT itself would divide by zero there)."""
    return _quotient_or_zero(magnitude.float(), norms, norms > 0)


def apply_dora(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged weight m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ (PEFT's ``DoraLinearVariant.merge``), and the row norms used.

    Args:
        base: W0, (out, in).
        delta: s·B@A, (out, in) (already multiplied by any merge weight).
        magnitude: m, (out,).

    Returns:
        (merged weight (out, in) fp32, norms (out,)); unmerge needs the norms. A row whose norm is zero stays
        zero instead of becoming NaN (PEFT itself would divide by zero there).
    """
    direction = base.float() + delta.float()
    norms = row_norms(direction)
    return rescaling(norms, magnitude)[:, None] * direction, norms


def unapply_dora(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                 norms: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_dora` given the norms it returned: W0 = W' · ‖·‖ / m − ΔW.
    Rows with m = 0 cannot be inverted from W' and come back as −ΔW; the receipt's norms are needed."""
    return _quotient_or_zero(norms.float(), magnitude.float(), magnitude != 0)[:, None] * merged.float() - delta.float()
