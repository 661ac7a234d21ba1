"""Manifest-driven, resumable batch runs of deltakit's operations: many extractions and merges, one command.

A manifest is TOML (or JSON with the same structure)::

    [defaults]                  # options for every job whose operation takes them
    rank = 16

    [[jobs]]
    op = "extract"              # a key of OPERATIONS
    finetuned = "org/ft-model"  # ("ft" also works) a path or a Hub id, org/name[@revision]
    base = "org/base-model@main"
    out = "adapters/ft-r16"
    push_repo = "me/ft-r16"     # where --push (or push = true) uploads the result; "{name}" = out's name

    [[jobs]]
    op = "merge"
    base = "org/base-model"
    adapters = ["adapters/ft-r16"]
    out = "merged/ft"

Option names are the operation's keyword arguments (the CLI's long names with ``_`` for ``-``; the CLI's
``rslora`` is accepted for ``use_rslora``, ``for`` for ``target``), checked against the function's signature and
type hints before any job runs. Relative paths are relative to the manifest's folder. A job may read another job's
``out``: jobs run in manifest order, except that a job runs after the jobs whose outputs it reads (a circle is
refused), and a job whose input this run rewrote is redone. No job's ``out`` may be, or lie inside, another's.

A Hub input is pinned when its job starts: the operation gets ``org/name@<commit>`` and the commit is recorded.

Resuming. Each operation writes its output atomically (a staging sibling renamed into place). Beside each
output, a marker ``.<out name>.deltakit-job.json`` records the job (operation, options, and its inputs'
identities: a Hub input's commit, a local input's file names, sizes and mtimes), first as ``running``, then,
once the output is in place, as ``done``. A rerun skips a job whose marker is ``done`` for the same job and
whose output exists; it redoes (replacing the output, cleaning up an interrupted run's staging directory) a job
whose marker is stale or still ``running``. An output with no marker at all is not ours, and is replaced only
with ``overwrite = true``.

The seam for a distributed engine: :func:`load_manifest` turns a manifest into :class:`JobSpec` values (plain
data: the operation's name, its keyword arguments with absolute paths, the push target, the indices of the jobs it
reads from, the resources it reserves on a cluster), each listed after the jobs it reads from, and
:func:`run_after` runs one JobSpec given the results of those jobs: no mutable state, nothing shared between jobs;
everything it needs to decide between skip and redo lives on disk beside the output. An :class:`Executor` runs
them: :class:`LocalExecutor` one at a time here, ``deltakit.ops.batch_ray.RayExecutor`` as Ray tasks on machines
that see the same filesystem (and Hub cache, or network).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import time
import types
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from tqdm import tqdm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no TOML reader in the standard library
    tomllib = None

from deltakit.io import hub
from deltakit.errors import (
    CheckpointNotFoundError,
    DeltakitError,
    HubError,
    InvalidOptionError,
    OutputExistsError,
)
from deltakit.ops.extract import extract
from deltakit.ops.merge import merge, unmerge
from deltakit.math.ranks import parse_rank_pattern
from deltakit.io.writer import write_json

MARKER_FORMAT = 1
Status = Literal["done", "skipped", "failed", "blocked", "not run", "would run", "would skip"]
_SUCCEEDED = ("done", "skipped", "would run", "would skip")  # the statuses a job reading the output may go on from


@dataclass(frozen=True)
class Operation:
    """An operation a job can name: the library function, and which of its arguments name inputs.

    Required options are the function's parameters without a default; every keyword is an option.
    """

    function: Callable[..., object]
    inputs: tuple[str, ...]  # the arguments that name checkpoints or adapters (a path or Hub id, or a list)


OPERATIONS: dict[str, Operation] = {
    "extract": Operation(extract, ("finetuned", "base")),
    "merge": Operation(merge, ("base", "adapters")),
    "unmerge": Operation(unmerge, ("merged", "adapters")),
}

# Arguments batch sets itself: progress is one bar over the jobs; a dry run is the whole batch's.
_BATCH_CONTROLLED = {"progress", "dry_run"}
# Keys of a job (or of the defaults) that belong to batch, not to the operation.
_RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory"}
_BATCH_KEYS = {"push", "push_repo", "private"} | _RESOURCE_KEYS
_ALIASES = {"ft": "finetuned", "rslora": "use_rslora", "for": "target"}
# Options whose manifest form differs from the keyword argument: the CLI's REGEX=RANK strings, and a single
# string where the CLI repeats a flag.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "rank_pattern": lambda value: [parse_rank_pattern(v) for v in value] if isinstance(value, list) else value,
    "include": lambda value: [value] if isinstance(value, str) else value,
    "exclude": lambda value: [value] if isinstance(value, str) else value,
}


@dataclass(frozen=True)
class Resources:
    """What a job reserves on a cluster (``num_cpus``, ``num_gpus``, ``memory`` in a manifest's job or defaults).

    The local executor runs one job at a time with the whole machine and ignores them; the Ray executor reserves
    them for the job's task (None: Ray's default, one CPU and no GPU). A job with a GPU runs its SVD on it.
    """

    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None  # bytes


@dataclass(frozen=True)
class JobSpec:
    """One job, self-contained: everything :func:`run_job` needs.

    Attributes:
        index: 1-based position in the manifest (how messages and the summary name the job).
        op: a key of :data:`OPERATIONS`.
        options: the operation's keyword arguments; paths are absolute, Hub ids as written.
        push_repo: upload the output to this Hub repo after the job succeeds (None: no upload).
        private: create ``push_repo`` private.
        depends_on: indices of the jobs whose output this job reads (they run first).
        resources: what the job reserves on a cluster.
    """

    index: int
    op: str
    options: dict[str, Any]
    push_repo: str | None = None
    private: bool = True
    depends_on: tuple[int, ...] = ()
    resources: Resources = Resources()

    @property
    def out(self) -> Path:
        return Path(self.options["out"])

    @property
    def label(self) -> str:
        return f"job {self.index} ({self.op})"


@dataclass
class JobResult:
    """What became of one job; ``error`` is its one-line message, ``exception`` the error itself."""

    index: int
    op: str
    out: str
    status: Status
    seconds: float = 0.0
    error: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # each input's identity: Hub commit or file stats hash
    pushed_url: str | None = None
    exception: DeltakitError | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["exception"]
        return data


@dataclass
class BatchReport:
    """The outcome of :func:`run_batch`, job by job."""

    manifest: str
    results: list[JobResult]
    dry_run: bool = False
    seconds: float = 0.0
    summary_path: str | None = None

    @property
    def failed(self) -> list[JobResult]:
        """Jobs that failed, or could not run because a job they read from failed (or would fail)."""
        return [r for r in self.results if r.status in ("failed", "blocked")]

    @property
    def error(self) -> DeltakitError | None:
        """The first job's error, for the exit code; None when every job succeeded."""
        return next((r.exception for r in self.results if r.exception is not None), None)

    def to_json(self) -> dict:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {"manifest": self.manifest, "dry_run": self.dry_run, "seconds": round(self.seconds, 3),
                "counts": counts, "jobs": [r.to_json() for r in self.results]}

    def summary_lines(self) -> list[str]:
        """A table (job, op, status, seconds, out), then each error and upload on its own line."""
        rows = [(str(r.index), r.op, r.status, f"{r.seconds:.1f}", r.out) for r in self.results]
        header = ("job", "op", "status", "seconds", "out")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[4]]) for row in [header, *rows]]
        lines += [f"job {r.index}: {r.error}" for r in self.results if r.error]
        lines += [f"job {r.index}: pushed {r.pushed_url}" for r in self.results if r.pushed_url]
        counts = self.to_json()["counts"]
        lines.append(", ".join(f"{n} {status}" for status, n in counts.items())
                     + ("" if self.dry_run else f" in {self.seconds:.1f} s"))
        if self.summary_path:
            lines.append(f"summary: {self.summary_path}")
        return lines


