"""FP8 block scales: dequantization and requantization agree with transformers' finegrained_fp8 and a hand formula."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import dequantize_fp8_by_hand
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
from transformers.utils.quantization_config import FineGrainedFP8Config

from deltakit.errors import CheckpointFormatError, UnsupportedWeightsError
from deltakit.io.fp8 import BlockFp8, block_fp8_layout, dequantize, quantize

CONFIG = Path("config.json")


def _transformers_quantizer(block: tuple[int, int]) -> Fp8Quantize:
    return Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block)))


def _weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Rows of very different magnitude, so that a scale applied to the wrong block shows.
    return torch.randn(shape, generator=generator) * torch.logspace(-3, 1, shape[0])[:, None]


@pytest.mark.parametrize("block", [(8, 8), (4, 16), (16, 4)])
def test_quantize_matches_transformers_bit_for_bit(block):
    weight = _weight((32, 48))
    expected = _transformers_quantizer(block)._quantize_one("m.weight", weight)
    codes, scale_inv = quantize(weight, BlockFp8(block))
    assert codes.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert torch.equal(codes.view(torch.uint8), expected["m.weight"].view(torch.uint8))
    assert torch.equal(scale_inv, expected["m.weight_scale_inv"])


@pytest.mark.parametrize("block", [(8, 8), (4, 16)])
def test_dequantize_matches_transformers(block):
    codes, scale_inv = _transformers_quantizer(block)._quantize_one("m.weight", _weight((32, 48))).values()
    expected = Fp8Dequantize(None)._dequantize_one(codes, scale_inv, output_dtype=torch.float32)
    assert torch.equal(dequantize(codes, scale_inv, BlockFp8(block)), expected)


@pytest.mark.parametrize("shape", [(20, 12), (8, 8), (1, 30), (17, 9)])
def test_partial_edge_blocks_follow_the_hand_formula(shape):
    """DeepSeek-V3 has (576, 7168) weights with 128-blocks: the scale grid is ceil-divided, edges are partial."""
    layout = BlockFp8((8, 8))
    weight = _weight(shape, seed=3)
    codes, scale_inv = quantize(weight, layout)
    assert tuple(scale_inv.shape) == layout.scale_shape(shape) == (-(-shape[0] // 8), -(-shape[1] // 8))
    restored = dequantize(codes, scale_inv, layout)
    assert torch.equal(restored, dequantize_fp8_by_hand(codes, scale_inv, (8, 8)))
    # e4m3 keeps 3 mantissa bits: each element within half a step of its value; a wrong edge scale is far off.
    assert ((restored - weight).norm() / weight.norm()) < 0.04
    # Every block's largest element maps to ±448 exactly, so amax survives the round trip up to fp32 rounding.
    assert torch.allclose(scale_inv * 448, _block_amax(weight, (8, 8)), rtol=1e-6)


def _block_amax(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows = -(-weight.shape[0] // block[0])
    cols = -(-weight.shape[1] // block[1])
    return torch.tensor([[weight[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max()
                          for j in range(cols)] for i in range(rows)])


def test_an_all_zero_block_keeps_scale_one_and_zero_codes():
    weight = _weight((16, 16))
    weight[:8, :8] = 0
    codes, scale_inv = quantize(weight, BlockFp8((8, 8)))
    assert scale_inv[0, 0] == 1.0 and not codes[:8, :8].float().any()


def test_requantizing_a_dequantized_weight_is_the_identity():
    """A merge that changes nothing in a block must give back its codes and scale exactly."""
    layout = BlockFp8((8, 8))
    codes, scale_inv = quantize(_weight((24, 40)), layout)
    restored = dequantize(codes, scale_inv, layout)
    fresh_codes, fresh_scale = quantize(restored, layout)
    assert torch.equal(fresh_codes.view(torch.uint8), codes.view(torch.uint8))
    assert not torch.equal(fresh_scale, scale_inv)  # amax = 448 · scale_inv is not exact in fp32 ...
    torch.testing.assert_close(fresh_scale, scale_inv, rtol=1e-6, atol=0)
    again_codes, again_scale = quantize(restored, layout, previous=(codes, scale_inv))
    assert torch.equal(again_codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(again_scale, scale_inv)  # ... so unchanged blocks keep their previous scale
    restored[0, 0] = 2 * restored[:8, :8].abs().max()  # a block with a new amax takes a fresh scale
    changed_codes, changed_scale = quantize(restored, layout, previous=(codes, scale_inv))
    assert not torch.equal(changed_codes.view(torch.uint8), codes.view(torch.uint8))
    assert changed_scale[0, 0] != scale_inv[0, 0] and torch.equal(changed_scale[1:], scale_inv[1:])


@pytest.mark.parametrize(("quant", "words"), [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ"),
    ({"quant_method": "awq"}, "AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
    ({"quant_method": "something-new"}, r"\(something-new\): these"),
    ({"quant_method": "fp8"}, "one scale per tensor"),
    ({"quant_method": "fbgemm_fp8"}, "fbgemm"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "static"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "ue8m0"),
])
def test_other_quantizations_are_refused_naming_the_layout(quant, words):
    with pytest.raises(UnsupportedWeightsError, match=words) as caught:
        block_fp8_layout({"quantization_config": quant}, CONFIG)
    assert "\n" not in str(caught.value) and "config.json" in str(caught.value)


def test_a_malformed_block_size_is_a_format_error():
    with pytest.raises(CheckpointFormatError, match=r"weight_block_size \[128, 0\] is not two positive integers"):
        block_fp8_layout({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 0]}}, CONFIG)


def test_block_layout_from_config():
    config = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 64]}}
    assert block_fp8_layout(config, CONFIG) == BlockFp8((128, 64))
    assert block_fp8_layout({"model_type": "llama"}, CONFIG) is None
    assert BlockFp8((128, 128)).scale_shape((576, 7168)) == (5, 56)
