"""Backbone features: the runtime that computes them and the on-disk cache that keeps them.

With a frozen backbone and horizontal flips as the only augmentation, every training image has
exactly two possible backbone outputs, its own and its mirror image's (and one more per training
view, `lungxray.data.acquisition`). They are computed once and stored under a key made of everything
that determines them: the backbone's weight values, the input size and resize method, the runtime,
and the file's content hash and view.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lungxray.config import conversions_dir, default_cache_dir
from lungxray.data.acquisition import read_views, view_names
from lungxray.errors import ConfigError, ImageError
from lungxray.io import atomic_path, file_hash, write_json
from lungxray.model.network import converted, model_fingerprint
from lungxray.parallel import bounded_map, progress
from lungxray.model.runtimes import InterpreterPool, as_batch, litert_available

FORMAT_VERSION = 1  # bump when the meaning of a stored feature changes
SHARD_SIZE = 2048


class ModelRuntime:
    """Runs a frozen Keras model (the backbone, on RGB images in [0, 255]; the lung segmenter) on
    batches of images. `keras` is the reference; `litert` (LiteRT with XNNPACK) computes the same
    function ~4x faster on CPU, within ~1e-4 (tests check), on a pool of interpreters
    (`lungxray.model.runtimes.InterpreterPool`) that any thread may borrow from."""

    def __init__(self, model: keras.Model, runtime: str = "auto", cache_dir: Path | None = None):
        if runtime == "auto":
            runtime = "litert" if litert_available() else "keras"
        self.model, self.name = model, runtime
        self.fingerprint = model_fingerprint(model)
        self.input_shape, self.output_shape = tuple(model.input_shape[1:]), tuple(model.output_shape[1:])
        # A traced call: an eager one dispatches every layer from Python, ~15x slower on small images.
        # Not predict_on_batch, which under a multi-worker strategy would gather across workers.
        self._traced = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
        if runtime == "litert":
            self.litert_path = converted(model, "litert", conversions_dir(Path(cache_dir or default_cache_dir())),
                                         fingerprint=self.fingerprint)
            self._pool = InterpreterPool(self.litert_path)

    def __call__(self, images) -> np.ndarray:
        """Outputs (n, *output_shape) of images: an (n, H, W, C) array or a sequence of (H, W, C) arrays."""
        if self.name == "keras":
            return np.asarray(self._traced(as_batch(images)), dtype=np.float32)
        return self._pool(images)[0]


def file_hashes(paths: list[Path]) -> list[str | None]:
    """Content hash of each file (None where it cannot be read), read in threads."""

    def one(path: Path) -> str | None:
        try:
            return file_hash(Path(path).read_bytes())
        except OSError:
            return None

    return list(bounded_map(one, paths))


class FeatureCache:
    """Features on disk, one folder per key, written in shards that are each moved into place whole.

    Two runs sharing a folder at worst compute the same features twice; an interrupted extraction
    keeps every finished shard. A shard that does not belong to the key or cannot be read is
    deleted and recomputed, never trusted.
    """

    def __init__(self, root: Path, runtime: ModelRuntime, interpolation: str, intensity: str = "none",
                 crop_fingerprint: str | None = None):
        self.meta = {
            "format": FORMAT_VERSION,
            "backbone_fingerprint": runtime.fingerprint,
            "input_shape": list(runtime.input_shape),
            "interpolation": interpolation,
            "runtime": runtime.name,
        }
        # Added only when used, so that caches made before these options existed keep their keys.
        if intensity != "none":
            self.meta["intensity"] = intensity
        if crop_fingerprint:
            self.meta["crop"] = crop_fingerprint
        self.key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root) / "features" / self.key
        self.folder.mkdir(parents=True, exist_ok=True)
        # Shards a killed process was writing; an hour old, so that no live writer's is touched.
        for leftover in self.folder.glob(".tmp-*"):
            if time.time() - leftover.stat().st_mtime > 3600:
                leftover.unlink(missing_ok=True)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            write_json(meta_path, self.meta)
        self.entries: dict[tuple[str, str], np.ndarray] = {}
        self._load()

    def _load(self) -> None:
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as stored:
                    if str(stored["key"]) != self.key:
                        raise ValueError("written for another key")
                    for name, view, vector in zip(stored["hashes"], stored["views"], stored["features"]):
                        self.entries[(str(name), str(view))] = vector
            except Exception:
                shard.unlink(missing_ok=True)

    def get(self, content_hash: str, view: str) -> np.ndarray | None:
        return self.entries.get((content_hash, view))

    def add(self, items: list[tuple[str, str, np.ndarray]]) -> None:
        if not items:
            return
        with atomic_path(self.folder / f"shard-{uuid.uuid4().hex}.npz") as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, key=np.array(self.key), hashes=np.array([i[0] for i in items]),
                         views=np.array([i[1] for i in items]), features=np.stack([i[2] for i in items]))
        for content_hash, view, vector in items:
            self.entries[(content_hash, view)] = vector


@dataclasses.dataclass
class Extraction:
    """What `FeatureExtractor.extract` found: the feature table (files, views, *output shape), rows NaN for
    unreadable files, and the same per view name ("orig", "flip" for the mirror image, ...); the
    errors; each file's content hash; how many files had a view computed."""

    table: np.ndarray
    vectors: dict[str, np.ndarray]
    errors: list[ImageError]
    hashes: list[str | None]
    computed: int