Step = Callable[[JobSpec, Sequence[JobResult]], JobResult]


class Progress:
    """One progress bar over the jobs, on stderr: how many are done (or skipped), running and failed, updated as
    each starts and finishes."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._bar = tqdm(total=total, unit="job", desc="batch", disable=not enabled, dynamic_ncols=True)
        self._running: set[int] = set()
        self._finished: dict[str, int] = {}

    def started(self, job: JobSpec) -> None:
        self._running.add(job.index)
        self._show()

    def finished(self, result: JobResult) -> None:
        self._running.discard(result.index)
        self._finished[result.status] = self._finished.get(result.status, 0) + 1
        self._bar.update()
        self._show()

    def close(self) -> None:
        self._bar.close()

    def _show(self) -> None:
        counts = {**self._finished, "running": len(self._running)}
        self._bar.set_postfix_str(", ".join(f"{n} {status}" for status, n in counts.items()), refresh=True)


class Executor(Protocol):
    """Runs a batch's jobs: each once the jobs it reads from have finished, through ``step`` (the batch's
    :func:`run_after`), given their results."""

    def run(self, jobs: Sequence[JobSpec], step: Step, *, stop_on_failure: bool,
            progress: Progress) -> list[JobResult]:
        """Run every job; after a job fails (with ``stop_on_failure``) the jobs not finished are ``not run``.

        Args:
            jobs: in an order where each job comes after the jobs it reads from (as :func:`load_manifest`
                returns them).
            step: called once per job as ``step(job, results of job.depends_on)``.
            stop_on_failure: stop at the first ``failed`` job.
            progress: told as each job starts and finishes.

        Returns:
            One result per job, in manifest order (by index).
        """
        ...


class LocalExecutor:
    """One job at a time on this machine, in the order given: the default."""

    def run(self, jobs: Sequence[JobSpec], step: Step, *, stop_on_failure: bool,
            progress: Progress) -> list[JobResult]:
        results: dict[int, JobResult] = {}
        stopped = False
        for job in jobs:
            if stopped:
                results[job.index] = JobResult(job.index, job.op, str(job.out), "not run")
            else:
                progress.started(job)
                results[job.index] = step(job, [results[i] for i in job.depends_on])
                stopped = stop_on_failure and results[job.index].status == "failed"
            progress.finished(results[job.index])
        return [results[index] for index in sorted(results)]


def run_batch(
    manifest: str | Path,
    *,
    continue_on_error: bool = False,
    dry_run: bool = False,
    push: bool = False,
    summary: str | Path | None = None,
    progress: bool = False,
    executor: Executor | None = None,
) -> BatchReport:
    """Run a manifest's jobs, skipping those already done, and write a JSON summary.

    Args:
        manifest: the ``.toml`` or ``.json`` manifest.
        continue_on_error: after a job fails, run the others (those that read its output are ``blocked``);
            default: stop at the first failure, leaving the rest ``not run``.
        dry_run: check every job's inputs (local paths, other jobs' outputs, Hub ids from the cache or the Hub)
            and outputs, here, and say which jobs would run or be skipped; write nothing.
        push: upload every job's output to its ``push_repo`` (as ``push = true`` on each job does).
        summary: the JSON summary to write; default ``<manifest stem>.summary.json`` beside the manifest.
        progress: one progress bar over the jobs, on stderr.
        executor: where the jobs run; default :class:`LocalExecutor` (one at a time, here). See
            :class:`deltakit.ops.batch_ray.RayExecutor` for a Ray cluster.

    Returns:
        The :class:`BatchReport`; jobs that failed are in ``report.failed`` (nothing is raised for them).

    Raises:
        InvalidOptionError: the manifest is malformed (unknown operation or option, missing or mistyped value,
            two jobs writing one output or one inside another's, jobs reading each other in a circle, a push
            without a repo); raised before any job runs.
    """
    started = time.perf_counter()
    manifest_path = Path(manifest)
    jobs = load_manifest(manifest_path, push=push)
    if dry_run:
        results = LocalExecutor().run(jobs, functools.partial(run_after, dry_run=True), stop_on_failure=False,
                                      progress=Progress(len(jobs), enabled=False))
        return BatchReport(str(manifest_path), results, dry_run=True, seconds=time.perf_counter() - started)

    bar = Progress(len(jobs), enabled=progress)
    try:
        results = (executor or LocalExecutor()).run(jobs, run_after, stop_on_failure=not continue_on_error,
                                                    progress=bar)
    finally:
        bar.close()
    summary_path = Path(summary) if summary else manifest_path.with_name(f"{manifest_path.stem}.summary.json")
    report = BatchReport(str(manifest_path), results, seconds=time.perf_counter() - started,
                         summary_path=str(summary_path))
    write_json(summary_path, report.to_json())
    return report


def run_after(job: JobSpec, dependencies: Sequence[JobResult], *, dry_run: bool = False) -> JobResult:
    """Run a job once the jobs it reads from have finished: ``blocked`` if one of them did not succeed, else
    :func:`run_job`, told which of its inputs were just rewritten.

    Args:
        job: the job.
        dependencies: the results of the jobs named in ``job.depends_on``.
        dry_run: as :func:`run_job`'s.
    """
    unsuccessful = [d for d in dependencies if d.status not in _SUCCEEDED]
    if unsuccessful:
        which = "would fail" if dry_run else "did not succeed"
        return JobResult(job.index, job.op, str(job.out), "blocked",
                         error=f"needs the output of job {unsuccessful[0].index}, which {which}")
    rewritten = frozenset(d.out for d in dependencies if d.status in ("done", "would run"))
    return run_job(job, rewritten=rewritten, dry_run=dry_run)


def run_job(job: JobSpec, *, rewritten: Collection[str] = (), dry_run: bool = False) -> JobResult:
    """Run one job unless its output is already done for the same inputs and options; then push it if asked.

    Args:
        job: the job; nothing else is read but the files it names (and its marker beside ``out``).
        rewritten: inputs (earlier jobs' outputs) that this batch has just rewritten, or in a dry run would
            write: the job is redone whatever its marker says, and in a dry run they need not exist yet.
        dry_run: decide only, write nothing: ``would run`` or ``would skip``, or ``failed`` on a missing input,
            an unresolvable Hub id or an output batch may not replace.

    Returns:
        Its result: ``done``, ``skipped`` (up to date) or ``failed`` (with the error; nothing is raised for
        a :class:`DeltakitError`).
    """
    started = time.perf_counter()
    result = JobResult(job.index, job.op, str(job.out), "failed")
    try:
        options, result.inputs = _pinned_inputs(job, rewritten if dry_run else ())
        marker_path = _marker_path(job.out)
        marker = _read_marker(marker_path)
        # A marker (of whatever job or state) means the output there is ours to replace.
        if marker is None and job.out.exists() and not options.get("overwrite"):
            raise OutputExistsError("exists and was not written by deltakit batch; set overwrite = true in "
                                    "the job to replace it", path=job.out)
        fingerprint = _fingerprint(job, result.inputs)
        up_to_date = not rewritten and marker is not None and _is_done(marker, fingerprint, job.out)
        if dry_run:
            result.status = "would skip" if up_to_date else "would run"
        elif up_to_date:
            result.status = "skipped"
        else:
            # Markers are written with write_json: a temporary sibling, then os.replace. The operation's
            # staged_output removes what an interrupted run of it left (staging no live process holds).
            write_json(marker_path, {"format": MARKER_FORMAT, "state": "running", "job": fingerprint})
            OPERATIONS[job.op].function(**{**options, "overwrite": True}, progress=False)
            marker = {"format": MARKER_FORMAT, "state": "done", "job": fingerprint,
                      "seconds": round(time.perf_counter() - started, 3)}
            write_json(marker_path, marker)
            result.status = "done"
        if not dry_run and job.push_repo and (marker.get("pushed") or {}).get("repo_id") != job.push_repo:
            result.pushed_url = hub.push(job.out, job.push_repo, private=job.private,
                                         commit_message=f"deltakit {job.op}: {job.out.name}")
            write_json(marker_path, {**marker, "pushed": {"repo_id": job.push_repo, "url": result.pushed_url}})
    except DeltakitError as e:
        result.status, result.error, result.exception = "failed", str(e), e
    result.seconds = time.perf_counter() - started
    return result


def load_manifest(path: str | Path, *, push: bool = False) -> list[JobSpec]:
    """Read and check a manifest: operations, option names and types, required options, outputs, push targets.

    Args:
        path: the ``.toml`` or ``.json`` manifest.
        push: push every job (as ``push = true`` everywhere).

    Returns:
        The jobs in the order they run: the manifest's, except that a job comes after the jobs whose outputs
        it reads. Paths are absolute (relative to the manifest's folder), defaults applied.

    Raises:
        InvalidOptionError: every problem found, in one message.
    """
    manifest_path = Path(path)
    data = _parse(manifest_path)
    problems: list[str] = []
    defaults = _aliased(data.get("defaults", {}), "defaults", problems)
    for key in defaults:
        if key not in _BATCH_KEYS and not any(key in _parameters(op) for op in OPERATIONS.values()):
            problems.append(f"defaults: no operation takes {key!r}{_did_you_mean(key, _all_option_names())}")
    for key in sorted(set(data) - {"defaults", "jobs"}):
        problems.append(f"unknown top-level key {key!r}; a manifest has [defaults] and [[jobs]]")
    entries = data.get("jobs")
    if not isinstance(entries, list) or not entries:
        problems.append("no [[jobs]]")
        entries = []

    root = manifest_path.parent.absolute()
    specs = [_job_spec(index, entry, defaults, root, push, problems) for index, entry in enumerate(entries, start=1)]
    jobs = [job for job in specs if job is not None]
    outs = _outputs(jobs, problems)
    jobs = _in_dependency_order([_with_inputs_located(job, root, outs, problems) for job in jobs], problems)
    if problems:
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise InvalidOptionError(count + "; ".join(problems), path=manifest_path)
    return jobs


def _parse(manifest_path: Path) -> dict:
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("no such manifest", path=manifest_path) from e
    if manifest_path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InvalidOptionError(f"not valid JSON ({e})", path=manifest_path) from e
    elif manifest_path.suffix == ".toml":
        if tomllib is None:
            raise InvalidOptionError("reading TOML needs Python 3.11+; write the manifest as JSON (same structure)",
                                     path=manifest_path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidOptionError(f"not valid TOML ({e})", path=manifest_path) from e
    else:
        raise InvalidOptionError("a manifest is a .toml or .json file", path=manifest_path)
    if not isinstance(data, dict):
        raise InvalidOptionError("not a table of [defaults] and [[jobs]]", path=manifest_path)
    return data


def _job_spec(index: int, entry: object, defaults: dict[str, Any], root: Path, push: bool,
              problems: list[str]) -> JobSpec | None:
    """One manifest entry → a JobSpec whose inputs are still as written (:func:`_with_inputs_located` places them
    once every job's output is known), or None (with the reasons appended to ``problems``)."""
    if not isinstance(entry, dict):
        problems.append(f"job {index}: not a table")
        return None
    op_name = entry.get("op")
    if op_name not in OPERATIONS:
        problems.append(f"job {index}: op {op_name!r} is not one of {', '.join(OPERATIONS)}")
        return None
    label = f"job {index} ({op_name})"
    op = OPERATIONS[op_name]
    parameters = _parameters(op)
    given = _aliased({k: v for k, v in entry.items() if k != "op"}, label, problems)
    merged = {k: v for k, v in defaults.items() if k in parameters or k in _BATCH_KEYS} | given
    options: dict[str, Any] = {}
    for key, value in merged.items():
        if key in _BATCH_KEYS:
            continue
        if key in _BATCH_CONTROLLED:
            problems.append(f"{label}: {key!r} is set by batch, not per job")
        elif key not in parameters:
            problems.append(f"{label}: unknown option {key!r}{_did_you_mean(key, parameters)}")
        else:
            options[key] = value
    missing = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in options]
    if missing:
        problems.append(f"{label}: missing {', '.join(repr(m) for m in missing)}")
        return None
    hints = typing.get_type_hints(op.function)
    for key, value in list(options.items()):
        if key in op.inputs:
            if isinstance(value, str) and _takes_list(hints.get(key)):
                options[key] = value = [value]
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and v for v in values):
                problems.append(f"{label}: {key} = {value!r} is not a path or Hub id (or a list of them where allowed)")
            continue
        try:
            value = _CONVERTERS.get(key, lambda v: v)(value)
        except InvalidOptionError as e:
            problems.append(f"{label}: {key}: {e}")
            continue
        if key in hints and not _conforms(value, hints[key]):
            problems.append(f"{label}: {key} = {value!r} is not {_type_name(hints[key])}")
        options[key] = value
    if not isinstance(options.get("out"), str):
        problems.append(f"{label}: out must be a path")
        return None
    options["out"] = os.path.normpath(root / options["out"])
    push_repo = _push_repo(merged, push, Path(options["out"]).name, label, problems)
    private = merged.get("private", True)
    if not isinstance(private, bool):
        problems.append(f"{label}: private = {private!r} is not true or false")
    return JobSpec(index, op_name, options, push_repo, bool(private), resources=_resources(merged, label, problems))


def _resources(merged: dict[str, Any], label: str, problems: list[str]) -> Resources:
    amounts = {}
    for key in sorted(_RESOURCE_KEYS & set(merged)):
        value = merged[key]
        number = float if key != "memory" else int
        if not _conforms(value, number) or value < 0:
            what = "a whole number of bytes" if key == "memory" else "a number ≥ 0"
            problems.append(f"{label}: {key} = {value!r} is not {what}")
        else:
            amounts[key] = value
    return Resources(**amounts)


def _outputs(jobs: list[JobSpec], problems: list[str]) -> dict[Path, int]:
    """Every job's output → its index; two jobs writing one place, or one inside the other's (the outer job
    would replace, or a redo delete, the inner one's finished output), are refused."""
    outs: dict[Path, int] = {}
    for job in jobs:
        if job.out in outs:
            problems.append(f"{job.label}: out {str(job.out)!r} is also job {outs[job.out]}'s out")
        outs.setdefault(job.out, job.index)
    for out, index in outs.items():
        for parent in out.parents:
            if parent in outs:
                problems.append(f"job {index}: out {str(out)!r} is inside job {outs[parent]}'s out {str(parent)!r}")
    return outs


def _with_inputs_located(job: JobSpec, root: Path, outs: dict[Path, int], problems: list[str]) -> JobSpec:
    """Make local inputs absolute, keep Hub ids, and note which jobs' outputs the job reads."""
    options, depends_on = dict(job.options), set()
    for key in OPERATIONS[job.op].inputs:
        value = options.get(key)
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v for v in values):
            continue  # already reported
        located = []
        for text in values:
            path = Path(os.path.normpath(root / text))
            if outs.get(path) == job.index:
                problems.append(f"{job.label}: {key} {text!r} is its own out")
            elif path in outs:
                depends_on.add(outs[path])
            # An existing path, or a job's output, is local; otherwise a well-formed org/name is a Hub id.
            is_local = path.exists() or path in outs or not hub.is_hub_id(text)
            located.append(str(path) if is_local else text)
        options[key] = located if isinstance(value, list) else located[0]
    return dataclasses.replace(job, options=options, depends_on=tuple(sorted(depends_on)))


