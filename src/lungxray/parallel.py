"""Ordered parallel map with a bounded look-ahead, so memory stays flat on any dataset size; and
progress reporting that suits where the output goes."""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

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


def progress(items: Iterable[T], total: int, desc: str | None, unit: str = "img") -> Iterator[T]:
    """`items`, with a progress bar on a terminal; elsewhere (CI logs, nohup, files), where a bar's
    carriage returns pile up into one enormous line, a log line at every tenth and at the end.
    `desc` None: no progress shown (the caller shows its own)."""
    if desc is None:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    started, step = time.perf_counter(), max(1, total // 10)
    done = 0
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0 and done < total:
            logging.getLogger("lungxray").info("%s: %d/%d %s", desc, done, total, unit)
    logging.getLogger("lungxray").info("%s: %d %s in %.1f s", desc, done, unit, time.perf_counter() - started)
