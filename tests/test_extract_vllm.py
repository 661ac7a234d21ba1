"""``extract --for vllm``: adapters that vLLM's loader accepts, that PEFT loads exactly, and that reproduce a full
fine-tune (norms included) without ``modules_to_save``.

vLLM is not a test dependency (it needs a GPU build), so its loader's rules are encoded below in
``vllm_violations``, as read in vLLM 0.33's source (``vllm/lora/peft_helper.py``, ``lora_model.py``, ``utils.py``;
the citations are in ``deltakit/adapters/profiles.py``), and ``_apply_as_vllm`` applies an adapter the way vLLM
versions without pattern support do: one scaling for every module, from the top-level ``lora_alpha``/``r``.
(``benchmarks/vllm_loader.py`` loads the same adapters through vLLM's own loader code.)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from builders import ModelPair, load_model, logits, make_perturbed_pair, peft_model, write_safetensors_pair
from safetensors.torch import load_file
from test_extract_peft import INPUT_IDS
from torch import nn

import deltakit
from deltakit.cli import main
from deltakit.adapters.architectures import ARCHITECTURES, architecture
from deltakit.errors import InvalidOptionError
from deltakit.math.norm_fold import NotFoldableError, change_norms, fold_into_consumer, scale_ratio

# vllm/config/lora.py: the largest --max-lora-rank (MaxLoRARanks).
VLLM_MAX_LORA_RANK = 512
# The embedding_modules of vLLM's model class per model_type (LlamaForCausalLM; MistralForCausalLM and
# Qwen2ForCausalLM list none): the only non-Linear modules its LoRA manager wraps.
VLLM_EMBEDDING_MODULES = {"llama": {"embed_tokens", "lm_head"}, "mistral": set(), "qwen2": set()}
# vllm/lora/utils.py::parse_fine_tuned_lora_name: the only keys it parses.
_VLLM_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|"
                       r"lora_embedding_A|lora_embedding_B)")


def vllm_violations(adapter_dir: Path, model: nn.Module) -> list[str]:
    """Why vLLM's loader would refuse (or misread) this adapter for ``model``; empty if it loads it as PEFT does."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    found = []
    # PEFTHelper.from_dict: required fields.
    found += [f"missing {f}" for f in ("r", "lora_alpha", "target_modules") if f not in config]
    # PEFTHelper._validate_features / validate_legal.
    if config.get("modules_to_save"):
        found.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("use_dora"):
        found.append("use_dora")
    if config.get("bias", "none") != "none":
        found.append(f"bias {config['bias']!r}")
    if config.get("r", 0) > VLLM_MAX_LORA_RANK:
        found.append(f"r {config['r']} > {VLLM_MAX_LORA_RANK}")
    # LoRAModel.from_local_checkpoint / from_lora_tensors: keys, module names, embedding vocabulary.
    linear_leaves = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    expected = linear_leaves | VLLM_EMBEDDING_MODULES[model.config.model_type]
    ranks: dict[str, int] = {}
    for key, tensor in weights.items():
        match = _VLLM_KEY.fullmatch(key)
        if match is None:
            found.append(f"unsupported key {key}")
            continue
        module, kind = match["module"], match["kind"]
        if module.rpartition(".")[2] not in expected:
            found.append(f"unexpected module {module}")
        if kind == "lora_embedding_A" and tensor.shape[1] != model.config.vocab_size:
            found.append(f"{key}: vocabulary {tensor.shape[1]} != {model.config.vocab_size}")
        if kind in ("lora_A.weight", "lora_embedding_A"):
            ranks[module] = tensor.shape[0]
    # PEFTHelper: vLLM 0.33 resolves each module's rank and scaling with PEFT's own pattern rule, so it agrees with
    # PEFT by construction; earlier versions drop the patterns and give every module lora_alpha/r. That must be
    # what PEFT computes for every module, and the ranks the patterns give must fit --max-lora-rank too.
    adapter = deltakit.read_adapter(adapter_dir)
    vllm_scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    if max([config["r"], *(config.get("rank_pattern") or {}).values()]) > VLLM_MAX_LORA_RANK:
        found.append(f"a rank_pattern rank > {VLLM_MAX_LORA_RANK}")
    for module, rank in ranks.items():
        if rank > config["r"]:
            found.append(f"{module}: rank {rank} > r {config['r']}")
        if not math.isclose(adapter.scaling(module), vllm_scaling, rel_tol=1e-6):
            found.append(f"{module}: PEFT scaling {adapter.scaling(module)} != older vLLM's {vllm_scaling}")
    return found


