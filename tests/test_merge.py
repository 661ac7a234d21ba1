"""merge / unmerge: equal to PEFT's merge_and_unload, invertible, streamed, and mirroring the base's layout.

Adapters are made with PEFT itself (``init_lora_weights=False`` so B ≠ 0, alpha ≠ r, DoRA magnitudes perturbed away
from the row norms, saved modules and biases changed), which makes PEFT an independent reference; one test also
merges an adapter that deltakit's own ``extract`` made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from builders import ModelPair, load_model, logits, low_rank_delta, refuse_direct, write_safetensors_pair
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from deltakit.io.checkpoint import open_checkpoint
from deltakit.errors import (
    InvalidOptionError,
    NonFiniteError,
    OutputExistsError,
    ReceiptMismatchError,
    ReceiptMissingError,
    TensorMismatchError,
    TensorMissingError,
)
from deltakit.ops.extract import extract
from deltakit.ops.merge import RECEIPT_DIR, merge, unmerge

# Two target sets per architecture that overlap (so one weight gets two adapters) and include the input
# embedding (lora_embedding_A/B, transposed delta) and, for GPT-2, Conv1D layers (fan_in_fan_out).
TARGETS = {
    "llama": (["q_proj", "v_proj", "down_proj", "embed_tokens"], ["q_proj", "k_proj", "up_proj", "lm_head"]),
    "bert": (["query", "value", "word_embeddings"], ["query", "key", "dense"]),
    "gpt2": (["c_attn", "c_proj", "wte"], ["c_attn", "c_fc"]),
}
# What the first adapter also replaces: a saved module (modules_to_save) or its targeted modules' biases.
EXTRAS = {
    "llama": {"modules_to_save": ["model.norm"]},
    "bert": {"bias": "lora_only"},
    "gpt2": {"modules_to_save": ["transformer.ln_f"]},
}


def _peft_adapter(base_dir: Path, out_dir: Path, targets: list[str], *, dora: bool, rank: int, alpha: float,
                  seed: int, rslora: bool = False, delta_ratio: float | None = None, **extra: object) -> Path:
    """A PEFT-made adapter with nothing trivial in it: B ≠ 0, magnitudes ≠ row norms, saved params ≠ base.

    PEFT's random B makes ΔW as large as W or larger. ``delta_ratio`` rescales each B so ‖ΔW‖ = ratio · ‖W‖ and
    sets DoRA magnitudes to the row norms of W + ΔW times 1 ± 2 %, the size of a real fine-tune's change.
    """
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_dora=dora,
                        use_rslora=rslora, **extra)
    model = get_peft_model(load_model(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
            elif "modules_to_save" in name or (param.requires_grad and name.endswith("bias")):
                param.add_(0.1 * torch.randn_like(param))
        for layer in model.modules():
            if delta_ratio is None or not isinstance(layer, LoraLayer):
                continue
            weight, scaling = layer.get_base_layer().weight, layer.scaling["default"]
            is_embedding = "default" in layer.lora_embedding_A
            if is_embedding:  # E (vocab, dim) = W (out, in) transposed
                weight = weight.T
                a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
            else:
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
            b.mul_(delta_ratio * weight.norm() / (scaling * b @ a).norm())
            if dora:
                norms = (weight + scaling * b @ a).norm(dim=1)
                layer.lora_magnitude_vector["default"].weight.copy_(norms * (1 + 0.02 * torch.randn_like(norms)))
    model.save_pretrained(out_dir)
    return out_dir


def _read(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float) -> None:
    for name, value in got.items():
        scale = ref[name].float().abs().max().item()
        error = (value.float() - ref[name].float()).abs().max().item()
        assert error <= rel * scale + 1e-7, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def _peft_merged(base_dir: Path, adapter_dirs: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """PEFT's own merge: load every adapter, scale by its weight, ``merge_and_unload`` them in order."""
    names = [f"a{k}" for k in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(load_model(base_dir), adapter_dirs[0], adapter_name=names[0])
    for name, adapter_dir in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(adapter_dir, adapter_name=name)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights):
                module.set_scale(name, weight)
    return model.merge_and_unload(adapter_names=names).state_dict()


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("kinds", [("lora",), ("dora",), ("lora", "lora"), ("dora", "dora"), ("lora", "dora")])
def test_merge_equals_peft_merge_and_unload(arch: str, kinds: tuple[str, ...], tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    """Same tensors as PEFT's merge_and_unload for Linear, Conv1D and embedding layers, LoRA and DoRA, one and two
    adapters (a second with other r/alpha, rsLoRA and weight 0.6), replaced saved modules and biases included."""
    pair: ModelPair = request.getfixturevalue(f"{arch}_pair")
    adapters = [
        _peft_adapter(pair.base_dir, tmp_path / "a0", TARGETS[arch][0], dora=kinds[0] == "dora", rank=4, alpha=7,
                      seed=1, **EXTRAS[arch]),
    ]
    weights = [1.0]
    if len(kinds) == 2:
        adapters.append(_peft_adapter(pair.base_dir, tmp_path / "a1", TARGETS[arch][1], dora=kinds[1] == "dora",
                                      rank=6, alpha=3, rslora=True, seed=2))
        weights.append(0.6)

    report = merge(pair.base_dir, adapters, tmp_path / "merged", weights=weights)

    got, base = _read(tmp_path / "merged"), _read(pair.base_dir)
    assert list(got) == list(base)
    _assert_close(got, _peft_merged(pair.base_dir, adapters, weights), rel=1e-5)
    changed = {c.tensor for c in report.changed}
    assert changed == {n for n in base if not torch.equal(got[n], base[n])}
    assert any(s == (1, "replace") for c in report.changed for s in c.steps)


def test_dora_rescales_what_was_merged_before_it_not_after(llama_pair: ModelPair, tmp_path: Path) -> None:
    """Order matters for DoRA (PEFT's semantics): LoRA then DoRA differs from DoRA then LoRA, and each equals PEFT."""
    lora = _peft_adapter(llama_pair.base_dir, tmp_path / "lora", ["q_proj"], dora=False, rank=4, alpha=7, seed=1)
    dora = _peft_adapter(llama_pair.base_dir, tmp_path / "dora", ["q_proj"], dora=True, rank=4, alpha=5, seed=2)
    name = "model.layers.0.self_attn.q_proj.weight"
    results = []
    for order in ([lora, dora], [dora, lora]):
        out = tmp_path / f"m-{order[0].name}"
        merge(llama_pair.base_dir, order, out)
        got = _read(out)
        _assert_close({name: got[name]}, _peft_merged(llama_pair.base_dir, order, [1.0, 1.0]), rel=1e-5)
        results.append(got[name])
    assert (results[0] - results[1]).abs().max() > 1e-3


def test_merging_an_extracted_full_rank_adapter_gives_the_finetune(llama_pair: ModelPair, tmp_path: Path) -> None:
    """extract at full rank (with carried norms and head) then merge reproduces the fine-tuned checkpoint."""
    extract(llama_pair.ft_dir, llama_pair.base_dir, tmp_path / "adapter", rank=96)
    merge(llama_pair.base_dir, [tmp_path / "adapter"], tmp_path / "merged")
    _assert_close(_read(tmp_path / "merged"), _read(llama_pair.ft_dir), rel=1e-5)


# The input embedding each tied pair's head shares, and that head's module.
TIED = {
    "llama_tied_pair": ("model.embed_tokens", "lm_head"),
    "gpt2_pair": ("transformer.wte", "lm_head"),
    "bert_pair": ("bert.embeddings.word_embeddings", "cls.predictions.decoder"),
}


@pytest.mark.parametrize("fixture", list(TIED))
def test_tied_head_takes_the_embedding_update_once(fixture: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    """A full-rank extract of a tied model stores the embedding's factors for the head too (transposed); the
    base stores only the embedding. Merging applies ΔE once: every tensor equals the fine-tune's, no head tensor
    appears, and transformers' logits equal the fine-tune's; unmerge gives the base back. (BERT: the head's bias,
    carried as ``cls.predictions.decoder.base_layer.bias``, lands on ``cls.predictions.bias``.)"""
    pair: ModelPair = request.getfixturevalue(fixture)
    embedding, head = TIED[fixture]
    extract(pair.ft_dir, pair.base_dir, tmp_path / "adapter", rank=128)
    assert f"base_model.model.{head}.lora_A.weight" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    report = merge(pair.base_dir, [tmp_path / "adapter"], tmp_path / "merged")

    base, merged, finetuned = _read(pair.base_dir), _read(tmp_path / "merged"), _read(pair.ft_dir)
    assert list(merged) == list(base) and f"{head}.weight" not in merged
    _assert_close(merged, finetuned, rel=1e-5)
    assert f"{embedding}.weight" in {c.tensor for c in report.changed}
    assert any(note.startswith(f"adapter #1: {head} is tied to {embedding}") for note in report.notes)
    input_ids = torch.randint(0, 128, (2, 16))
    ft_logits = logits(pair.ft_dir, input_ids)
    torch.testing.assert_close(logits(tmp_path / "merged", input_ids), ft_logits, rtol=0, atol=1e-4)
    unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "unmerged")
    _assert_close(_read(tmp_path / "unmerged"), base, rel=1e-5)

    # PEFT 0.21.2's merge_and_unload on the same adapter merges the embedding's LoRA and the head's LoRA (for
    # lm_head the factors ensure_weight_tying shares; for BERT's decoder a LoRA of its own) into the one shared
    # tensor, so it holds E + 2ΔE, while PEFT's unmerged forward is the fine-tune's. If this starts failing, PEFT
    # changed how it merges tied modules: check that deltakit's merge still equals what PEFT then does.
    model = PeftModel.from_pretrained(load_model(pair.base_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(model, input_ids), ft_logits, rtol=0, atol=1e-4)
    peft_merged = model.merge_and_unload().state_dict()
    name, delta = f"{embedding}.weight", finetuned[f"{embedding}.weight"] - base[f"{embedding}.weight"]
    torch.testing.assert_close(peft_merged[name], base[name] + 2 * delta, rtol=0, atol=1e-5)
    assert peft_merged[f"{head}.weight"].data_ptr() == peft_merged[name].data_ptr()


def test_base_storing_both_tied_tensors_gets_each_its_own_factors(llama_tied_pair: ModelPair,
                                                                   tmp_path: Path) -> None:
    """A tied base that stores lm_head.weight too (a copy of the embedding): each tensor takes its own factors,
    and both end equal to the fine-tuned embedding."""
    extract(llama_tied_pair.ft_dir, llama_tied_pair.base_dir, tmp_path / "adapter", rank=128)
    base = _read(llama_tied_pair.base_dir)
    base_dir = tmp_path / "base"
    shutil.copytree(llama_tied_pair.base_dir, base_dir)
    save_file(base | {"lm_head.weight": base["model.embed_tokens.weight"].clone()}, base_dir / "model.safetensors",
              metadata={"format": "pt"})

    report = merge(base_dir, [tmp_path / "adapter"], tmp_path / "merged")

    merged, finetuned = _read(tmp_path / "merged"), _read(llama_tied_pair.ft_dir)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= {c.tensor for c in report.changed}
    assert not any("tied" in note for note in report.notes)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        _assert_close({name: merged[name]}, {name: finetuned["model.embed_tokens.weight"]}, rel=1e-5)


@pytest.mark.parametrize("change", ["factors", "scaling"])
def test_tied_head_with_an_update_of_its_own_is_refused(change: str, llama_tied_pair: ModelPair,
                                                        tmp_path: Path) -> None:
    """Head factors that are not the embedding's transposed (one element off), or the same factors under another
    scaling, would need a head weight the base does not have: refused, naming the module, dry run included."""
    extract(llama_tied_pair.ft_dir, llama_tied_pair.base_dir, tmp_path / "adapter", rank=4)
    adapter = tmp_path / "adapter"
    if change == "factors":
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors["base_model.model.lm_head.lora_B.weight"][0, 0] += 1e-3
        save_file(tensors, adapter / "adapter_model.safetensors")
        reason = r"its factors are not model\.embed_tokens's transposed"
    else:
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["alpha_pattern"] = {"^lm_head": 8}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        reason = r"its scaling 2 differs from model\.embed_tokens's"
    for dry_run in (True, False):
        with pytest.raises(TensorMissingError, match=rf"lm_head\.weight: module lm_head: the base ties .*{reason}"):
            merge(llama_tied_pair.base_dir, [adapter], tmp_path / "out", dry_run=dry_run)
    assert _no_output(tmp_path, "out")


def _ulps_bf16(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """|got − ref| in units of the bf16 spacing at |scale| (default |ref|): 2^(e − 7) for |scale| in [2^e, 2^(e+1))."""
    scale = ref if scale is None else scale
    exponent = torch.floor(torch.log2(scale.float().abs().clamp_min(2.0**-126)))
    return (got.float() - ref.float()).abs() / torch.exp2(exponent - 7)


@pytest.mark.parametrize("fixture", ["llama_pair", "llama_pair_bf16_sharded"])
def test_merge_then_unmerge_returns_the_base(fixture: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """LoRA then DoRA (‖ΔW‖ = 3 % of ‖W‖) merged and unmerged with the receipt. fp32: within 1e-6 of each tensor's
    largest magnitude; bf16: every element within one ulp of max(|base|, |merged|) there, and most bit-exact.
    Replaced tensors come back byte for byte; the receipt is not carried into the unmerged output."""
    pair: ModelPair = request.getfixturevalue(fixture)
    adapters = [
        _peft_adapter(pair.base_dir, tmp_path / "lora", TARGETS["llama"][0], dora=False, rank=4, alpha=7, seed=1,
                      delta_ratio=0.03, modules_to_save=["model.norm"]),
        _peft_adapter(pair.base_dir, tmp_path / "dora", TARGETS["llama"][1], dora=True, rank=6, alpha=3, seed=2,
                      delta_ratio=0.03),
    ]
    merge(pair.base_dir, adapters, tmp_path / "merged", weights=[0.5, 1.0])
    assert (tmp_path / "merged" / RECEIPT_DIR).is_dir()
    report = unmerge(tmp_path / "merged", adapters[::-1], tmp_path / "unmerged")  # order comes from the receipt

    assert report.receipt == "used" and report.weights == [0.5, 1.0]
    assert not (tmp_path / "unmerged" / RECEIPT_DIR).exists()
    base, merged, unmerged = _read(pair.base_dir), _read(tmp_path / "merged"), _read(tmp_path / "unmerged")
    assert not torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert torch.equal(unmerged["model.norm.weight"], base["model.norm.weight"])
    exact = total = 0
    for name, value in unmerged.items():
        assert value.dtype == base[name].dtype
        if value.dtype == torch.bfloat16:
            scale = torch.maximum(base[name].abs(), merged[name].abs())
            assert _ulps_bf16(value, base[name], scale).max() <= 1.0, name
            exact, total = exact + int((value == base[name]).sum()), total + value.numel()
        else:
            assert (value - base[name]).abs().max() <= 1e-6 * base[name].abs().max(), name
    assert exact >= 0.9 * total


def test_unmerge_without_receipt_subtracts_lora_and_refuses_dora(llama_pair: ModelPair, tmp_path: Path) -> None:
    """No receipt: a plain LoRA adapter is subtracted; a DoRA adapter (or one that replaced tensors) is refused."""
    lora = _peft_adapter(llama_pair.base_dir, tmp_path / "lora", ["q_proj", "v_proj"], dora=False, rank=4, alpha=7,
                         seed=1)
    dora = _peft_adapter(llama_pair.base_dir, tmp_path / "dora", ["q_proj"], dora=True, rank=4, alpha=7, seed=2)
    saving = _peft_adapter(llama_pair.base_dir, tmp_path / "saving", ["q_proj"], dora=False, rank=4, alpha=7, seed=3,
                           modules_to_save=["model.norm"])
    for adapter in (lora, dora, saving):
        merge(llama_pair.base_dir, [adapter], tmp_path / f"merged-{adapter.name}", weights=[0.7])
        shutil.rmtree(tmp_path / f"merged-{adapter.name}" / RECEIPT_DIR)

    report = unmerge(tmp_path / "merged-lora", [lora], tmp_path / "unmerged", weights=[0.7])
    assert report.receipt.startswith("none used")
    _assert_close(_read(tmp_path / "unmerged"), _read(llama_pair.base_dir), rel=1e-6)
    for adapter, what in ((dora, "is DoRA"), (saving, "replaced this tensor")):
        with pytest.raises(ReceiptMissingError, match=what):
            unmerge(tmp_path / f"merged-{adapter.name}", [adapter], tmp_path / f"unmerged-{adapter.name}")
        assert not (tmp_path / f"unmerged-{adapter.name}").exists()


def test_unmerge_with_another_adapters_receipt_refuses_dora(llama_pair: ModelPair, tmp_path: Path) -> None:
    """A receipt only counts for the adapters it records (by content hash)."""
    dora = _peft_adapter(llama_pair.base_dir, tmp_path / "dora", ["q_proj"], dora=True, rank=4, alpha=7, seed=1)
    other = _peft_adapter(llama_pair.base_dir, tmp_path / "other", ["q_proj"], dora=True, rank=4, alpha=7, seed=2)
    merge(llama_pair.base_dir, [dora], tmp_path / "merged")
    with pytest.raises(ReceiptMismatchError, match="was not merged into this checkpoint"):
        unmerge(tmp_path / "merged", [other], tmp_path / "unmerged")
    with pytest.raises(InvalidOptionError, match="receipt records weights"):
        unmerge(tmp_path / "merged", [dora], tmp_path / "unmerged", weights=[0.5])


def _llama_like(layers: int, hidden: int, inter: int, vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(*shape, generator=generator)).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors |= {f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                    f"{p}.self_attn.q_proj.weight": rand(hidden, hidden),
                    f"{p}.self_attn.v_proj.weight": rand(hidden // 2, hidden),
                    f"{p}.mlp.up_proj.weight": rand(inter, hidden),
                    f"{p}.mlp.down_proj.weight": rand(hidden, inter)}
    return tensors | {"model.norm.weight": torch.ones(hidden, dtype=dtype), "lm_head.weight": rand(vocab, hidden)}


@pytest.mark.parametrize("o_direct", ["allowed", "refused at open", "refused at write"])
def test_output_mirrors_a_sharded_bf16_base(o_direct: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 bf16 shards with a custom prefix: same file names, index bytes, header bytes, tensor order, dtypes and
    metadata; untouched tensors byte-identical; side files copied, stale weights and subdirectories skipped; every
    file loads with safetensors. The adapter comes from deltakit's own extract of a rank-4 fine-tune. Also where
    the file system refuses O_DIRECT, at open (tmpfs) or at the first write (some FUSE mounts): the same bytes,
    through the page cache."""
    refuse_direct(monkeypatch, o_direct)
    base = _llama_like(3, 64, 96, 100, torch.bfloat16)
    finetuned = dict(base)
    for i in range(3):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        finetuned[name] = (base[name].float() + low_rank_delta(64, 64, 4, seed=i, scale=0.5)).to(torch.bfloat16)
    base_dir, ft_dir = write_safetensors_pair(tmp_path, base, finetuned, shards=3, prefix="diffusion_pytorch_model")
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    (base_dir / "tokenizer.json").write_text("{}")
    (base_dir / "pytorch_model.bin").write_bytes(b"stale")
    (base_dir / "original").mkdir()
    extract(ft_dir, base_dir, tmp_path / "adapter", rank=4)

    report = merge(base_dir, [tmp_path / "adapter"], tmp_path / "merged")

    out_dir = tmp_path / "merged"
    names = sorted(p.name for p in base_dir.glob("diffusion_pytorch_model*"))
    assert sorted(p.name for p in out_dir.glob("diffusion_pytorch_model*")) == names and len(names) == 4
    index = "diffusion_pytorch_model.safetensors.index.json"
    assert (out_dir / index).read_bytes() == (base_dir / index).read_bytes()
    assert sorted(report.other_files) == ["config.json", "tokenizer.json"]
    assert not (out_dir / "pytorch_model.bin").exists() and not (out_dir / "original").exists()
    assert len(report.skipped_files) == 2
    base_ckpt, out_ckpt = open_checkpoint(base_dir), open_checkpoint(out_dir)
    for base_file, out_file in zip(base_ckpt.files, out_ckpt.files):
        base_header, out_header = base_ckpt.header(base_file), out_ckpt.header(out_file)
        assert out_header.metadata == base_header.metadata == {"format": "pt"}
        assert [(i.name, i.dtype, i.shape) for i in out_header.tensors.values()] == \
               [(i.name, i.dtype, i.shape) for i in base_header.tensors.values()]
        load_file(out_file)
        base_bytes, out_bytes = base_file.read_bytes(), out_file.read_bytes()
        assert len(out_bytes) == len(base_bytes)
        assert out_bytes[:base_header.data_start] == base_bytes[:base_header.data_start]
    changed = {c.tensor for c in report.changed}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)}
    for name, info in base_ckpt.tensors.items():
        raw = [open(i.file, "rb").read()[i.start:i.end] for i in (info, out_ckpt.info(name))]
        assert (raw[0] == raw[1]) == (name not in changed), name
    merged = _read(out_dir)
    for name in changed:  # a rank-4 delta: recovered up to the bf16 rounding of the fine-tune and of the merge
        error = (merged[name].float() - finetuned[name].float()).abs().max()
        assert error <= 2.0**-7 * finetuned[name].float().abs().max()


def test_dtype_override_casts_every_float_tensor_and_fixes_the_index(tmp_path: Path) -> None:
    base = _llama_like(2, 32, 48, 50, torch.bfloat16)
    base_dir, _ = write_safetensors_pair(tmp_path, base, base, shards=2)
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    adapter = _handmade_adapter(tmp_path / "adapter", {"model.layers.0.mlp.up_proj": (48, 32)})

    merge(base_dir, [adapter], tmp_path / "merged", dtype="float32")

    merged = _read(tmp_path / "merged")
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"].float())
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in base.values())
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"


def _handmade_adapter(out_dir: Path, modules: dict[str, tuple[int, int]], rank: int = 2) -> Path:
    """A minimal PEFT LoRA adapter (r=2, alpha=4) for the given module → (out, in) shapes."""
    out_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out, inp) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules)}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


def _no_output(tmp_path: Path, name: str) -> bool:
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in tmp_path.iterdir())


def test_adapter_for_another_base_fails_before_writing_and_names_the_module(tmp_path: Path) -> None:
    base_dir, _ = write_safetensors_pair(tmp_path, _llama_like(2, 32, 48, 50, torch.float32), {"x": torch.zeros(1)})
    missing = _handmade_adapter(tmp_path / "missing", {"model.layers.5.mlp.up_proj": (48, 32)})
    with pytest.raises(TensorMissingError, match=r"model\.layers\.5\.mlp\.up_proj"):
        merge(base_dir, [missing], tmp_path / "out")
    resized = _handmade_adapter(tmp_path / "resized", {"model.layers.1.mlp.up_proj": (64, 32)})
    with pytest.raises(TensorMismatchError, match=r"module model\.layers\.1\.mlp\.up_proj.*\(64, 32\).*\[48, 32\]"):
        merge(base_dir, [resized], tmp_path / "out")
    assert _no_output(tmp_path, "out")


def test_non_finite_result_is_refused_and_finite_extremes_are_not(tmp_path: Path) -> None:
    """A NaN in the factors fails the merge naming the tensor and rows, leaving nothing; finite values near the
    fp32 limit, whose sum overflows, merge."""
    base = _llama_like(1, 32, 48, 50, torch.float32)
    base["model.layers.0.mlp.up_proj.weight"][:2] = 3e38
    base_dir, _ = write_safetensors_pair(tmp_path, base, {"x": torch.zeros(1)})
    adapter = _handmade_adapter(tmp_path / "adapter", {"model.layers.0.mlp.up_proj": (48, 32)})
    merge(base_dir, [adapter], tmp_path / "merged")
    assert torch.isfinite(_read(tmp_path / "merged")["model.layers.0.mlp.up_proj.weight"]).all()

    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"][5, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError, match=r"up_proj\.weight: the merged weight has NaN or Inf in rows 0–47"):
        merge(base_dir, [adapter], tmp_path / "out")
    assert _no_output(tmp_path, "out")


def test_weighted_saved_module_is_interpolated(llama_pair: ModelPair, tmp_path: Path) -> None:
    """A modules_to_save param under weight w becomes W0 + w · (saved − W0), like a scaled delta."""
    saving = _peft_adapter(llama_pair.base_dir, tmp_path / "saving", ["q_proj"], dora=False, rank=4, alpha=7, seed=1,
                           modules_to_save=["model.norm"])
    merge(llama_pair.base_dir, [saving], tmp_path / "merged", weights=[0.25])
    saved = load_file(saving / "adapter_model.safetensors")["base_model.model.model.norm.weight"]
    base = _read(llama_pair.base_dir)["model.norm.weight"]
    merged = _read(tmp_path / "merged")["model.norm.weight"]
    torch.testing.assert_close(merged, base + 0.25 * (saved - base))


def test_replaced_tensor_also_changed_by_another_adapter_is_refused(llama_pair: ModelPair, tmp_path: Path) -> None:
    saving = _peft_adapter(llama_pair.base_dir, tmp_path / "saving", ["q_proj"], dora=False, rank=4, alpha=7, seed=1,
                           modules_to_save=["lm_head"])
    lora = _peft_adapter(llama_pair.base_dir, tmp_path / "lora", ["lm_head"], dora=False, rank=4, alpha=7, seed=2)
    with pytest.raises(InvalidOptionError, match="lm_head.weight.*depend on the order"):
        merge(llama_pair.base_dir, [saving, lora], tmp_path / "out")
    assert _no_output(tmp_path, "out")


def test_existing_output_needs_overwrite_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    base_dir, _ = write_safetensors_pair(tmp_path, _llama_like(1, 32, 48, 50, torch.float32), {"x": torch.zeros(1)})
    adapter = _handmade_adapter(tmp_path / "adapter", {"model.layers.0.mlp.up_proj": (48, 32)})
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        merge(base_dir, [adapter], tmp_path / "out")
    report = merge(base_dir, [adapter], tmp_path / "plan", dry_run=True)
    assert not (tmp_path / "plan").exists()
    assert [(c.tensor, c.steps) for c in report.changed] == [("model.layers.0.mlp.up_proj.weight", [(1, "lora")])]
    merge(base_dir, [adapter], tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(InvalidOptionError, match="2 weight"):
        merge(base_dir, [adapter], tmp_path / "other", weights=[1.0, 2.0])


@pytest.mark.parametrize("dry_run", [False, True])
def test_output_that_overlaps_an_input_is_refused(dry_run: bool, tmp_path: Path) -> None:
    """merge and unmerge refuse an output that is an input, lies inside one, or contains one, before writing,
    also in a dry run, even with overwrite."""
    base_dir, _ = write_safetensors_pair(tmp_path, _llama_like(1, 32, 48, 50, torch.float32), {"x": torch.zeros(1)})
    adapter = _handmade_adapter(tmp_path / "adapter", {"model.layers.0.mlp.up_proj": (48, 32)})
    files = {p: p.read_bytes() for p in [*base_dir.iterdir(), *adapter.iterdir()]}
    for operation in (merge, unmerge):
        for out, what in ((base_dir, f"is, or is inside, the input {base_dir}"),
                          (base_dir / "merged", f"is, or is inside, the input {base_dir}"),
                          (adapter / "merged", f"is, or is inside, the input {adapter}"),
                          (tmp_path, f"contains the input {base_dir}")):
            with pytest.raises(InvalidOptionError, match=re.escape(f"the output {what};")):
                operation(base_dir, [adapter], out, overwrite=True, dry_run=dry_run)
    assert {p: p.read_bytes() for p in [*base_dir.iterdir(), *adapter.iterdir()]} == files
    assert not (base_dir / "merged").exists() and not (adapter / "merged").exists()


_MEMORY_CHILD = textwrap.dedent("""
    import json, re, sys, torch
    from deltakit.ops.merge import merge
    torch.set_num_threads(1)
    torch.ones(64, 64).addmm_(torch.ones(64, 2), torch.ones(2, 64))  # load the BLAS kernels before measuring

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    merge(sys.argv[1], [sys.argv[2]], sys.argv[3])
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_shard(tmp_path: Path) -> None:
    """One 256 MiB shard of 64 fp32 (1024, 1024) tensors (4 MiB each), all LoRA-targeted: the merge's peak RSS
    growth stays within 8 tensors' worth (32 MiB), an eighth of the shard.

    Measured in a child process: VmHWM after resetting it (``/proc/self/clear_refs`` = 5) minus the RSS at that
    moment. deltakit reads tensors with read() (and copies unchanged ones file to file), not mmap, so page cache is
    not counted; library pages are loaded by a warm-up before the reset. deltakit holds two read buffers the size
    of the largest tensor it changes (one is being written while the other is read), a 1 MiB fp32 block and the
    adapter (4 MiB here): 17–25 MiB measured.
    """
    count, largest = 64, 4 * 2**20
    tensors = {f"layers.{i}.proj.weight": torch.full((1024, 1024), float(i)) for i in range(count)}
    base_dir, _ = write_safetensors_pair(tmp_path, tensors, {"x": torch.zeros(1)})
    adapter = _handmade_adapter(tmp_path / "adapter", {f"layers.{i}.proj": (1024, 1024) for i in range(count)}, rank=8)
    del tensors
    result = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(base_dir), str(adapter), str(tmp_path / "out")],
                            capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    assert growth <= 8 * largest, f"peak grew by {growth / 2**20:.1f} MiB"
    assert growth <= count * largest / 8
