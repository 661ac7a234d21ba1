"""Run a batch on a Ray cluster: each job one Ray task, the jobs it reads from its task's arguments.

The only module that imports ray (the ``ray`` extra); ``deltakit batch --executor ray`` imports it, nothing else
does. Each task runs the same :func:`deltakit.ops.batch.run_after` as the local executor, so markers, resume,
skips and errors are the same; what changes is where and how many at once:

- A job's task takes the tasks of the jobs it reads from as arguments: Ray starts it once they have finished,
  and runs independent jobs in parallel, as the cluster's resources allow (a job reserves its manifest's
  ``num_cpus``, ``num_gpus`` and ``memory``; by default one CPU).
- Each job runs in a fresh worker process (``max_calls=1``): it sees only the GPUs Ray reserved for it (a job
  with none runs its math on the CPU, a job with one its SVD on that GPU), uses as many math threads as CPUs it
  reserved, and gives its memory back to the node when it ends.
- A worker that dies mid-job (killed, out of memory, its node lost) is retried by Ray, up to
  :data:`MAX_RETRIES` times. The retry starts clean: the dead attempt's marker says ``running`` and its staging
  directory (never the output, which is renamed in only when complete) is removed by the operation's
  ``staged_output``. A job that fails for its own reasons returns a ``failed`` result; nothing raises, so
  nothing is retried.
- Every path in the manifest must mean the same file on this machine and on every worker: shared storage
  mounted at the same path on all nodes, or Hub ids as inputs (each worker reads them through its own Hub
  cache) and ``push`` for the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deltakit.errors import DeviceUnavailableError, InvalidOptionError
from deltakit.ops.batch import JobResult, JobSpec, Progress, Step
from deltakit.ops.ray_cluster import MAX_RETRIES, connected, import_ray, prepare_worker


class RayExecutor:
    """Each job one Ray task (see the module's docstring); an :class:`deltakit.ops.batch.Executor`."""

    def __init__(self, address: str | None = None) -> None:
        """Check that Ray is installed; connect only when the batch runs.

        Args:
            address: the cluster: ``auto`` (the one ``ray start`` runs on this machine), ``ray://HOST:PORT``
                (Ray Client), or a GCS address; None starts Ray on this machine for the run (or uses
                ``RAY_ADDRESS``, or the Ray this process already initialized).

        Raises:
            DeviceUnavailableError: Ray is not installed.
        """
        self._ray = import_ray()
        self.address = address

    def run(self, jobs: Sequence[JobSpec], step: Step, *, stop_on_failure: bool,
            progress: Progress) -> list[JobResult]:
        with connected(self._ray, self.address) as connected_here:
            if connected_here and self.address is None:
                _refuse_what_this_machine_lacks(jobs, self._ray.cluster_resources())
            return _run_tasks(self._ray, jobs, step, stop_on_failure, progress)


def _run_tasks(ray: Any, jobs: Sequence[JobSpec], step: Step, stop_on_failure: bool,
               progress: Progress) -> list[JobResult]:
    task = ray.remote(max_calls=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_job_task)
    refs: dict[int, Any] = {}
    for job in jobs:  # each after the jobs it reads from, whose refs it takes
        refs[job.index] = task.options(**_task_options(job)).remote(step, job, *(refs[i] for i in job.depends_on))
    by_ref = {ref: job for job, ref in zip(jobs, refs.values())}
    results: dict[int, JobResult] = {}
    started: set[int] = set()
    pending = list(refs.values())
    try:
        while True:
            # "Running" from here: a job whose inputs are ready is running, or waiting for a free worker.
            for job in jobs:
                if job.index not in started and all(i in results for i in job.depends_on):
                    started.add(job.index)
                    progress.started(job)
            if not pending:
                break
            [ready], pending = ray.wait(pending, num_returns=1)
            job = by_ref[ready]
            results[job.index] = _result(ray, ready, job, results)
            progress.finished(results[job.index])
            if stop_on_failure and results[job.index].status == "failed":
                for ref in pending:  # not started: dropped; running: interrupted (staging removed) → "not run"
                    ray.cancel(ref)
                stop_on_failure = False
    finally:
        for ref in pending:  # a bug in a job, or Ctrl-C here: leave nothing running for a driver that is gone
            ray.cancel(ref, force=True)
    return [results[index] for index in sorted(results)]


def _result(ray: Any, ref: Any, job: JobSpec, results: dict[int, JobResult]) -> JobResult:
    """The job's result, or what its task's failure means for it."""
    try:
        return ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return JobResult(job.index, job.op, str(job.out), "not run")
    except ray.exceptions.RayError as e:
        # A job whose input task failed outright gets that failure as its own, without running.
        unsuccessful = [i for i in job.depends_on if i not in results or results[i].status not in ("done", "skipped")]
        if unsuccessful:
            return JobResult(job.index, job.op, str(job.out), "blocked",
                             error=f"needs the output of job {unsuccessful[0]}, which did not succeed")
        if isinstance(e, ray.exceptions.RayTaskError):
            raise  # a bug in deltakit: keep its traceback, as the local executor does
        error = DeviceUnavailableError(f"the Ray worker running it died {MAX_RETRIES + 1} times "
                                       f"({type(e).__name__}); see the Ray logs of its node", path=job.out)
        return JobResult(job.index, job.op, str(job.out), "failed", error=str(error), exception=error)


def _task_options(job: JobSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"name": f"deltakit {job.label}"}
    for key, value in vars(job.resources).items():
        if value is not None:
            options[key] = value
    return options


def _job_task(step: Step, job: JobSpec, *dependencies: JobResult) -> JobResult:
    """One job, in a worker process of its own."""
    import ray

    prepare_worker(ray, job.resources.num_cpus)
    return step(job, dependencies)


def _refuse_what_this_machine_lacks(jobs: Sequence[JobSpec], available: dict[str, float]) -> None:
    """On a Ray started here (no autoscaler), a job asking for more than the machine has would wait for ever."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    for job in jobs:
        for key, value in vars(job.resources).items():
            if value is not None and value > available.get(names[key], 0):
                raise InvalidOptionError(f"{job.label}: {key} = {value} but this machine's Ray has "
                                         f"{available.get(names[key], 0):g}; lower it, or run on a cluster "
                                         "with --address")