def _apply_as_vllm(pair: ModelPair, adapter_dir: Path) -> nn.Module:
    """The untied base plus the adapter as a vLLM without pattern support computes it: W + s·B@A (embeddings
    (B@A)ᵀ), one s for all modules."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    model = load_model(pair.base_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key in weights:
            match = _VLLM_KEY.fullmatch(key)
            if match["kind"] not in ("lora_A.weight", "lora_embedding_A"):
                continue
            module, is_embedding = match["module"], match["kind"] == "lora_embedding_A"
            a = weights[key].float()
            b = weights[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")].float()
            delta = scaling * (b @ a)
            params[f"{module}.weight"].add_(delta.T if is_embedding else delta)
    return model


# --- the validator encodes the rules: a default PEFT adapter of a full fine-tune breaks them ------------------


def test_validator_rejects_default_peft_adapter(llama_pair, qwen2_pair, tmp_path):
    deltakit.extract(llama_pair.ft_dir, llama_pair.base_dir, tmp_path / "llama", rank=4)
    found = vllm_violations(tmp_path / "llama", load_model(llama_pair.base_dir))
    assert any(v.startswith("modules_to_save") for v in found), found
    assert any(v.startswith("unsupported key base_model.model.model.norm.weight") for v in found), found
    deltakit.extract(qwen2_pair.ft_dir, qwen2_pair.base_dir, tmp_path / "qwen2", avg_rank=3, alpha=3.0,
                     budget_weighting="absolute")
    found = vllm_violations(tmp_path / "qwen2", load_model(qwen2_pair.base_dir))
    assert "bias 'lora_only'" in found and any("base_layer.bias" in v for v in found), found
    assert any("PEFT scaling" in v for v in found), found  # per-module ranks, one alpha: wrong under older vLLM


# --- full rank: the fine-tune, norms included, with no modules_to_save ---------------------------------------


def test_llama_full_finetune_reproduced_without_modules_to_save(llama_pair, tmp_path):
    """Every norm of the full fine-tune changed; each is folded into the Linear layers that read it."""
    report = deltakit.extract(llama_pair.ft_dir, llama_pair.base_dir, tmp_path / "a", rank=128, svd="exact",
                              target="vllm")
    assert vllm_violations(tmp_path / "a", load_model(llama_pair.base_dir)) == []
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["bias"] == "none" and config["use_dora"] is False
    folded = {t.tensor for t in report.fates("folded")}
    assert folded == {"model.norm.weight"} | {f"model.layers.{i}.{n}.weight" for i in range(2)
                                             for n in ("input_layernorm", "post_attention_layernorm")}
    assert all(t.relative_change > 0.01 for t in report.fates("folded"))  # they did change
    assert report.fates("dropped") == [] and report.fates("carried") == []
    expected = logits(llama_pair.ft_dir, INPUT_IDS)
    torch.testing.assert_close(logits(peft_model(llama_pair, tmp_path / "a"), INPUT_IDS), expected,
                               atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits(_apply_as_vllm(llama_pair, tmp_path / "a"), INPUT_IDS), expected,
                               atol=2e-4, rtol=1e-4)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "vllm serve" in card and "--max-lora-rank 64" in card and "model.norm.weight" in card


@pytest.fixture(scope="module")
def qwen2_norms_pair(tmp_path_factory) -> ModelPair:
    """Qwen2 with changed decoder norms and Linear weights; embeddings, head, biases and the final norm as in the
    base (vLLM's Qwen2ForCausalLM takes no LoRA on lm_head, so the final norm has no reader to fold into)."""
    return make_perturbed_pair(tmp_path_factory.mktemp("qwen2_norms"), "qwen2",
                               r"model\.layers\.\d+\.(.*layernorm|(self_attn|mlp)\.\w+_proj)\.weight")


def test_qwen2_norm_changes_reproduced_without_modules_to_save(qwen2_norms_pair, tmp_path):
    pair = qwen2_norms_pair
    report = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "a", rank=128, svd="exact", target="vllm")
    assert vllm_violations(tmp_path / "a", load_model(pair.base_dir)) == []
    assert len(report.fates("folded")) == 4 and report.fates("dropped") == []
    expected = logits(pair.ft_dir, INPUT_IDS)
    assert not torch.allclose(logits(pair.base_dir, INPUT_IDS), expected, atol=1e-2)
    torch.testing.assert_close(logits(peft_model(pair, tmp_path / "a"), INPUT_IDS), expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits(_apply_as_vllm(pair, tmp_path / "a"), INPUT_IDS), expected,
                               atol=2e-4, rtol=1e-4)


