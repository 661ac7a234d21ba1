"""Checks on tensor values that extract and inspect make the same way: finiteness, and equality across dtypes."""

from __future__ import annotations

from pathlib import Path

import torch

from deltakit.errors import NonFiniteError


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or ±Inf; checked in blocks of rows, since isfinite on a whole tensor would
    allocate a mask as large as the tensor."""
    if not tensor.is_floating_point():
        return True
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor.reshape(1, -1)
    step = max(1, (1 << 20) // max(1, rows.shape[1]))
    # isfinite has no float8 kernel; such a block is small, so widen it.
    widen = tensor.dtype.itemsize == 1
    return all(bool(torch.isfinite(block.float() if widen else block).all()) for block in rows.split(step))


def check_finite(tensor: torch.Tensor, name: str, where: Path) -> None:
    """Raise NonFiniteError naming the tensor and its file if any element is NaN or ±Inf."""
    if not all_finite(tensor):
        raise NonFiniteError("contains NaN or Inf", path=where, tensor=name)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Element-wise equality, comparing in fp32 when the dtypes differ (an fp16 base, a bf16 fine-tune)."""
    return torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.float(), b.float())
