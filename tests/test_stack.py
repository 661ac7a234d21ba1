"""stack: Σ_k w_k ΔW_k as one PEFT adapter, exactly (concatenated factors) or optimally truncated (QR + small SVD)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import ModelPair, load_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from deltakit.adapters.peft_format import read_adapter
from deltakit.errors import InvalidOptionError
from deltakit.adapters.layers import WeightKind
from deltakit.ops.merge import merge
from deltakit.ops.stack import stack

WEIGHTS = [0.7, -1.3]


def _peft_adapter(base_dir: Path, out_dir: Path, targets: list[str], *, rank: int, alpha: float, seed: int,
                  rslora: bool = False, dora: bool = False, **extra: object) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        use_rslora=rslora, use_dora=dora, **extra)
    model = get_peft_model(load_model(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return out_dir


def _deltas(adapter_dirs: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k · s_k · B_k A_k per module, dense, in fp64: the reference."""
    total: dict[str, torch.Tensor] = {}
    for adapter_dir, weight in zip(adapter_dirs, weights):
        adapter = read_adapter(adapter_dir)
        for module, entry in adapter.modules.items():
            if entry.key_a is None:
                continue
            f = adapter.factors(module, WeightKind.EMBEDDING if entry.is_embedding else WeightKind.LINEAR)
            delta = weight * f.scaling * (f.b.double() @ f.a.double())
            total[module] = total.get(module, 0) + delta
    return total


@pytest.fixture
def two_adapters(llama_pair: ModelPair, tmp_path: Path) -> list[Path]:
    """Mixed rank (4, 6), alpha (7, 3), rsLoRA on the second, modules present in one or both, an embedding."""
    return [
        _peft_adapter(llama_pair.base_dir, tmp_path / "a0", ["q_proj", "v_proj", "embed_tokens"], rank=4, alpha=7,
                      seed=1),
        _peft_adapter(llama_pair.base_dir, tmp_path / "a1", ["q_proj", "down_proj", "embed_tokens"], rank=6, alpha=3,
                      rslora=True, seed=2),
    ]


def _assert_merges_like_the_originals(base_dir: Path, stacked_dir: Path, adapters: list[Path], tmp_path: Path) -> None:
    """Merging the stacked adapter gives the weights that merging the originals with WEIGHTS gives."""
    merge(base_dir, [stacked_dir], tmp_path / "merged-stack")
    merge(base_dir, adapters, tmp_path / "merged-both", weights=WEIGHTS)
    stacked, both = load_file(tmp_path / "merged-stack" / "model.safetensors"), \
        load_file(tmp_path / "merged-both" / "model.safetensors")
    for name, value in both.items():
        assert (stacked[name] - value).abs().max() <= 1e-5 * value.abs().max(), name


