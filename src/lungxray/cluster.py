"""Work spread over Ray workers, for jobs larger than one machine: Ray Data maps batches of file
names through actors that each load a model once, and streams their results back.

    cluster = RayCluster()                      # a Ray instance of this machine's, started and stopped here
    cluster = RayCluster("ray://head:10001")    # or an existing cluster ("auto": the one this node belongs to)

Two jobs use it: archive scoring (`lungxray.infer.batch`, `predict --engine ray`) and backbone feature
extraction into the feature cache (`train --extract-engine ray`). Workers read the images themselves
and need neither TensorFlow nor the cache: they get a LiteRT model's path and file names, and send
back rows. On a cluster, model and images must be on storage every node sees (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np

from lungxray.data.acquisition import read_views, view_names
from lungxray.data.images import read_bytes
from lungxray.errors import ConfigError, ImageError
from lungxray.io import file_hash
from lungxray.model.runtimes import InterpreterPool


@dataclasses.dataclass
class RayCluster:
    """Where Ray work runs: `address` None starts a local instance; `workers` defaults to every CPU."""

    address: str | None = None
    workers: int | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[int]:
        """Connected to Ray for the block; yields how many workers to use."""
        import ray

        started_here = not ray.is_initialized()
        try:
            ray.init(address=self.address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        except ConnectionError as error:
            raise ConfigError(f"cannot reach the Ray cluster at --address {self.address}: {error}") from None
        try:
            yield self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        finally:
            if started_here:
                ray.shutdown()

    def map_files(self, files: list[str], worker: type, batch_size: int, **worker_arguments) -> Iterator[dict]:
        """Each batch of `files` through a `worker(**worker_arguments)` actor (one core each), its
        results yielded as NumPy batches as they come."""
        import ray

        if not files:
            return
        with self.session() as workers:
            results = ray.data.from_items([{"file": f} for f in files]).map_batches(
                worker, batch_size=batch_size, concurrency=workers, num_cpus=1, batch_format="numpy",
                fn_constructor_kwargs=worker_arguments)
            yield from results.iter_batches(batch_size=None, batch_format="numpy")


class BackboneWorker:
    """A Ray actor computing backbone features, as `features.FeatureExtractor` does in one process:
    the same reading, the same LiteRT model, one image (and its other training views) at a time."""

    def __init__(self, model_path: str, image_size: int, interpolation: str, intensity: str, views: int):
        self.pool = InterpreterPool(Path(model_path), size=1)
        self.image_size, self.interpolation, self.intensity = image_size, interpolation, intensity
        self.views = view_names(views)

    def __call__(self, batch: dict) -> dict:
        files = [str(f) for f in batch["file"]]
        dim = self.pool.output_shapes[0][0]
        out = {"sha256": np.full(len(files), None, object),
               **{view: np.full((len(files), dim), np.nan, np.float32) for view in self.views}}
        for row, name in enumerate(files):
            try:
                data = read_bytes(name, name)
                content_hash = file_hash(data)
                images = read_views(data, list(range(len(self.views))), content_hash, self.image_size,
                                    self.interpolation, name, self.intensity)
            except ImageError:
                continue  # the extraction that reads the cache afterwards reports it, with the others
            out["sha256"][row] = content_hash
            for view, vector in zip(self.views, self.pool(images)[0]):
                out[view][row] = vector
        return out
