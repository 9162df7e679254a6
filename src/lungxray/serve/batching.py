"""Dynamic batching: images from requests that arrive together are predicted in one call, as
TensorFlow Serving and Triton do. A worker takes what is waiting, and while more images are on their
way (admitted, still being decoded) it waits for them, up to `max_batch` images or `max_wait`
seconds; with nothing else on its way it goes at once, so a lone request waits for nobody.

With `max_batch=1` it is a two-stage pipeline: the server's threads decode while these run the
network, which on 2 cores served more than decoding and predicting in one thread."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time

import numpy as np


class Batcher:
    def __init__(self, predict, max_batch: int, max_wait: float, workers: int, on_batch=None):
        """`predict(images) -> Predictions` for an (n, H, W, 3) array; `workers` calls may run at once
        (one per core: the LiteRT pool holds one interpreter per core); `on_batch(n)` hears each size."""
        self.predict, self.max_batch, self.max_wait, self.on_batch = predict, max_batch, max_wait, on_batch
        self.waiting: collections.deque = collections.deque()  # (image, future)
        self.coming = 0
        self.condition = threading.Condition()
        for number in range(workers):
            threading.Thread(target=self._work, name=f"lungxray-batcher-{number}", daemon=True).start()

    @contextlib.contextmanager
    def expecting(self):
        """Around the decoding of an image that will be submitted: workers wait for it."""
        with self.condition:
            self.coming += 1
        try:
            yield
        finally:
            with self.condition:
                self.coming -= 1
                self.condition.notify_all()

    def submit(self, image: np.ndarray) -> concurrent.futures.Future:
        """A future for (Predictions of the batch, this image's row in it)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.condition:
            self.waiting.append((image, future))
            self.condition.notify_all()
        return future

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                predictions = self.predict(np.stack([image for image, _ in batch]))
            except BaseException as error:  # each caller hears of it; the worker lives on
                for _, future in batch:
                    future.set_exception(error)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for row, (_, future) in enumerate(batch):
                future.set_result((predictions, row))

    def _next_batch(self) -> list:
        with self.condition:
            while not self.waiting:
                self.condition.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self.waiting) < self.max_batch and self.coming > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.condition.wait(remaining)
            return [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