def test_exact_stack_is_the_weighted_sum(two_adapters: list[Path], llama_pair: ModelPair, tmp_path: Path) -> None:
    """Concatenated factors give Σ w_k ΔW_k to fp32 precision, ranks add where modules overlap (rank_pattern for the
    others), PEFT loads the result with no unexpected keys, and merging it equals merging both adapters."""
    report = stack(two_adapters, tmp_path / "stacked", weights=WEIGHTS, exact=True)

    reference, got = _deltas(two_adapters, WEIGHTS), _deltas([tmp_path / "stacked"], [1.0])
    assert got.keys() == reference.keys()
    for module, delta in reference.items():
        assert (got[module] - delta).norm() <= 1e-6 * delta.norm(), module
    ranks = {m.module: m.rank for m in report.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 10 and ranks["model.layers.0.self_attn.v_proj"] == 4
    assert ranks["model.layers.0.mlp.down_proj"] == 6
    config = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["use_rslora"] is False

    model = PeftModel.from_pretrained(load_model(llama_pair.base_dir), two_adapters[0], adapter_name="first")
    assert model.load_adapter(tmp_path / "stacked", adapter_name="stacked").unexpected_keys == []
    _assert_merges_like_the_originals(llama_pair.base_dir, tmp_path / "stacked", two_adapters, tmp_path)


def test_rank_stack_is_the_truncated_svd_of_the_sum(two_adapters: list[Path], tmp_path: Path) -> None:
    """--rank 3 gives the best rank-3 approximation of the dense sum (torch.linalg.svd) and its Eckart–Young error."""
    report = stack(two_adapters, tmp_path / "stacked", weights=WEIGHTS, rank=3)

    reference, got = _deltas(two_adapters, WEIGHTS), _deltas([tmp_path / "stacked"], [1.0])
    errors = {m.module: m.relative_error for m in report.modules}
    for module, delta in reference.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert (got[module] - best).norm() <= 1e-5 * delta.norm(), module
        tail = (s[3:].square().sum() / s.square().sum()).sqrt()
        assert (got[module] - delta).norm() / delta.norm() == pytest.approx(float(tail), rel=1e-4)
        assert errors[module] == pytest.approx(float(tail), rel=1e-4)
    assert {m.rank for m in report.modules} == {3}


def test_energy_stack_keeps_the_smallest_rank_that_holds_the_energy(two_adapters: list[Path], tmp_path: Path) -> None:
    report = stack(two_adapters, tmp_path / "stacked", weights=WEIGHTS, energy=0.9)

    reference = _deltas(two_adapters, WEIGHTS)
    for module in report.modules:
        s = torch.linalg.svdvals(reference[module.module])
        kept = torch.cumsum(s.square(), 0) / s.square().sum()
        assert module.rank == int((kept < 0.9 - 1e-9).sum()) + 1, module.module
        assert module.energy_retained >= 0.9


def test_conv1d_adapters_stack_and_merge_like_the_originals(gpt2_pair: ModelPair, tmp_path: Path) -> None:
    """GPT-2 (PEFT's fan_in_fan_out layers in): the exact stack merges to the same weights as the two adapters; it
    stores its Conv1D factors as parameter targets (so fan_in_fan_out is false, see is_parameter_target)."""
    adapters = [_peft_adapter(gpt2_pair.base_dir, tmp_path / f"a{k}", targets, rank=2 + k, alpha=5, seed=k)
                for k, targets in enumerate((["c_attn", "c_proj"], ["c_attn", "c_fc"]))]
    stack(adapters, tmp_path / "stacked", weights=WEIGHTS, exact=True)
    config = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and config["target_modules"] == []
    assert "transformer.h.1.mlp.c_fc.weight" in config["target_parameters"]
    _assert_merges_like_the_originals(gpt2_pair.base_dir, tmp_path / "stacked", adapters, tmp_path)


def test_saved_modules_are_carried_from_one_adapter_and_conflicts_refused(llama_pair: ModelPair,
                                                                         tmp_path: Path) -> None:
    saving = _peft_adapter(llama_pair.base_dir, tmp_path / "saving", ["q_proj"], rank=4, alpha=7, seed=1,
                           modules_to_save=["model.norm"])
    plain = _peft_adapter(llama_pair.base_dir, tmp_path / "plain", ["v_proj"], rank=4, alpha=7, seed=2)
    other = _peft_adapter(llama_pair.base_dir, tmp_path / "other", ["v_proj"], rank=4, alpha=7, seed=3,
                          modules_to_save=["model.norm"])

    report = stack([saving, plain], tmp_path / "stacked", exact=True)
    assert report.carried == ["base_model.model.model.norm.weight"]
    assert json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    stacked = load_file(tmp_path / "stacked" / "adapter_model.safetensors")
    original = load_file(saving / "adapter_model.safetensors")
    assert torch.equal(stacked["base_model.model.model.norm.weight"], original["base_model.model.model.norm.weight"])

    with pytest.raises(InvalidOptionError, match="different values"):
        stack([saving, other], tmp_path / "conflict", exact=True)
    with pytest.raises(InvalidOptionError, match="cannot scale without the base"):
        stack([saving, plain], tmp_path / "scaled", weights=[0.5, 1.0], exact=True)
    assert not (tmp_path / "conflict").exists() and not (tmp_path / "scaled").exists()


def test_dora_adapters_and_unclear_modes_are_refused(llama_pair: ModelPair, tmp_path: Path) -> None:
    lora = _peft_adapter(llama_pair.base_dir, tmp_path / "lora", ["q_proj"], rank=4, alpha=7, seed=1)
    dora = _peft_adapter(llama_pair.base_dir, tmp_path / "dora", ["q_proj"], rank=4, alpha=7, seed=2, dora=True)
    with pytest.raises(InvalidOptionError, match="DoRA"):
        stack([lora, dora], tmp_path / "out", exact=True)
    with pytest.raises(InvalidOptionError, match="exactly one of"):
        stack([lora, lora], tmp_path / "out")
    with pytest.raises(InvalidOptionError, match="exactly one of"):
        stack([lora, lora], tmp_path / "out", rank=4, exact=True)
    with pytest.raises(InvalidOptionError, match="2 weight"):
        stack([lora], tmp_path / "out", weights=[1.0, 2.0], exact=True)
    assert not (tmp_path / "out").exists()
