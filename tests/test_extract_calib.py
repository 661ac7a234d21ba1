"""``extract --calib``: output-aware fits end to end, from the CLI to PEFT, and the calibration's clean errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from builders import ModelPair, load_model, logits, save_char_tokenizer
from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict

import deltakit
from deltakit.cli import main

INPUT_IDS = torch.randint(4, 99, (2, 16), generator=torch.Generator().manual_seed(3))
TEXT = "".join(f"def f{i}(x):\n    '''Return x plus {i}.'''\n    return x + {i}\n\n" for i in range(60))


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _with_tokenizer(pair: ModelPair, root: Path) -> tuple[Path, Path]:
    """A copy of the pair whose fine-tune carries a tokenizer (the session fixtures are read-only)."""
    ft, base = root / "ft", root / "base"
    shutil.copytree(pair.ft_dir, ft)
    shutil.copytree(pair.base_dir, base)
    save_char_tokenizer(ft)
    return ft, base


def _peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """Logits of base + adapter in PEFT, failing on missing or unexpected adapter keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_model(base_dir), adapter_dir)
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    result = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)), adapter_name="default")
    assert result.unexpected_keys == [] and [k for k in result.missing_keys if "lora_" in k] == []
    return logits(model, INPUT_IDS)


@pytest.mark.parametrize("fixture, source", [
    ("llama_pair", "text"), ("gpt2_pair", "jsonl"),
    pytest.param("qwen2_pair", "self", marks=pytest.mark.slow),  # sampling: one block-wise pass per position
])
def test_calibrated_extract_from_the_cli(fixture: str, source: str, request: pytest.FixtureRequest,
                                         capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pair: ModelPair = request.getfixturevalue(fixture)
    ft, base = _with_tokenizer(pair, tmp_path)
    if source == "text":
        calib = tmp_path / "calib.txt"
        calib.write_text(TEXT)
    elif source == "jsonl":
        calib = tmp_path / "calib.jsonl"
        calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT.split("\n\n")))
    else:
        calib = "self"
    out = tmp_path / "adapter"
    code, stdout, stderr = _run(capsys, "extract", ft, base, "-r", 4, "-o", out, "--calib", calib,
                                "--calib-tokens", 512, "--calib-seq-len", 32, "-q")
    assert code == 0, stderr
    report = json.loads((out / "extract_report.json").read_text())
    calibration = report["calibration"]
    assert calibration["source"] == str(calib) and calibration["tokens"] == 512 and calibration["seq_len"] == 32
    assert len(calibration["sha256"]) == 64 and calibration["activations"] == "finetuned"
    if source != "self":
        import hashlib

        assert calibration["sha256"] == hashlib.sha256(Path(calib).read_bytes()).hexdigest()
    fits = {m["module"]: m for m in report["modules"]}
    whitened = [m for m in fits.values() if m["fit"] == "whitened"]
    assert len(whitened) >= len(fits) // 2
    for m in whitened:  # in-sample, the whitened fit predicts no more output error than plain SVD
        assert m["output_relative_error"] <= m["plain_output_relative_error"] * 1.01
        assert m["relative_error"] >= 0.0 and m["heldout_output_relative_errors"][0] < m[
            "heldout_output_relative_errors"][1]
    if pair.arch == "gpt2":
        assert fits["transformer.wpe"]["fit"] == "plain (no calibration inputs)"
    card = (out / "README.md").read_text()
    assert calibration["sha256"] in card and "Output-aware fit" in card and "predicted output error" in card
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no spill left behind
    merged = tmp_path / "merged"
    deltakit.merge(base, [out], merged, dtype="float32")
    torch.testing.assert_close(_peft_logits(base, out), logits(merged, INPUT_IDS), rtol=1e-4, atol=1e-4)


