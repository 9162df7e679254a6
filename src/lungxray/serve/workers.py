"""`lungxray serve --workers N`: N server processes on one port, under uvicorn's own supervisor.

One process is held by its Python, not by the cores: its HTTP handling, multipart parsing, gate and
audit lines share one GIL while LiteRT and decoding release it (docs/benchmarks.md#serving). What
must hold for the server as a whole is shared, so that `--rate` and `--max-pending` mean what they
say whatever the number of workers: the images in hand are a count in a file every worker maps, and
each caller's rate bucket lives in one manager process that every worker asks. The metrics of all
the workers are summed by prometheus-client's multiprocess mode (`metrics.py`).
"""

from __future__ import annotations

import fcntl
import inspect
import json
import math
import mmap
import os
import secrets
import shutil
import struct
import sys
import tempfile
import threading
from multiprocessing.managers import BaseManager
from pathlib import Path

from lungxray.environment import variables_set
from lungxray.errors import ConfigError
from lungxray.serve.guards import Admission
from lungxray.serve.operations import RateLimit

# What each worker builds its app from (JSON). The manager's key is in it: a process's environment
# is readable only by its own user, as the keys file is.
SETTINGS_ENV = "LUNGXRAY_SERVE_WORKER"

COUNT = struct.Struct("q")  # the images in hand, in the admission file
# A worker that could not build its app exits with this code (uvicorn's own "never started", which
# uvicorn 0.5x stops on by itself; 0.49, which Flower pins, would start it again and again).
STARTUP_FAILURE = 3
_held: dict = {}  # in the manager process: the rate limit


def _hold(per_second: float) -> None:
    _held["rate_limit"] = RateLimit(per_second)


def _rate_limit() -> RateLimit:
    return _held["rate_limit"]


class SharedRateLimit(BaseManager):
    """The manager process that holds the workers' rate limit; in a worker,
    `SharedRateLimit(address, authkey).connect()`, then `.rate_limit()` is a proxy to it."""


SharedRateLimit.register("rate_limit", callable=_rate_limit)


class FileLock:
    """A lock for threads and processes alike: a thread lock (an flock does not keep out the other
    threads of its own process), then an exclusive flock on `file`."""

    def __init__(self, file):
        self.file, self.threads = file, threading.Lock()

    def __enter__(self):
        self.threads.acquire()
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *_):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.threads.release()


class SharedAdmission(Admission):
    """`Admission` whose count lives in a file that every worker maps, changed under a `FileLock`:
    microseconds a call, where asking a manager process cost 15% of the served rate (measured). A
    worker killed while it holds images leaves them counted until the server restarts."""

    def __init__(self, path: Path, limit: int):  # the count is not reset: other workers may hold images
        self.limit, self.file = limit, open(path, "r+b")
        self.shared = mmap.mmap(self.file.fileno(), COUNT.size)
        self.lock = FileLock(self.file)

    @property
    def count(self) -> int:
        return COUNT.unpack_from(self.shared)[0]

    @count.setter
    def count(self, value: int) -> None:
        COUNT.pack_into(self.shared, 0, value)


class Shared:
    """What one worker shares with the others: the admission, and the rate limit (or None)."""

    def __init__(self, admission_file: Path, max_pending: int, rate: dict | None):
        self.admission = SharedAdmission(admission_file, max_pending)
        self.rate_limit = None
        if rate is not None:
            manager = SharedRateLimit(address=rate["address"], authkey=bytes.fromhex(rate["authkey"]))
            manager.connect()
            self.rate_limit = manager.rate_limit()


def serve_workers(model: str, host: str, port: int, workers: int, *, cache_dir: Path | None, runtime: str,
                  keys: Path | None, connection_limits: dict, app_options: dict, server_options: dict) -> None:
    """Serve with `workers` processes until stopped; SIGTERM drains each worker as one server does.
    The connections' total is shared out among them (`connections.GuardedProtocol`, whose limits
    each worker sets for itself); `server_options` are uvicorn's (`server.uvicorn_options`)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's supervisor, which starts a worker that died again; but not one that could not
        start: that would fail again, so the server stops."""

        def keep_subprocess_alive(self) -> None:
            if any(worker.process.exitcode == STARTUP_FAILURE for worker in self.processes):
                self.should_exit.set()
                return
            super().keep_subprocess_alive()

    folder = Path(tempfile.mkdtemp(prefix="lungxray-serve-"))
    (folder / "metrics").mkdir()
    (folder / "admission").write_bytes(bytes(COUNT.size))
    manager, rate = None, None
    if app_options.get("rate") is not None:
        authkey = secrets.token_bytes(32)
        manager = SharedRateLimit(authkey=authkey)
        manager.start(_hold, (app_options["rate"],))
        rate = {"address": manager.address, "authkey": authkey.hex()}
    settings = json.dumps({
        "model": str(model), "cache_dir": str(cache_dir) if cache_dir else None, "runtime": runtime,
        "keys": str(keys) if keys else None, "app": app_options, "rate": rate,
        "connections": {**connection_limits, "total": max(1, math.ceil(connection_limits["total"] / workers))},
        "admission": str(folder / "admission")}, default=str)
    supervisor = None
    # The workers are spawned fresh and read both as they start; prometheus-client chooses its
    # multiprocess mode when it is imported.
    with variables_set({"PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"), SETTINGS_ENV: settings}):
        try:
            config = uvicorn.Config("lungxray.serve.workers:app_from_environment", factory=True, host=host,
                                    port=port, workers=workers, **server_options)
            # uvicorn 0.49 (Flower's pin) is given each worker's target; from 0.50 on it makes its own.
            target = ({"target": uvicorn.Server(config).run} if "target" in inspect.signature(Multiprocess).parameters
                      else {})
            supervisor = Supervisor(config, sockets=[config.bind_socket()], **target)
            supervisor.run()
        finally:
            if manager is not None:
                manager.shutdown()
            shutil.rmtree(folder, ignore_errors=True)
    if supervisor is not None and any(worker.process.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        raise ConfigError("a worker could not start (its error is above); the server stopped")


def app_from_environment():
    """The app of one worker (uvicorn's factory). A worker that cannot build it exits as uvicorn's
    "never started", so that the supervisor stops instead of starting it again and again."""
    try:
        return build_app(json.loads(os.environ[SETTINGS_ENV]))
    except Exception as error:
        print(f"lungxray serve: a worker could not start: {error}", file=sys.stderr, flush=True)
        sys.exit(STARTUP_FAILURE)


def build_app(settings: dict):
    """One worker's app, from the settings `serve_workers` left it."""
    from lungxray.infer.lite_predictor import is_export
    from lungxray.infer.loader import load_predictor
    from lungxray.rundir import RunDir
    from lungxray.serve.app import DEFAULT_MAX_PENDING, create_app
    from lungxray.serve.connections import GuardedProtocol
    from lungxray.serve.keys import KeyStore

    GuardedProtocol.configure(**settings["connections"])
    shared = Shared(Path(settings["admission"]), settings["app"].get("max_pending", DEFAULT_MAX_PENDING),
                    settings["rate"])
    model = settings["model"]
    run = None if is_export(model) else RunDir.open(model)
    cache_dir = Path(settings["cache_dir"]) if settings["cache_dir"] else None
    predictor = load_predictor(model, cache_dir, settings["runtime"])
    keys = KeyStore(Path(settings["keys"])) if settings["keys"] else None
    return create_app(predictor, run, keys=keys, shared=shared, **settings["app"])
