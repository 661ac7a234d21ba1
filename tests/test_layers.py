"""Layer kinds and key names (adapters/layers.py), checked against what PEFT and transformers actually do."""

from __future__ import annotations

import re

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from deltakit.adapters.layers import (
    PEFT_PREFIX,
    WeightKind,
    base_bias_key,
    find_tied_head,
    from_out_in,
    lora_keys,
    magnitude_key,
    module_pattern,
    out_in_shape,
    parse_peft_key,
    saved_module_key,
    target_modules,
    to_out_in,
    transpose_embedding_factors,
    weight_kind,
)
from deltakit.names import matches_peft_pattern


@pytest.mark.parametrize(("name", "shape", "model_type", "kind"), [
    ("model.layers.0.self_attn.q_proj.weight", (8, 4), "llama", WeightKind.LINEAR),
    ("model.embed_tokens.weight", (10, 4), "llama", WeightKind.EMBEDDING),
    ("bert.embeddings.token_type_embeddings.weight", (2, 4), "bert", WeightKind.EMBEDDING),
    ("transformer.h.0.attn.c_attn.weight", (4, 12), "gpt2", WeightKind.CONV1D),
    ("transformer.h.0.attn.c_attn.weight", (4, 12), None, WeightKind.CONV1D),
    ("model.layers.0.attn.c_proj.weight", (4, 4), "llama", WeightKind.LINEAR),  # the name alone is not enough
    ("model.layers.0.self_attn.q_proj.bias", (8,), "llama", WeightKind.OTHER),
    ("model.norm.weight", (4,), "llama", WeightKind.OTHER),
    ("conv.weight", (4, 4, 3), None, WeightKind.OTHER),
])
def test_weight_kind(name, shape, model_type, kind):
    assert weight_kind(name, shape, model_type) is kind


def test_out_in_orientation_matches_the_torch_layers():
    """PEFT's ΔW is (out, in): Linear stores it as is, Conv1D and Embedding transposed."""
    linear, conv1d, embedding = torch.nn.Linear(3, 5), Conv1D(5, 3), torch.nn.Embedding(7, 5)
    assert out_in_shape(tuple(linear.weight.shape), WeightKind.LINEAR) == (5, 3)
    assert out_in_shape(tuple(conv1d.weight.shape), WeightKind.CONV1D) == (5, 3)
    # PEFT's embedding LoRA: lora_embedding_A (r, num_embeddings), B (dim, r): in = vocabulary, out = dim.
    assert out_in_shape(tuple(embedding.weight.shape), WeightKind.EMBEDDING) == (5, 7)
    x = torch.randn(2, 3)
    torch.testing.assert_close(conv1d(x), x @ to_out_in(conv1d.weight, WeightKind.CONV1D).T + conv1d.bias)
    matrix = torch.randn(5, 3)
    for kind in (WeightKind.LINEAR, WeightKind.CONV1D, WeightKind.EMBEDDING):
        assert torch.equal(to_out_in(from_out_in(matrix, kind), kind), matrix)


def test_transposed_embedding_factors_give_the_head_the_same_delta():
    a, b = torch.randn(2, 7), torch.randn(5, 2)  # embedding (vocab 7, dim 5): ΔE = (B @ A)ᵀ, (7, 5)
    head_a, head_b = transpose_embedding_factors(a, b)
    assert torch.equal(head_b @ head_a, (b @ a).T)


def test_keys_round_trip_through_parse_peft_key():
    module = "model.layers.0.mlp.up_proj"
    a, b = lora_keys(module, WeightKind.LINEAR)
    ea, eb = lora_keys("model.embed_tokens", WeightKind.EMBEDDING)
    assert (a, eb) == (f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_B")
    assert [parse_peft_key(k) for k in (a, b, ea, magnitude_key(module), base_bias_key(module))] == [
        (module, "lora_A"), (module, "lora_B"), ("model.embed_tokens", "lora_A"), (module, "magnitude"),
        (module, "base_bias")]
    assert parse_peft_key(saved_module_key("model.norm.weight")) == ("model.norm", "saved:weight")
    with pytest.raises(ValueError, match="does not start with"):
        parse_peft_key("model.norm.weight")


def test_module_pattern_selects_exactly_one_module_by_peft_rule():
    modules = ["model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj", "x.model.layers.1.mlp.up_proj"]
    key = module_pattern(modules[0])
    assert [m for m in modules if matches_peft_pattern(key, m)] == [modules[0]]


def test_target_modules_is_a_list_unless_a_name_is_a_suffix_of_another():
    assert target_modules(["a.q", "a.v"], ["a.q", "a.v", "a.k"]) == ["a.q", "a.v"]
    regex = target_modules(["q"], ["q", "x.q"])  # PEFT's list match would take x.q too (endswith ".q")
    assert isinstance(regex, str) and re.fullmatch(regex, "q") and not re.fullmatch(regex, "x.q")


def test_find_tied_head():
    llama = ["model.embed_tokens.weight", "model.norm.weight"]
    causal = {"architectures": ["LlamaForCausalLM"]}
    tied = find_tied_head(llama, causal)
    assert tied is not None and (tied.head, tied.embedding, tied.bias) == ("lm_head", "model.embed_tokens", None)
    assert find_tied_head(llama + ["lm_head.weight"], causal) is None  # the head is stored: its own tensor
    assert find_tied_head(llama, causal | {"tie_word_embeddings": False}) is None
    assert find_tied_head(llama, {"architectures": ["LlamaModel"]}) is None  # no head at all
