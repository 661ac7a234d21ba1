"""One module's weight pair read from two checkpoints as ΔW on the math device: the step extract and inspect
share before their math."""

from __future__ import annotations

import torch

from deltakit.adapters.layers import WeightKind, to_out_in
from deltakit.adapters.variants import DeltaPair
from deltakit.errors import NonFiniteError
from deltakit.io.checkpoint import Checkpoint
from deltakit.math.values import all_finite, check_finite, same_values
from deltakit.names import TensorName


def read_delta(finetuned: Checkpoint, base: Checkpoint, weight: TensorName, kind: WeightKind, device: torch.device,
               *, keep_finetuned: bool = False) -> DeltaPair | None:
    """W0 and ΔW = W_ft − W0 of one weight, fp32, (out, in), on ``device``; None if the two are equal.

    Memory: the stored pair, then W0 and ΔW in fp32 (and W_ft with ``keep_finetuned``), never more.

    Raises:
        NonFiniteError: either input holds NaN or Inf (naming it), or ΔW overflows float32.
    """
    base_w, ft_w = base.get(weight), finetuned.get(weight)
    if same_values(base_w, ft_w) and all_finite(base_w):
        return None
    base_m = to_out_in(base_w.to(device, torch.float32), kind)  # (out, in)
    del base_w
    delta = to_out_in(ft_w.to(device, torch.float32), kind)
    del ft_w
    ft_m = delta.clone() if keep_finetuned else None
    delta.sub_(base_m)
    if not all_finite(delta):
        # Only now is the cost of reading both again worth it: it names the input that holds the NaN or Inf.
        check_finite(base.get(weight), weight, base.path)
        check_finite(finetuned.get(weight), weight, finetuned.path)
        raise NonFiniteError("ΔW overflows float32", path=finetuned.path, tensor=weight)
    return DeltaPair(base_m, delta, ft_m)


def is_changed(finetuned: Checkpoint, base: Checkpoint, name: TensorName) -> bool:
    """Whether a tensor differs between the checkpoints; NonFiniteError if either holds NaN or Inf."""
    base_t, ft_t = base.get(name), finetuned.get(name)
    check_finite(base_t, name, base.path)
    check_finite(ft_t, name, finetuned.path)
    return not same_values(base_t, ft_t)