def test_qwen2_full_finetune_drops_what_vllm_cannot_load_and_says_what_it_costs(qwen2_pair, tmp_path):
    report = deltakit.extract(qwen2_pair.ft_dir, qwen2_pair.base_dir, tmp_path / "a", rank=8, target="vllm")
    assert vllm_violations(tmp_path / "a", load_model(qwen2_pair.base_dir)) == []
    dropped = {t.tensor: t for t in report.fates("dropped")}
    assert set(dropped) == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} | {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"}
    assert "lm_head" in dropped["model.norm.weight"].reason
    assert dropped["lm_head.weight"].relative_change > 0.1
    assert dropped["model.layers.0.self_attn.q_proj.bias"].relative_change is None  # a zero base...
    assert dropped["model.layers.0.self_attn.q_proj.bias"].change_norm > 0  # ...so the size of the change is given
    lines = "\n".join(report.summary_lines())
    assert "relative change" in lines and "DROPPED" in lines
    card = (tmp_path / "a" / "README.md").read_text()
    assert "`model.norm.weight`" in card and "relative change" in card


# --- one scaling, right for every module ----------------------------------------------------------------------


def test_per_module_ranks_and_alpha_are_right_under_one_scaling(llama_pair, tmp_path):
    """A budget gives each module its own rank; with alpha ≠ r and rsLoRA each module's own scaling would differ.
    A vLLM that ignores the patterns applies one scaling from lora_alpha/r: its result must equal PEFT's."""
    report = deltakit.extract(llama_pair.ft_dir, llama_pair.base_dir, tmp_path / "a", avg_rank=3, alpha=5.0,
                              budget_weighting="absolute", use_rslora=True, target="vllm")
    ranks = {m.rank for m in report.modules}
    assert len(ranks) > 1
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == max(ranks) and config["lora_alpha"] == 5.0 and config["use_rslora"] is True
    assert vllm_violations(tmp_path / "a", load_model(llama_pair.base_dir)) == []
    torch.testing.assert_close(logits(_apply_as_vllm(llama_pair, tmp_path / "a"), INPUT_IDS),
                               logits(peft_model(llama_pair, tmp_path / "a"), INPUT_IDS), atol=2e-4, rtol=1e-4)


def test_tied_head_keeps_its_lora_and_reports_the_final_norm(llama_tied_pair, tmp_path):
    """Folding the final norm into a tied head would change the embedding too: it is dropped and said so."""
    report = deltakit.extract(llama_tied_pair.ft_dir, llama_tied_pair.base_dir, tmp_path / "a", rank=128,
                              svd="exact", target="vllm")
    assert vllm_violations(tmp_path / "a", load_model(llama_tied_pair.base_dir)) == []
    [dropped] = report.fates("dropped")
    assert dropped.tensor == "model.norm.weight" and "tied" in dropped.reason and dropped.relative_change > 0
    peft_model(llama_tied_pair, tmp_path / "a")  # loads with no missing or unexpected keys


# --- refusals, one line each, before any work ----------------------------------------------------------------


def test_dora_for_vllm_is_refused(llama_pair, tmp_path):
    with pytest.raises(InvalidOptionError, match="vLLM does not load adapters with use_dora"):
        deltakit.extract(llama_pair.ft_dir, llama_pair.base_dir, tmp_path / "a", dora=True, target="vllm")
    assert not (tmp_path / "a").exists()


def test_unknown_architecture_is_not_guessed(gpt2_pair, tmp_path):
    with pytest.raises(InvalidOptionError, match="model_type 'gpt2' is not in deltakit's table") as caught:
        deltakit.extract(gpt2_pair.ft_dir, gpt2_pair.base_dir, tmp_path / "a", target="vllm")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "a").exists()


