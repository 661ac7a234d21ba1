"""The read-ahead helper: order, bound, overlap, errors at their item, and cleanup however the caller leaves."""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest

from deltakit.io.prefetch import prefetched


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "deltakit-prefetch"]


def test_items_come_in_order_whatever_the_timing():
    jitter = random.Random(0)

    def slow(n):
        for i in range(n):
            time.sleep(jitter.random() * 0.002)
            yield i

    with prefetched(slow(200), depth=2) as ahead:
        got = []
        for item in ahead:
            time.sleep(jitter.random() * 0.002)
            got.append(item)
    assert got == list(range(200))
    assert not _prefetch_threads()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_never_more_than_depth_items_beyond_the_one_held(depth):
    produced = []

    def counted():
        for i in range(30):
            produced.append(i)
            yield i

    with prefetched(counted(), depth=depth) as ahead:
        for held, item in enumerate(ahead, start=1):
            time.sleep(0.002)  # give the producer every chance to run ahead
            assert len(produced) <= held + depth, (item, len(produced))
    assert produced == list(range(30))


def test_the_next_item_is_produced_while_the_caller_works_on_this_one():
    started = [threading.Event() for _ in range(3)]

    def items():
        for i in range(3):
            started[i].set()
            yield i

    with prefetched(items(), depth=1) as ahead:
        for item in ahead:
            if item < 2:
                # Without a producer thread this would wait forever: item + 1 is only asked for after this body.
                assert started[item + 1].wait(timeout=30), f"item {item + 1} was not read ahead"


def test_an_error_is_raised_at_its_item_after_every_earlier_one():
    class Corrupt(Exception):
        pass

    def items():
        yield 0
        yield 1
        raise Corrupt("shard 2: tensor x: file ends early")

    got = []
    with pytest.raises(Corrupt, match="tensor x: file ends early"):
        with prefetched(items(), depth=2) as ahead:
            for item in ahead:
                got.append(item)
    assert got == [0, 1]
    assert not _prefetch_threads()


@pytest.mark.parametrize("leave", ["break", "raise"])
def test_leaving_early_stops_the_producer_and_closes_the_items(leave):
    closed = threading.Event()
    produced = []

    def items():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    with pytest.raises(KeyboardInterrupt) if leave == "raise" else contextlib.nullcontext():
        with prefetched(items(), depth=1) as ahead:
            for item in ahead:
                if item == 3:
                    if leave == "break":
                        break
                    raise KeyboardInterrupt
    assert closed.is_set()  # the generator's finally ran (files it holds are closed)
    assert not _prefetch_threads()  # joined: nothing reads on behind the caller
    assert len(produced) <= 6


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        with prefetched([1], depth=0):
            pass

