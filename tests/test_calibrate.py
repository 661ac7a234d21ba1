"""The block-wise calibration pass against transformers' own full forward, its memory, its sources and errors."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from builders import ModelPair, load_model, make_pair, save_char_tokenizer

from deltakit.errors import CalibrationError, InvalidOptionError, TensorMissingError
from deltakit.io.checkpoint import open_checkpoint
from deltakit.ops import calibrate as calib
from deltakit.ops.calibrate import BlockwiseModel, calibrate, collect_moments, sample_sequences, tokenize_source

CPU = torch.device("cpu")


def _ids(sequences: int = 6, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (sequences, seq_len), generator=torch.Generator().manual_seed(seed))


def _reference_moments(model_dir: Path, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """E[xxᵀ] of every Linear/Conv1D input (and halves by sequence parity) from one full transformers forward."""
    model = load_model(model_dir)
    sums: dict[str, list[torch.Tensor]] = {}
    odd = torch.arange(ids.shape[0]) % 2 == 1

    def hook(name: str):
        def record(_module, inputs):
            x = inputs[0].double()
            sums[name] = [(x[~odd].reshape(-1, x.shape[-1]).T @ x[~odd].reshape(-1, x.shape[-1])),
                          (x[odd].reshape(-1, x.shape[-1]).T @ x[odd].reshape(-1, x.shape[-1]))]
        return record

    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Conv1D"):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(input_ids=ids)
    per_half = ids[~odd].numel(), ids[odd].numel()
    means = {name: (a + b) / ids.numel() for name, (a, b) in sums.items()}
    halves = {name: [a / per_half[0], b / per_half[1]] for name, (a, b) in sums.items()}
    return means, halves


@pytest.mark.parametrize("fixture", ["llama_pair", "qwen2_pair", "gpt2_pair"])
def test_blockwise_moments_equal_the_full_forward(fixture: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    pair: ModelPair = request.getfixturevalue(fixture)
    ids = _ids()
    ckpt = open_checkpoint(pair.ft_dir)
    moments = collect_moments(BlockwiseModel(ckpt, CPU), ckpt, ids, tmp_path)
    means, halves = _reference_moments(pair.ft_dir, ids)
    tied_head = pair.arch == "gpt2"
    expected = {name for name in means if not (tied_head and name == "lm_head")}
    assert expected <= set(moments.sites)
    for name in expected:
        torch.testing.assert_close(moments.moment(name).double(), means[name], rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(moments.halves(name), halves[name]):
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5)
    embedding = "transformer.wte" if pair.arch == "gpt2" else "model.embed_tokens"
    frequencies = torch.bincount(ids.flatten(), minlength=128).double() / ids.numel()
    torch.testing.assert_close(moments.moment(embedding).double(), frequencies, rtol=1e-6, atol=1e-7)


def test_modules_sharing_an_input_share_one_moment(llama_pair: ModelPair, tmp_path: Path) -> None:
    ckpt = open_checkpoint(llama_pair.ft_dir)
    moments = collect_moments(BlockwiseModel(ckpt, CPU), ckpt, _ids(), tmp_path)
    attention = [moments.sites[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    assert attention[0] == attention[1] == attention[2]
    assert moments.sites["model.layers.0.mlp.gate_proj"] == moments.sites["model.layers.0.mlp.up_proj"]
    assert moments.sites["model.layers.0.mlp.down_proj"] != moments.sites["model.layers.0.mlp.up_proj"]


def test_at_most_one_block_is_resident(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block is dropped before the next is built, for collection (forward, then backward) and for sampling."""
    pair = make_pair(tmp_path / "deep", "llama", steps=1, num_hidden_layers=4)
    ckpt = open_checkpoint(pair.ft_dir)
    model = BlockwiseModel(ckpt, CPU)
    built: list[weakref.ref] = []
    most_alive = 0
    original = BlockwiseModel.load

    def counting_load(self, weights, name):
        nonlocal most_alive
        alive = sum(ref() is not None for ref in built)
        most_alive = max(most_alive, alive)
        module = original(self, weights, name)
        if name.startswith(model.layout.blocks):
            built.append(weakref.ref(module))
        return module

    monkeypatch.setattr(BlockwiseModel, "load", counting_load)
    collect_moments(model, ckpt, _ids(), tmp_path / "moments")
    sample_sequences(model, ckpt, sequences=2, seq_len=4)
    assert len(built) == 2 * 4 + 3 * 4
    assert most_alive == 0  # no block still referenced when the next one is built


