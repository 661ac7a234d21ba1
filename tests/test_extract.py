"""``deltakit.extract`` on synthetic checkpoints: exactness, optimality, policies, reporting, errors, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from builders import delta_spectrum, low_rank_delta, write_safetensors_pair
from safetensors.torch import load_file

import deltakit
from deltakit.errors import (
    InvalidOptionError,
    NonFiniteError,
    NothingToExtractError,
    OutputExistsError,
    TensorMismatchError,
)

Q, UP, NORM = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.input_layernorm"


def _pair(tmp_path, deltas: dict[str, torch.Tensor], *, extra_base=None, dtype=torch.float32, ft_dtype=None,
          shards=1):
    """Base weights of the right shapes, fine-tune = base + the given deltas (keyed by module)."""
    gen = torch.Generator().manual_seed(3)
    base, ft = {}, {}
    for module, delta in deltas.items():
        w0 = torch.randn(delta.shape, generator=gen)
        base[f"{module}.weight"] = w0.to(dtype)
        ft[f"{module}.weight"] = (w0 + delta).to(ft_dtype or dtype)
    base[f"{NORM}.weight"] = torch.ones(48, dtype=dtype)
    ft[f"{NORM}.weight"] = torch.ones(48, dtype=ft_dtype or dtype)
    base.update(extra_base or {})
    return write_safetensors_pair(tmp_path, base, ft, shards=shards)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_known_rank_delta_is_recovered_to_fp32_precision(tmp_path, svd):
    deltas = {Q: low_rank_delta(64, 48, 5, seed=1), UP: low_rank_delta(96, 48, 3, seed=2)}
    base_dir, ft_dir = _pair(tmp_path, deltas)
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=5, svd=svd)
    factors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for module, delta in deltas.items():
        a = factors[f"base_model.model.{module}.lora_A.weight"]
        b = factors[f"base_model.model.{module}.lora_B.weight"]
        assert (b @ a - delta).norm() / delta.norm() < 1e-5
    assert max(m.relative_error for m in report.modules) < 1e-5


def test_truncation_error_equals_eckart_young_tail(tmp_path):
    delta = low_rank_delta(64, 48, 12, seed=4, decay=0.7)
    s = delta_spectrum(48, 12, decay=0.7)
    base_dir, ft_dir = _pair(tmp_path, {Q: delta})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=4, svd="exact")
    optimal = float((s[4:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
    factors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    measured = float((factors[f"base_model.model.{Q}.lora_B.weight"] @ factors[f"base_model.model.{Q}.lora_A.weight"]
                      - delta).norm() / delta.norm())
    (module,) = report.modules
    assert module.relative_error == pytest.approx(optimal, rel=1e-4)
    assert measured == pytest.approx(optimal, rel=1e-4)
    assert module.energy_retained == pytest.approx(1 - optimal**2, rel=1e-5)


def test_energy_policy_picks_smallest_rank_reaching_the_fraction(tmp_path):
    delta = low_rank_delta(64, 48, 10, seed=5)  # σ_i = (10 - i)/10
    s = delta_spectrum(48, 10)
    base_dir, ft_dir = _pair(tmp_path, {Q: delta})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", energy=0.8, max_rank=32)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    expected = int((energy < 0.8).sum()) + 1
    assert report.modules[0].rank == expected
    assert report.modules[0].energy_retained >= 0.8


def test_rank_above_min_dimension_is_clamped_and_reported(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: low_rank_delta(64, 8, 8, seed=1)})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=32, carry=False)  # factors, not carried whole
    assert report.modules[0].rank == 8
    assert "clamped" in report.modules[0].note


def test_report_lists_carried_dropped_and_base_only_tensors(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: low_rank_delta(64, 48, 2, seed=1)},
                             extra_base={"model.extra.weight": torch.zeros(3)})
    ft = load_file(ft_dir / "model.safetensors")
    ft[f"{NORM}.weight"] += 0.5
    from safetensors.torch import save_file
    save_file(ft, ft_dir / "model.safetensors")
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=2)
    assert [(t.tensor, t.fate) for t in report.tensors] == [
        ("model.extra.weight", "only-in-base"), (f"{NORM}.weight", "carried")]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [NORM]
    assert torch.equal(load_file(tmp_path / "a" / "adapter_model.safetensors")[f"base_model.model.{NORM}.weight"],
                       ft[f"{NORM}.weight"])
    saved = json.loads((tmp_path / "a" / "extract_report.json").read_text())
    assert saved["summary"]["tensors_carried"] == 1 and saved["summary"]["tensors_only_in_base"] == 1
    assert "tensors carried exactly | 1" in (tmp_path / "a" / "README.md").read_text()

    dropped = deltakit.extract(ft_dir, base_dir, tmp_path / "b", rank=2, carry=False)
    assert [t.fate for t in dropped.fates("dropped")] == ["dropped"]
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] is None


def test_include_exclude_select_modules(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: low_rank_delta(64, 48, 2, seed=1), UP: low_rank_delta(96, 48, 2, seed=2)})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=2, exclude=[r"mlp\."])
    assert [m.module for m in report.modules] == [Q]
    assert [t.tensor for t in report.fates("dropped")] == [f"{UP}.weight"]


def test_mixed_dtypes_and_shards(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: low_rank_delta(64, 48, 2, seed=1), UP: low_rank_delta(96, 48, 2, seed=2)},
                             dtype=torch.float32, ft_dtype=torch.bfloat16, shards=3)
    deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=2)
    factors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {t.dtype for t in factors.values()} == {torch.float32}  # the base's dtype by default
    deltakit.extract(ft_dir, base_dir, tmp_path / "b", rank=2, dtype="float16")
    assert {t.dtype for t in load_file(tmp_path / "b" / "adapter_model.safetensors").values()} == {torch.float16}


def test_same_seed_gives_byte_identical_adapter(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: low_rank_delta(64, 48, 30, seed=1, decay=0.8)})
    for out in ("a", "b"):
        deltakit.extract(ft_dir, base_dir, tmp_path / out, rank=4, svd="randomized", seed=11)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_identical_checkpoints_raise_nothing_to_extract(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: torch.zeros(64, 48)})
    with pytest.raises(NothingToExtractError, match="identical"):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    base_dir, ft_dir = write_safetensors_pair(tmp_path, {f"{Q}.weight": torch.zeros(4, 6)},
                                              {f"{Q}.weight": torch.zeros(4, 5)})
    with pytest.raises(TensorMismatchError, match=r"q_proj.weight base \[4, 6\] vs fine-tuned \[4, 5\]"):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a")


def test_nonfinite_input_names_the_tensor(tmp_path):
    delta = low_rank_delta(64, 48, 2, seed=1)
    delta[3, 4] = float("nan")
    base_dir, ft_dir = _pair(tmp_path, {Q: delta})
    with pytest.raises(NonFiniteError, match=r"q_proj\.weight: contains NaN or Inf"):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_existing_output_needs_overwrite(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: low_rank_delta(64, 48, 2, seed=1)})
    (tmp_path / "a").mkdir()
    with pytest.raises(OutputExistsError):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a")
    deltakit.extract(ft_dir, base_dir, tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_bad_options_fail_before_work(tmp_path):
    base_dir, ft_dir = _pair(tmp_path, {Q: low_rank_delta(64, 48, 2, seed=1)})
    with pytest.raises(InvalidOptionError):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a", dtype="float8")
    with pytest.raises(InvalidOptionError):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a", max_rank=8)  # only with energy
    with pytest.raises(InvalidOptionError):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a", include=["("])


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import deltakit.ops.extract  # deltakit loads its operations lazily: count their imports before the start
    import deltakit

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    peak = [0]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)
    start = anon()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    deltakit.extract(sys.argv[1], sys.argv[2], sys.argv[3], rank=8)
    stop.set(); t.join()
    print(max(peak[0], anon()) - start)
""")


