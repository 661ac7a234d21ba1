"""Small-block CPU math on one thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the CPU math inside on one thread (nothing changes for another device).

    Loops of ~1 MiB blocks (ΔW, merge) gain nothing from a second thread and lose much to waking it: every torch op
    is a parallel region, and with passive OpenMP threads (``OMP_WAIT_POLICY=PASSIVE``, which the CLI sets) each one
    costs a wake-up. ΔW of 30 bf16 modules took 2.08 s on 2 passive threads, 1.06 s on one and 0.68 s on 2 spinning
    ones; but spinning threads are disastrous as soon as anything else runs (benchmarks/README.md). A 2 GB merge on
    2 busy cores took 41 CPU-seconds of spinning threads, against 0.6 on one thread.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