class FeatureExtractor:
    """Features for lists of image files, through the cache; files are read, hashed and decoded in
    threads ahead of the backbone. With a `cluster` (`lungxray.cluster.RayCluster`), the features the
    cache lacks are first computed by Ray workers and stored, and extraction then reads them back."""

    def __init__(self, backbone: keras.Model, image_size: int, interpolation: str = "nearest",
                 runtime: str = "auto", cache_dir: Path | None = None, workers: int | None = None,
                 intensity: str = "none", crop=None, cluster=None):
        cache_dir = Path(cache_dir or default_cache_dir())
        self.runtime = ModelRuntime(backbone, runtime, cache_dir)
        self.cache = FeatureCache(cache_dir, self.runtime, interpolation, intensity, crop and crop.fingerprint)
        self.image_size, self.interpolation, self.intensity, self.crop = image_size, interpolation, intensity, crop
        self.workers, self.cluster = workers, cluster
        self.feature_shape = tuple(backbone.output_shape[1:])
        if cluster is not None and (self.runtime.name != "litert" or crop is not None):
            raise ConfigError("features on Ray are computed by the LiteRT backbone on whole images: they need "
                              "feature_runtime auto or litert, and crop none")

    def extract(self, paths: list[Path], views: int = 1, desc: str = "features") -> Extraction:
        """Features of the first `views` training views of each file: 1, the file itself; 2, and its
        mirror image; more, and variants (`lungxray.data.acquisition`). Only views the cache lacks are computed."""
        views = view_names(views)
        if self.cluster is not None:
            self._fill_on_cluster(paths, views)
        # One array for all views, so that training takes it as its table without stacking a copy.
        table = np.full((len(paths), len(views), *self.feature_shape), np.nan, np.float32)
        out = {v: table[:, k] for k, v in enumerate(views)}
        errors: list[ImageError] = []
        hashes: list[str | None] = [None] * len(paths)
        pending: list[tuple[str, str, np.ndarray]] = []
        computed = 0

        def prepare(i: int):
            """(i, content hash, vectors per view, the views computed now, error)."""
            try:
                data = Path(paths[i]).read_bytes()
            except OSError as error:
                return i, None, None, [], ImageError(paths[i], f"cannot read file ({error.strerror or error})")
            content_hash = file_hash(data)
            vectors = [self.cache.get(content_hash, v) for v in views]
            missing = [k for k, vector in enumerate(vectors) if vector is None]
            if not missing:
                return i, content_hash, vectors, [], None
            try:
                images = read_views(data, missing, content_hash, self.image_size, self.interpolation, str(paths[i]),
                                    self.intensity, self.crop)
            except ImageError as error:
                return i, content_hash, None, [], error
            # Each worker thread runs the backbone itself, on an interpreter it borrows from the pool.
            for k, vector in zip(missing, self.runtime(images)):
                vectors[k] = vector
            return i, content_hash, vectors, missing, None

        items = bounded_map(prepare, range(len(paths)), self.workers)
        for i, content_hash, vectors, fresh, error in progress(items, len(paths), desc):
            hashes[i] = content_hash
            if error is not None:
                errors.append(error)
                continue
            for v, vector in zip(views, vectors):
                out[v][i] = vector
            if fresh:
                pending += [(content_hash, views[k], vectors[k]) for k in fresh]
                computed += 1
            if len(pending) >= SHARD_SIZE:
                self.cache.add(pending)
                pending = []
        self.cache.add(pending)
        return Extraction(table, out, errors, hashes, computed)

    def _fill_on_cluster(self, paths: list[Path], views: tuple[str, ...]) -> None:
        """Store in the cache the features of `paths` it lacks, computed by the cluster's workers."""
        from lungxray.cluster import BackboneWorker

        missing = [str(path) for path, content_hash in zip(paths, file_hashes(paths))
                   if content_hash is not None and any(self.cache.get(content_hash, v) is None for v in views)]
        pending: list[tuple[str, str, np.ndarray]] = []
        for batch in self.cluster.map_files(missing, BackboneWorker, batch_size=64, model_path=str(self.runtime.litert_path),
                                            image_size=self.image_size, interpolation=self.interpolation,
                                            intensity=self.intensity, views=len(views)):
            pending += [(content_hash, v, batch[v][row]) for row, content_hash in enumerate(batch["sha256"])
                        if content_hash is not None for v in views]
            if len(pending) >= SHARD_SIZE:
                self.cache.add(pending)
                pending = []
        self.cache.add(pending)
