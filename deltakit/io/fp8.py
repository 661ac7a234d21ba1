"""FP8 block-scaled weights (DeepSeek-V3, Qwen3-FP8 and other ``quant_method: "fp8"`` releases).

The layout, as transformers 5's ``finegrained_fp8`` integration reads it: ``config.json`` holds
``quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [bo, bi],
...}``; each quantized Linear stores ``<m>.weight`` as float8_e4m3fn codes of shape (out, in) and
``<m>.weight_scale_inv`` in fp32 of shape (ceil(out/bo), ceil(in/bi)), and W[i, j] = code[i, j] ·
scale_inv[i // bo, j // bi] (edge blocks are partial). Which modules are quantized is read from the files, not
the config: a weight is FP8 exactly when it is stored as float8_e4m3fn with a ``weight_scale_inv`` beside it
(embeddings, norms, the lm_head and MoE routers stay in the model dtype in these releases).

Requantization follows transformers' ``Fp8Quantize``: per block, scale_inv = amax / 448 (1 for an all-zero
block) and code = clamp(W · 448 / amax, ±448) rounded to float8_e4m3fn, so a merged checkpoint has the scales
a fresh quantization of the merged weights would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.errors import CheckpointFormatError, UnsupportedWeightsError
from deltakit.names import TensorName

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"  # <m>.weight → <m>.weight_scale_inv
QUANT_METHOD = "fp8"

# quantization_config.quant_method values of layouts deltakit reads no weights of, as users know them.
_OTHER_LAYOUTS = {
    "bitsandbytes": "bitsandbytes (int8/4-bit packed)",
    "gptq": "GPTQ (int4/int8 packed)",
    "awq": "AWQ (int4 packed)",
    "compressed-tensors": "compressed-tensors",
    "fbgemm_fp8": "fbgemm FP8 (per-channel scales)",
    "torchao": "torchao",
    "hqq": "HQQ",
    "eetq": "EETQ (int8)",
    "aqlm": "AQLM",
    "quanto": "quanto",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "bitnet": "BitNet",
    "mxfp4": "MXFP4",
    "fp_quant": "FP-Quant",
    "spqr": "SpQR",
}


@dataclass(frozen=True)
class BlockFp8:
    """A checkpoint's FP8 block layout: (rows, cols) of each block sharing one scale."""

    block: tuple[int, int]

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(ceil(out/bo), ceil(in/bi)): the scale grid of an (out, in) weight."""
        out, inp = shape
        return -(-out // self.block[0]), -(-inp // self.block[1])


def scale_name(weight: TensorName) -> TensorName:
    """``<m>.weight`` → ``<m>.weight_scale_inv``."""
    return weight + SCALE_SUFFIX


def fp8_layout(config: dict | None) -> BlockFp8 | None:
    """The block layout of an FP8 checkpoint deltakit reads, from its config; None for anything else (which
    :func:`block_fp8_layout` explains)."""
    try:
        return block_fp8_layout(config, Path("config.json"))
    except (CheckpointFormatError, UnsupportedWeightsError):
        return None


def block_fp8_layout(config: dict | None, config_path: Path) -> BlockFp8 | None:
    """The FP8 block layout ``config.json``'s ``quantization_config`` describes; None if it describes none.

    Raises:
        UnsupportedWeightsError: any other quantization (named in the message), or an FP8 variant deltakit does
            not read (per-tensor scales, static activation scales, power-of-two ``ue8m0`` scales, FP4 experts).
        CheckpointFormatError: a quantization_config that is not an object, or a malformed block size.
    """
    quant = (config or {}).get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise CheckpointFormatError("quantization_config is not a JSON object", path=config_path)
    method = quant.get("quant_method")

    def refuse(what: str) -> UnsupportedWeightsError:
        return UnsupportedWeightsError(
            f"quantization_config ({method}): {what} quantized weights are not supported (only FP8 with block "
            'scales: quant_method "fp8", weight_block_size, dynamic activations); use the unquantized '
            "(bf16/fp16/fp32) release", path=config_path)

    if method != QUANT_METHOD:
        raise refuse(_OTHER_LAYOUTS.get(str(method), "these"))
    block = quant.get("weight_block_size")
    if block is None:
        raise refuse("FP8 with one scale per tensor (no weight_block_size):")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointFormatError(f"quantization_config.weight_block_size {block!r} is not two positive integers",
                                    path=config_path)
    if str(quant.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise refuse(f"FP8 with activation_scheme {quant.get('activation_scheme')!r} (stored activation scales):")
    if quant.get("scale_fmt", "float") != "float":
        raise refuse(f"FP8 with scale_fmt {quant.get('scale_fmt')!r}:")
    if quant.get("expert_dtype", "fp8") != "fp8":
        raise refuse(f"FP8 with expert_dtype {quant.get('expert_dtype')!r}:")
    return BlockFp8((block[0], block[1]))


def dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, layout: BlockFp8) -> torch.Tensor:
    """W = code × scale_inv of its block, in fp32, (out, in). Memory: the fp32 result and one row-expanded copy of
    the (small) scale grid; the columns are scaled through a view."""
    rows, cols = codes.shape
    bo, bi = layout.block
    weight = codes.to(torch.float32)
    scale = scale_inv.to(torch.float32).repeat_interleave(bo, dim=0)[:rows]  # (out, ceil(in/bi))
    full = cols // bi
    weight[:, : full * bi].view(rows, full, bi).mul_(scale[:, :full, None])
    if cols > full * bi:
        weight[:, full * bi:].mul_(scale[:, full:])
    return weight


def quantize(weight: torch.Tensor, layout: BlockFp8,
             previous: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize an (out, in) weight as transformers' ``Fp8Quantize`` does; partial edge blocks take the
    amax of the elements they hold.

    ``previous``: the (codes, scale_inv) the weight had before a merge. A block whose codes come out the same
    and whose scale differs from the previous one by float32 rounding only (amax = 448 · scale_inv is not exact)
    keeps the previous scale, so a block the merge left unchanged keeps its bytes.

    Returns:
        (codes float8_e4m3fn (out, in), scale_inv fp32 (ceil(out/bo), ceil(in/bi))).
    """
    rows, cols = weight.shape
    bo, bi = layout.block
    row_tiles, col_tiles = layout.scale_shape((rows, cols))
    padded = torch.zeros(row_tiles * bo, col_tiles * bi, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight
    tiles = padded.view(row_tiles, bo, col_tiles, bi)
    amax = tiles.abs().amax(dim=(1, 3))  # (row_tiles, col_tiles)
    is_zero = amax == 0
    scales = torch.where(is_zero, torch.ones_like(amax), FP8_MAX / torch.where(is_zero, torch.ones_like(amax), amax))
    tiles.mul_(scales[:, None, :, None])
    codes = tiles.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(row_tiles * bo, col_tiles * bi)[:rows, :cols]
    codes, scale_inv = codes.contiguous(), (1.0 / scales).to(torch.float32)
    if previous is not None:
        old_codes, old_scale = previous
        old_scale = old_scale.to(torch.float32)
        same_codes = torch.zeros(row_tiles * bo, col_tiles * bi, dtype=torch.bool, device=codes.device)
        same_codes[:rows, :cols] = codes.view(torch.uint8) == old_codes.to(codes.device).view(torch.uint8)
        same_codes[rows:], same_codes[:, cols:] = True, True
        is_same_block = same_codes.view(row_tiles, bo, col_tiles, bi).all(dim=3).all(dim=1)
        is_rounding = (scale_inv - old_scale.to(scale_inv.device)).abs() <= 4 * torch.finfo(torch.float32).eps * old_scale.abs()
        scale_inv = torch.where(is_same_block & is_rounding, old_scale.to(scale_inv.device), scale_inv)
    return codes, scale_inv


@dataclass(frozen=True)
class Requantization:
    """An FP8 weight changed in fp32 and stored as FP8 again: how much the rounding lost."""

    tensor: TensorName
    delta_norm: float  # ‖W' − W‖: the change made to the dequantized weight
    relative_to_delta: float  # ‖Q(W') − W'‖ / ‖W' − W‖: the share of that change the requantization loses
    relative_to_weight: float  # ‖Q(W') − W'‖ / ‖W'‖: FP8's own precision (e4m3: a few percent)


def requantize(name: TensorName, changed: torch.Tensor, codes: torch.Tensor, scale_inv: torch.Tensor,
               layout: BlockFp8) -> tuple[torch.Tensor, torch.Tensor, Requantization]:
    """Store a changed weight as FP8 again (fresh block scales; unchanged blocks keep their bytes) and measure the
    loss against the weight it came from, given as its (codes, scale_inv).

    Returns:
        (codes, scale_inv, the measurement).
    """
    new_codes, new_scale = quantize(changed, layout, previous=(codes, scale_inv))

    def norm(tensor: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))

    delta_norm = norm(changed - dequantize(codes, scale_inv, layout))
    error = norm(dequantize(new_codes, new_scale, layout) - changed)
    weight_norm = norm(changed)
    return new_codes, new_scale, Requantization(name, delta_norm, error / delta_norm if delta_norm > 0 else 0.0,
                                                error / weight_norm if weight_norm > 0 else 0.0)
