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