def _in_dependency_order(jobs: list[JobSpec], problems: list[str]) -> list[JobSpec]:
    """The jobs in manifest order, except that each comes after the jobs it reads from (so a rerun never reads
    an output that a later job then rewrites); jobs that read each other's outputs in a circle are refused."""
    by_index = {job.index: job for job in jobs}
    waiting_on = {job.index: set(job.depends_on) for job in jobs}
    ordered: list[JobSpec] = []
    while waiting_on:
        ready = [index for index, needs in waiting_on.items() if not needs]
        if not ready:
            circle = dict(waiting_on)
            while unread := set(circle) - set().union(*circle.values()):  # jobs after the circle, not in it
                circle = {index: needs for index, needs in circle.items() if index not in unread}
            problems.append(f"jobs {', '.join(map(str, sorted(circle)))} read each other's outputs in a circle; "
                            "no order can run them")
            break
        first = min(ready)  # manifest order among the jobs that can run next
        ordered.append(by_index[first])
        del waiting_on[first]
        for needs in waiting_on.values():
            needs.discard(first)
    return ordered


def _push_repo(merged: dict[str, Any], push: bool, out_name: str, label: str, problems: list[str]) -> str | None:
    wants_push = push or merged.get("push", False)
    if not isinstance(wants_push, bool):
        problems.append(f"{label}: push = {wants_push!r} is not true or false (name the repo with push_repo)")
        return None
    repo = merged.get("push_repo")
    if not wants_push:
        return None
    if not isinstance(repo, str):
        problems.append(f"{label}: push requested but no push_repo = \"org/name\"")
        return None
    repo = repo.replace("{name}", out_name)
    try:
        if hub.parse_hub_id(repo).revision:
            problems.append(f"{label}: push_repo {repo!r} names a revision; name the repo only")
    except HubError as e:
        problems.append(f"{label}: push_repo: {e}")
    return repo


