"""One tensor read from two checkpoints, and a weight pair turned into ΔW on the math device: the steps extract
and inspect share before their math. Reading is separate from the math so that the next module can be read
ahead (:func:`~deltakit.io.prefetch.prefetched`) while this one is factorized."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.adapters.layers import WeightKind, to_out_in
from deltakit.adapters.variants import DeltaPair
from deltakit.errors import NonFiniteError
from deltakit.io.checkpoint import Checkpoint
from deltakit.math.factorize import DeltaBuffer
from deltakit.math.norm_fold import fold_into_consumer
from deltakit.math.values import check_finite, same_values
from deltakit.names import TensorName


@dataclass(frozen=True)
class StoredPair:
    """One tensor as each checkpoint stores it, and where each came from (for errors)."""

    name: TensorName
    finetuned: torch.Tensor
    base: torch.Tensor
    finetuned_path: Path
    base_path: Path

    def check_finite(self) -> None:
        """Raise NonFiniteError naming the tensor and the checkpoint that holds a NaN or Inf."""
        check_finite(self.base, self.name, self.base_path)
        check_finite(self.finetuned, self.name, self.finetuned_path)


def read_pair(finetuned: Checkpoint, base: Checkpoint, name: TensorName) -> StoredPair:
    """Read one tensor from both checkpoints."""
    return StoredPair(name, finetuned.get(name), base.get(name), finetuned.path, base.path)


def delta_of(stored: StoredPair, kind: WeightKind, deltas: DeltaBuffer, *, keep_base: bool = False,
             keep_finetuned: bool = False, column_scale: torch.Tensor | None = None) -> DeltaPair | None:
    """ΔW = W_ft − W0 of one weight, fp32, (out, in), on the buffer's device, with ‖ΔW‖²; None if the two are
    equal. ΔW lives in ``deltas`` (valid until its next use); W0 and W_ft are converted only when asked for.

    ``column_scale``: the g'/g of a changed norm this module reads, folded in first (ΔW = W_ft·diag(g'/g) − W0,
    :mod:`deltakit.math.norm_fold`); W_ft then means the folded weight, and equal weights still have a ΔW. The
    folded readers are Linear layers, stored (out, in), so the scale applies to the stored columns.

    Raises:
        NonFiniteError: either input holds NaN or Inf (naming it), or ΔW overflows float32.
    """
    finetuned = stored.finetuned
    if column_scale is not None:
        # A fp32 copy of W_ft with its columns scaled; the stored tensor is left as read.
        finetuned = fold_into_consumer(finetuned.to(deltas.device, torch.float32, copy=True), column_scale)
    delta, energy = deltas.form(finetuned, stored.base)
    if energy == 0.0 and column_scale is None:  # every difference exactly 0: x − y = 0 only for x = y in IEEE
        return None
    if not math.isfinite(energy):
        stored.check_finite()  # names the input that holds the NaN or Inf
        raise NonFiniteError("ΔW overflows float32", path=stored.finetuned_path, tensor=stored.name)

    def converted(weight: torch.Tensor, keep: bool) -> torch.Tensor | None:
        return to_out_in(weight.to(deltas.device, torch.float32), kind) if keep else None

    return DeltaPair(converted(stored.base, keep_base), to_out_in(delta, kind),
                     converted(finetuned, keep_finetuned), energy)


def is_changed(stored: StoredPair) -> bool:
    """Whether a tensor differs between the checkpoints; NonFiniteError if either holds NaN or Inf."""
    stored.check_finite()
    return not same_values(stored.base, stored.finetuned)
