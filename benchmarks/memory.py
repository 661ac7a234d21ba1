"""Peak memory of a block of code, for benchmarks: anonymous RSS sampled by a thread, VmHWM, CUDA peak.

RssAnon (heap and anonymous mmaps: tensors) is what a streaming tool must bound; VmRSS also counts
file-backed pages, such as a memory-mapped safetensors file, which the kernel can drop at will.

    with PeakMemory() as peak:
        work()
    print(peak.anon_delta_bytes, peak.hwm_bytes, peak.cuda_peak_bytes)

On entry the glibc heap is trimmed (malloc_trim), so blocks freed earlier and kept by the allocator do not
hide the peak of the measured code. Linux only (reads /proc/self/status). Sampling can miss a spike shorter than the interval; VmHWM cannot,
but it counts file-backed pages too and can only be reset where /proc/self/clear_refs is writable
(``hwm_reset`` says whether it was; if not, VmHWM is the process's peak since it started).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")


def read_status_bytes(field: str) -> int:
    """One ``kB`` field of /proc/self/status (RssAnon, VmRSS, VmHWM, ...), in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{_STATUS}: no field {field}")


def _trim_heap() -> None:
    # glibc keeps freed blocks (up to its 32 MiB dynamic mmap threshold) resident and reuses them, so
    # without a trim, memory freed before entry hides the peak of what runs inside.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager measuring peak anonymous RSS, VmHWM and (on CUDA) peak allocated memory.

    Attributes (valid after exit):
        anon_start_bytes: RssAnon on entry.
        anon_peak_bytes: largest RssAnon seen (sampled every ``interval_s`` seconds, and at entry and exit).
        hwm_bytes: VmHWM on exit (peak VmRSS since entry when ``hwm_reset``, else since process start).
        hwm_reset: whether VmHWM could be reset on entry.
        cuda_peak_bytes: torch.cuda.max_memory_allocated() on exit, or None without CUDA.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.anon_start_bytes = 0
        self.anon_peak_bytes = 0
        self.hwm_bytes = 0
        self.hwm_reset = False
        self.cuda_peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def anon_delta_bytes(self) -> int:
        """Peak RssAnon above its value on entry."""
        return self.anon_peak_bytes - self.anon_start_bytes

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        _trim_heap()
        self.hwm_reset = _reset_hwm()
        self.anon_start_bytes = self.anon_peak_bytes = read_status_bytes("RssAnon")
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.anon_peak_bytes = max(self.anon_peak_bytes, read_status_bytes("RssAnon"))
        self.hwm_bytes = read_status_bytes("VmHWM")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.anon_peak_bytes = max(self.anon_peak_bytes, read_status_bytes("RssAnon"))
