"""Prepare the next item on a background thread while the caller works on the current one.

Used by training (load, move and augment the next batch during a step) and by the projection pipeline (decode and
letterbox the next films while the current ones are projected and drawn): torch ops and image decoders release the
GIL, so the preparation hides behind the caller's compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["prefetched"]

T, U = TypeVar("T"), TypeVar("U")


def prefetched(items: Iterable[T], prepare: Callable[[T], U], background: bool = True) -> Iterator[U]:
    """``prepare(item)`` for each item of ``items``, in order.

    With ``background`` the next item is fetched and prepared on a thread while the caller works on the current
    one, so the preparation hides behind the caller's work. At most one prepared item waits, and ``next(items)``
    and ``prepare`` are called in the same order as without it, so every random number ``prepare`` draws from its
    own generator is the same.
    """
    it = iter(items)
    if not background:
        for item in it:
            yield prepare(item)
        return
    done = object()

    def fetch():
        item = next(it, done)
        return done if item is done else prepare(item)

    with ThreadPoolExecutor(1, thread_name_prefix="xraydeconv-batches") as pool:
        pending = pool.submit(fetch)
        while (ready := pending.result()) is not done:
            pending = pool.submit(fetch)
            yield ready
