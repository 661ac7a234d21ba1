"""Factor codecs (deltakit/math/quantize.py): error bounds of the 8-bit codecs, exactness of their stored values
in every float dtype, and the Gram-trick distance."""

from __future__ import annotations

import pytest
import torch

from deltakit.errors import InvalidOptionError
from deltakit.math.quantize import FACTOR_CODECS, factor_codec, product_distance


def _factors(out: int = 48, inp: int = 40, rank: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Columns of B and rows of A of very different sizes, as an SVD split gives them.
    s = torch.logspace(0, -2, rank)
    b = torch.randn(out, rank, generator=gen) * s.sqrt()
    a = s.sqrt()[:, None] * torch.randn(rank, inp, generator=gen)
    return b, a


def test_int8_elements_are_within_half_a_step() -> None:
    b, a = _factors()
    encoded = factor_codec("int8").encode(b, a)
    assert encoded.b.dtype == encoded.a.dtype == torch.int8
    assert int(encoded.b.abs().max()) == int(encoded.a.abs().max()) == 127  # the full range is used
    b_scale = float(b.abs().max()) / 127
    a_scale = float(a.abs().max()) / 127
    assert encoded.scale == pytest.approx(b_scale * a_scale, rel=1e-12)
    assert float((encoded.b.float() * b_scale - b).abs().max()) <= b_scale / 2 * (1 + 1e-5)
    assert float((encoded.a.float() * a_scale - a).abs().max()) <= a_scale / 2 * (1 + 1e-5)


def test_float8_elements_have_bounded_relative_error() -> None:
    b, a = _factors()
    encoded = factor_codec("float8_e4m3fn").encode(b, a)
    assert encoded.b.dtype == torch.float8_e4m3fn
    b_scale = float(b.abs().max()) / 448
    restored = encoded.b.float() * b_scale
    normal = b.abs() >= 2.0**-6 * b_scale  # e4m3's smallest normal, scaled
    assert torch.all((restored - b)[normal].abs() <= 2.0**-4 * b[normal].abs() * (1 + 1e-6))
    assert float(encoded.b.float().abs().max()) == 448.0


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("float_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_stored_values_are_exact_in_every_float_dtype(name: str, float_dtype: torch.dtype) -> None:
    """PEFT copies the stored tensor into a float LoRA parameter: that cast must not round."""
    encoded = factor_codec(name).encode(*_factors())
    for stored in (encoded.b, encoded.a):
        assert torch.equal(stored.to(float_dtype).double(), stored.double())


@pytest.mark.parametrize("name", list(FACTOR_CODECS))
def test_product_error_is_small_relative_to_the_product(name: str) -> None:
    b, a = _factors()
    encoded = factor_codec(name).encode(b, a)
    exact = b.double() @ a.double()
    error = float(torch.linalg.norm(encoded.product().double() - exact) / torch.linalg.norm(exact))
    assert error < {"int8": 0.02, "float8_e4m3fn": 0.08, "bfloat16": 0.01, "float16": 0.002, "float32": 1e-6}[name]


def test_int8_beats_float8_on_an_svd_split() -> None:
    """The lead in issue 14: int8 has the smaller error at the same bytes."""
    b, a = _factors(out=256, inp=200, rank=16)
    exact = b.double() @ a.double()
    errors = {name: float(torch.linalg.norm(factor_codec(name).encode(b, a).product().double() - exact))
              for name in ("int8", "float8_e4m3fn")}
    assert errors["int8"] < errors["float8_e4m3fn"]


def test_zero_factors_encode_to_zero() -> None:
    encoded = factor_codec("int8").encode(torch.zeros(5, 2), torch.zeros(2, 3))
    assert encoded.scale == 1.0 and not encoded.b.any() and not encoded.a.any()


def test_unknown_name_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="int4"):
        factor_codec("int4")


def test_product_distance_matches_the_dense_norm() -> None:
    b1, a1 = _factors(seed=1)
    b2, a2 = _factors(seed=2)
    dense = float(torch.linalg.norm(b1.double() @ a1.double() - b2.double() @ a2.double()))
    assert product_distance(b1, a1, b2, a2) == pytest.approx(dense, rel=1e-9)
    # Identical products: what is left is rounding of ‖b1 @ a1‖² in float64, far below any quantization error.
    assert product_distance(b1, a1, b1, a1) < 1e-6 * float(torch.linalg.norm(b1 @ a1))
