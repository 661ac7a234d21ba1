"""Mixture-of-experts checkpoints: adapters PEFT 0.21 loads into transformers 5's fused experts, and merges that
match PEFT's merge_and_unload (adapters/moe.py has the rules these tests hold deltakit to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import MoePair, logits, peft_model
from safetensors.torch import load_file

import deltakit
from deltakit.errors import InvalidOptionError

PAIRS = ["mixtral_pair", "qwen3_moe_pair"]
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))




def _weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt_dir / "model.safetensors")


def _expert_weights(pair: MoePair) -> list[str]:
    return [n for n in _weights(pair.base_dir) if ".experts." in n]


@pytest.mark.parametrize("pair_name", PAIRS)
def test_full_rank_moe_adapter_loads_in_peft_and_reproduces_the_finetune(pair_name, request, tmp_path):
    pair = request.getfixturevalue(pair_name)
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=128, svd="exact")
    assert max(m.relative_error for m in report.modules) < 1e-5
    assert not report.fates("dropped")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # One rank for every expert and router (the largest any needed); the others keep theirs through rank_pattern.
    assert config["r"] == 48 and config["lora_alpha"] == 48
    assert not [k for k in config["rank_pattern"] if "expert" in k or k.endswith("gate")]
    # Unchanged experts are in the adapter as zeros, and reported as unchanged, layer by layer.
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    unchanged = [k for k in weights if ".experts.1." in k]
    assert len(unchanged) == 2 * 3 * 2 and not any(weights[k].any() for k in unchanged)
    assert [(layer["changed"], layer["unchanged"]) for layer in report.experts] == [([0, 2, 3], [1])] * 2
    assert all(e < 1e-5 for layer in report.experts for e in layer["max_relative_error"].values())
    card = (tmp_path / "a" / "README.md").read_text()
    assert "changed 3/4" in card and "unchanged [1]" in card
    assert any("changed 3/4" in line for line in report.summary_lines())
    expected = logits(pair.ft_dir, INPUT_IDS)
    got = logits(peft_model(pair, tmp_path / "a"), INPUT_IDS)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("pair_name", PAIRS)
def test_low_rank_moe_merge_and_unmerge_match_peft_merge_and_unload(pair_name, request, tmp_path):
    """At rank 6 with alpha 5 (so a scaling error shows; the 4-expert routers have rank 4 and are padded to 6 with
    their scaling changed), deltakit's merge of the per-expert adapter writes what PEFT's merge into the fused
    experts saves, tensor by tensor, and unmerge gives the base back."""
    pair = request.getfixturevalue(pair_name)
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=6, alpha=5.0)
    assert {m.rank for m in report.modules if m.module.endswith("gate")} == {4}
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 5.0 and not config["rank_pattern"]
    assert all(layer["max_relative_error"]["0"] > 0.1 for layer in report.experts)  # lossy: the test can tell
    loaded = peft_model(pair, tmp_path / "a")
    peft_logits = logits(loaded, INPUT_IDS)
    loaded.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    deltakit.merge(pair.base_dir, [tmp_path / "a"], tmp_path / "merged")
    ours, theirs = _weights(tmp_path / "merged"), _weights(tmp_path / "peft_merged")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(logits(tmp_path / "merged", INPUT_IDS), peft_logits, atol=2e-4, rtol=1e-4)
    base = _weights(pair.base_dir)
    assert all(torch.equal(ours[n], base[n]) for n in _expert_weights(pair) if ".experts.1." in n)
    deltakit.unmerge(tmp_path / "merged", [tmp_path / "a"], tmp_path / "unmerged")
    for name, tensor in _weights(tmp_path / "unmerged").items():
        torch.testing.assert_close(tensor, base[name], atol=1e-6, rtol=1e-5, msg=name)


def test_excluded_experts_are_zero_filled_and_reported_as_dropped(mixtral_pair, tmp_path):
    pair = mixtral_pair
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=4, exclude=[r"experts\.2\."])
    dropped = {t.tensor for t in report.fates("dropped")}
    assert dropped == {n for n in _expert_weights(pair) if ".experts.2." in n}
    assert [layer["changed"] for layer in report.experts] == [[0, 2, 3]] * 2  # changed, though not in the adapter
    assert [layer["max_relative_error"]["2"] for layer in report.experts] == [1.0, 1.0]
    peft_model(pair, tmp_path / "a")  # still loads: the excluded experts are zeros


@pytest.mark.parametrize(("option", "words"), [({"dora": True}, "reject DoRA"), ({"use_rslora": True}, "√2")])
def test_dora_and_rslora_on_experts_are_refused_before_any_math(qwen3_moe_pair, tmp_path, option, words):
    pair = qwen3_moe_pair
    with pytest.raises(InvalidOptionError, match=words) as caught:
        deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=4, **option)
    assert "--exclude" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "a").exists()


def test_dora_without_the_experts_loads_in_peft(qwen3_moe_pair, tmp_path):
    pair = qwen3_moe_pair
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=128, svd="exact", dora=True,
                     exclude=[r"experts|mlp\.gate$"])
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    peft_model(pair, tmp_path / "a")


def test_dense_mlp_in_a_moe_model_is_carried_since_peft_claims_its_names(tmp_path):
    """Qwen3-MoE with a dense layer: PEFT's MoE conversion turns a ``layers.1.mlp.gate_proj`` target into the fused
    experts' target_parameters, so LoRA there never loads; deltakit carries those Linears whole instead."""
    from builders import make_moe_pair

    pair = make_moe_pair(tmp_path / "pair", "qwen3_moe", mlp_only_layers=[1])
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=128, svd="exact")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    dense = [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert sorted(m for m in config["modules_to_save"] if ".mlp." in m) == dense
    assert not [m.module for m in report.modules if m.module in dense]
    assert [layer["block"] for layer in report.experts] == ["model.layers.0.mlp"]
    torch.testing.assert_close(logits(peft_model(pair, tmp_path / "a"), INPUT_IDS), logits(pair.ft_dir, INPUT_IDS),
                               atol=2e-4, rtol=1e-4)


def test_stacked_moe_adapters_load_in_peft(mixtral_pair, tmp_path):
    """Re-truncation gives each expert its own rank; the stack pads them back to one, so PEFT still loads it."""
    pair = mixtral_pair
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=4)
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "b", rank=2, alpha=3.0)
    deltakit.stack([tmp_path / "a", tmp_path / "b"], tmp_path / "s", energy=0.9)
    config = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert not [k for k in config["rank_pattern"] if "experts" in k]
    stacked = logits(peft_model(pair, tmp_path / "s"), INPUT_IDS)
    deltakit.merge(pair.base_dir, [tmp_path / "s"], tmp_path / "merged")
    torch.testing.assert_close(stacked, logits(tmp_path / "merged", INPUT_IDS), atol=2e-4, rtol=1e-4)