def _exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def test_cli_for_vllm(llama_pair, tmp_path, capsys):
    args = ["extract", str(llama_pair.ft_dir), str(llama_pair.base_dir), "--for", "vllm"]
    assert _exit_code([*args, "--dora", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().startswith("deltakit: error: --for vllm: vLLM does not load adapters "
                                                      "with use_dora")
    assert _exit_code([*args, "-r", "4", "-q", "-o", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "extract_report.json").read_text())["options"]["target"] == "vllm"


def test_norm_the_base_switches_off_is_not_folded(tmp_path):
    """g = 0 where g' ≠ 0: no scaling of the reader recovers that channel; the norm is dropped and said so, and its
    readers keep their own ΔW."""
    torch.manual_seed(0)
    base = {"model.layers.0.input_layernorm.weight": torch.tensor([1.0, 0.0, 2.0, 1.0]),
            **{f"model.layers.0.self_attn.{p}_proj.weight": torch.randn(4, 4) for p in "qkv"}}
    finetuned = dict(base, **{"model.layers.0.input_layernorm.weight": torch.tensor([1.0, 0.5, 2.0, 1.0]),
                              "model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"]
                              + 0.1})
    base_dir, ft_dir = write_safetensors_pair(tmp_path, base, finetuned)
    for ckpt_dir in (base_dir, ft_dir):
        (ckpt_dir / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=4, target="vllm")
    [dropped] = report.fates("dropped")
    assert dropped.tensor == "model.layers.0.input_layernorm.weight" and "0 in the base's scale" in dropped.reason
    assert [m.module for m in report.modules] == ["model.layers.0.self_attn.q_proj"]  # k, v unchanged: not folded


# --- the math and the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_folding_a_norm_scale_into_its_reader_is_exact(kind):
    torch.manual_seed(0)
    hidden, out = 16, 8
    x = torch.randn(5, hidden, dtype=torch.float64)
    x_hat = x / x.pow(2).mean(-1, keepdim=True).sqrt() if kind == "rms" else torch.nn.functional.layer_norm(
        x, (hidden,))
    g, g_ft = torch.rand(hidden, dtype=torch.float64) + 0.5, torch.rand(hidden, dtype=torch.float64) + 0.5
    w_ft = torch.randn(out, hidden, dtype=torch.float64)
    folded = fold_into_consumer(w_ft.clone(), scale_ratio(g, g_ft).double())
    # the ratio is computed in fp32, like every delta
    torch.testing.assert_close((g * x_hat) @ folded.T, (g_ft * x_hat) @ w_ft.T, rtol=1e-5, atol=1e-5)
    if kind == "layer":  # a bias change is left over: W_ft·(β' − diag(g'/g)·β), a constant no bias-free LoRA holds
        beta, beta_ft = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
        leftover = (g_ft * x_hat + beta_ft) @ w_ft.T - (g * x_hat + beta) @ folded.T
        torch.testing.assert_close(leftover, ((beta_ft - g_ft / g * beta) @ w_ft.T).expand(5, -1), rtol=1e-5,
                                   atol=1e-5)


def test_scale_ratio_zero_channels():
    assert scale_ratio(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.5]
    with pytest.raises(NotFoldableError, match="1 channel"):
        scale_ratio(torch.tensor([0.0, 2.0]), torch.tensor([0.1, 1.0]))


def test_change_norms_blockwise_equals_direct():
    base, finetuned = torch.randn(3000, 700), torch.randn(3000, 700)  # more than one block of rows
    change, scale = change_norms(base, finetuned)
    assert math.isclose(change, float(torch.linalg.vector_norm((finetuned - base).double())), rel_tol=1e-9)
    assert math.isclose(scale, float(torch.linalg.vector_norm(base.double())), rel_tol=1e-9)


def test_table_names_every_reader_of_a_llama_norm(llama_pair):
    model = load_model(llama_pair.base_dir)
    arch = architecture("llama", "test")
    modules = dict(model.named_modules())
    norms = [n for n, m in modules.items() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(arch.readers_of(n) for n in norms)
    for norm in norms:
        assert all(isinstance(modules[r], nn.Linear) for r in arch.readers_of(norm))
    assert set(ARCHITECTURES) == set(VLLM_EMBEDDING_MODULES)


def test_batch_manifest_takes_the_cli_name(tmp_path):
    from deltakit.ops.batch import load_manifest

    manifest = tmp_path / "jobs.toml"
    manifest.write_text('[[jobs]]\nop = "extract"\nft = "ft"\nbase = "base"\nout = "a"\nfor = "vllm"\n\n'
                        '[[jobs]]\nop = "extract"\nft = "ft"\nbase = "base"\nout = "b"\nfor = "sglang"\n')
    with pytest.raises(InvalidOptionError, match="sglang"):
        load_manifest(manifest)
    manifest.write_text(manifest.read_text().split("\n\n")[0] + "\n")
    assert load_manifest(manifest)[0].options["target"] == "vllm"


def test_norm_with_an_excluded_reader_is_not_folded(llama_pair, tmp_path):
    """Folding into only some readers would leave the excluded one reading the base norm: the norm is dropped,
    and the readers that are in keep their own ΔW."""
    report = deltakit.extract(llama_pair.ft_dir, llama_pair.base_dir, tmp_path / "a", rank=4, target="vllm",
                              exclude=[r"layers\.0\.self_attn\.q_proj"])
    dropped = {t.tensor: t.reason for t in report.fates("dropped")}
    assert "excluded" in dropped["model.layers.0.input_layernorm.weight"]
    assert "model.layers.1.input_layernorm.weight" in {t.tensor for t in report.fates("folded")}
    notes = {m.module: m.note or "" for m in report.modules}
    assert "norm" not in notes["model.layers.0.self_attn.k_proj"]
    assert "norm it reads" in notes["model.layers.1.self_attn.k_proj"]