def test_sampling_follows_the_full_models_distribution(llama_pair: ModelPair) -> None:
    """Block-wise sampling with a KV cache draws what the full model's own next-token probabilities draw."""
    ckpt = open_checkpoint(llama_pair.ft_dir)
    ids = sample_sequences(BlockwiseModel(ckpt, CPU), ckpt, sequences=3, seq_len=12, seed=5)
    assert ids.shape == (3, 12) and bool((ids[:, 0] == llama_pair.config.bos_token_id).all())
    model = load_model(llama_pair.ft_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for position in range(11):
            logits = model(input_ids=ids[:, : position + 1]).logits[:, -1]
            drawn = torch.multinomial(torch.softmax(logits.double(), dim=-1), 1, generator=generator)[:, 0]
            assert torch.equal(drawn, ids[:, position + 1])


def test_text_and_jsonl_sources(llama_pair: ModelPair, tmp_path: Path) -> None:
    model_dir = save_char_tokenizer(tmp_path / "tok")
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    calibration = tokenize_source(text, model_dir, tokens=100, seq_len=16)
    assert calibration.token_ids.shape == (6, 16)
    assert calibration.token_ids[0, 0] == 1 and calibration.token_ids[0, 1] == 4 + ord("d") - 32
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"sample {i}", "id": i}) for i in range(30)) + "\n")
    from_jsonl = tokenize_source(jsonl, model_dir, tokens=64, seq_len=32)
    assert from_jsonl.token_ids.shape == (2, 32)
    assert from_jsonl.sha256 != calibration.sha256 and len(from_jsonl.sha256) == 64
    short = tokenize_source(jsonl, model_dir, tokens=4096, seq_len=4096)  # less text than one sequence
    assert short.token_ids.shape[0] == 1 and 0 < short.token_ids.shape[1] < 4096


