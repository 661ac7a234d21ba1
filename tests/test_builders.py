"""The test builders do what they claim: real, fully changed fine-tunes; shards, dtypes and indexes as on the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from builders import (
    ARCHS,
    ModelPair,
    build_model,
    delta_spectrum,
    finetune,
    load_model,
    logits,
    low_rank_delta,
    make_pair,
    module_kinds,
    write_safetensors_pair,
)
from safetensors import safe_open
from safetensors.torch import load_file

PAIR_FIXTURES = ["llama_pair", "llama_tied_pair", "llama_pair_bf16_sharded", "qwen2_pair", "bert_pair", "gpt2_pair"]


def _read_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _input_ids() -> torch.Tensor:
    return torch.arange(24).view(2, 12) * 5 % 128


@pytest.mark.parametrize("fixture", PAIR_FIXTURES)
def test_finetune_changes_every_tensor_and_keeps_names_shapes_dtypes(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Every tensor, norms and biases included, differs between base and fine-tune; nothing else does."""
    pair: ModelPair = request.getfixturevalue(fixture)
    base, ft = _read_checkpoint(pair.base_dir), _read_checkpoint(pair.ft_dir)
    assert list(base) == list(ft)
    assert any(name.endswith("norm.weight") or "LayerNorm" in name or ".ln_" in name for name in base)
    for name in base:
        assert (base[name].shape, base[name].dtype) == (ft[name].shape, ft[name].dtype), name
        if base[name].dtype == torch.float32:
            # every element moves: each batch holds every token id and position
            assert torch.all(base[name] != ft[name]), name
        else:
            assert not torch.equal(base[name], ft[name]), name


