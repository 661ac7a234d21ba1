"""``deltakit batch --executor ray``: the same jobs as Ray tasks on a real (local) Ray cluster.

One cluster for the module (``ray.init(num_cpus=2)``, no dashboard): starting Ray takes several seconds. What is
checked: the outputs are byte-identical to the local executor's (JSON reports without their timings), the
summary says the same, a dependency becomes a task dependency, a job's own error is reported (not retried) like
the local executor reports it, and a worker killed mid-job is retried by Ray into the clean run's output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from builders import ModelPair
from test_batch import _leftovers, _manifest, _snapshot, _statuses, _without_seconds

from deltakit.cli import main
from deltakit.errors import CheckpointNotFoundError
from deltakit.ops import batch

ray = pytest.importorskip("ray")
from deltakit.ops.batch_ray import RayExecutor  # noqa: E402  (after the skip: it imports ray)

pytestmark = pytest.mark.usefixtures("ray_cluster", "single_thread")


@pytest.fixture(scope="module")
def local_run(llama_pair: ModelPair, tmp_path_factory) -> tuple[dict, dict]:
    """The local executor's outputs and summary for the manifest of test_batch (4 jobs, job 4 reads 1 and 2)."""
    root = tmp_path_factory.mktemp("local")
    (root / "jobs.toml").write_text(_manifest(llama_pair))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module scope: set up before the single_thread fixture runs)
    try:
        report = batch.run_batch(root / "jobs.toml")
    finally:
        torch.set_num_threads(threads)
    assert _statuses(report) == ["done"] * 4
    return _files(root), _portable(report, root)


def _files(root: Path) -> dict:
    """The outputs as in test_batch, with the run's folder named ROOT (reports and model cards name their paths)."""
    return {name: json.loads(json.dumps(data).replace(str(root), "ROOT")) if name.endswith(".json")
            else data.replace(str(root).encode(), b"ROOT") for name, data in _snapshot(root).items()}


def _portable(report: batch.BatchReport, root: Path) -> dict:
    """The summary with the run's folder named ROOT, without timings or the identities of local inputs (mtimes)."""
    summary = json.loads(json.dumps(_without_seconds(report.to_json())).replace(str(root), "ROOT"))
    for job in summary["jobs"]:
        for identity in job["inputs"].values():
            for each in identity if isinstance(identity, list) else [identity]:
                each.pop("files", None)
    return summary


def test_ray_runs_the_jobs_as_tasks_with_the_local_executors_outputs(
    tmp_path: Path, llama_pair: ModelPair, local_run: tuple[dict, dict]
) -> None:
    expected_files, expected_summary = local_run
    (tmp_path / "jobs.toml").write_text(_manifest(llama_pair))
    report = batch.run_batch(tmp_path / "jobs.toml", executor=RayExecutor())
    assert _statuses(report) == ["done"] * 4
    assert _files(tmp_path) == expected_files
    assert _portable(report, tmp_path) == expected_summary
    assert json.loads((tmp_path / "jobs.summary.json").read_text())["counts"] == {"done": 4}

    again = batch.run_batch(tmp_path / "jobs.toml", executor=RayExecutor())  # resume: the same markers
    assert _statuses(again) == ["skipped"] * 4


@pytest.mark.slow
def test_a_jobs_own_error_is_reported_as_the_local_executor_reports_it(tmp_path: Path, llama_pair: ModelPair) -> None:
    """Job 2's base is missing: it fails once (a result, not an exception Ray would retry), job 4 that reads it
    is blocked, jobs 1 and 3 run; the summary equals the local executor's. Without --continue-on-error the
    failure stops the run: job 4 is not run (job 1, running beside job 2, may be done or interrupted)."""
    text = _manifest(llama_pair).replace(f'finetuned = "{llama_pair.ft_dir}"\nbase = "{llama_pair.base_dir}"',
                                         f'finetuned = "{llama_pair.ft_dir}"\nbase = "missing-base"')
    summaries = []
    for name, executor in [("local", None), ("ray", RayExecutor())]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "jobs.toml").write_text(text)
        report = batch.run_batch(tmp_path / name / "jobs.toml", continue_on_error=True, executor=executor)
        assert _statuses(report) == ["done", "failed", "done", "blocked"]
        assert report.results[1].error == f"{tmp_path / name / 'missing-base'}: no such file or directory (base)"
        summaries.append(_portable(report, tmp_path / name))
    assert summaries[0] == summaries[1]

    shutil.rmtree(tmp_path / "ray")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "jobs.toml").write_text(text)
    report = batch.run_batch(tmp_path / "ray" / "jobs.toml", executor=RayExecutor())
    assert _statuses(report)[1:] == ["failed", "not run", "not run"] and _statuses(report)[0] in ("done", "not run")
    assert isinstance(report.error, CheckpointNotFoundError)


def _killed_on_first_attempt(flag: Path):
    """A step (see batch.Executor) that, on job 2's first attempt only, SIGKILLs its own worker process in the
    middle of writing the adapter: after the marker says running, with a half-written staging directory."""

    def step(job: batch.JobSpec, dependencies):
        if job.index == 2 and not flag.exists():
            import deltakit.io.writer as writer

            real_write, written = writer.SafetensorsWriter.write, []

            def write(self, name, tensor):
                written.append(name)
                if len(written) == 2:
                    flag.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_write(self, name, tensor)

            writer.SafetensorsWriter.write = write  # in this worker process only, which dies with it
        return batch.run_after(job, dependencies)

    return step


def test_a_worker_killed_mid_job_is_retried_into_the_clean_runs_output(
    tmp_path: Path, llama_pair: ModelPair, local_run: tuple[dict, dict]
) -> None:
    (tmp_path / "jobs.toml").write_text(_manifest(llama_pair))
    jobs = batch.load_manifest(tmp_path / "jobs.toml")
    flag = tmp_path / "killed"
    results = RayExecutor().run(jobs, _killed_on_first_attempt(flag), stop_on_failure=True,
                                progress=batch.Progress(len(jobs), enabled=False))
    assert flag.exists()  # the kill happened
    assert [r.status for r in results] == ["done"] * 4
    assert _files(tmp_path) == local_run[0]
    assert _leftovers(tmp_path) == []  # the dead attempt's staging directory is gone


@pytest.mark.slow
def test_the_cli_runs_a_manifest_on_ray(tmp_path: Path, llama_pair: ModelPair, local_run: tuple[dict, dict]) -> None:
    """ray.is_initialized() here: the executor uses the module's cluster and leaves it running."""
    (tmp_path / "jobs.toml").write_text(_manifest(llama_pair))
    main(["batch", str(tmp_path / "jobs.toml"), "--executor", "ray", "-q"])
    assert _files(tmp_path) == local_run[0] and ray.is_initialized()
