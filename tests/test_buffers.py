"""BufferPool: read buffers handed out again only once no tensor refers to them, without spending a big one on a
small request."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from deltakit.io.buffers import BufferPool, large_buffer


def _address(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def test_a_buffer_is_reused_once_every_view_of_it_is_gone():
    pool = BufferPool()
    first = pool.take(1 << 20)
    where = _address(first)
    kept = first[16:].view(torch.float32)  # a view of a view keeps the memory after the first tensor is gone
    del first
    gc.collect()
    second = pool.take(1 << 20)
    assert _address(second) != where
    del kept, second
    gc.collect()
    assert _address(pool.take(1 << 20)) == where


def test_a_request_above_the_largest_kept_gets_memory_of_its_own():
    """An outsized tensor's buffer is freed with it, not kept for the rest of the run (the allocator may still hand
    the same pages back, so the pool's free list is what is checked); its request drops the free buffers too."""
    pool = BufferPool(largest_kept=1 << 20)
    small = pool.take(1 << 20)
    del small
    gc.collect()
    assert len(pool._free) == 1
    big = pool.take(4 << 20)
    assert len(pool._free) == 0  # dropped when the outsized request came
    del big
    gc.collect()
    assert len(pool._free) == 0  # and the outsized buffer is not kept


def test_buffers_are_aligned_as_asked():
    pool = BufferPool()
    for size in (1, 4095, 4097, 1 << 20):
        for align in (64, 4096):
            assert _address(pool.take(size, align=align)) % align == 0


def test_no_buffer_is_held_twice_under_concurrent_use():
    """Threads taking, filling, checking and dropping buffers at once (as the read-ahead thread and the fitting
    thread do): no buffer is handed out while another holder still sees it."""
    import random
    import threading

    pool = BufferPool()
    failures = []

    def use(seed: int) -> None:
        rng = random.Random(seed)
        held = []
        for step in range(300):
            value = (seed * 31 + step) % 251
            tensor = pool.take(rng.choice([4096, 8192, 20000]))
            tensor.fill_(value)
            held.append((tensor, value))
            if len(held) > 3 or rng.random() < 0.5:
                old, expected = held.pop(rng.randrange(len(held)))
                if not bool((old == expected).all()):
                    failures.append((seed, step))

    threads = [threading.Thread(target=use, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def _rollup_kib(field: str) -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in smaps_rollup")


def test_a_large_buffer_is_private_memory_aligned_to_a_huge_page_and_in_huge_pages_where_the_kernel_allows():
    """Huge pages make an O_DIRECT transfer a few large requests instead of one per 4 KiB page. The memory is
    private (a shared mapping would be shmem, which takes no huge pages on most systems, and is not RssAnon)."""
    small = large_buffer(1000)
    assert small.nbytes == 1000 and small.flags.writeable
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("no /proc/self/smaps_rollup here")
    anon, huge = _rollup_kib("Anonymous"), _rollup_kib("AnonHugePages")
    size = 64 << 20
    buffer = large_buffer(size)
    buffer[:] = 1  # touch every page
    assert buffer.nbytes == size and buffer.ctypes.data % (2 << 20) == 0
    assert _rollup_kib("Anonymous") - anon >= size // 1024
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off here")
    defrag = Path("/sys/kernel/mm/transparent_hugepage/defrag")
    if not defrag.exists() or not any(f"[{mode}]" in defrag.read_text() for mode in ("always", "madvise",
                                                                                        "defer+madvise")):
        pytest.skip("the kernel does not compact memory for huge pages that are asked for: it may have none at hand")
    assert _rollup_kib("AnonHugePages") - huge >= size // 1024 // 2  # most of it: the kernel may be short of them
    del buffer
