"""Read buffers reused from one tensor to the next, so that reading a checkpoint does not fault in fresh memory.

A fresh tensor per read costs the kernel a page fault and a zero-fill for every 4 KiB of it, and the allocator
returns the memory (``munmap``) when the tensor dies, so the next read pays again. Reading the two 13.5 GB sides of a
7B-shaped pair into fresh tensors took 15.4 s of kernel time on 2 cores; into reused memory, 1.0 s
(benchmarks/README.md, bench_throughput). On a box whose cores also run the SVDs, that kernel time is taken from the
math.

A buffer is handed out again only once nothing refers to it: each hand-out is a numpy view of the pool's array that
the returned tensor's storage owns (``torch.from_numpy``), and a ``weakref.finalize`` on that view returns the array
to the pool when the storage is freed, that is when the last tensor or view of any kind over it is gone. A caller
that keeps a tensor read from a checkpoint keeps its buffer; nothing it holds can be overwritten.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

__all__ = ["BufferPool"]

# A free array serves a request of at least 1/_MOST_WASTE of its size.
_MOST_WASTE = 2


class BufferPool:
    """Byte buffers handed out as uint8 tensors and taken back when their tensors are gone.

    A request takes the smallest free array that holds it, unless that wastes more than half of the array: a
    buffer the size of the embedding is kept for the head rather than spent on a projection (on a 7B-shaped
    extract, using any larger array raised peak memory by 0.4 GB when the head came and found it busy). A request
    no free array serves first drops the free arrays smaller than it, then allocates. So the pool holds the
    arrays in use at once, plus at most a few free ones, each more than twice the size of a later request.
    """

    def __init__(self) -> None:
        self._free: dict[int, np.ndarray] = {}  # id → array; the finalizers add to it from any thread
        self._lock = threading.Lock()  # between threads that take

    def __reduce__(self) -> tuple:
        return BufferPool, ()  # sent to another process (a Ray task), a pool arrives empty: its buffers stay here

    def take(self, nbytes: int, align: int = 64) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` whose first byte is at an address that is a multiple of ``align``.

        Its contents are whatever an earlier read left there. It is the caller's alone until every tensor over its
        memory is gone.
        """
        with self._lock:
            array = self._smallest_free(nbytes + align)
            if array is None:
                array = np.empty(nbytes + align, dtype=np.uint8)
        pad = -array.ctypes.data % align
        view = array[pad:pad + nbytes]
        weakref.finalize(view, self._release, array)
        return torch.from_numpy(view)

    def _smallest_free(self, nbytes: int) -> np.ndarray | None:
        free = sorted(self._free.values(), key=lambda a: a.nbytes)
        fitting = next((array for array in free if array.nbytes >= nbytes), None)
        if fitting is not None and fitting.nbytes <= _MOST_WASTE * nbytes:
            return self._free.pop(id(fitting))
        for array in free:  # too small for this request: dropped rather than kept beside a new one
            if array.nbytes < nbytes:
                self._free.pop(id(array), None)
        return None

    def _release(self, array: np.ndarray) -> None:
        self._free[id(array)] = array
