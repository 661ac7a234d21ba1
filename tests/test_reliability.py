"""Faults and interruptions: a full disk, SIGKILL, Ctrl-C, outputs that overlap inputs, determinism, big models.

The invariants: the final output path holds either nothing (or the previous output) or a complete output; a
failure leaves no staging or temporary sibling behind (only SIGKILL may leave a hidden ``.NAME.deltakit-tmp-*``
directory, which is never mistaken for output); rerunning after an interruption gives the same bytes as a
clean run; the same inputs and seed give the same bytes.

The SIGKILL and Ctrl-C runs are real processes running the CLI's ``main``, forked from one server process that
has already imported deltakit: a fresh ``python -m deltakit`` spends ~2 s importing torch, which would make
several kill trials cost tens of seconds. The disk-full runs are plain ``python -m deltakit`` processes.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from builders import low_rank_delta, write_safetensors_pair

import deltakit
from deltakit.cli import main

REPO = Path(__file__).resolve().parents[1]
LAYERS, SIZE = 32, 256  # 32 factorized (256, 256) fp32 weights: a CLI extract takes 0.5-1.5 s on 2 busy cores
HEAD_SHAPE = (8192, 1024)  # one 32 MB tensor left unchanged, so merge has something sizeable to stream
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


# --- inputs -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base_dir, ft_dir): 3 shards, a config.json each; every layer changed (rank 8 plus a little noise)."""
    generator = torch.Generator().manual_seed(0)
    base, finetuned = {}, {}
    for i in range(LAYERS):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        base[name] = torch.randn(SIZE, SIZE, generator=generator)
        # Not builders.low_rank_delta: its fp64 QRs cost ~0.15 s a layer on a busy machine.
        low_rank = torch.randn(SIZE, 8, generator=generator) @ torch.randn(8, SIZE, generator=generator) / 8
        finetuned[name] = base[name] + low_rank + 0.01 * torch.randn(SIZE, SIZE, generator=generator)
    base["lm_head.weight"] = finetuned["lm_head.weight"] = torch.randn(HEAD_SHAPE, generator=generator)
    base_dir, ft_dir = write_safetensors_pair(tmp_path_factory.mktemp("pair"), base, finetuned, shards=3)
    for ckpt_dir in (base_dir, ft_dir):
        (ckpt_dir / "config.json").write_text(json.dumps(CONFIG))
    return base_dir, ft_dir


