"""Issue 10: no silent wrong result, and every mistake a user can make gets one clear line before any work.

Each test names the issue item it covers; each failed on the code before its fix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from builders import low_rank_delta, write_safetensors_pair

Q = "model.layers.0.self_attn.q_proj.weight"
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltakit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_env())


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deltakit: error: "), result.stderr
    return lines[0]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    w0 = torch.randn(32, 24)
    return write_safetensors_pair(tmp_path / "in", {Q: w0}, {Q: w0 + low_rank_delta(32, 24, 2, seed=1)})


# --- 19: help answers without importing torch ----------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["extract", "--help"], ["merge", "--help"], ["stack", "--help"],
                                  ["inspect", "--help"], ["batch", "--help"], ["unmerge", "--help"],
                                  ["extract", "a", "b", "--svd", "magic"]])
def test_help_and_option_errors_do_not_import_torch(args: list[str]) -> None:
    code = ("import sys\nfrom deltakit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env())
    assert "torch imported: False" in result.stdout, result.stdout + result.stderr


def test_dtype_choices_are_the_library_dtypes() -> None:
    from deltakit.cli import DTYPE_CHOICES
    from deltakit.io.dtypes import DTYPES

    assert sorted(DTYPE_CHOICES) == sorted(DTYPES)


def test_import_deltakit_is_lazy_and_still_exports_the_api() -> None:
    code = "import sys, deltakit\nprint('torch' in sys.modules)\nprint(deltakit.extract.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert result.stdout.split() == ["False", "deltakit.ops.extract"], result.stderr


# --- 12: Ctrl-C during start-up --------------------------------------------------------------------------------


# Python's own start-up (site, .pth files, finding the package) is not ours to guard: the child says when it is
# past it, then runs `python -m deltakit` for real.
_AFTER_SITE = ("import importlib.util, runpy; importlib.util.find_spec('deltakit.__main__'); print('ready', flush=True); "
               "runpy.run_module('deltakit', run_name='__main__')")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.01, 0.05, 0.2, 0.5, 1.0])
def test_ctrl_c_during_start_up_prints_no_traceback(pair: tuple[Path, Path], tmp_path: Path, delay: float) -> None:
    base_dir, ft_dir = pair
    process = subprocess.Popen([sys.executable, "-c", _AFTER_SITE, "extract", ft_dir, base_dir, "-o",
                                tmp_path / "out"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    assert process.stdout.readline() == "ready\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert process.returncode in (130, 0), stderr
    if process.returncode == 130:
        assert stderr.strip().splitlines()[-1] == "Aborted!"
        assert not (tmp_path / "out").exists()


# --- 17: one rule for the default output, and the summary says where it went ------------------------------


def test_default_output_of_a_local_path_goes_to_the_working_directory(pair: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    base_dir, ft_dir = pair
    work = tmp_path / "work"
    work.mkdir()
    result = _run("extract", ft_dir, base_dir, "-r", "2", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (work / "finetuned-lora-r2" / "adapter_config.json").is_file()
    assert not (ft_dir.parent / "finetuned-lora-r2").exists()
    assert result.stderr.strip().splitlines()[-1] == f"output: {work / 'finetuned-lora-r2'}"


def test_default_output_of_a_weights_file_drops_its_suffix(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, ft_dir = pair
    result = _run("extract", ft_dir / "model.safetensors", base_dir, "-r", "2", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model-lora-r2" / "adapter_config.json").is_file()


def test_every_command_ends_its_summary_with_the_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, ft_dir = pair
    assert _run("extract", ft_dir, base_dir, "-r", "2", "-o", tmp_path / "a").returncode == 0
    for args, out in [(("merge", base_dir, tmp_path / "a"), "m"), (("unmerge", tmp_path / "m", tmp_path / "a"), "u"),
                      (("stack", tmp_path / "a", "--exact"), "s")]:
        result = _run(*args, "-o", tmp_path / out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip().splitlines()[-1] == f"output: {tmp_path / out}"


# --- 10: an output that may not be written is one line naming the path, before any work ----------------------

from deltakit.errors import OutputExistsError, OutputWriteError  # noqa: E402
from deltakit.io.writer import staged_output  # noqa: E402


def _never_reached() -> None:
    raise AssertionError("the block ran: the refusal came after the work")


@pytest.mark.parametrize("code, words", [(13, "permission denied"), (30, "read-only"), (1, "not permitted")])
def test_an_unwritable_parent_is_refused_before_the_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         code: int, words: str) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputWriteError) as caught:
        with staged_output(tmp_path / "out", overwrite=False):
            _never_reached()
    assert caught.value.path == tmp_path / "out" and words in str(caught.value)
    assert str(caught.value).count("\n") == 0 and "choose another --out" in str(caught.value)


def test_overwrite_of_an_output_that_cannot_move_aside_is_refused_before_the_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_rename = os.rename

    def refuse(src: object, dst: object) -> None:
        if Path(src) == final:
            raise PermissionError(1, os.strerror(1), str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OutputWriteError, match="not permitted"):
        with staged_output(final, overwrite=True):
            _never_reached()
    assert (final / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _can(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only tmpfs (root only: skipped where mounting is not allowed)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or not _can(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]):
        pytest.skip("cannot mount a read-only tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_cli_on_a_read_only_filesystem_is_one_line(pair: tuple[Path, Path], read_only_dir: Path) -> None:
    base_dir, ft_dir = pair
    result = _run("extract", ft_dir, base_dir, "-r", "2", "-o", read_only_dir / "out")
    assert result.returncode == 1
    assert _one_error_line(result) == (f"deltakit: error: {read_only_dir / 'out'}: cannot write: the filesystem is "
                                       "read-only; remount it read-write or choose another --out")


@pytest.fixture
def immutable_output(tmp_path: Path):
    """An existing output directory with the immutable attribute (skipped where chattr is not allowed)."""
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text("{}")
    if not _can(["chattr", "+i", str(out)]):
        pytest.skip("chattr +i is not allowed here")
    yield out
    subprocess.run(["chattr", "-i", str(out)], check=True)


def test_cli_overwrite_of_an_immutable_output_is_one_line_and_keeps_it(pair: tuple[Path, Path],
                                                                       immutable_output: Path) -> None:
    base_dir, ft_dir = pair
    result = _run("extract", ft_dir, base_dir, "-r", "2", "-o", immutable_output, "--overwrite")
    assert result.returncode == 1
    line = _one_error_line(result)
    assert line.startswith(f"deltakit: error: {immutable_output}: cannot write: operation not permitted"), line
    assert [p.name for p in immutable_output.iterdir()] == ["adapter_config.json"]
    assert [p.name for p in immutable_output.parent.iterdir()] == ["out"]


# --- 11: a killed run's leftovers are cleaned by the next run; SIGTERM and SIGHUP clean up like SIGINT -------


def test_a_set_aside_output_left_beside_a_newer_one_is_deleted_by_the_next_run(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "new.txt").write_text("new")
    old = tmp_path / ".out.deltakit-old-0badf00d"  # killed while deleting it, after the new output went in
    old.mkdir()
    (old / "big.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(OutputExistsError):
        with staged_output(final, overwrite=False):
            _never_reached()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_set_aside_output_with_nothing_in_its_place_is_moved_back(tmp_path: Path) -> None:
    old = tmp_path / ".out.deltakit-old-0badf00d"  # killed between the two renames of an overwrite
    old.mkdir()
    (old / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        with staged_output(tmp_path / "out", overwrite=False):
            _never_reached()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "old.txt").read_text() == "old"


_STAGE_AND_WAIT = """
import sys, time
from pathlib import Path
from deltakit.io.writer import staged_output
with staged_output(Path(sys.argv[1]), overwrite=False) as staging:
    (staging / "part.bin").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_termination_signals_remove_the_staging_directory(tmp_path: Path, sig: signal.Signals) -> None:
    process = subprocess.Popen([sys.executable, "-c", _STAGE_AND_WAIT, tmp_path / "out"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    assert process.stdout.readline() == "ready\n"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    if sig != signal.SIGINT:
        assert process.returncode == 128 + sig and stderr == ""
    assert list(tmp_path.iterdir()) == []


# --- 2: weights deltakit cannot do arithmetic on are refused from the headers ---------------------------------

import json  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

import deltakit  # noqa: E402
from deltakit.errors import UnsupportedWeightsError  # noqa: E402

K = "model.layers.0.self_attn.k_proj.weight"


def _quantized_pair(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    w0 = torch.randn(16, 16) * 40
    delta = low_rank_delta(16, 16, 2, seed=3) * 40
    base, ft = {K: torch.randn(16, 16), Q: w0}, {K: torch.randn(16, 16), Q: w0 + delta}
    if dtype.is_complex:
        base[Q], ft[Q] = base[Q].to(dtype) * (1 + 1j), ft[Q].to(dtype) * (1 + 1j)
    else:
        base[Q], ft[Q] = base[Q].to(dtype), ft[Q].to(dtype)
    return write_safetensors_pair(root, base, ft)


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.uint8, "U8"), (torch.int32, "I32"),
                                         (torch.complex64, "C64"), (torch.float8_e4m3fn, "F8_E4M3"),
                                         (torch.float8_e5m2, "F8_E5M2")])