def test_calibration_errors(llama_pair: ModelPair, bert_pair: ModelPair, tmp_path: Path) -> None:
    model_dir = save_char_tokenizer(tmp_path / "tok")
    with pytest.raises(CalibrationError, match="no such calibration file"):
        tokenize_source(tmp_path / "missing.txt", model_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        tokenize_source(empty, model_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(CalibrationError, match='line 2 has no "text"'):
        tokenize_source(bad, model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("some text")
    with pytest.raises(CalibrationError, match="no tokenizer"):
        tokenize_source(text, llama_pair.ft_dir)
    with pytest.raises(InvalidOptionError, match="less than one sequence"):
        tokenize_source(text, model_dir, tokens=8, seq_len=16)
    bert = open_checkpoint(bert_pair.ft_dir)
    with pytest.raises(CalibrationError, match="does not support the architecture BertForMaskedLM"):
        calibrate("self", bert, open_checkpoint(bert_pair.base_dir), tmp_path)


def test_calibrate_reads_the_base_blocks_when_asked(llama_pair: ModelPair, tmp_path: Path) -> None:
    ft, base = open_checkpoint(llama_pair.ft_dir), open_checkpoint(llama_pair.base_dir)
    (tmp_path / "ft").mkdir()
    (tmp_path / "base").mkdir()
    calibration, on_ft = calibrate("self", ft, base, tmp_path / "ft", tokens=32, seq_len=8)
    assert calibration.source == "self" and calibration.token_ids.shape == (4, 8)
    _, on_base = calibrate("self", ft, base, tmp_path / "base", tokens=32, seq_len=8, activations="base")
    module = "model.layers.1.mlp.down_proj"
    means, _ = _reference_moments(llama_pair.base_dir, calibration.token_ids)
    torch.testing.assert_close(on_base.moment(module).double(), means[module], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(on_ft.moment(module), on_base.moment(module))


def test_missing_block_tensor_is_named(llama_pair: ModelPair, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json",):
        (broken / name).write_text((llama_pair.ft_dir / name).read_text())
    tensors = load_file(llama_pair.ft_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    ckpt = open_checkpoint(broken)
    with pytest.raises(TensorMissingError, match="model.layers.1.mlp.up_proj.weight"):
        collect_moments(BlockwiseModel(ckpt, CPU), ckpt, _ids(), tmp_path)


def test_transformers_missing_gives_one_line(llama_pair: ModelPair, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(calib.ExtraMissingError, match=r"pip install 'deltakit\[calib\]'"):
        BlockwiseModel(open_checkpoint(llama_pair.ft_dir), CPU)


def test_sequences_never_exceed_the_models_positions(gpt2_pair: ModelPair, tmp_path: Path) -> None:
    """GPT-2 has 64 learned positions here: a longer --calib-seq-len is cut to 64, and the report says so."""
    ft, base = open_checkpoint(gpt2_pair.ft_dir), open_checkpoint(gpt2_pair.base_dir)
    calibration, _ = calibrate("self", ft, base, tmp_path, tokens=128, seq_len=256)
    assert calibration.token_ids.shape == (2, 64) and calibration.describe()["seq_len"] == 64


@pytest.mark.parametrize("fixture", ["llama_pair", "gpt2_pair"])
def test_blockwise_gradient_moments_equal_the_full_backward(fixture: str, request: pytest.FixtureRequest,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """E[ggᵀ] at every module's output from the block-by-block backward pass equals the one transformers' own
    full backward gives for the same labels; the head keeps its diagonal, a tied embedding has none."""
    pair: ModelPair = request.getfixturevalue(fixture)
    ids = _ids()
    drawn: list[torch.Tensor] = []
    original = calib.fisher_labels

    def recording(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drawn.append(original(logits, generator))
        return drawn[-1]

    monkeypatch.setattr(calib, "fisher_labels", recording)
    ckpt = open_checkpoint(pair.ft_dir)
    moments = collect_moments(BlockwiseModel(ckpt, CPU), ckpt, ids, tmp_path)
    assert not list(tmp_path.glob("hidden-*"))  # the spilled hidden states are gone once used

    model = load_model(pair.ft_dir)
    gradients: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Conv1D", "Embedding"):
            def keep(_module, _inputs, output, name=name):
                output.register_hook(lambda g: gradients.__setitem__(name, g.detach().double()))
            module.register_forward_hook(keep)
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.cat(drawn).flatten(), reduction="sum").backward()

    odd = torch.arange(ids.shape[0]) % 2 == 1
    if pair.arch == "gpt2":  # the tied embedding is also the head: weighted by its inputs only
        assert "transformer.wte" not in moments.output_sites and "lm_head" not in moments.output_sites
        expected = {n for n in gradients if n.startswith("transformer.h.")}
    else:
        expected = set(gradients)
    assert expected == set(moments.output_sites)
    for name in expected:
        g = gradients[name]  # (sequences, seq_len, out)
        halves = [(h.reshape(-1, h.shape[-1]).T @ h.reshape(-1, h.shape[-1])) / h[..., 0].numel()
                  for h in (g[~odd], g[odd])]
        whole = (halves[0] + halves[1]) / 2
        if name == "lm_head":
            halves, whole = [h.diagonal() for h in halves], whole.diagonal()
        torch.testing.assert_close(moments.output_moment(name).double(), whole, rtol=1e-4, atol=1e-7)
        for ours, theirs in zip(moments.output_halves(name), halves):
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-7)


def test_self_pools_samples_of_the_base_model(llama_pair: ModelPair, tmp_path: Path) -> None:
    """``self`` draws a quarter of its sequences from the base model (seed + 1), the rest from the fine-tune."""
    ft, base = open_checkpoint(llama_pair.ft_dir), open_checkpoint(llama_pair.base_dir)
    calibration, _ = calibrate("self", ft, base, tmp_path, tokens=64, seq_len=8, seed=3)
    assert calibration.token_ids.shape == (8, 8) and calibration.describe()["base_sequences"] == 2
    model = BlockwiseModel(ft, CPU)
    assert torch.equal(calibration.token_ids[:6], sample_sequences(model, ft, sequences=6, seq_len=8, seed=3))
    assert torch.equal(calibration.token_ids[6:], sample_sequences(model, base, sequences=2, seq_len=8, seed=4))