def test_calibration_lowers_the_output_error_on_its_own_text(llama_pair: ModelPair, tmp_path: Path) -> None:
    """On the calibration text itself, base + calibrated adapter is closer to the fine-tune than plain SVD."""
    ft, base = _with_tokenizer(llama_pair, tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    deltakit.extract(ft, base, plain, rank=4)
    deltakit.extract(ft, base, calibrated, rank=4, calib=calib, calib_tokens=1024, calib_seq_len=32)
    ids = deltakit.ops.calibrate.tokenize_source(calib, ft, tokens=1024, seq_len=32).token_ids
    reference = torch.log_softmax(logits(ft, ids), dim=-1)

    def kl(adapter: Path) -> float:
        merged = tmp_path / f"merged-{adapter.name}"
        deltakit.merge(base, [adapter], merged, dtype="float32")
        adapted = torch.log_softmax(logits(merged, ids), dim=-1)
        return float((reference.exp() * (reference - adapted)).sum(-1).mean())

    assert kl(calibrated) < 0.9 * kl(plain)


def test_calibration_errors_are_one_line(llama_pair: ModelPair, bert_pair: ModelPair,
                                         capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    cases = [
        ((llama_pair.ft_dir, llama_pair.base_dir, "--calib", tmp_path / "missing.txt"), 1,
         "no such calibration file"),
        ((llama_pair.ft_dir, llama_pair.base_dir, "--calib", Path(__file__)), 1, "no tokenizer"),
        ((bert_pair.ft_dir, bert_pair.base_dir, "--calib", "self"), 1,
         "does not support the architecture BertForMaskedLM"),
        ((llama_pair.ft_dir, llama_pair.base_dir, "--calib", "self", "--dora"), 2, "--calib with --dora"),
        ((llama_pair.ft_dir, llama_pair.base_dir, "--calib", "self", "--calib-tokens", "8", "--calib-seq-len", "16"),
         2, "less than one sequence"),
    ]
    for args, exit_code, message in cases:
        code, _, stderr = _run(capsys, "extract", *args, "-o", out)
        lines = stderr.strip().splitlines()
        assert code == exit_code and len(lines) == 1 and message in lines[0], stderr
        assert not out.exists()
    ft, base = _with_tokenizer(llama_pair, tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, stderr = _run(capsys, "extract", ft, base, "--calib", empty, "-o", out)
    assert code == 1 and "the calibration text is empty" in stderr and not out.exists()


def test_inspect_shows_the_whitened_spectra(llama_pair: ModelPair, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    ft, base = _with_tokenizer(llama_pair, tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    code, stdout, stderr = _run(capsys, "inspect", ft, base, "--ranks", "4,16,64", "--calib", calib,
                                "--calib-tokens", 512, "--calib-seq-len", 32, "--json", "-q")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["calibration"]["sha256"] == __import__("hashlib").sha256(calib.read_bytes()).hexdigest()
    for m in report["modules"]:
        kept = [m["output_energy_retained"][r] for r in ("4", "16", "64")]
        assert 0.0 < kept[0] <= kept[1] <= kept[2] == pytest.approx(1.0)
        assert len(m["output_singular_values"]) == min(m["out_in"])
    # Whitening concentrates the output energy: rank 4 keeps more of it than of ‖ΔW‖², module by module.
    assert sum(m["output_energy_retained"]["4"] > m["energy_retained"]["4"] for m in report["modules"]) >= 0.8 * len(
        report["modules"])
    code, _, table = _run(capsys, "inspect", ft, base, "--ranks", "4,16", "--calib", calib, "--calib-tokens", 512,
                          "--calib-seq-len", 32, "-q")
    assert code == 0 and "O@4" in table and "output energy" in table


def test_budget_with_calib_allocates_on_the_whitened_spectra(llama_pair: ModelPair, tmp_path: Path) -> None:
    """--avg-rank with --calib: the ranks come from the Fisher-whitened spectra (the energies the allocation
    weighs), every calibrated module is the whitened fit at its rank, and the size is the uniform rank's."""
    from deltakit.io.checkpoint import open_checkpoint
    from deltakit.math.factorize import truncated_svd
    from deltakit.math.ranks import BudgetRanks, ModuleSpectrum
    from deltakit.math.whiten import whitened_svd, whitening
    from deltakit.ops.calibrate import calibrate

    ft, base = _with_tokenizer(llama_pair, tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "adapter"
    deltakit.extract(ft, base, out, avg_rank=4, budget_weighting="absolute", calib=calib, calib_tokens=1024,
                     calib_seq_len=32, svd="exact")
    report = json.loads((out / "extract_report.json").read_text())
    rows = {m["module"]: m for m in report["modules"]}
    assert report["calibration"]["output_weighting"] == "fisher"

    ft_ckpt, base_ckpt = open_checkpoint(ft), open_checkpoint(base)
    (tmp_path / "moments").mkdir()
    _, moments = calibrate(calib, ft_ckpt, base_ckpt, tmp_path / "moments", tokens=1024, seq_len=32)
    exact = lambda matrix, k: truncated_svd(matrix, k, method="exact", device="cpu")  # noqa: E731
    fits, spectra = {}, []
    for module in rows:
        weight = f"{module}.weight"
        delta = ft_ckpt.get(weight).float() - base_ckpt.get(weight).float()
        if module.endswith("embed_tokens"):
            delta = delta.T  # PEFT's (dim, vocab)
        output = moments.output_moment(module)
        fit = whitened_svd(delta, whitening(moments.moment(module)), min(delta.shape), exact,
                           None if output is None else whitening(output))
        fits[module] = fit
        spectra.append(ModuleSpectrum(module, tuple(delta.shape), fit.s, fit.total_energy))
    params = sum(min(4, *s.out_in) * s.cost_per_rank for s in spectra)
    expected = dict(zip(fits, BudgetRanks(params, weighting="absolute").allocate(spectra)))
    assert {m: r["rank"] for m, r in rows.items()} == expected and len(set(expected.values())) > 1
    assert all(r["fit"] == "whitened" for r in rows.values())

    from peft.utils import load_peft_weights
    weights = load_peft_weights(str(out))
    for module, fit in fits.items():
        rank = expected[module]
        a_key = next(k for k in weights if module in k and ("lora_A" in k or "lora_embedding_A" in k))
        b_key = a_key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        ours = weights[b_key].float() @ weights[a_key].float()  # lora_alpha = rank by default: scaling 1
        theirs = (fit.u[:, :rank] * fit.s[:rank]) @ fit.vh[:rank]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3 * float(theirs.abs().max()))


def test_calibration_reads_through_the_page_cache_and_the_fits_past_it(llama_pair: ModelPair, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibration reads the weights once per pass: they stay readable from the page cache even where the files are
    not cached yet; the module fits, which read each weight once, then read past the cache the files still not in
    it."""
    from deltakit.io import checkpoint as checkpoint_module
    from deltakit.ops import extract as extract_module

    ft, base = _with_tokenizer(llama_pair, tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    monkeypatch.setattr(checkpoint_module, "cached_fraction", lambda path: 0.0)
    seen = {}

    def recording(name, function):
        def wrapper(*args, **kwargs):
            finetuned, base = args[1:3] if name == "calibrate" else (args[0].finetuned, args[0].base)
            seen[name] = set(finetuned.read_direct) | set(base.read_direct)
            return function(*args, **kwargs)
        monkeypatch.setattr(extract_module, name, wrapper)

    recording("calibrate", extract_module.calibrate)
    recording("_extract_modules", extract_module._extract_modules)
    deltakit.extract(ft, base, tmp_path / "out", rank=4, calib=calib, calib_tokens=256, calib_seq_len=32)
    weight_files = {f for d in (ft, base) for f in d.glob("*.safetensors")}
    assert seen == {"calibrate": set(), "_extract_modules": weight_files}