@pytest.mark.parametrize("operation", ["extract", "inspect", "merge"])
def test_weights_without_arithmetic_are_refused_naming_tensor_and_dtype(tmp_path: Path, dtype: torch.dtype,
                                                                        name: str, operation: str) -> None:
    base_dir, ft_dir = _quantized_pair(tmp_path, dtype)
    with pytest.raises(UnsupportedWeightsError) as caught:
        if operation == "extract":
            deltakit.extract(ft_dir, base_dir, tmp_path / "out", rank=2)
        elif operation == "inspect":
            deltakit.inspect(ft_dir, base_dir)
        else:
            w0 = torch.randn(16, 16)
            float_base, float_ft = write_safetensors_pair(tmp_path / "float", {Q: w0}, {Q: w0 + 1})
            deltakit.extract(float_ft, float_base, tmp_path / "adapter", rank=1)
            deltakit.merge(base_dir, [tmp_path / "adapter"], tmp_path / "out")
    message = str(caught.value)
    assert Q in message and f"dtype {name}" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_integer_buffers_that_are_not_parameters_still_pass(tmp_path: Path) -> None:
    w0 = torch.randn(16, 16)
    ids = torch.arange(8)[None]
    base_dir, ft_dir = write_safetensors_pair(tmp_path, {Q: w0, "model.position_ids": ids},
                                              {Q: w0 + low_rank_delta(16, 16, 2, seed=1), "model.position_ids": ids})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "out", rank=2)
    assert len(report.modules) == 1