@pytest.mark.slow  # ~35 s: 320 MB of checkpoints and a child process
def test_peak_memory_is_bounded_by_tensor_size_not_model_size(tmp_path):
    """A 40-tensor checkpoint (~160 MB of fp32 weights per side): extraction's peak anonymous memory above its
    start must stay within a small multiple of one tensor (4 MB), far below the model."""
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for i in range(40):
        w0 = torch.randn(1024, 1024, generator=gen)
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w0
        ft[f"model.layers.{i}.mlp.up_proj.weight"] = w0 + 0.01 * torch.randn(1024, 1024, generator=gen)
    base_dir, ft_dir = write_safetensors_pair(tmp_path, base, ft, shards=4)
    del base, ft
    # glibc raises its mmap threshold (up to 32 MB) after big frees, so 4 MB buffers would come from a
    # fragmenting heap; a fixed threshold gives them the mmap treatment that real LLM tensors (> 32 MB) get.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(ft_dir), str(base_dir), str(tmp_path / "a")],
                            capture_output=True, text=True, check=True, env=env)
    peak = int(result.stdout.strip().splitlines()[-1])
    print(f"peak anonymous memory above start: {peak / 1e6:.1f} MB")
    tensor = 1024 * 1024 * 4
    model = 40 * tensor
    assert peak < 12 * tensor, f"peak anonymous memory {peak / 1e6:.0f} MB for 4 MB tensors"
    assert peak < model / 3