def _pinned_inputs(job: JobSpec, pending: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's options with each Hub input pinned to its current commit, and every input's identity; an input
    in ``pending`` (an output a dry run would write first) need not exist yet."""
    options = dict(job.options)
    identities: dict[str, Any] = {}
    for key in OPERATIONS[job.op].inputs:
        values = options[key] if isinstance(options[key], list) else [options[key]]
        pinned, ids = [], []
        for value in values:
            if hub.is_hub_id(value):
                ref = hub.parse_hub_id(value)
                commit = hub.resolve_commit(ref)
                pinned.append(f"{ref.repo_id}@{commit}")
                ids.append({"hub": value, "commit": commit})
            elif value in pending:
                pinned.append(value)
                ids.append({"path": value})
            elif not Path(value).exists():
                raise CheckpointNotFoundError(f"no such file or directory ({key})", path=value)
            else:
                pinned.append(value)
                ids.append({"path": value, "files": _local_identity(Path(value))})
        options[key] = pinned if isinstance(options[key], list) else pinned[0]
        identities[key] = ids if isinstance(job.options[key], list) else ids[0]
    return options, identities


def _local_identity(path: Path) -> str:
    """A cheap identity of a local input: a hash of its files' relative names, sizes and mtimes (no content)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def _fingerprint(job: JobSpec, identities: dict[str, Any]) -> dict:
    """What the output depends on, JSON-normalized so that it compares equal to a marker read back."""
    options = {k: v for k, v in job.options.items() if k not in OPERATIONS[job.op].inputs and k != "overwrite"}
    return json.loads(json.dumps({"op": job.op, "options": options, "inputs": identities}, sort_keys=True))


def _is_done(marker: dict, fingerprint: dict, out: Path) -> bool:
    return marker.get("state") == "done" and marker.get("job") == fingerprint and out.is_dir()


def _marker_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.deltakit-job.json")


def _read_marker(marker_path: Path) -> dict | None:
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"state": "unreadable"}  # still ours: the job is redone
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return {"state": "unknown format"}
    return marker


def _aliased(table: object, where: str, problems: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        problems.append(f"{where}: not a table")
        return {}
    result: dict[str, Any] = {}
    written_as: dict[str, str] = {}
    for key, value in table.items():
        name = _ALIASES.get(key, key)
        if name in result:
            problems.append(f"{where}: {written_as[name]!r} and {key!r} name the same option")
        result[name], written_as[name] = value, key
    return result


def _parameters(op: Operation) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(op.function).parameters)


def _all_option_names() -> list[str]:
    return sorted({name for op in OPERATIONS.values() for name in _parameters(op)} | _BATCH_KEYS)


def _did_you_mean(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a manifest value fits a type hint (the forms deltakit's signatures use; others pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _takes_list(hint: Any) -> bool:
    hints = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(typing.get_origin(h) is list for h in hints)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "").replace("pathlib.", "")
