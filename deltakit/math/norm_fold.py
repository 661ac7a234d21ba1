"""A change of a normalization layer's scale, moved into the Linear layers that read the norm's output.

RMSNorm and LayerNorm compute ``n = g ⊙ x̂ (+ β)``, where ``x̂`` depends on the layer's input only. A Linear that
reads ``n`` in the fine-tune computes ``W_ft·(g' ⊙ x̂) = (W_ft·diag(g'/g))·(g ⊙ x̂)``: the fine-tuned model equals
the base's norm followed by a Linear whose input columns are scaled by ``g'/g``. So the whole change of the norm
scale can live in its consumers' deltas, ``ΔW = W_ft·diag(g'/g) − W0``, and an adapter that cannot carry the
norm (vLLM takes no ``modules_to_save``) still reproduces it exactly at full rank.

What does not fold: a channel the base switches off (``g = 0``) but the fine-tune uses (nothing scaled by zero can
be scaled back), and a LayerNorm bias change ``β → β'`` (it adds ``W_ft·(β' − diag(g'/g)·β)``, a constant that
only a Linear bias could hold).
"""

from __future__ import annotations

import torch


class NotFoldableError(ValueError):
    """The fine-tuned scale cannot be expressed through the base's scale (it uses a channel the base zeroes)."""


def scale_ratio(base_scale: torch.Tensor, finetuned_scale: torch.Tensor) -> torch.Tensor:
    """``g'/g`` per channel, in fp32.

    A channel that is zero in both has ratio 1: it feeds zero to the consumers either way.

    Raises:
        NotFoldableError: some channel has ``g = 0`` and ``g' ≠ 0``, naming how many.
    """
    base, finetuned = base_scale.float(), finetuned_scale.float()
    zero = base == 0
    stranded = int((zero & (finetuned != 0)).sum())
    if stranded:
        raise NotFoldableError(f"{stranded} channel(s) are 0 in the base's scale but not in the fine-tune's")
    return torch.where(zero, torch.ones_like(base), finetuned / torch.where(zero, torch.ones_like(base), base))


def fold_into_consumer(finetuned_weight: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``W_ft·diag(ratio)`` for a consumer's weight in (out, in) orientation, in place; returns it."""
    return finetuned_weight.mul_(ratio.to(finetuned_weight.device, finetuned_weight.dtype)[None, :])


def change_norms(base: torch.Tensor, finetuned: torch.Tensor) -> tuple[float, float]:
    """``(‖t_ft − t_base‖, ‖t_base‖)``: the size of what is lost when a changed tensor is left out of an adapter,
    and what to compare it with. Summed in fp64 over blocks of rows, so a large embedding costs no full-size fp64
    copy."""
    base_rows = base.reshape(-1, base.shape[-1]) if base.dim() > 1 else base.reshape(1, -1)
    ft_rows = finetuned.reshape(base_rows.shape)
    step = max(1, (1 << 20) // max(1, base_rows.shape[1]))
    change = scale = 0.0
    for b, f in zip(base_rows.split(step), ft_rows.split(step)):
        b64 = b.double()
        change += float(torch.sum((f.double() - b64) ** 2))
        scale += float(torch.sum(b64**2))
    return change**0.5, scale**0.5
