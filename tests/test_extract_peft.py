"""Extracted adapters load into PEFT as they are and reproduce what they promise.

At full rank an adapter must give the fine-tune's logits; at any rank PEFT's outputs must equal the base weights
plus scaling·B@A (and DoRA's rescaling) computed directly from the adapter file. Every load is checked for
missing and unexpected keys (``from_pretrained`` drops unexpected keys silently, so the state dict is loaded
again with ``set_peft_model_state_dict``, which reports them).
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import ModelPair, load_model, logits, peft_model

import deltakit
from deltakit.math.dora import apply_dora
from deltakit.adapters.layers import WeightKind, from_out_in, to_out_in

PAIRS = ["llama_pair", "qwen2_pair", "bert_pair", "gpt2_pair", "llama_tied_pair"]
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))




def _apply_directly(pair: ModelPair, adapter_dir) -> torch.nn.Module:
    """Base weights + the adapter, computed from the files without PEFT: W0 + s·B@A per module (DoRA: m/‖·‖
    rescaling per output row), tied heads through their embedding, carried tensors copied in."""
    model = load_model(pair.base_dir)
    adapter = deltakit.read_adapter(adapter_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    updated: set[int] = set()  # storage of weights already updated: a tied head shares its embedding's
    with torch.no_grad():
        for module, entry in adapter.modules.items():
            if entry.key_a is None:
                continue
            weight = params[f"{module}.weight"]
            is_conv1d = adapter.is_conv1d(module) and type(model.get_submodule(module)).__name__ == "Conv1D"
            kind = WeightKind.EMBEDDING if entry.is_embedding else (
                WeightKind.CONV1D if is_conv1d else WeightKind.LINEAR)
            if entry.base_bias_key:
                model.get_submodule(module).bias.copy_(adapter.weights.get(entry.base_bias_key))
            if weight.data_ptr() in updated:
                continue  # a tied head: its factors are the embedding's, transposed; the delta is applied once
            updated.add(weight.data_ptr())
            factors = adapter.factors(module, kind)
            base_m = to_out_in(weight.float(), kind)
            if factors.magnitude is not None:
                new, _ = apply_dora(base_m, factors.delta(), factors.magnitude)
            else:
                new = base_m + factors.delta()
            weight.copy_(from_out_in(new, kind))
        for name, key in adapter.saved.items():
            params[name].copy_(adapter.weights.get(key))
    return model


@pytest.mark.parametrize("pair_name", PAIRS)
def test_full_rank_adapter_reproduces_finetune_in_peft(pair_name, request, tmp_path):
    pair = request.getfixturevalue(pair_name)
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "adapter", rank=128, svd="exact")
    assert report.modules and max(m.relative_error for m in report.modules) < 1e-5
    assert not report.fates("dropped"), report.fates("dropped")
    expected = logits(pair.ft_dir, INPUT_IDS)
    got = logits(peft_model(pair, tmp_path / "adapter"), INPUT_IDS)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("pair_name", PAIRS)
def test_low_rank_peft_output_equals_direct_application(pair_name, request, tmp_path):
    """alpha ≠ r and rsLoRA so that a wrong scaling anywhere shows."""
    pair = request.getfixturevalue(pair_name)
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "adapter", rank=3, alpha=5.0, use_rslora=True,
                     rank_pattern=[(r"(mlp|intermediate)\..*", 5)])  # every arch has such modules
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 5.0 and config["use_rslora"] is True
    got = logits(peft_model(pair, tmp_path / "adapter"), INPUT_IDS)
    expected = logits(_apply_directly(pair, tmp_path / "adapter"), INPUT_IDS)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(expected, logits(pair.ft_dir, INPUT_IDS), atol=1e-3)  # rank 3 is lossy here


def test_rank_pattern_reaches_peft_per_module(llama_pair, tmp_path):
    deltakit.extract(llama_pair.ft_dir, llama_pair.base_dir, tmp_path / "a", rank=4,
                     rank_pattern=[(r"mlp\.down_proj", 7), (r"layers\.1\..*", 2)])
    model = peft_model(llama_pair, tmp_path / "a")
    layers = model.base_model.model.model.layers
    assert layers[0].mlp.down_proj.r["default"] == 7
    assert layers[1].mlp.down_proj.r["default"] == 7  # first matching pattern wins, as in PEFT
    assert layers[1].self_attn.q_proj.r["default"] == 2
    assert layers[0].self_attn.q_proj.r["default"] == 4


@pytest.mark.parametrize("pair_name", ["llama_pair", "gpt2_pair"])
def test_dora_full_rank_reproduces_finetune_in_peft(pair_name, request, tmp_path):
    pair = request.getfixturevalue(pair_name)
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "dora", rank=128, svd="exact", dora=True)
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert max(m.relative_error for m in report.modules) < 1e-5
    expected = logits(pair.ft_dir, INPUT_IDS)
    if pair.config.tie_word_embeddings:
        # PEFT cannot tie DoRA magnitudes across embedding and head: the tied embedding is dropped, and said so.
        assert [t.tensor for t in report.fates("dropped")] == ["transformer.wte.weight"]
        return
    got = logits(peft_model(pair, tmp_path / "dora"), INPUT_IDS)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("pair_name", ["llama_pair", "gpt2_pair"])
def test_dora_low_rank_peft_output_equals_direct_application(pair_name, request, tmp_path):
    pair = request.getfixturevalue(pair_name)
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "dora", rank=4, alpha=8.0, dora=True)
    got = logits(peft_model(pair, tmp_path / "dora"), INPUT_IDS)
    expected = logits(_apply_directly(pair, tmp_path / "dora"), INPUT_IDS)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_bf16_sharded_checkpoint_extracts_and_loads(llama_pair_bf16_sharded, tmp_path):
    pair = llama_pair_bf16_sharded
    assert len(list(pair.base_dir.glob("model-*-of-*.safetensors"))) > 2
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=128)
    weights = deltakit.open_checkpoint(tmp_path / "a" / "adapter_model.safetensors")
    assert {weights.info(n).dtype for n in weights} == {torch.bfloat16}
    expected = logits(pair.ft_dir, INPUT_IDS)
    got = logits(peft_model(pair, tmp_path / "a"), INPUT_IDS)
    # bf16 factors of a full-rank delta: the rounding of B and A is what remains.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("pair_name", ["llama_pair", "llama_tied_pair", "gpt2_pair"])
def test_budget_adapter_loads_in_peft_with_its_per_module_ranks(pair_name, request, tmp_path):
    """A budget gives every module its own rank; rank_pattern must carry each one to PEFT, tied heads included."""
    pair = request.getfixturevalue(pair_name)
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", avg_rank=3, alpha=4.0,
                              budget_weighting="absolute")
    assert len({m.rank for m in report.modules}) > 1  # the allocation is not uniform on a real fine-tune
    model = peft_model(pair, tmp_path / "a")
    for m in report.modules:
        assert model.get_submodule(f"base_model.model.{m.module}").r["default"] == m.rank, m.module
    got = logits(model, INPUT_IDS)
    expected = logits(_apply_directly(pair, tmp_path / "a"), INPUT_IDS)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