@pytest.fixture(scope="module")
def adapter(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA adapter of ``pair``, extracted with the randomized SVD, seed 0."""
    base_dir, ft_dir = pair
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    deltakit.extract(ft_dir, base_dir, out, rank=4, svd="randomized", seed=0)
    return out


def _extract_args(pair: tuple[Path, Path], out: Path) -> list[str]:
    base_dir, ft_dir = pair
    return ["extract", str(ft_dir), str(base_dir), "-r", "4", "--svd", "randomized", "-o", str(out), "-q"]


def _merge_args(pair: tuple[Path, Path], adapter: Path, out: Path) -> list[str]:
    return ["merge", str(pair[0]), str(adapter), "-o", str(out), "-q"]


# --- comparing outputs --------------------------------------------------------------------------------------------


def _without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _assert_same_output(got: Path, expected: Path) -> None:
    """Every file byte for byte, except extract_report.json, compared as JSON without its ``seconds`` fields."""
    files = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()) == files
    for rel in files:
        if rel.name == "extract_report.json":
            report, reference = (json.loads((d / rel).read_text()) for d in (got, expected))
            assert _without_timings(report) == _without_timings(reference)
            assert report["summary"]["seconds"] > 0
        else:
            assert (got / rel).read_bytes() == (expected / rel).read_bytes(), rel


def _identity(path: Path) -> tuple[int, int] | None:
    """Which directory is at ``path`` (a new output is renamed in, so its inode changes); None: nothing."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _siblings(out: Path, tag: str) -> set[Path]:
    return set(out.parent.glob(f".{out.name}.deltakit-{tag}-*"))


# --- processes forked from a server that has imported deltakit -----------------------------------------------------

# Reads one JSON request per line, forks a child that runs the CLI's main() with the request's arguments (stdout
# and stderr to the request's log file), prints the child's pid, then its exit code as os.waitstatus_to_exitcode
# gives it (-9 for SIGKILL). The server runs no torch op before forking, so no thread pool is copied into a child.
_FORK_SERVER = r"""
import json, os, sys, traceback
import deltakit
import deltakit.ops.batch  # the CLI imports torch and the operations lazily: once here, not in every child
from deltakit.cli import main
MAIN = os.path.join(os.path.dirname(deltakit.__file__), "__main__.py")
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = [MAIN, *request["args"]]  # as `python -m deltakit ARGS` sees it (the report records it)
            main(request["args"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class _ForkServer:
    """Starts ``deltakit`` CLI runs as child processes of a server that has already paid for the imports."""

    def __init__(self) -> None:
        self._server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], cwd=REPO, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self, args: list[str], log: Path) -> int:
        """Start one run; returns its pid."""
        self._server.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
        self._server.stdin.flush()
        return int(self._server.stdout.readline())

    def wait(self) -> int:
        """The exit code of the run started last (negative: killed by that signal)."""
        return int(self._server.stdout.readline())

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=30)


@pytest.fixture(scope="module")
def fork_server() -> Iterator[_ForkServer]:
    server = _ForkServer()
    yield server
    server.close()


def _wait_for_new_staging(out: Path, pid: int, existing: set[Path]) -> None:
    """Block until the run ``pid`` has created its staging directory (the work has begun) or has ended."""
    deadline = time.monotonic() + 60
    while not _siblings(out, "tmp") - existing and Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the run never created its staging directory"
        time.sleep(0.002)


def _run_interrupted(server: _ForkServer, args: list[str], out: Path, log: Path, sig: int | None,
                     delay: float) -> tuple[int, float]:
    """Run ``args``; ``delay`` seconds after its staging directory appears send ``sig`` (None: let it finish).

    Returns the exit code and the seconds from the staging directory's appearance to the end of the run.
    """
    existing = _siblings(out, "tmp")
    pid = server.start(args, log)
    _wait_for_new_staging(out, pid, existing)
    staged = time.monotonic()
    if sig is not None:
        time.sleep(delay)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it had already finished (and been reaped)
    code = server.wait()
    return code, time.monotonic() - staged


# --- 1. disk full -------------------------------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:
        # Without SIGXFSZ ignored the kernel kills the writer; ignored, write() fails with EFBIG instead.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("command", ["extract", "merge"])
def test_file_size_limit_is_one_line_error_naming_the_file_and_leaves_nothing(pair, adapter, tmp_path, command):
    out = tmp_path / "outputs" / "out"
    if command == "extract":
        # The adapter's factors are 32 modules x 4 x (256 + 256) fp32 = 256 KiB; the JSON files are far smaller.
        args, limit, failed_file = _extract_args(pair, out), 64 << 10, "adapter_model.safetensors"
    else:
        args, limit, failed_file = _merge_args(pair, adapter, out), 1 << 20, "model-00001-of-00003.safetensors"
    result = subprocess.run([sys.executable, "-m", "deltakit", *args], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=_limit_file_size(limit), timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"deltakit: error: {out / failed_file}: cannot write: the file size limit was hit")
    assert list(out.parent.iterdir()) == []  # no output, no staging directory, no temporary file


# --- 2. SIGKILL at random points ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "trials"), [("extract", 5), ("merge", 6)])
def test_sigkill_leaves_no_partial_output_and_rerun_matches_clean_run(pair, adapter, fork_server, tmp_path,
                                                                      command, trials):
    """Killed at random points, a run leaves no output or a complete one; a rerun reproduces a clean run."""
    out = tmp_path / "out"
    # The same out path and command line for every run (the report and the card record both), so --overwrite
    # always: it only matters once an output exists.
    args = (_extract_args(pair, out) if command == "extract" else _merge_args(pair, adapter, out)) + ["--overwrite"]

    code, run_seconds = _run_interrupted(fork_server, args, out, tmp_path / "clean.log", None, 0.0)
    assert code == 0, (tmp_path / "clean.log").read_text()
    reference = out.rename(tmp_path / "reference")

    rng = random.Random(1234)
    killed_mid_run = 0
    for trial in range(trials):
        log = tmp_path / f"kill{trial}.log"
        before = _identity(out)
        code, seconds = _run_interrupted(fork_server, args, out, log, signal.SIGKILL, rng.random() * run_seconds)
        assert code in (-signal.SIGKILL, 0), log.read_text()
        if code == 0:
            # Finished before the kill: the first run was slower (cold caches); aim the next kills at this pace.
            run_seconds = min(run_seconds, seconds)
        if out.exists():
            _assert_same_output(out, reference)  # the earlier output or the new one, complete either way
        killed_mid_run += code == -signal.SIGKILL and _identity(out) == before  # killed before its final rename
    assert killed_mid_run >= 1, f"no kill landed before the {run_seconds:.2f} s run ended"

    code, _ = _run_interrupted(fork_server, args, out, tmp_path / "rerun.log", None, 0.0)
    assert code == 0, (tmp_path / "rerun.log").read_text()
    _assert_same_output(out, reference)
    # SIGKILL can leave staging directories; nothing else appears beside the output.
    names = {p.name for p in tmp_path.iterdir()} - {p.name for p in _siblings(out, "tmp") | _siblings(out, "old")}
    assert names == {"out", "reference", "clean.log", "rerun.log", *(f"kill{t}.log" for t in range(trials))}


# --- 3. Ctrl-C -----------------------------------------------------------------------------------------------------


def _wait_until_mid_run(out: Path, pid: int, command: str) -> None:
    """Return once the run is well under way: extract 20 ms into its SVDs (a later wake-up can
    miss the end of so short a run), merge once it writes its first shard."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline and Path(f"/proc/{pid}").exists(), "the run ended before its middle"
        staging = next(iter(_siblings(out, "tmp")), None)
        if staging is not None:
            if command == "extract":
                time.sleep(0.02)
                return
            if any(".safetensors" in p.name for p in staging.iterdir()):
                return
        time.sleep(0.002)


@pytest.mark.parametrize("command", ["extract", "merge"])
def test_ctrl_c_exits_130_with_aborted_and_leaves_nothing(pair, adapter, fork_server, tmp_path, command):
    out = tmp_path / "out"
    args = _extract_args(pair, out) if command == "extract" else _merge_args(pair, adapter, out)
    pid = fork_server.start(args, tmp_path / "log")
    _wait_until_mid_run(out, pid, command)
    os.kill(pid, signal.SIGINT)
    code = fork_server.wait()
    log = (tmp_path / "log").read_text()
    assert code == 130, log
    assert log.strip() == "Aborted!"
    assert [p.name for p in tmp_path.iterdir()] == ["log"]


# --- 4. outputs that overlap inputs --------------------------------------------------------------------------------


@pytest.fixture
def small_inputs(tmp_path: Path) -> dict[str, Path]:
    """A tiny pair and a LoRA adapter of it, each in its own directory under ``tmp_path/inputs``."""
    w0 = torch.randn(16, 12)
    base_dir, ft_dir = write_safetensors_pair(tmp_path / "inputs", {"m.weight": w0},
                                              {"m.weight": w0 + low_rank_delta(16, 12, 2, seed=0)})
    adapter_dir = tmp_path / "inputs" / "adapter"
    deltakit.extract(ft_dir, base_dir, adapter_dir, rank=2)
    return {"base": base_dir, "finetuned": ft_dir, "adapter": adapter_dir}


_OVERLAP_COMMANDS = {
    "extract": (["extract", "{finetuned}", "{base}", "-r", "2"], "finetuned"),
    "merge": (["merge", "{base}", "{adapter}"], "base"),
    "merge-dry-run": (["merge", "{base}", "{adapter}", "--dry-run"], "base"),
    "stack": (["stack", "{adapter}", "--exact"], "adapter"),
    "inspect": (["inspect", "{finetuned}", "{base}"], "base"),
}


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
@pytest.mark.parametrize("command", list(_OVERLAP_COMMANDS))
def test_output_overlapping_an_input_is_refused_with_exit_2(small_inputs, tmp_path, capsys, command, where):
    template, overlapped = _OVERLAP_COMMANDS[command]
    target = small_inputs[overlapped]
    out = {"equal": target, "inside": target / "out", "containing": target.parent}[where]
    before = {p: p.read_bytes() for p in (tmp_path / "inputs").rglob("*") if p.is_file()}
    # --overwrite: an output that contains an input must be refused, never replaced (that would delete the input).
    with pytest.raises(SystemExit) as exited:
        main([arg.format(**small_inputs) for arg in template] + ["-o", str(out), "--overwrite", "-q"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltakit: error: ") and "input" in lines[0], lines
    assert {p: p.read_bytes() for p in (tmp_path / "inputs").rglob("*") if p.is_file()} == before
    assert not (target / "out").exists()


# --- 5. determinism ------------------------------------------------------------------------------------------------


def test_randomized_extract_with_same_seed_is_byte_identical(pair, adapter, tmp_path):
    base_dir, ft_dir = pair
    torch.manual_seed(99)  # the global RNG must play no part: the seed option decides
    torch.randn(10)
    deltakit.extract(ft_dir, base_dir, tmp_path / "again", rank=4, svd="randomized", seed=0)
    deltakit.extract(ft_dir, base_dir, tmp_path / "seed1", rank=4, svd="randomized", seed=1)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (adapter / name).read_bytes(), name
    # The seed is really in play: another one gives other factors (a vacuous pass otherwise).
    assert (tmp_path / "seed1" / "adapter_model.safetensors").read_bytes() != (
        adapter / "adapter_model.safetensors").read_bytes()


def test_merge_is_byte_identical_across_runs(pair, adapter, tmp_path):
    deltakit.merge(pair[0], [adapter], out=tmp_path / "first")
    deltakit.merge(pair[0], [adapter], out=tmp_path / "second")
    _assert_same_output(tmp_path / "second", tmp_path / "first")
    assert {p.name for p in (tmp_path / "first").iterdir()} >= {
        "model.safetensors.index.json", "config.json", "model-00001-of-00003.safetensors"}


# --- 6. a checkpoint much larger than its largest tensor ------------------------------------------------------------


@pytest.mark.slow
def test_peak_memory_is_bounded_by_largest_tensor_not_model_size(tmp_path):
    """~200 MB of bf16 (2048, 2048) tensors in 4 shards: extract and merge stay within a few fp32 tensors."""
    from benchmarks.big_checkpoint import build_pair, run_measured

    base_dir, ft_dir, facts = build_pair(tmp_path, size_bytes=200_000_000, dim=2048, shard_bytes=50_000_000)
    largest_fp32 = facts.largest_numel * 4
    assert facts.model_bytes > 20 * facts.largest_bytes  # the model is far larger than any one tensor
    runs = [
        run_measured("extract", ["extract", str(ft_dir), str(base_dir), "-r", "16", "-o", str(tmp_path / "lora"),
                                 "-q"], tmp_path),
        run_measured("merge", ["merge", str(base_dir), str(tmp_path / "lora"), "-o", str(tmp_path / "merged"),
                               "-q"], tmp_path),
    ]
    for run in runs:
        # The allowance covers the adapter, the thread pools and allocator slack; the interpreter and torch
        # themselves are in anon_start_bytes.
        assert run.anon_peak_bytes - run.anon_start_bytes < 6 * largest_fp32 + (96 << 20), run