def test_fp8_block_scales_are_refused_naming_the_layout(tmp_path: Path) -> None:
    codes = torch.randn(16, 16).to(torch.float8_e4m3fn)
    tensors = {Q: codes, Q.replace(".weight", ".weight_scale_inv"): torch.ones(1, 1)}
    for side in ("base", "finetuned"):
        (tmp_path / side).mkdir()
        save_file(tensors, tmp_path / side / "model.safetensors")
    with pytest.raises(UnsupportedWeightsError, match=r"weight_scale_inv: FP8 block-scaled weights"):
        deltakit.extract(tmp_path / "finetuned", tmp_path / "base", tmp_path / "out", rank=2)


def test_a_quantization_config_is_refused_naming_the_method(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, ft_dir = pair
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quantization_config": {"quant_method": "fp8"}}))
    result = _run("extract", ft_dir, base_dir, "-o", tmp_path / "out")
    assert result.returncode == 1
    assert _one_error_line(result) == (f"deltakit: error: {base_dir / 'config.json'}: quantization_config (fp8): "
                                       "quantized checkpoints are not supported yet; use the unquantized "
                                       "(bf16/fp16/fp32) release")


# --- 9: an adapter config with wrong types is one line naming the file and the field -------------------------


@pytest.fixture
def adapter(pair: tuple[Path, Path], tmp_path: Path) -> Path:
    base_dir, ft_dir = pair
    deltakit.extract(ft_dir, base_dir, tmp_path / "adapter", rank=2)
    return tmp_path / "adapter"


@pytest.mark.parametrize("field, value, words", [
    ("r", None, "field 'r' is null; it must be a positive integer"),
    ("r", "16", "field 'r' is '16' (a string); it must be a positive integer"),
    ("r", 0, "field 'r' is 0 (a number); it must be a positive integer"),
    ("lora_alpha", "32", "field 'lora_alpha' is '32' (a string); it must be a finite number"),
    ("rank_pattern", ["q_proj"], "field 'rank_pattern' is ['q_proj'] (a list); it must be an object"),
    ("rank_pattern", {"q_proj": "4"}, "field rank_pattern['q_proj'] is '4' (a string); it must be a positive"),
    ("rank_pattern", {"q_proj(": 4}, "field rank_pattern['q_proj('] is not a valid regex"),
    ("alpha_pattern", {"q_proj": None}, "field alpha_pattern['q_proj'] is null; it must be a finite number"),
    ("target_modules", "q_proj(", "field target_modules is not a valid regex"),
    ("target_modules", [1, 2], "field 'target_modules' is [1, 2] (a list); it must be null, a regex string"),
    ("use_dora", "yes", "field 'use_dora' is 'yes' (a string); it must be true or false"),
    ("layers_to_transform", "0", "field 'layers_to_transform' is '0' (a string)"),
])
@pytest.mark.parametrize("command", ["merge", "stack"])
def test_wrong_config_types_are_one_line_naming_file_and_field(pair: tuple[Path, Path], adapter: Path,
                                                               tmp_path: Path, field: str, value: object,
                                                               words: str, command: str) -> None:
    base_dir, _ = pair
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(deltakit.DeltakitError) as caught:
        if command == "merge":
            deltakit.merge(base_dir, [adapter], tmp_path / "out")
        else:
            deltakit.stack([adapter], tmp_path / "out", exact=True)
    assert str(caught.value).startswith(f"{config_path}: {words}"), str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.exit_code == 1
    assert not (tmp_path / "out").exists()


def test_wrong_config_type_on_the_command_line(pair: tuple[Path, Path], adapter: Path, tmp_path: Path) -> None:
    base_dir, _ = pair
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": "16"}))
    result = _run("merge", base_dir, adapter, "-o", tmp_path / "out")
    assert result.returncode == 1
    assert _one_error_line(result) == (f"deltakit: error: {config_path}: field 'r' is '16' (a string); it must be "
                                       "a positive integer")
