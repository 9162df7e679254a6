"""Ordered parallel map with a bounded look-ahead, so memory stays flat on any dataset size."""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                ahead: int = 128) -> Iterator[R]:
    """Like `map(fn, items)` run in threads, yielding in order, with at most `ahead` results pending.

    Pillow and hashlib release the GIL, so decoding and hashing scale across threads.
    """
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
