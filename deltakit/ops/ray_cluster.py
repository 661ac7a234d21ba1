"""What every ``--executor ray`` shares: importing Ray (the ``ray`` extra), reaching a cluster, preparing a
worker, and :class:`RayMap`, a pure function run over units of work as Ray tasks.

Only the Ray executors import this module (``batch --executor ray``, ``extract --executor ray``), so the core
commands never need Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

import torch

from deltakit.errors import DeltakitError, DeviceUnavailableError

# Attempts after the first for a task whose worker died (killed, out of memory, its node lost); a task's own
# errors are never retried.
MAX_RETRIES = 3

Shared = TypeVar("Shared")
Unit = TypeVar("Unit")
Result = TypeVar("Result")


def import_ray() -> ModuleType:
    """Ray, or one line saying how to install it.

    Raises:
        DeviceUnavailableError: Ray is not installed.
    """
    try:
        import ray
    except ModuleNotFoundError as e:
        raise DeviceUnavailableError("--executor ray needs Ray, which is not installed; "
                                     "pip install 'deltakit[ray]'") from e
    return ray


@contextmanager
def connected(ray: ModuleType, address: str | None) -> Iterator[bool]:
    """Connected to Ray for the block; yields whether the connection was made here (False: this process had
    already initialized Ray, and it stays so).

    Args:
        address: ``auto`` (the cluster ``ray start`` runs on this machine), ``ray://HOST:PORT`` (Ray Client), or
            a GCS address; None starts Ray on this machine for the block (or uses ``RAY_ADDRESS``).

    Raises:
        DeviceUnavailableError: Ray cannot be started or reached.
    """
    if ray.is_initialized():
        yield False
        return
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"at {address}" if address else "on this machine"
        raise DeviceUnavailableError(f"--executor ray: cannot start or reach Ray {where} ({reason}); start a "
                                     "cluster with `ray start --head`, or check --address") from e
    try:
        yield True
    finally:
        ray.shutdown()  # stops a Ray started here; only disconnects from a cluster


def prepare_worker(ray: ModuleType, num_cpus: float | None) -> None:
    """In a task's worker: its reserved CPUs as torch's math threads, and no GPU unless it reserved one."""
    if not ray.get_gpu_ids():
        # Ray leaves a task that reserved no GPU free to use every GPU of its node, other tasks' included. CUDA is
        # not initialized yet in a fresh worker, so hiding them here is enough: the task runs on the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(max(1, int(num_cpus or 1)))


class RayMap:
    """A pure function over units of work, each unit one Ray task with Ray's default reservation: one CPU (so one
    math thread) and no GPU. The shared argument is put in the object store once; each task returns its unit's
    result to the driver. A dead worker's task is retried (:data:`MAX_RETRIES`), a task's DeltakitError is raised
    here as it was raised there, and whatever is still running when the map ends early is cancelled.
    """

    def __init__(self, address: str | None = None) -> None:
        """Check that Ray is installed; connect only when the map runs.

        Raises:
            DeviceUnavailableError: Ray is not installed.
        """
        self._ray = import_ray()
        self.address = address

    def map(self, function: Callable[[Shared, Unit], Result], shared: Shared, units: Sequence[Unit],
            label: Callable[[Unit], str] = str) -> Iterator[tuple[int, Result]]:
        """``function(shared, unit)`` for every unit, as the tasks complete (any order), with the unit's index.

        ``function`` must be importable by the workers (a module-level function of a package they have).

        Raises:
            DeltakitError: a task's own error, as it was raised.
            DeviceUnavailableError: a unit's worker died more than :data:`MAX_RETRIES` times, or no cluster.
        """
        ray = self._ray
        with connected(ray, self.address):
            task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_unit_task)
            shared_ref = ray.put(shared)
            index = {task.options(name=f"deltakit {label(unit)}").remote(function, shared_ref, unit): i
                     for i, unit in enumerate(units)}
            pending = list(index)
            try:
                while pending:
                    [ready], pending = ray.wait(pending, num_returns=1)
                    yield index[ready], _result(ray, ready, label(units[index[ready]]))
            finally:
                for ref in pending:  # an error, or a consumer that stopped early: leave nothing running
                    ray.cancel(ref, force=True)


def _unit_task(function: Callable[[Shared, Unit], Result], shared: Shared, unit: Unit) -> Result:
    import ray

    prepare_worker(ray, 1)
    return function(shared, unit)


def _result(ray: Any, ref: Any, label: str) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, DeltakitError):
            raise e.cause from None  # the one line it would be locally, not a remote traceback
        raise  # a bug in deltakit: keep its traceback
    except ray.exceptions.RayError as e:
        raise DeviceUnavailableError(f"{label}: the Ray worker running it died {MAX_RETRIES + 1} times "
                                     f"({type(e).__name__}); see the Ray logs of its node") from e
