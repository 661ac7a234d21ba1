"""FP8 block-scaled checkpoints end to end: extract from them, merge into them (FP8 again, or plain with --dtype),
and load the results with transformers and PEFT."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from builders import ModelPair, dequantize_fp8_by_hand, load_model, logits, make_pair, quantize_checkpoint_fp8
from peft import PeftModel
from safetensors.torch import load_file

import deltakit
from deltakit.io.fp8 import BlockFp8, dequantize

INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
BLOCK = (8, 16)  # not square, so that swapped block axes show


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory) -> tuple[ModelPair, Path, Path]:
    """A llama pair (fp32), and both sides quantized to FP8 with 8×16 blocks by transformers' own quantizer."""
    root = tmp_path_factory.mktemp("fp8_pair")
    pair = make_pair(root / "pair", "llama")
    return pair, quantize_checkpoint_fp8(pair.base_dir, root / "base_fp8", block=BLOCK), \
        quantize_checkpoint_fp8(pair.ft_dir, root / "ft_fp8", block=BLOCK)


def _dequantized(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint as transformers' CPU load sees it: FP8 dequantized by hand, the rest as fp32."""
    stored = load_file(ckpt_dir / "model.safetensors")
    return {name: dequantize_fp8_by_hand(t, stored[name + "_scale_inv"], BLOCK) if t.dtype == torch.float8_e4m3fn
            else t.float() for name, t in stored.items() if not name.endswith("_scale_inv")}


def test_the_reader_presents_dequantized_weights_and_hides_the_scales(fp8_pair):
    _, base_fp8, _ = fp8_pair
    ckpt = deltakit.open_checkpoint(base_fp8)
    assert not [n for n in ckpt if n.endswith("_scale_inv")]
    info = ckpt.info("model.layers.0.mlp.down_proj.weight")
    assert info.dtype == torch.float32 and info.scale == "model.layers.0.mlp.down_proj.weight_scale_inv"
    # The same values transformers loads (it dequantizes on CPU), element for element.
    model = load_model(base_fp8)
    assert torch.equal(ckpt.get("model.layers.0.mlp.down_proj.weight"), model.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(ckpt.get("lm_head.weight"), model.lm_head.weight)  # not quantized (modules_to_not_convert)


@pytest.mark.parametrize("sides", ["both", "base", "finetuned"])
def test_full_rank_extract_from_fp8_reproduces_the_dequantized_finetune(fp8_pair, tmp_path, sides):
    pair, base_fp8, ft_fp8 = fp8_pair
    base = base_fp8 if sides in ("both", "base") else pair.base_dir
    ft = ft_fp8 if sides in ("both", "finetuned") else pair.ft_dir
    # fp32 factors: the unquantized embedding and head are bf16 here, and bf16 factors would round.
    report = deltakit.extract(ft, base, tmp_path / "a", rank=128, svd="exact", dtype="float32")
    assert max(m.relative_error for m in report.modules) < 1e-5 and not report.fates("dropped")
    weights = deltakit.open_checkpoint(tmp_path / "a" / "adapter_model.safetensors")
    assert not [n for n in weights if "scale_inv" in n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_model(base), tmp_path / "a")
    torch.testing.assert_close(logits(model, INPUT_IDS), logits(ft, INPUT_IDS), atol=2e-4, rtol=1e-4)


def test_merge_into_fp8_requantizes_with_fresh_block_scales_and_loads(fp8_pair, tmp_path):
    pair, base_fp8, ft_fp8 = fp8_pair
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=8)
    report = deltakit.merge(base_fp8, [tmp_path / "a"], tmp_path / "merged")
    stored, base_stored = load_file(tmp_path / "merged" / "model.safetensors"), load_file(base_fp8 / "model.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in stored.items()} == {n: (t.dtype, t.shape) for n, t in base_stored.items()}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"] == \
        json.loads((base_fp8 / "config.json").read_text())["quantization_config"]
    # Bit for bit what transformers' own quantizer makes of the plain fp32 merge of the dequantized base.
    deltakit.merge(base_fp8, [tmp_path / "a"], tmp_path / "plain", dtype="float32")
    reference = quantize_checkpoint_fp8(tmp_path / "plain", tmp_path / "reference", block=BLOCK)
    expected = load_file(reference / "model.safetensors")
    for name, tensor in stored.items():
        assert torch.equal(tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor,
                           expected[name].view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn
                           else expected[name]), name
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    merged_w = dequantize(stored[name], stored[name + "_scale_inv"], BlockFp8(BLOCK))
    relative = (merged_w - plain[name]).norm() / plain[name].norm()
    assert 0 < relative < 0.04  # e4m3 keeps 3 mantissa bits
    row = next(r for r in report.requantized if r.tensor == name)
    assert row.relative_to_weight == pytest.approx(float(relative), rel=1e-4)
    assert len(report.requantized) == 14 and all(0 < r.relative_to_delta < 1 for r in report.requantized)
    assert report.adapter_errors and report.adapter_errors[0] > 0
    assert any("FP8 requantized" in line for line in report.summary_lines())
    # transformers loads it as it loads the original; FP8 rounding moves the logits by a few percent.
    got, expected_logits = logits(tmp_path / "merged", INPUT_IDS), logits(tmp_path / "plain", INPUT_IDS)
    assert (got - expected_logits).abs().max() < 0.15 * expected_logits.abs().max()


def test_merge_with_dtype_writes_a_plain_checkpoint_without_quantization_config(fp8_pair, tmp_path):
    pair, base_fp8, _ = fp8_pair
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=8)
    deltakit.merge(base_fp8, [tmp_path / "a"], tmp_path / "merged", dtype="bfloat16")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    stored = load_file(tmp_path / "merged" / "model.safetensors")
    assert not [n for n in stored if "scale_inv" in n] and {t.dtype for t in stored.values()} == {torch.bfloat16}
    # Each weight: the dequantized base plus the adapter's delta, rounded to bf16 once.
    base = _dequantized(base_fp8)
    adapter = deltakit.read_adapter(tmp_path / "a")
    for module in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj"):
        from deltakit.adapters.layers import WeightKind
        expected = base[f"{module}.weight"] + adapter.factors(module, WeightKind.LINEAR).delta()
        torch.testing.assert_close(stored[f"{module}.weight"], expected.to(torch.bfloat16), atol=0, rtol=0)


