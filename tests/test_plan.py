"""Plans from headers alone (ops/plan.py): what each module of a fine-tune becomes, and what each adapter does to
each base tensor. Unit tests on tiny raw checkpoints: no tensor data is needed to decide any of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import write_safetensors_pair
from safetensors.torch import save_file

from deltakit.adapters.layers import WeightKind
from deltakit.adapters.peft_format import read_adapter
from deltakit.adapters.variants import DORA, LORA
from deltakit.errors import AdapterFormatError, InvalidOptionError, TensorMismatchError, TensorMissingError
from deltakit.io.checkpoint import open_checkpoint
from deltakit.ops.plan import (
    FactorStep,
    ReplaceStep,
    module_fates,
    plan_extract,
    plan_merge,
    tied_bias_fates,
)

P = "base_model.model."


def _pair(tmp_path: Path, base: dict, ft: dict, config: dict | None = None):
    base_dir, ft_dir = write_safetensors_pair(tmp_path, base, ft)
    for directory in (base_dir, ft_dir):
        if config is not None:
            (directory / "config.json").write_text(json.dumps(config))
    return open_checkpoint(ft_dir), open_checkpoint(base_dir)


def _llama_like() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.zeros(10, 4),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
        "model.layers.0.self_attn.q_proj.bias": torch.zeros(4),
        "model.layers.0.input_layernorm.weight": torch.zeros(4),
        "model.norm.weight": torch.zeros(4),
    }


def test_extract_plan_groups_by_module_and_classifies_weights(tmp_path: Path) -> None:
    ft, base = _pair(tmp_path, _llama_like(), _llama_like())
    plan = plan_extract(ft, base)
    by_module = {m.module: m for m in plan.modules}
    q = by_module["model.layers.0.self_attn.q_proj"]
    assert q.weight == "model.layers.0.self_attn.q_proj.weight" and q.kind is WeightKind.LINEAR
    assert q.bias == "model.layers.0.self_attn.q_proj.bias"
    assert by_module["model.embed_tokens"].kind is WeightKind.EMBEDDING
    norm = by_module["model.layers.0.input_layernorm"]
    assert norm.weight is None and norm.tensors == ["model.layers.0.input_layernorm.weight"]
    assert {"model", "model.layers", "model.layers.0", "model.layers.0.self_attn"} <= plan.parents
    assert plan.only_in_base == [] and plan.tied is None


def test_extract_plan_raises_every_shape_mismatch_at_once_before_reading(tmp_path: Path) -> None:
    ft_tensors = _llama_like() | {"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 5),
                                  "model.norm.weight": torch.zeros(5)}
    ft, base = _pair(tmp_path, _llama_like(), ft_tensors)
    with pytest.raises(TensorMismatchError, match=r"2 tensor\(s\) differ in shape.*q_proj\.weight base \[4, 4\]"):
        plan_extract(ft, base)


def test_extract_plan_takes_a_vocabulary_resize_and_new_tensors(tmp_path: Path) -> None:
    ft_tensors = _llama_like() | {"model.embed_tokens.weight": torch.zeros(12, 4), "model.extra.weight": torch.zeros(3)}
    base_tensors = _llama_like() | {"model.only_base.weight": torch.zeros(2)}
    ft, base = _pair(tmp_path, base_tensors, ft_tensors)
    plan = plan_extract(ft, base)
    by_module = {m.module: m for m in plan.modules}
    embed = by_module["model.embed_tokens"]
    assert embed.resized == {"model.embed_tokens.weight": ((10, 4), (12, 4))} and embed.weight is None
    assert by_module["model.extra"].new_in_finetuned == ["model.extra.weight"]
    assert plan.only_in_base == ["model.only_base.weight"]


def test_extract_plan_selects_with_include_exclude_and_refuses_a_bad_regex(tmp_path: Path) -> None:
    ft, base = _pair(tmp_path, _llama_like(), _llama_like())
    plan = plan_extract(ft, base, include=["layers"], exclude=["norm"])
    selected = {m.module for m in plan.modules if m.is_selected}
    assert selected == {"model.layers.0.self_attn.q_proj"}
    with pytest.raises(InvalidOptionError, match=r"--exclude '\(' is not a valid regex"):
        plan_extract(ft, base, exclude=["("])


def test_extract_plan_finds_a_tied_head_and_sets_its_bias_apart(tmp_path: Path) -> None:
    tensors = {"bert.embeddings.word_embeddings.weight": torch.zeros(10, 4), "cls.predictions.bias": torch.zeros(10),
               "cls.predictions.transform.dense.weight": torch.zeros(4, 4)}
    ft, base = _pair(tmp_path, tensors, tensors, {"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    plan = plan_extract(ft, base)
    assert plan.tied is not None
    assert (plan.tied.head, plan.tied.embedding, plan.tied.bias) == (
        "cls.predictions.decoder", "bert.embeddings.word_embeddings", "cls.predictions.bias")
    assert all("cls.predictions.bias" not in m.tensors for m in plan.modules)


# --- fates of changed tensors ------------------------------------------------------------------------------------


def _modules(tmp_path: Path, **kwargs):
    ft, base = _pair(tmp_path, _llama_like(), _llama_like())
    plan = plan_extract(ft, base, **kwargs)
    return plan, {m.module: m for m in plan.modules}


def test_fates_of_a_factorized_module(tmp_path: Path) -> None:
    plan, modules = _modules(tmp_path)
    q = modules["model.layers.0.self_attn.q_proj"]
    only_bias = module_fates(plan, q, [q.bias], factorized=True, carry=True)
    assert only_bias.keys == {q.bias: P + "model.layers.0.self_attn.q_proj.base_layer.bias"}
    assert [(f.fate, f.reason) for f in only_bias.fates] == [("carried", "bias of a factorized module")]
    assert not only_bias.saves_module
    # The same bias, with the weight not factorized: the whole module is saved.
    saved = module_fates(plan, q, [q.bias], factorized=False, carry=True)
    assert saved.saves_module and set(saved.keys) == set(q.tensors)
    assert saved.keys[q.weight] == P + q.weight


def test_fates_drop_what_peft_cannot_carry(tmp_path: Path) -> None:
    plan, modules = _modules(tmp_path)
    q, norm = modules["model.layers.0.self_attn.q_proj"], modules["model.norm"]
    no_carry = module_fates(plan, norm, norm.tensors, factorized=False, carry=False)
    assert [(f.fate, f.reason) for f in no_carry.fates] == [("dropped", "changed and not factorizable; --no-carry")]
    plan_sel, modules_sel = _modules(tmp_path / "sel", exclude=["norm"])
    excluded = modules_sel["model.norm"]
    assert module_fates(plan_sel, excluded, excluded.tensors, factorized=False, carry=True).fates[0].reason == \
        "changed, but excluded by --include/--exclude"
    two = [q.weight, q.bias]
    assert module_fates(plan, q, two, factorized=True, carry=True).fates[0].reason == \
        "changed param of a factorized module that PEFT cannot carry"
    assert module_fates(plan, q, [], factorized=True, carry=True).fates == []


def test_fates_refuse_modules_to_save_for_a_parent_module(tmp_path: Path) -> None:
    tensors = {"model.scale": torch.zeros(1), "model.layer.weight": torch.zeros(2, 2), "top": torch.zeros(1)}
    ft, base = _pair(tmp_path, tensors, tensors)
    plan = plan_extract(ft, base)
    modules = {m.module: m for m in plan.modules}
    parent = module_fates(plan, modules["model"], ["model.scale"], factorized=False, carry=True)
    assert "module with submodules" in parent.fates[0].reason and not parent.keys
    top = module_fates(plan, modules[""], ["top"], factorized=False, carry=True)
    assert "top-level parameter" in top.fates[0].reason and not top.keys


def test_tied_bias_fates(tmp_path: Path) -> None:
    from deltakit.adapters.layers import TiedHead

    tied = TiedHead("cls.predictions.decoder", "bert.embeddings.word_embeddings", "cls.predictions.bias")
    carried = tied_bias_fates(tied, head_factorized=True, carry=True)
    assert carried.keys == {"cls.predictions.bias": P + "cls.predictions.decoder.base_layer.bias"}
    assert tied_bias_fates(tied, head_factorized=False, carry=True).fates[0].fate == "dropped"
    assert tied_bias_fates(tied, head_factorized=True, carry=False).keys == {}


# --- merge plans -------------------------------------------------------------------------------------------------


def _adapter(out_dir: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    out_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}))
    return out_dir


def _factors(module: str, out: int, inp: int) -> dict[str, torch.Tensor]:
    return {f"{P}{module}.lora_A.weight": torch.ones(2, inp), f"{P}{module}.lora_B.weight": torch.ones(out, 2)}


def test_merge_plan_steps_in_adapter_order_with_variants(tmp_path: Path) -> None:
    _, base = _pair(tmp_path, _llama_like(), _llama_like())
    q = "model.layers.0.self_attn.q_proj"
    lora = _adapter(tmp_path / "lora", _factors(q, 4, 4))
    dora = _adapter(tmp_path / "dora", _factors(q, 4, 4) | {f"{P}{q}.lora_magnitude_vector": torch.ones(4)},
                    use_dora=True)
    saving = _adapter(tmp_path / "saving", {f"{P}model.norm.weight": torch.ones(4)}, modules_to_save=["model.norm"])
    plan = plan_merge(base, [read_adapter(lora), read_adapter(dora), read_adapter(saving)], is_base=True)
    job = plan.jobs[f"{q}.weight"]
    assert [(type(s), s.adapter) for s in job.steps] == [(FactorStep, 0), (FactorStep, 1)]
    assert [s.variant for s in job.steps] == [LORA, DORA] and job.replacement is None
    norm = plan.jobs["model.norm.weight"]
    assert isinstance(norm.replacement, ReplaceStep) and norm.replacement.key == f"{P}model.norm.weight"
    changes = plan.changes(base, reverse=True)
    assert [(c.tensor, c.steps) for c in changes] == [
        (f"{q}.weight", [(2, "dora"), (1, "lora")]), ("model.norm.weight", [(3, "replace")])]


def test_merge_plan_refuses_what_headers_show(tmp_path: Path) -> None:
    _, base = _pair(tmp_path, _llama_like(), _llama_like())
    q = "model.layers.0.self_attn.q_proj"
    cases = [
        (_factors("model.layers.7.mlp", 4, 4), {}, TensorMissingError, "base has no such tensor"),
        (_factors(q, 5, 4), {}, TensorMismatchError, r"\(5, 4\) but the base weight is \[4, 4\]"),
        (_factors(q, 4, 4) | {f"{P}{q}.lora_magnitude_vector": torch.ones(4)}, {}, AdapterFormatError,
         "has a lora_magnitude_vector but use_dora is false"),
        (_factors(q, 4, 4), {"use_dora": True}, AdapterFormatError, "has no lora_magnitude_vector but use_dora"),
        (_factors(q, 4, 4) | {f"{P}{q}.lora_magnitude_vector": torch.ones(3)}, {"use_dora": True},
         AdapterFormatError, r"lora_magnitude_vector has shape \[3\], expected \[4\]"),
        ({f"{P}{q}.lora_magnitude_vector": torch.ones(4)}, {"use_dora": True}, AdapterFormatError,
         "DoRA magnitude but no LoRA factors"),
        ({f"{P}model.norm.weight": torch.ones(5)}, {}, TensorMismatchError, r"of shape \[5\], the base's is \[4\]"),
    ]
    for i, (tensors, config, error, message) in enumerate(cases):
        adapter = read_adapter(_adapter(tmp_path / f"a{i}", tensors, **config))
        with pytest.raises(error, match=message):
            plan_merge(base, [adapter], is_base=True)


def test_merge_plan_refuses_a_replacement_beside_another_change(tmp_path: Path) -> None:
    _, base = _pair(tmp_path, _llama_like(), _llama_like())
    first = _adapter(tmp_path / "a", {f"{P}model.norm.weight": torch.ones(4)})
    second = _adapter(tmp_path / "b", {f"{P}model.norm.weight": torch.ones(4)})
    with pytest.raises(InvalidOptionError, match=r"adapter #1 replaces this tensor and adapter\(s\) #2 also change"):
        plan_merge(base, [read_adapter(first), read_adapter(second)], is_base=True)


def test_merge_plan_maps_names_without_the_first_component(tmp_path: Path) -> None:
    """The original GPT-2 checkpoints store ``h.0.attn.c_attn.weight``; PEFT names ``transformer.h.0...``."""
    tensors = {"h.0.attn.c_attn.weight": torch.zeros(4, 12)}
    _, base = _pair(tmp_path, tensors, tensors, {"model_type": "gpt2", "tie_word_embeddings": False})
    adapter = _adapter(tmp_path / "a", _factors("transformer.h.0.attn.c_attn", 12, 4), fan_in_fan_out=True)
    plan = plan_merge(base, [read_adapter(adapter)], is_base=True)
    assert list(plan.jobs) == ["h.0.attn.c_attn.weight"]
    assert plan.jobs["h.0.attn.c_attn.weight"].kind is WeightKind.CONV1D
