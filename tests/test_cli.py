"""The CLI boundary: exit codes, one-line errors on stderr, --debug tracebacks, help that matches the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import low_rank_delta, write_safetensors_pair

from deltakit.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"
Q = "model.layers.0.self_attn.q_proj.weight"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltakit", *args], capture_output=True, text=True)


@pytest.fixture
def pair(tmp_path):
    w0 = torch.randn(32, 24)
    return write_safetensors_pair(tmp_path, {Q: w0}, {Q: w0 + low_rank_delta(32, 24, 2, seed=1)})


def test_extract_succeeds_and_prints_summary(pair, tmp_path):
    base_dir, ft_dir = pair
    result = _run("extract", str(ft_dir), str(base_dir), "-r", "2", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "modules factorized : 1" in result.stderr
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_missing_input_is_one_line_exit_1(tmp_path):
    result = _run("extract", str(tmp_path / "nope"), str(tmp_path / "nope2"), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltakit: error: ") and "nope" in lines[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_is_exit_2(pair, tmp_path):
    base_dir, ft_dir = pair
    (tmp_path / "out").mkdir()
    result = _run("extract", str(ft_dir), str(base_dir), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "--overwrite" in result.stderr


def test_bad_option_is_usage_error_exit_2(pair):
    base_dir, ft_dir = pair
    result = _run("extract", str(ft_dir), str(base_dir), "--svd", "magic")
    assert result.returncode == 2
    assert "magic" in result.stderr


def test_identical_inputs_exit_1_without_output(tmp_path):
    w0 = torch.randn(8, 8)
    base_dir, ft_dir = write_safetensors_pair(tmp_path, {Q: w0}, {Q: w0.clone()})
    result = _run("extract", str(ft_dir), str(base_dir), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and "identical" in result.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_of_the_error_itself(tmp_path):
    """--debug re-raises the DeltakitError: the traceback ends in that error and its message, not in a crash."""
    result = _run("--debug", "extract", str(tmp_path / "nope"), str(tmp_path / "nope2"))
    assert result.returncode == 1 and result.stderr.startswith("Traceback")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("deltakit.errors.CheckpointNotFoundError: ") and str(tmp_path / "nope") in last
    assert "deltakit: error:" not in result.stderr


def test_every_command_has_help_and_is_in_the_readme():
    readme = README.read_text()
    for name, command in cli.commands.items():
        assert command.help and "Example" in command.help, name
        assert re.search(rf"deltakit {name}\b", readme), f"`deltakit {name}` is not documented in README.md"


def test_the_cli_keeps_openmp_threads_from_spinning_unless_the_user_chose():
    """OpenMP reads its wait policy once, when torch loads: main() must set it before any command imports torch,
    and keep a policy the user set."""
    script = ("import os, sys; from deltakit.cli import main\n"
              "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["PASSIVE", "False"]
    out = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["ACTIVE", "False"]
