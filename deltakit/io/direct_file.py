"""A new file written front to back past the page cache (``O_DIRECT``), where the file system allows it.

Written through the page cache, every byte is copied by the kernel into a cached page, accounted dirty and written
back later; on a 2-core VM that copy was the largest single item of a 13.5 GB merge (30 % of its cycles in
``copy_folio_from_iter_atomic``), and ``dd`` of 4.3 GB took 7.3 s with fsync against 1.5–1.9 s with ``O_DIRECT``
(benchmarks/README.md). Here the bytes are gathered in an aligned staging buffer (one copy in user space) and each
full buffer goes to the device as it is. ``O_DIRECT`` needs the buffer's address, the file offset and the length
to be multiples of the logical block size: the last, partial block is written padded with zeros and the file is
then truncated to its size.

Where ``O_DIRECT`` is refused (tmpfs before Linux 6.6, some network and FUSE file systems: ``EINVAL`` when it is
set or at the first write) the same bytes are written through the page cache. Either way :meth:`DirectFile.sync`
makes them durable.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deltakit.io.buffers import large_buffer

__all__ = ["DirectFile"]

_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere the page cache is used
# 4 KiB covers logical blocks of 512 B and 4 KiB.
_ALIGN = 4096
# Large requests keep the device busy: 64 MiB writes reached 2.3 GB/s, 8 MiB ones less (dd on the same disk).
_STAGING_BYTES = 64 << 20


class DirectFile:
    """A file created for writing (it must not exist), written in order with :meth:`write`, then :meth:`sync`-ed
    and :meth:`close`-d. Not for concurrent use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        # Set after creating, not at open: a file system that refuses O_DIRECT may do so after creating the file,
        # and opening again with O_EXCL would then fail.
        self._direct = False
        if _O_DIRECT:
            try:
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | _O_DIRECT)
                self._direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    os.close(self._fd)
                    raise
        # Allocated at the first write; only the pages a small file touches are ever faulted in.
        self._staging: np.ndarray | None = None
        self._synced = False
        self._filled = 0  # bytes staged, not yet written
        self._size = 0  # bytes written to the file or staged: the file's size once synced

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append every byte of ``data``; returns how many (all)."""
        source = memoryview(data).cast("B")

        def copy(room: memoryview, done: int) -> int:
            room[:] = source[done:done + len(room)]
            return len(room)

        return self._stage(len(source), copy)

    def copy_from(self, source: int, offset: int, count: int) -> int:
        """Append up to ``count`` bytes of the open file ``source`` from ``offset``, read straight into the staging
        buffer; returns how many (fewer only where ``source`` ends)."""
        return self._stage(count, lambda room, done: os.preadv(source, [room], offset + done))

    def _stage(self, count: int, fill: Callable[[memoryview, int], int]) -> int:
        """Append ``count`` bytes, ``fill(room, done)`` putting the next ones into ``room`` of the staging buffer
        and returning how many (0: no more); each full buffer is written out. Returns how many were appended."""
        if self._synced:
            raise ValueError(f"{self.path}: written after sync")
        staging = memoryview(self._staging_buffer())
        done = 0
        while done < count:
            filled = fill(staging[self._filled:self._filled + min(count - done, len(staging) - self._filled)], done)
            if not filled:
                break
            self._filled += filled
            done += filled
            if self._filled == len(staging):
                self._write_staged(len(staging))
        self._size += done
        return done

    def sync(self) -> None:
        """Write what is staged and make the whole file durable (fsync); nothing may be written after."""
        self._synced = True
        if self._filled:
            tail = self._filled
            if self._direct:
                padded = -(-tail // _ALIGN) * _ALIGN
                self._staging[tail:padded] = 0
                self._write_staged(padded)
                os.ftruncate(self._fd, self._size)
            else:
                self._write_staged(tail)
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (once); what :meth:`sync` did not write is lost."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._staging = None
            os.close(fd)

    def _staging_buffer(self) -> np.ndarray:
        if self._staging is None:
            self._staging = large_buffer(_STAGING_BYTES)  # 2 MiB-aligned: O_DIRECT's alignment, and large requests
        return self._staging

    def _write_staged(self, length: int) -> None:
        """Write the first ``length`` staged bytes (a multiple of the alignment with O_DIRECT) at the end."""
        view = memoryview(self._staging)[:length]
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._stop_direct()  # refused at the first write by some file systems: the same bytes, cached
                continue
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            view = view[written:]
        self._filled = 0

    def _stop_direct(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
        self._direct = False
