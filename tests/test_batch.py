"""``deltakit batch``: manifests of extract and merge jobs, run in order, resumable after a crash.

The invariant: whatever point a run is killed at, rerunning the manifest leaves every output complete and
byte-identical to a clean run's (JSON reports compared without their timings), redoing only what was not
finished, and leaving no staging directory behind.

The killed runs are real subprocesses that call :func:`deltakit.batch.run_batch` (what ``deltakit batch`` calls);
a small driver holds the process at a chosen point (by wrapping the shard writer or an operation, never the code
under test) so that the SIGKILL lands exactly there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from builders import ModelPair
from test_hub import COMMIT, CONFIG, seed_repo

from deltakit.cli import main
from deltakit.ops import batch
from deltakit.io import hub
from deltakit.errors import CheckpointNotFoundError, InvalidOptionError, OutputExistsError
from deltakit.ops.extract import extract
from deltakit.ops.merge import merge

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("adapters/r4", "adapters/r8", "merged/r4", "merged/mix")


def _manifest(pair: ModelPair, *, r4_rank: int = 4) -> str:
    """Two extractions at different ranks, a merge of one, a weighted merge of both (which reads jobs 1, 2)."""
    return f"""
[defaults]
rank = 8
svd = "exact"

[[jobs]]
op = "extract"
ft = "{pair.ft_dir}"
base = "{pair.base_dir}"
out = "adapters/r4"
rank = {r4_rank}

[[jobs]]
op = "extract"
finetuned = "{pair.ft_dir}"
base = "{pair.base_dir}"
out = "adapters/r8"
carry = false  # factors only: merge refuses two adapters that both replace the norms

[[jobs]]
op = "merge"
base = "{pair.base_dir}"
adapters = ["adapters/r4"]
out = "merged/r4"

[[jobs]]
op = "merge"
base = "{pair.base_dir}"
adapters = ["adapters/r4", "adapters/r8"]
weights = [0.5, 0.5]
out = "merged/mix"
"""


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread: these matrices are tiny, so threads only add contention on a busy machine (20x slower
    measured), and a killed run and its rerun must use the same thread count for bit-identical SVDs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workdir(tmp_path: Path, llama_pair: ModelPair) -> Path:
    (tmp_path / "jobs.toml").write_text(_manifest(llama_pair))
    return tmp_path


def _snapshot(root: Path) -> dict[str, object]:
    """Every output file's content; JSON files parsed, with timings (``seconds``) dropped."""
    files: dict[str, object] = {}
    for out in OUTPUTS:
        for path in sorted((root / out).rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                key = str(path.relative_to(root))
                files[key] = _without_seconds(json.loads(data)) if path.suffix == ".json" else data
    return files


def _without_seconds(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _clear_outputs(root: Path) -> None:
    for folder in ("adapters", "merged"):
        shutil.rmtree(root / folder, ignore_errors=True)
    (root / "jobs.summary.json").unlink(missing_ok=True)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for folder in ("adapters", "merged") for p in (root / folder).glob(".*deltakit-*")
                  if not p.name.endswith(".deltakit-job.json"))


def _statuses(report: batch.BatchReport) -> list[str]:
    return [r.status for r in report.results]


def test_jobs_run_in_order_write_a_summary_and_a_rerun_skips_them(workdir: Path) -> None:
    report = batch.run_batch(workdir / "jobs.toml")
    assert _statuses(report) == ["done"] * 4 and not report.failed and report.error is None
    assert json.loads((workdir / "adapters/r4/adapter_config.json").read_text())["r"] == 4
    assert json.loads((workdir / "adapters/r8/adapter_config.json").read_text())["r"] == 8  # from [defaults]
    summary = json.loads((workdir / "jobs.summary.json").read_text())
    assert summary["counts"] == {"done": 4}
    ops = ["extract", "extract", "merge", "merge"]
    assert [(j["index"], j["op"], j["status"], j["out"]) for j in summary["jobs"]] == [
        (i + 1, op, "done", str(workdir / out)) for i, (op, out) in enumerate(zip(ops, OUTPUTS))]
    marker = json.loads((workdir / "adapters/.r4.deltakit-job.json").read_text())
    assert marker["state"] == "done" and marker["job"]["options"]["rank"] == 4
    assert marker["job"]["inputs"]["base"]["files"].startswith("sha256:")
    lines = report.summary_lines()
    assert lines[0].split() == ["job", "op", "status", "seconds", "out"]
    assert lines[1].split()[:3] == ["1", "extract", "done"] and lines[-2].startswith("4 done in ")

    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and "summary" not in p.name}
    again = batch.run_batch(workdir / "jobs.toml")
    assert _statuses(again) == ["skipped"] * 4
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_outputs_equal_direct_library_calls(workdir: Path, llama_pair: ModelPair, tmp_path_factory) -> None:
    batch.run_batch(workdir / "jobs.toml")
    direct = tmp_path_factory.mktemp("direct")
    extract(llama_pair.ft_dir, llama_pair.base_dir, direct / "r4", rank=4, svd="exact")
    merge(llama_pair.base_dir, [direct / "r4"], direct / "m4")
    assert (workdir / "adapters/r4/adapter_model.safetensors").read_bytes() == (
        direct / "r4/adapter_model.safetensors").read_bytes()
    assert (workdir / "merged/r4/model.safetensors").read_bytes() == (direct / "m4/model.safetensors").read_bytes()


