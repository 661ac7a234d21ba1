"""Factor codecs: how a LoRA factor pair (B, A) is stored, at 16/32-bit floats or compactly at 8 bits.

An 8-bit codec stores each factor with one scale of its own: B ≈ s_B·B_q and A ≈ s_A·A_q, so that
B@A ≈ (s_B·s_A)·B_q@A_q. The product of the scales is one number per module, which the adapter folds into the
module's LoRA scaling (PEFT's ``alpha_pattern``), so no scale tensor is stored and PEFT loads the file as it is.

- ``int8``: symmetric, s = max|x| / 127, round to nearest; the grid is uniform, so the error of each element is
  at most s/2.
- ``float8_e4m3fn``: s = max|x| / 448 (e4m3's largest finite value), round to nearest e4m3 value; the relative
  error of each element is at most 2⁻⁴, but small elements fall below the smallest subnormal (2⁻⁹·s) and flush.

Both codecs' stored values are exact in float16, bfloat16 and float32 (integers up to 127; e4m3 has 3 mantissa
bits and an exponent range inside float16's), so casting them into any float LoRA parameter loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from deltakit.defaults import FACTOR_DTYPES
from deltakit.errors import InvalidOptionError


@dataclass(frozen=True)
class EncodedFactors:
    """A factor pair as stored: b @ a times ``scale`` is the product of the factors that were encoded."""

    b: torch.Tensor  # (out, r), in the codec's storage dtype
    a: torch.Tensor  # (r, in)
    scale: float

    def product(self) -> torch.Tensor:
        """scale · b @ a in fp32, (out, in)."""
        return self.scale * (self.b.float() @ self.a.float())


class FactorCodec(Protocol):
    dtype: torch.dtype  # of the stored factors
    is_compact: bool  # stores scaled values (with a scale to fold into the scaling), not the factors themselves

    @property
    def itemsize(self) -> int: ...

    def encode(self, b: torch.Tensor, a: torch.Tensor) -> EncodedFactors: ...


@dataclass(frozen=True)
class FloatFactors:
    """Factors cast to a float dtype, scale 1."""

    dtype: torch.dtype
    is_compact = False

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def encode(self, b: torch.Tensor, a: torch.Tensor) -> EncodedFactors:
        return EncodedFactors(b.to(self.dtype), a.to(self.dtype), 1.0)


@dataclass(frozen=True)
class ScaledFactors:
    """Each factor scaled so that its largest magnitude is the storage format's ``limit``, then rounded to it."""

    dtype: torch.dtype
    limit: float  # the largest magnitude the format holds (used in full)
    is_compact = True

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        x = x.float()
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak == 0.0:
            return torch.zeros_like(x, dtype=self.dtype), 1.0
        scale = peak / self.limit
        scaled = x / scale
        if self.dtype.is_floating_point:
            stored = scaled.clamp(-self.limit, self.limit).to(self.dtype)  # round to nearest representable
        else:
            stored = scaled.round().clamp(-self.limit, self.limit).to(self.dtype)
        return stored, scale

    def encode(self, b: torch.Tensor, a: torch.Tensor) -> EncodedFactors:
        b_q, b_scale = self._quantize(b)
        a_q, a_scale = self._quantize(a)
        return EncodedFactors(b_q, a_q, b_scale * a_scale)


_EIGHT_BIT_LIMITS = {"int8": 127.0, "float8_e4m3fn": float(torch.finfo(torch.float8_e4m3fn).max)}
# By --factor-dtype name (defaults.FACTOR_DTYPES; scripts depend on the names, issue 14).
FACTOR_CODECS: dict[str, FactorCodec] = {
    name: ScaledFactors(getattr(torch, name), _EIGHT_BIT_LIMITS[name]) if name in _EIGHT_BIT_LIMITS
    else FloatFactors(getattr(torch, name)) for name in FACTOR_DTYPES
}


def factor_codec(name: str) -> FactorCodec:
    """The codec for a ``--factor-dtype`` name.

    Raises:
        InvalidOptionError: an unknown name.
    """
    if name not in FACTOR_CODECS:
        raise InvalidOptionError(f"--factor-dtype {name!r}: choose one of {', '.join(FACTOR_CODECS)}")
    return FACTOR_CODECS[name]


def product_distance(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖b1 @ a1 − b2 @ a2‖_F without forming either product: with P = [b1, −b2] and Q = [a1; a2],
    ‖P @ Q‖² = trace((PᵀP)(QQᵀ)), which costs (out + in)·(2r)² instead of out·in·r."""
    p = torch.cat([b1.double(), -b2.double()], dim=1)  # (out, 2r)
    q = torch.cat([a1.double(), a2.double()], dim=0)  # (2r, in)
    squared = float(((p.T @ p) * (q @ q.T)).sum())
    return max(squared, 0.0) ** 0.5
