"""Read ahead on a background thread: the next items of an iterable are produced while the caller works on one.

Reading a tensor (file reads, the kernel's copy from the page cache) and the math on the previous one (matmul,
SVD) both release the GIL, so one thread reading ahead overlaps the two. The read-ahead is bounded: at most
``depth`` items exist beyond the one the caller holds, so memory stays a few tensors. The items come out in the
iterable's order whatever the timing, and an error raised while producing one is raised to the caller at that
item, after every earlier one: the caller sees what it would see reading in line.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_END = object()


@contextmanager
def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[Iterator[T]]:
    """Iterate over ``items`` with up to ``depth`` of them produced ahead on a background thread.

    Use as ``with prefetched(reads) as ahead: for item in ahead: ...``. Leaving the block (the end, ``break``, an
    exception, Ctrl-C) stops the producer after the item it is producing, closes ``items`` (a generator's
    ``finally`` blocks run) and joins the thread, so nothing reads on behind the caller's back.

    Args:
        items: the iterable; it is iterated on the background thread only.
        depth: how many items may be produced beyond the one the caller holds (≥ 1).
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    produced: queue.SimpleQueue = queue.SimpleQueue()
    room = threading.Semaphore(depth)  # one permit per item that may exist ahead of the caller's
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(items)
        try:
            while room.acquire() and not stop.is_set():
                try:
                    produced.put((next(iterator), None))
                except StopIteration:
                    produced.put((_END, None))
                    return
        except BaseException as error:  # noqa: BLE001 — handed to the caller, who raises it at this item
            produced.put((_END, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[T]:
        while True:
            item, error = produced.get()
            if error is not None:
                raise error
            if item is _END:
                return
            room.release()  # the caller now holds this item: the producer may start the next
            yield item
            del item  # the caller's reference is the only one left

    thread = threading.Thread(target=produce, name="deltakit-prefetch", daemon=True)
    thread.start()
    ahead = consume()
    try:
        yield ahead
    finally:
        stop.set()
        room.release()  # wakes a producer waiting for room
        ahead.close()
        thread.join()
