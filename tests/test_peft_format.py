"""The PEFT adapter format on disk (adapters/peft_format.py) and the variant keys (adapters/variants.py): what is
written reads back the same, PEFT's own config class accepts it, and malformed adapters are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from deltakit.adapters.layers import WeightKind
from deltakit.adapters.peft_format import (
    CarriedTensor,
    ModuleFactors,
    adapter_spec,
    check_supported,
    lora_scaling,
    parse_weights,
    read_adapter,
    write_adapter,
)
from deltakit.adapters.variants import DORA, LORA, variant_of
from deltakit.errors import AdapterFormatError, CheckpointNotFoundError, InvalidOptionError

P = "base_model.model."


def _factors(module: str, rank: int, out: int = 6, inp: int = 4, alpha: float | None = None,
             kind: WeightKind = WeightKind.LINEAR, magnitude: bool = False) -> ModuleFactors:
    alpha = float(alpha if alpha is not None else rank)
    generator = torch.Generator().manual_seed(rank)
    return ModuleFactors(module, kind, torch.randn(rank, inp, generator=generator),
                         torch.randn(out, rank, generator=generator), alpha, lora_scaling(alpha, rank, False),
                         torch.rand(out, generator=generator) if magnitude else None)


def test_written_adapter_reads_back_with_per_module_ranks_and_alphas(tmp_path: Path) -> None:
    factors = [_factors("m.q", 4), _factors("m.k", 4), _factors("m.v", 2, alpha=8.0),
               _factors("m.embed", 3, out=5, inp=10, kind=WeightKind.EMBEDDING)]
    bias = torch.arange(6.0)
    carried = [CarriedTensor(f"{P}m.q.base_layer.bias", bias.dtype, (6,), lambda: bias)]
    spec = adapter_spec(factors, carried, default_rank=1, variant_config=LORA.config())
    assert (spec.rank, spec.alpha, spec.has_base_biases) == (4, 4.0, True)
    size = write_adapter(tmp_path, factors, carried, spec)
    assert size == (tmp_path / "adapter_model.safetensors").stat().st_size

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is False and config["bias"] == "lora_only"
    assert config["rank_pattern"] == {"^m\\.v": 2, "^m\\.embed": 3}
    assert config["alpha_pattern"] == {"^m\\.v": 8.0, "^m\\.embed": 3.0}
    LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})  # PEFT accepts every key

    adapter = read_adapter(tmp_path)
    assert variant_of(adapter) is LORA
    assert set(adapter.modules) == {"m.q", "m.k", "m.v", "m.embed"}
    assert adapter.modules["m.embed"].is_embedding and adapter.modules["m.q"].base_bias_key is not None
    for f in factors:
        back = adapter.factors(f.module, f.kind)
        assert torch.equal(back.a, f.a) and torch.equal(back.b, f.b)
        assert (back.alpha, back.scaling) == (f.alpha, f.scaling)
    assert adapter.scaling("m.v") == 4.0


def test_dora_adapter_round_trip_names_its_variant(tmp_path: Path) -> None:
    factors = [_factors("m.q", 2, magnitude=True)]
    write_adapter(tmp_path, factors, [], adapter_spec(factors, [], default_rank=1, variant_config=DORA.config()))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    adapter = read_adapter(tmp_path)
    assert variant_of(adapter) is DORA
    assert torch.equal(adapter.factors("m.q", WeightKind.LINEAR).magnitude, factors[0].magnitude)


def test_variant_config_keys_name_every_variant_once():
    assert LORA.config() == {"use_dora": False} and DORA.config() == {"use_dora": True}


def test_rslora_scaling():
    assert lora_scaling(16.0, 4, False) == 4.0 and lora_scaling(16.0, 4, True) == 8.0


def test_malformed_adapters_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such adapter directory"):
        read_adapter(tmp_path / "missing")
    cases = {
        "nojson": ("not json", AdapterFormatError, "not valid JSON"),
        "notlora": ({"peft_type": "IA3", "r": 1, "lora_alpha": 1}, AdapterFormatError, "peft_type must be LORA"),
        "nor": ({"peft_type": "LORA", "lora_alpha": 1}, AdapterFormatError, "missing 'r'"),
        "noweights": ({"peft_type": "LORA", "r": 1, "lora_alpha": 1}, CheckpointNotFoundError,
                      "no adapter_model.safetensors"),
    }
    for name, (config, error, message) in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        with pytest.raises(error, match=message):
            read_adapter(directory)


def test_half_a_factor_pair_and_a_wrong_rank_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    def adapter(name: str, tensors: dict, r: int = 2) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r}))
        return directory

    with pytest.raises(AdapterFormatError, match="only one of lora_A / lora_B"):
        read_adapter(adapter("half", {f"{P}m.q.lora_A.weight": torch.ones(2, 4)}))
    wrong = read_adapter(adapter("rank", {f"{P}m.q.lora_A.weight": torch.ones(2, 4),
                                          f"{P}m.q.lora_B.weight": torch.ones(6, 2)}, r=3))
    with pytest.raises(AdapterFormatError, match="factors have rank 2 but the config gives r=3"):
        wrong.factors("m.q", WeightKind.LINEAR)


def test_check_supported_names_the_option(tmp_path: Path) -> None:
    factors = [_factors("m.q", 2)]
    write_adapter(tmp_path, factors, [], adapter_spec(factors, [], default_rank=1, variant_config=LORA.config()))
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"lora_bias": True}))
    with pytest.raises(AdapterFormatError, match="lora_bias"):
        check_supported(read_adapter(tmp_path))


def test_parse_weights():
    assert parse_weights(None, 2) == [1.0, 1.0]
    assert parse_weights([1, 0.5], 2) == [1.0, 0.5]
    for weights, count, message in (([1.0], 2, "1 weight"), (None, 0, "no adapters"),
                                    ([float("nan")], 1, "finite")):
        with pytest.raises(InvalidOptionError, match=message):
            parse_weights(weights, count)