@pytest.mark.parametrize(
    ("fixture", "absent", "present"),
    [
        ("gpt2_pair", ["lm_head.weight"], ["transformer.wte.weight", "transformer.h.0.attn.c_attn.bias"]),
        (
            "bert_pair",
            ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"],
            ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias"],
        ),
        ("llama_tied_pair", ["lm_head.weight"], ["model.embed_tokens.weight"]),
        ("llama_pair", [], ["lm_head.weight", "model.embed_tokens.weight"]),
        ("qwen2_pair", [], ["lm_head.weight", "model.layers.0.self_attn.q_proj.bias"]),
    ],
)
def test_tied_tensors_are_written_once_and_names_equal_parameter_names(
    fixture: str, absent: list[str], present: list[str], request: pytest.FixtureRequest
) -> None:
    """Tied tensors are stored once, under the input side; file names are the model's parameter names."""
    pair: ModelPair = request.getfixturevalue(fixture)
    with safe_open(pair.ft_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert not names & set(absent)
    assert set(present) <= names
    model = load_model(pair.ft_dir)
    assert names == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize(
    ("fixture", "output_module", "input_module"),
    [
        ("gpt2_pair", "lm_head", "transformer.wte"),
        ("bert_pair", "cls.predictions.decoder", "bert.embeddings.word_embeddings"),
        ("llama_tied_pair", "lm_head", "model.embed_tokens"),
    ],
)
def test_loading_reties_the_missing_output_weight(
    fixture: str, output_module: str, input_module: str, request: pytest.FixtureRequest
) -> None:
    pair: ModelPair = request.getfixturevalue(fixture)
    modules = dict(load_model(pair.ft_dir).named_modules())
    assert modules[output_module].weight is modules[input_module].weight
    assert pair.config.tie_word_embeddings


def test_sharded_bf16_pair_has_an_index_matching_its_shards(llama_pair_bf16_sharded: ModelPair) -> None:
    for ckpt_dir in (llama_pair_bf16_sharded.base_dir, llama_pair_bf16_sharded.ft_dir):
        shard_paths = sorted(ckpt_dir.glob("model-*-of-*.safetensors"))
        assert len(shard_paths) >= 3
        assert not (ckpt_dir / "model.safetensors").exists()
        index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
        stored = {}
        for path in shard_paths:
            with safe_open(path, "pt") as f:
                stored.update({name: path.name for name in f.keys()})
        assert index["weight_map"] == stored
        tensors = _read_checkpoint(ckpt_dir)
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert json.loads((ckpt_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert llama_pair_bf16_sharded.config.dtype == torch.bfloat16


def test_transformers_loads_bf16_shards_as_bf16_unless_told(llama_pair_bf16_sharded: ModelPair) -> None:
    assert load_model(llama_pair_bf16_sharded.ft_dir, dtype="auto").dtype == torch.bfloat16
    model = load_model(llama_pair_bf16_sharded.ft_dir)
    assert model.dtype == torch.float32
    stored = _read_checkpoint(llama_pair_bf16_sharded.ft_dir)
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"].float())


@pytest.mark.parametrize("fixture", PAIR_FIXTURES)
def test_finetuned_logits_differ_from_base(fixture: str, request: pytest.FixtureRequest) -> None:
    pair: ModelPair = request.getfixturevalue(fixture)
    input_ids = _input_ids()
    base_logits, ft_logits = logits(pair.base_dir, input_ids), logits(pair.ft_dir, input_ids)
    assert ft_logits.shape == (2, 12, 128) and ft_logits.dtype == torch.float32
    assert (ft_logits - base_logits).abs().max() > 0.1
    assert torch.equal(logits(pair.ft_dir, input_ids), ft_logits)


def test_logits_of_a_model_equal_logits_of_its_saved_dir(tmp_path: Path) -> None:
    model = finetune(build_model("gpt2"), steps=1)
    model.save_pretrained(tmp_path / "ft")
    assert torch.equal(logits(model, _input_ids()), logits(tmp_path / "ft", _input_ids()))


def test_finetune_keeps_tied_weights_tied_and_is_deterministic() -> None:
    first, second = finetune(build_model("gpt2"), steps=2), finetune(build_model("gpt2"), steps=2)
    assert first.lm_head.weight is first.transformer.wte.weight
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_builders_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(build_model("bert", seed=7), steps=1)
    low_rank_delta(8, 6, 2, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_make_pair_refuses_to_overwrite(tmp_path: Path) -> None:
    make_pair(tmp_path, "gpt2", steps=1)
    with pytest.raises(FileExistsError):
        make_pair(tmp_path, "gpt2", steps=1)


def test_module_kinds_name_conv1d_linear_embedding_and_norms() -> None:
    kinds = {arch: module_kinds(build_model(arch)) for arch in ARCHS}
    assert kinds["gpt2"]["transformer.h.0.attn.c_attn"] == "Conv1D"
    assert kinds["gpt2"]["transformer.h.1.mlp.c_proj"] == "Conv1D"
    assert kinds["gpt2"]["lm_head"] == "Linear"  # sharing wte's weight
    assert kinds["gpt2"]["transformer.wte"] == "Embedding"
    assert kinds["llama"]["model.layers.0.input_layernorm"] == "LlamaRMSNorm"
    assert kinds["qwen2"]["model.norm"] == "Qwen2RMSNorm"
    assert kinds["bert"]["cls.predictions.decoder"] == "Linear"
    assert kinds["bert"]["cls.predictions"] == "BertLMPredictionHead"  # owns the tied decoder bias
    assert kinds["bert"]["bert.encoder.layer.1.output.LayerNorm"] == "LayerNorm"


@pytest.mark.parametrize("decay", [None, 0.8])
def test_low_rank_delta_has_the_stated_spectrum(decay: float | None) -> None:
    delta = low_rank_delta(40, 24, 5, seed=3, scale=2.0, decay=decay)
    assert delta.shape == (40, 24) and delta.dtype == torch.float32
    expected = delta_spectrum(24, 5, scale=2.0, decay=decay)
    torch.testing.assert_close(torch.linalg.svdvals(delta.double()), expected, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(delta).item() == (5 if decay is None else 24)
    assert torch.equal(delta, low_rank_delta(40, 24, 5, seed=3, scale=2.0, decay=decay))


def test_delta_spectrum_rejects_bad_rank_and_decay() -> None:
    with pytest.raises(ValueError):
        delta_spectrum(4, 5)
    with pytest.raises(ValueError):
        delta_spectrum(4, 2, decay=1.0)


@pytest.mark.parametrize("shards", [1, 3])
def test_write_safetensors_pair_round_trips_with_a_valid_index(tmp_path: Path, shards: int) -> None:
    base = {f"layers.{i}.weight": torch.randn(3, i + 1) for i in range(7)}
    base["shared"] = base["layers.0.weight"][:, :1]  # a view: must still be writable
    ft = {name: tensor + 1 for name, tensor in base.items()}
    base_dir, ft_dir = write_safetensors_pair(tmp_path, base, ft, shards=shards, prefix="diffusion_pytorch_model")
    for ckpt_dir, tensors in ((base_dir, base), (ft_dir, ft)):
        files = sorted(p.name for p in ckpt_dir.iterdir())
        if shards == 1:
            assert files == ["diffusion_pytorch_model.safetensors"]
        else:
            index = json.loads((ckpt_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
            shard_names = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
            assert files == sorted([*shard_names, "diffusion_pytorch_model.safetensors.index.json"])
            assert set(index) == {"metadata", "weight_map"}
            assert index["metadata"] == {"total_size": sum(t.numel() * 4 for t in tensors.values())}
            assert list(index["weight_map"]) == list(tensors)  # dict order, contiguous groups
            for name in shard_names:
                with safe_open(ckpt_dir / name, "pt") as f:
                    assert f.metadata() == {"format": "pt"}
                    assert 2 <= len(f.keys()) <= 3
                    assert all(index["weight_map"][key] == name for key in f.keys())
        loaded = _read_checkpoint(ckpt_dir)
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


def test_write_safetensors_pair_rejects_more_shards_than_tensors(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError):
        write_safetensors_pair(tmp_path, tensors, tensors, shards=3)


def test_every_test_is_offline_with_a_private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    assert cache.is_relative_to(tmp_path_factory.getbasetemp())
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        huggingface_hub.hf_hub_download("openai-community/gpt2", "config.json")