def test_unmerge_from_fp8_gives_the_base_back_within_fp8_precision(fp8_pair, tmp_path):
    pair, base_fp8, _ = fp8_pair
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=8)
    deltakit.merge(base_fp8, [tmp_path / "a"], tmp_path / "merged")
    report = deltakit.unmerge(tmp_path / "merged", [tmp_path / "a"], tmp_path / "unmerged")
    assert len(report.requantized) == 14
    base, back = _dequantized(base_fp8), _dequantized(tmp_path / "unmerged")
    name = "model.layers.0.mlp.gate_proj.weight"
    assert (back[name] - base[name]).norm() / base[name].norm() < 0.06
    assert torch.equal(back["model.norm.weight"], base["model.norm.weight"])


def test_dora_merge_into_fp8_and_unmerge_with_its_receipt(fp8_pair, tmp_path):
    """DoRA row norms go into the receipt in the order the merge meets the weights: an FP8 weight comes up with its
    scales, which the file stores first (safetensors orders by dtype), before the bf16 norms the adapter replaces."""
    pair, base_fp8, _ = fp8_pair
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "d", rank=8, dora=True)
    deltakit.merge(base_fp8, [tmp_path / "d"], tmp_path / "merged")
    deltakit.merge(base_fp8, [tmp_path / "d"], tmp_path / "plain", dtype="float32")
    merged, plain = _dequantized(tmp_path / "merged"), load_file(tmp_path / "plain" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < (merged[name] - plain[name]).norm() / plain[name].norm() < 0.04
    deltakit.unmerge(tmp_path / "merged", [tmp_path / "d"], tmp_path / "unmerged")
    base, back = _dequantized(base_fp8), _dequantized(tmp_path / "unmerged")
    assert (back[name] - base[name]).norm() / base[name].norm() < 0.06
    assert torch.equal(back["model.layers.0.input_layernorm.weight"], base["model.layers.0.input_layernorm.weight"])


def test_scales_that_do_not_fit_the_block_size_are_a_one_line_error(fp8_pair, tmp_path):
    from safetensors.torch import save_file

    from deltakit.errors import CheckpointFormatError

    _, base_fp8, _ = fp8_pair
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((base_fp8 / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16, 16]  # the scales were made for 8×16
    (bad / "config.json").write_text(json.dumps(config))
    save_file(load_file(base_fp8 / "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"weight_block_size \[16, 16\] needs float32") as caught:
        deltakit.open_checkpoint(bad)
    assert "_scale_inv" in str(caught.value) and "\n" not in str(caught.value)


def test_fp8_mixture_of_experts_extracts_and_merges_expert_by_expert(mixtral_pair, tmp_path):
    """DeepSeek-V3-like: every expert weight FP8 with its own block scales, the routers in bf16."""
    pair = mixtral_pair
    base_fp8 = quantize_checkpoint_fp8(pair.base_dir, tmp_path / "base_fp8", block=BLOCK)
    ft_fp8 = quantize_checkpoint_fp8(pair.ft_dir, tmp_path / "ft_fp8", block=BLOCK)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_scale_inv" in load_file(base_fp8 / "model.safetensors")
    report = deltakit.extract(ft_fp8, base_fp8, tmp_path / "a", rank=128, svd="exact", dtype="float32")
    assert max(m.relative_error for m in report.modules) < 1e-5
    # An expert the fine-tune left alone quantizes to the same codes: still seen as unchanged.
    assert [(layer["changed"], layer["unchanged"]) for layer in report.experts] == [([0, 2, 3], [1])] * 2
    merged = deltakit.merge(base_fp8, [tmp_path / "a"], tmp_path / "merged")
    assert any(".experts." in r.tensor for r in merged.requantized)
    got, want = _dequantized(tmp_path / "merged"), _dequantized(ft_fp8)
    # A full-rank merge of the dequantized fine-tune, requantized: the fine-tune's own codes come back.
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    assert (got[name] - want[name]).norm() / want[name].norm() < 1e-3
