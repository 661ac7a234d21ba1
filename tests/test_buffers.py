"""BufferPool: read buffers handed out again only once no tensor refers to them, without spending a big one on a
small request."""

from __future__ import annotations

import gc

import torch

from deltakit.io.buffers import BufferPool


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