_DRIVER = r"""
import functools, json, os, sys, time
from pathlib import Path
import torch
import deltakit.ops.batch as batch
import deltakit.io.writer as writer

torch.set_num_threads(1)  # as in the test process (see the single_thread fixture)

flag, pause, first_marker = Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])

def first_job_done():
    return first_marker.is_file() and json.loads(first_marker.read_text()).get("state") == "done"

def hold():
    flag.touch()
    time.sleep(600)

if pause == "mid-write":  # hold in job 2's second tensor write: a half-written staging directory exists
    real_write, writes = writer.SafetensorsWriter.write, []
    def write(self, name, tensor):
        if first_job_done():
            writes.append(name)
            if len(writes) == 2:
                hold()
        return real_write(self, name, tensor)
    writer.SafetensorsWriter.write = write
else:  # "after-output": job 2's output is in place, its marker still says running
    extract_op = batch.OPERATIONS["extract"]
    @functools.wraps(extract_op.function)  # batch reads the option names from the signature
    def extract_then_hold(*args, **kwargs):
        report = extract_op.function(*args, **kwargs)
        if first_job_done():
            hold()
        return report
    batch.OPERATIONS["extract"] = batch.Operation(extract_then_hold, extract_op.inputs)

batch.run_batch(sys.argv[1])
"""


@pytest.mark.parametrize("pause", ["mid-write", pytest.param("after-output", marks=pytest.mark.slow)])
def test_sigkill_mid_run_then_rerun_gives_the_clean_run_outputs(workdir: Path, pause: str) -> None:
    """Killed with SIGKILL while job 2 writes (or right after its output is renamed in), then rerun: job 1 is
    skipped, job 2 redone, jobs 3 and 4 run, and all four outputs equal a clean run's.

    A subprocess costs 2-5 s (importing torch), so the second crash point runs with -m slow; the fast test
    below reproduces its on-disk state in-process. The clean run and the resumed one go through the same entry
    point: command_line() records argv in the model card.
    """
    clean = batch.run_batch(workdir / "jobs.toml")
    assert _statuses(clean) == ["done"] * 4
    expected = _snapshot(workdir)
    _clear_outputs(workdir)

    flag = workdir / "paused"
    process = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(workdir / "jobs.toml"), str(flag), pause,
         str(workdir / "adapters/.r4.deltakit-job.json")],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the batch never reached the pause point"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
        process.stderr.close()

    marker_2 = json.loads((workdir / "adapters/.r8.deltakit-job.json").read_text())
    assert marker_2["state"] == "running"
    assert (workdir / "adapters/r8").exists() == (pause == "after-output")
    assert bool(_leftovers(workdir)) == (pause == "mid-write")  # the half-written staging directory
    assert not (workdir / "merged").exists()

    resumed = batch.run_batch(workdir / "jobs.toml")
    assert _statuses(resumed) == ["skipped", "done", "done", "done"]
    assert _snapshot(workdir) == expected
    assert _leftovers(workdir) == []


def _staging(out: Path, tag: str) -> Path:
    """A staging directory and its lock file as writer.staged_output names them, as a killed run leaves them."""
    staging = out.with_name(f".{out.name}.deltakit-tmp-{tag}")
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"half-written")
    staging.with_name(f".{out.name}.deltakit-lock-{tag}").touch()
    return staging


