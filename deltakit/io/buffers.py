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

import mmap
import threading
import weakref

import numpy as np
import torch

__all__ = ["BufferPool", "large_buffer"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux
# Below this a buffer is ordinary heap memory: a huge page is faulted in whole, a small tensor would cost 2 MiB.
_LARGE = 8 << 20


def large_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of uint8 memory whose start is aligned to 2 MiB, in transparent huge pages where the kernel gives
    them (its THP mode ``madvise`` gives them only to memory that asks); ordinary memory below 8 MiB.

    An ``O_DIRECT`` transfer is split into requests of at most a device's segment count of physically contiguous
    runs (254 on a virtio disk): about 1 MiB a request into 4 KiB pages, up to the device's largest into huge pages.
    Reading a 13.5 GB checkpoint past the page cache went at 0.71 GB/s into 4 KiB pages and 2.27 GB/s into huge pages
    on this VM's disk (benchmarks/README.md). One fault maps 2 MiB, not 4 KiB.
    """
    if nbytes < _LARGE:
        return np.empty(nbytes, dtype=np.uint8)
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # anonymous: shared would be shmem
    if _MADV_HUGEPAGE is not None:
        try:
            region.madvise(_MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: ordinary pages
            pass
    array = np.frombuffer(region, dtype=np.uint8)  # owns the mapping: unmapped when the last view is gone
    pad = -array.ctypes.data % _HUGE_PAGE
    return array[pad:pad + nbytes]


class BufferPool:
    """Byte buffers handed out as uint8 tensors and taken back when their tensors are gone.

    The pool never holds more arrays than were in use at once: a request that no free array can hold first drops the
    free arrays (all smaller than it), then allocates. So its memory stays at the largest tensors read at once, which
    the reads needed anyway. Requests above ``largest_kept`` bytes get memory of their own, freed with their tensor,
    and drop the free arrays: a checkpoint's few outsized tensors (the embedding and the head) would otherwise keep
    their buffers for the whole run beside the read-ahead of ordinary ones, or find the pool's buffers beside their
    own (on a 7B-shaped extract, 0.3–0.4 GB more at the peak either way).
    """

    def __init__(self, largest_kept: int | None = None) -> None:
        self.largest_kept = largest_kept  # None: no limit
        self._free: dict[int, np.ndarray] = {}  # id → array; the finalizers add to it from any thread
        self._lock = threading.Lock()  # between threads that take

    def __reduce__(self) -> tuple:
        # Sent to another process (a Ray task), a pool arrives empty: its buffers stay here.
        return BufferPool, (self.largest_kept,)

    def take(self, nbytes: int, align: int = 64) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` whose first byte is at an address that is a multiple of ``align``.

        Its contents are whatever an earlier read left there. It is the caller's alone until every tensor over its
        memory is gone.
        """
        kept = self.largest_kept is None or nbytes <= self.largest_kept
        with self._lock:
            array = self._smallest_free(nbytes + align)  # for an outsized request, drops every free array
            if array is None or not kept:
                array = large_buffer(nbytes + align)
        pad = -array.ctypes.data % align
        view = array[pad:pad + nbytes]
        if kept:
            weakref.finalize(view, self._release, array)
        return torch.from_numpy(view)

    def _smallest_free(self, nbytes: int) -> np.ndarray | None:
        # A snapshot first: a finalizer may add to the dict meanwhile (another thread's, or this one's in a collection).
        free = sorted(list(self._free.values()), key=lambda a: a.nbytes)
        for array in free:
            if array.nbytes >= nbytes:
                return self._free.pop(id(array))
        for array in free:  # every free array is too small for this request: drop them rather than keep both
            self._free.pop(id(array), None)
        return None

    def _release(self, array: np.ndarray) -> None:
        self._free[id(array)] = array
