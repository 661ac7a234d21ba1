"""DoRA's math, in PEFT's convention: W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖, norms per row of the (out, in) matrix.

Everything here works on (out, in) fp32 matrices (see layers.py for how Linear, Conv1D and embedding weights map
onto that orientation; PEFT's embedding magnitude is per embedding dimension, which is a row there).

Extraction (DESIGN.md §5): the direction only matters up to a per-row scale, so each fine-tuned row is first
rescaled by d_i = ⟨w_ft,i, w0,i⟩ / ‖w_ft,i‖² (1 where that is not positive) to bring it as close to the base
row as its direction allows; the low-rank factors approximate Δ' = diag(d)·W_ft − W0, which is smaller than
W_ft − W0 wherever the fine-tune mostly rescaled rows. The magnitudes are then the least-squares optimum for
the truncated direction: m_i = ⟨u_i, w_ft,i⟩ with u_i the unit row of W0 + s·BA. At full rank
W0 + s·BA = diag(d)·W_ft, so u_i ∥ w_ft,i and m_i·u_i = w_ft,i: the fit is exact.
"""

from __future__ import annotations

import torch


def row_norms(matrix: torch.Tensor) -> torch.Tensor:
    """‖row_i‖ for each row of an (out, in) matrix, computed in fp32 at least."""
    return torch.linalg.vector_norm(matrix.float(), dim=1)


def direction_scales(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """d_i = ⟨w_ft,i, w0,i⟩ / ‖w_ft,i‖², or 1 where the row is zero or the scale would not be positive."""
    dots = (finetuned * base).sum(dim=1)
    squares = (finetuned * finetuned).sum(dim=1)
    scales = dots / torch.where(squares > 0, squares, torch.ones_like(squares))
    return torch.where((squares > 0) & (scales > 0), scales, torch.ones_like(scales))


def dora_target(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """Δ' = diag(d)·W_ft − W0, the matrix whose truncated SVD gives DoRA's low-rank factors."""
    return direction_scales(base, finetuned)[:, None] * finetuned - base


def fit_magnitude(direction: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """m_i = ⟨v_i / ‖v_i‖, w_ft,i⟩: the least-squares magnitudes for the direction V = W0 + s·BA.
    A zero direction row gets magnitude 0 (its output row is 0 whatever m is)."""
    norms = row_norms(direction)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, (direction * finetuned).sum(dim=1) / safe, torch.zeros_like(norms))


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
    factor = torch.where(norms > 0, magnitude.float() / torch.where(norms > 0, norms, torch.ones_like(norms)),
                         torch.zeros_like(norms))
    return factor[:, None] * direction, norms


def unapply_dora(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                 norms: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_dora` given the norms it returned: W0 = W' · ‖·‖ / m − ΔW.
    Rows with m = 0 cannot be inverted from W' and come back as −ΔW; the receipt's norms are needed."""
    factor = torch.where(magnitude != 0, norms.float() / torch.where(magnitude != 0, magnitude.float(),
                                                                      torch.ones_like(norms)),
                         torch.zeros_like(norms))
    return factor[:, None] * merged.float() - delta.float()