def test_an_output_whose_marker_still_says_running_is_redone(workdir: Path) -> None:
    """The state a crash between an output's rename and its marker's update leaves: the output is replaced, the
    killed run's staging directory removed, and a staging directory whose lock a live process holds kept."""
    batch.run_batch(workdir / "jobs.toml")
    expected = _snapshot(workdir)
    marker_path = workdir / "adapters/.r8.deltakit-job.json"
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "state": "running"}))
    (workdir / "adapters/r8/adapter_model.safetensors").write_bytes(b"half-written")
    _staging(workdir / "adapters/r8", "0123abcd")
    live = _staging(workdir / "adapters/r8", "live0000")
    lock = os.open(live.with_name(".r8.deltakit-lock-live0000"), os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another run building this output right now
    try:
        report = batch.run_batch(workdir / "jobs.toml")
    finally:
        os.close(lock)
    assert _statuses(report) == ["skipped", "done", "skipped", "done"]  # job 4 reads job 2's output
    assert _snapshot(workdir) == expected
    assert _leftovers(workdir) == [".r8.deltakit-lock-live0000", ".r8.deltakit-tmp-live0000"]


def test_changing_a_job_redoes_it_and_the_jobs_that_read_it(workdir: Path, llama_pair: ModelPair) -> None:
    batch.run_batch(workdir / "jobs.toml")
    (workdir / "jobs.toml").write_text(_manifest(llama_pair, r4_rank=2))
    report = batch.run_batch(workdir / "jobs.toml")
    assert _statuses(report) == ["done", "skipped", "done", "done"]
    assert json.loads((workdir / "adapters/r4/adapter_config.json").read_text())["r"] == 2


def _extract_then_merge(pair: ModelPair, *, rank: int, merge_first: bool) -> str:
    extract_job = f'[[jobs]]\nop = "extract"\nft = "{pair.ft_dir}"\nbase = "{pair.base_dir}"\nout = "adapters/r4"\n'
    merge_job = f'[[jobs]]\nop = "merge"\nbase = "{pair.base_dir}"\nadapters = ["adapters/r4"]\nout = "merged/r4"\n'
    jobs = [merge_job, extract_job] if merge_first else [extract_job, merge_job]
    return f'[defaults]\nrank = {rank}\nsvd = "exact"\n\n' + "\n".join(jobs)


def test_a_job_listed_before_the_job_it_reads_runs_after_it(workdir: Path, llama_pair: ModelPair,
                                                             tmp_path_factory) -> None:
    """Issue 10, item 6: with the merge listed first, a rerun after changing the extraction used to skip the merge
    (its input had not changed yet) and then rewrite the adapter under it: a stale merge and exit 0."""
    (workdir / "jobs.toml").write_text(_extract_then_merge(llama_pair, rank=4, merge_first=False))
    assert _statuses(batch.run_batch(workdir / "jobs.toml")) == ["done", "done"]
    (workdir / "jobs.toml").write_text(_extract_then_merge(llama_pair, rank=2, merge_first=True))
    [merge_job, extract_job] = batch.load_manifest(workdir / "jobs.toml")[::-1]
    assert (extract_job.op, merge_job.op, merge_job.depends_on) == ("extract", "merge", (2,))
    report = batch.run_batch(workdir / "jobs.toml")
    assert [(r.index, r.op, r.status) for r in report.results] == [(1, "merge", "done"), (2, "extract", "done")]
    direct = tmp_path_factory.mktemp("direct")
    extract(llama_pair.ft_dir, llama_pair.base_dir, direct / "r2", rank=2, svd="exact")
    merge(llama_pair.base_dir, [direct / "r2"], direct / "m2")
    assert (workdir / "merged/r4/model.safetensors").read_bytes() == (direct / "m2/model.safetensors").read_bytes()


def test_a_redone_output_redoes_its_readers_even_when_its_files_look_unchanged(
    workdir: Path, llama_pair: ModelPair, monkeypatch
) -> None:
    """Where timestamps are coarse (some network filesystems), a rewritten adapter of the same size looks like
    the old one; the merge that reads it must be redone all the same, because batch itself rewrote it."""
    monkeypatch.setattr(batch, "_local_identity", lambda path: "unchanging")
    (workdir / "jobs.toml").write_text(_extract_then_merge(llama_pair, rank=4, merge_first=False))
    batch.run_batch(workdir / "jobs.toml")
    marker_path = workdir / "adapters/.r4.deltakit-job.json"
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "state": "running"}))
    assert _statuses(batch.run_batch(workdir / "jobs.toml")) == ["done", "done"]
    assert _statuses(batch.run_batch(workdir / "jobs.toml", dry_run=True)) == ["would skip", "would skip"]
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "state": "running"}))
    assert _statuses(batch.run_batch(workdir / "jobs.toml", dry_run=True)) == ["would run", "would run"]


