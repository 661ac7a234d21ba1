"""What the kernel's page cache holds: memory available to new data, and how much of a file is cached already.

Both decide how a checkpoint is read (:func:`deltakit.io.checkpoint.plan_reads`): a file that is not cached is
read past the cache, one that is cached is read from it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

__all__ = ["available_memory", "cached_fraction"]


def available_memory() -> int:
    """Bytes of memory available to new data now (Linux's MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _libc_mincore():
    try:
        function = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):  # no C library to load (Windows) or no mincore in it
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


_MINCORE = _libc_mincore()


def cached_fraction(path: Path) -> float | None:
    """The fraction of the file's pages that are in the page cache now; None where that cannot be told.

    ``mincore`` of a read-only mapping of the file: mapping faults nothing in and reads nothing, so asking costs one
    page-cache lookup per 4 KiB page (about 15 ms per GB here).
    """
    if _MINCORE is None:
        return None
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                return 1.0
            mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    pages = -(-size // mmap.PAGESIZE)
    resident = np.zeros(pages, dtype=np.uint8)
    try:
        address = np.frombuffer(mapping, dtype=np.uint8)  # a view, to learn the mapping's address
        failed = _MINCORE(address.ctypes.data, size, resident.ctypes.data)
        del address  # the mapping cannot close while a view of it exists
    finally:
        mapping.close()
    if failed:
        return None
    return float(np.count_nonzero(resident & 1)) / pages
