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


def test_a_big_free_buffer_is_kept_for_a_big_request_not_spent_on_a_small_one():
    pool = BufferPool()
    big = pool.take(4 << 20)
    big_at = _address(big)
    del big
    small = pool.take(1 << 20)  # a quarter of the free one: a buffer of its own
    assert not big_at <= _address(small) < big_at + (4 << 20)
    half = pool.take(3 << 20)  # three quarters: served by the big one
    assert _address(half) == big_at
    del small, half


def test_buffers_are_aligned_as_asked():
    pool = BufferPool()
    for size in (1, 4095, 4097, 1 << 20):
        for align in (64, 4096):
            assert _address(pool.take(size, align=align)) % align == 0