def _with_missing_base(pair: ModelPair, workdir: Path) -> Path:
    text = _manifest(pair).replace(f'finetuned = "{pair.ft_dir}"\nbase = "{pair.base_dir}"',
                                   f'finetuned = "{pair.ft_dir}"\nbase = "missing-base"')
    (workdir / "jobs.toml").write_text(text)
    return workdir / "jobs.toml"


def test_a_failing_job_stops_the_run(workdir: Path, llama_pair: ModelPair) -> None:
    report = batch.run_batch(_with_missing_base(llama_pair, workdir))
    assert _statuses(report) == ["done", "failed", "not run", "not run"]
    assert isinstance(report.error, CheckpointNotFoundError) and report.error.exit_code == 1
    assert report.results[1].error == f"{workdir / 'missing-base'}: no such file or directory (base)"
    assert not (workdir / "merged").exists()
    summary = json.loads((workdir / "jobs.summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["done", "failed", "not run", "not run"]
    assert summary["jobs"][1]["error"] == report.results[1].error
    assert f"job 2: {report.results[1].error}" in report.summary_lines()


def test_continue_on_error_runs_the_others_and_blocks_the_jobs_that_need_the_failed_one(
    workdir: Path, llama_pair: ModelPair
) -> None:
    report = batch.run_batch(_with_missing_base(llama_pair, workdir), continue_on_error=True)
    assert _statuses(report) == ["done", "failed", "done", "blocked"]
    assert report.results[3].error == "needs the output of job 2, which did not succeed"
    assert isinstance(report.error, CheckpointNotFoundError)
    assert (workdir / "merged/r4/model.safetensors").is_file() and not (workdir / "merged/mix").exists()
    assert json.loads((workdir / "jobs.summary.json").read_text())["counts"] == {"done": 2, "failed": 1, "blocked": 1}


def test_dry_run_catches_a_bad_option_name_before_any_work(workdir: Path, llama_pair: ModelPair) -> None:
    text = _manifest(llama_pair).replace('out = "adapters/r8"', 'out = "adapters/r8"\nrnak = 3')
    (workdir / "jobs.toml").write_text(text)
    with pytest.raises(InvalidOptionError) as info:
        batch.run_batch(workdir / "jobs.toml", dry_run=True)
    assert str(info.value) == f"{workdir / 'jobs.toml'}: job 2 (extract): unknown option 'rnak'; did you mean 'rank'?"
    assert info.value.exit_code == 2
    with pytest.raises(InvalidOptionError):
        batch.run_batch(workdir / "jobs.toml")  # a real run checks the whole manifest first too
    assert sorted(p.name for p in workdir.iterdir()) == ["jobs.toml"]


def test_dry_run_reports_what_would_happen_and_writes_nothing(workdir: Path, llama_pair: ModelPair) -> None:
    report = batch.run_batch(workdir / "jobs.toml", dry_run=True)
    assert _statuses(report) == ["would run"] * 4 and report.dry_run
    assert sorted(p.name for p in workdir.iterdir()) == ["jobs.toml"]
    batch.run_batch(workdir / "jobs.toml")
    assert _statuses(batch.run_batch(workdir / "jobs.toml", dry_run=True)) == ["would skip"] * 4
    missing = batch.run_batch(_with_missing_base(llama_pair, workdir), dry_run=True)
    assert _statuses(missing) == ["would skip", "failed", "would skip", "blocked"]
    assert missing.results[1].error == f"{workdir / 'missing-base'}: no such file or directory (base)"


def test_manifest_problems_are_all_named_at_once(tmp_path: Path) -> None:
    (tmp_path / "jobs.toml").write_text("""
[defaults]
rnk = 4

[[jobs]]
op = "extract"
ft = "a"
base = "b"
out = "c"
rank = "16"
svd = "fast"
progress = true

[[jobs]]
op = "merge"
base = "b"
adapters = ["c"]

[[jobs]]
op = "stack"
""")
    with pytest.raises(InvalidOptionError) as info:
        batch.load_manifest(tmp_path / "jobs.toml")
    message = str(info.value)
    assert message == (f"{tmp_path / 'jobs.toml'}: 6 problems: defaults: no operation takes 'rnk'; did you mean "
                       "'rank'?; job 1 (extract): 'progress' is set by batch, not per job; "
                       "job 1 (extract): rank = '16' is not int or one of 'auto'; "
                       "job 1 (extract): svd = 'fast' is not one of 'exact', 'randomized', 'auto'; "
                       "job 2 (merge): missing 'out'; job 3: op 'stack' is not one of extract, merge, unmerge")
    for name, text, problem in [
        ("one", 'ft = "a"\nbase = "b"\nout = "c"\nsvd = "fast"',
         "job 1 (extract): svd = 'fast' is not one of 'exact', 'randomized', 'auto'"),
        ("two", 'ft = "a"\nbase = "b"\nout = "c"\nrank_pattern = ["q_proj"]',
         "job 1 (extract): rank_pattern: rank pattern 'q_proj' must look like REGEX=RANK, e.g. 'mlp\\..*=32'"),
        ("three", 'ft = "a"\nfinetuned = "b"\nbase = "b"\nout = "c"',
         "job 1 (extract): 'ft' and 'finetuned' name the same option"),
    ]:
        (tmp_path / f"{name}.toml").write_text(f'[[jobs]]\nop = "extract"\n{text}\n')
        with pytest.raises(InvalidOptionError) as info:
            batch.load_manifest(tmp_path / f"{name}.toml")
        assert str(info.value) == f"{tmp_path / name}.toml: {problem}"
    (tmp_path / "four.toml").write_text('[[jobs]]\nop = "merge"\nbase = "b"\nadapters = ["c"]\n')
    with pytest.raises(InvalidOptionError, match=r"job 1 \(merge\): missing 'out'$"):
        batch.load_manifest(tmp_path / "four.toml")
    (tmp_path / "five.toml").write_text('[[jobs]]\nop = "stack"\n')
    with pytest.raises(InvalidOptionError, match="job 1: op 'stack' is not one of extract, merge, unmerge$"):
        batch.load_manifest(tmp_path / "five.toml")


def test_two_jobs_writing_one_output_and_bad_syntax_are_refused(tmp_path: Path) -> None:
    job = '[[jobs]]\nop = "extract"\nft = "a"\nbase = "b"\nout = "same"\n'
    (tmp_path / "dup.toml").write_text(job + job)
    with pytest.raises(InvalidOptionError, match=r"job 2 \(extract\): out '.*same' is also job 1's out"):
        batch.load_manifest(tmp_path / "dup.toml")
    (tmp_path / "bad.toml").write_text("[[jobs]\n")
    with pytest.raises(InvalidOptionError, match=r"bad.toml: not valid TOML \("):
        batch.load_manifest(tmp_path / "bad.toml")


def test_an_output_inside_another_jobs_output_is_refused(tmp_path: Path) -> None:
    """The outer job would replace (or, redone, delete) the inner job's finished output."""
    job = '[[jobs]]\nop = "extract"\nft = "a"\nbase = "b"\nout = "{}"\n'
    (tmp_path / "nested.toml").write_text(job.format("adapters/r4") + job.format("adapters") + job.format("other"))
    with pytest.raises(InvalidOptionError) as info:
        batch.load_manifest(tmp_path / "nested.toml")
    assert str(info.value) == (f"{tmp_path / 'nested.toml'}: job 1: out '{tmp_path / 'adapters/r4'}' is inside "
                               f"job 2's out '{tmp_path / 'adapters'}'")


def test_jobs_that_read_each_other_in_a_circle_are_refused(tmp_path: Path) -> None:
    job = '[[jobs]]\nop = "merge"\nbase = "base"\nadapters = ["{}"]\nout = "{}"\n'
    (tmp_path / "circle.toml").write_text(job.format("b", "a") + job.format("a", "b") + job.format("a", "c"))
    with pytest.raises(InvalidOptionError, match=r"circle.toml: jobs 1, 2 read each other's outputs in a circle"):
        batch.load_manifest(tmp_path / "circle.toml")
    (tmp_path / "self.toml").write_text(job.format("a", "a"))
    with pytest.raises(InvalidOptionError, match=r"job 1 \(merge\): adapters 'a' is its own out$"):
        batch.load_manifest(tmp_path / "self.toml")


def test_json_manifest_reads_like_toml(tmp_path: Path) -> None:
    (tmp_path / "jobs.toml").write_text('[defaults]\nrank = 4\n[[jobs]]\nop = "extract"\nft = "a"\nbase = "b"\n'
                                        'out = "c"\nrank_pattern = ["q_proj=2"]\ninclude = "mlp"\n')
    (tmp_path / "jobs.json").write_text(json.dumps({"defaults": {"rank": 4}, "jobs": [
        {"op": "extract", "ft": "a", "base": "b", "out": "c", "rank_pattern": ["q_proj=2"], "include": "mlp"}]}))
    from_toml, from_json = batch.load_manifest(tmp_path / "jobs.toml"), batch.load_manifest(tmp_path / "jobs.json")
    assert from_toml == from_json
    assert from_toml[0].options == {"finetuned": str(tmp_path / "a"), "base": str(tmp_path / "b"),
                                    "out": str(tmp_path / "c"), "rank": 4, "rank_pattern": [("q_proj", 2)],
                                    "include": ["mlp"]}


def test_an_output_batch_did_not_write_is_replaced_only_with_overwrite(workdir: Path, llama_pair: ModelPair) -> None:
    (workdir / "adapters/r4").mkdir(parents=True)
    (workdir / "adapters/r4/mine.txt").write_text("not deltakit's")
    report = batch.run_batch(workdir / "jobs.toml")
    assert _statuses(report)[0] == "failed" and isinstance(report.error, OutputExistsError)
    assert (workdir / "adapters/r4/mine.txt").exists()
    text = _manifest(llama_pair).replace("rank = 4\n", "rank = 4\noverwrite = true\n", 1)
    (workdir / "jobs.toml").write_text(text)
    assert _statuses(batch.run_batch(workdir / "jobs.toml")) == ["done"] * 4
    assert not (workdir / "adapters/r4/mine.txt").exists()


def test_hub_inputs_are_pinned_to_their_commit(tmp_path: Path) -> None:
    """A Hub id input is recorded (and passed on) as org/name@<commit>; here resolved offline from the cache."""
    seed_repo("org/base", COMMIT, {"config.json": CONFIG})
    job = '[[jobs]]\nop = "extract"\nft = "org/base@main"\nbase = "org/base"\nout = "o"\n'
    (tmp_path / "jobs.toml").write_text(job)
    [job] = batch.load_manifest(tmp_path / "jobs.toml")
    assert job.options["base"] == "org/base"
    [result] = batch.run_batch(tmp_path / "jobs.toml", dry_run=True).results
    assert result.status == "would run"
    assert result.inputs == {"finetuned": {"hub": "org/base@main", "commit": COMMIT},
                             "base": {"hub": "org/base", "commit": COMMIT}}
    (tmp_path / "missing.toml").write_text('[[jobs]]\nop = "extract"\nft = "org/nope"\nbase = "org/base"\nout = "o"\n')
    [result] = batch.run_batch(tmp_path / "missing.toml", dry_run=True).results
    assert result.status == "failed" and result.error.startswith("org/nope: not a local path, and not in the Hub cache")


class _FakeHubApi:
    """Records create_repo and upload_folder instead of sending them: the push's network boundary, replaced in
    this one test; it also keeps a copy of each uploaded folder's model card."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        card_path = Path(kwargs["folder_path"]) / "README.md"
        card = card_path.read_text() if card_path.is_file() else None
        self.calls.append(("upload_folder", {**kwargs, "card": card}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}"})


def test_push_uploads_each_finished_output_privately_once(workdir: Path, llama_pair: ModelPair, monkeypatch) -> None:
    """The network boundary (HfApi's create_repo and upload_folder) is replaced by a recording fake."""
    monkeypatch.setattr(_FakeHubApi, "calls", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHubApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    text = _manifest(llama_pair).replace('[defaults]\n', '[defaults]\npush_repo = "me/{name}"\n')
    (workdir / "jobs.toml").write_text(text)
    report = batch.run_batch(workdir / "jobs.toml")
    assert _statuses(report) == ["done"] * 4 and _FakeHubApi.calls == []  # push_repo alone does not push

    report = batch.run_batch(workdir / "jobs.toml", push=True)
    assert _statuses(report) == ["skipped"] * 4
    names = ["r4", "r8", "r4", "mix"]
    creates = [c for name, c in _FakeHubApi.calls if name == "create_repo"]
    uploads = [c for name, c in _FakeHubApi.calls if name == "upload_folder"]
    assert creates == [{"repo_id": f"me/{n}", "private": True, "exist_ok": True} for n in names]
    assert [(u["repo_id"], u["folder_path"]) for u in uploads] == [(f"me/{n}", str(workdir / out))
                                                                   for n, out in zip(names, OUTPUTS)]
    for upload in uploads[:2]:  # each adapter's model card names its base (merge writes no card yet)
        assert f"\nbase_model: {llama_pair.base_dir}\n" in upload["card"]
    assert [r.pushed_url for r in report.results] == [f"https://huggingface.co/me/{n}/commit/{COMMIT}" for n in names]

    batch.run_batch(workdir / "jobs.toml", push=True)
    assert len(_FakeHubApi.calls) == 8  # already pushed: recorded in each job's marker


def test_the_ray_executor_without_ray_installed_is_one_line(workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(SystemExit) as info:
        main(["batch", str(workdir / "jobs.toml"), "--executor", "ray"])
    assert info.value.code == 3
    assert capsys.readouterr().err.splitlines() == [
        "deltakit: error: --executor ray needs Ray, which is not installed; pip install 'deltakit[ray]'"]
    with pytest.raises(SystemExit) as info:
        main(["batch", str(workdir / "jobs.toml"), "--address", "auto"])
    assert info.value.code == 2 and "--address needs --executor ray" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == ["jobs.toml"]


def test_resources_come_from_the_manifest_per_job_or_by_default(tmp_path: Path) -> None:
    (tmp_path / "jobs.toml").write_text('[defaults]\nnum_cpus = 2\nmemory = 4_000_000_000\n'
                                        '[[jobs]]\nop = "extract"\nft = "a"\nbase = "b"\nout = "c"\nnum_gpus = 1\n'
                                        '[[jobs]]\nop = "extract"\nft = "a"\nbase = "b"\nout = "d"\nnum_cpus = 0.5\n')
    first, second = batch.load_manifest(tmp_path / "jobs.toml")
    assert first.resources == batch.Resources(num_cpus=2, num_gpus=1, memory=4_000_000_000)
    assert second.resources == batch.Resources(num_cpus=0.5, memory=4_000_000_000)
    (tmp_path / "bad.toml").write_text('[[jobs]]\nop = "extract"\nft = "a"\nbase = "b"\nout = "c"\nnum_gpus = -1\n'
                                       'memory = "8GB"\n')
    with pytest.raises(InvalidOptionError) as info:
        batch.load_manifest(tmp_path / "bad.toml")
    assert str(info.value).endswith("2 problems: job 1 (extract): memory = '8GB' is not a whole number of bytes; "
                                    "job 1 (extract): num_gpus = -1 is not a number ≥ 0")


def test_a_job_asking_more_than_a_ray_started_here_has_is_refused_before_any_runs(tmp_path: Path) -> None:
    """Ray started by deltakit on this machine has no autoscaler: such a job would wait for ever."""
    from deltakit.ops.batch_ray import _refuse_what_this_machine_lacks  # needs no ray to import

    (tmp_path / "jobs.toml").write_text('[[jobs]]\nop = "extract"\nft = "a"\nbase = "b"\nout = "c"\nnum_gpus = 1\n')
    jobs = batch.load_manifest(tmp_path / "jobs.toml")
    with pytest.raises(InvalidOptionError, match=r"^job 1 \(extract\): num_gpus = 1 but this machine's Ray has 0; "):
        _refuse_what_this_machine_lacks(jobs, {"CPU": 2.0, "memory": 8e9})
    _refuse_what_this_machine_lacks(jobs, {"CPU": 2.0, "GPU": 1.0})