# --- reading ahead: the next module is read while this one is factorized ------------------------------------------

_LAYERS = [f"model.layers.{i}.mlp.up_proj" for i in range(4)]


def test_next_module_is_read_while_this_one_is_factorized(tmp_path, monkeypatch):
    import threading

    from deltakit.ops import extract as extract_op

    base_dir, ft_dir = _pair(tmp_path, {m: low_rank_delta(96, 48, 3, seed=i) for i, m in enumerate(_LAYERS)},
                             shards=2)
    second_read = threading.Event()
    real_read, real_delta = extract_op.read_pair, extract_op.delta_of

    def read_pair(finetuned, base, name):
        if name == f"{_LAYERS[1]}.weight":
            second_read.set()
        return real_read(finetuned, base, name)

    def delta_of(stored, *args, **kwargs):
        if stored.name == f"{_LAYERS[0]}.weight":
            # Read in line, layer 1 would only be read after this returns: waiting would time out.
            assert second_read.wait(timeout=30), "the next module was not read ahead"
        return real_delta(stored, *args, **kwargs)

    monkeypatch.setattr(extract_op, "read_pair", read_pair)
    monkeypatch.setattr(extract_op, "delta_of", delta_of)
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=3)
    assert [m.module for m in report.modules] == _LAYERS
    monkeypatch.undo()
    deltakit.extract(ft_dir, base_dir, tmp_path / "b", rank=3)  # the same bytes, whatever the read timing
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_read_error_in_a_later_module_is_raised_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    from deltakit.errors import CheckpointFormatError
    from deltakit.io.checkpoint import Checkpoint

    base_dir, ft_dir = _pair(tmp_path, {m: low_rank_delta(96, 48, 3, seed=i) for i, m in enumerate(_LAYERS)},
                             shards=2)
    bad = f"{_LAYERS[2]}.weight"
    real_get = Checkpoint.get

    def get(self, name):
        if name == bad and self.path == ft_dir:
            raise CheckpointFormatError("file ends after 10 of 18432 expected bytes", path=self.path, tensor=name)
        return real_get(self, name)

    monkeypatch.setattr(Checkpoint, "get", get)
    with pytest.raises(CheckpointFormatError, match=rf"{bad}.*file ends after 10") as caught:
        deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=3)
    assert caught.value.tensor == bad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "finetuned"]
