"""`lungxray federate server` and `lungxray federate site`: a federation across hospitals on Flower's
Deployment Engine, each hospital a SuperNode and the coordinator a SuperLink.

    site     the site's features, made from its own films as a centralised run makes them (the
             cached engine), kept in its own folder; then Flower's SuperNode, which runs the
             federation's ClientApp on them until stopped. Only what `apps.py` sends leaves it.
    server   Flower's SuperLink with TLS, admitting only the sites whose public keys it was given;
             the federation's ServerApp submitted to it (`flwr run`), which waits for every site,
             trains and fits as in a simulation; then what it fitted put on the recipe's backbone as
             an ordinary run folder.

The ServerApp and ClientApp are this module's `server` and `client`, named in the Flower App project
`app_project` writes (a pyproject.toml alone: each site runs the lungxray it has installed, and the
fingerprint check refuses one whose features differ). docs/federated.md: certificates, keys and the
commands at each site.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lungxray.config import Config, Federation
from lungxray.errors import ConfigError, DataError
from lungxray.federated.apps import SITE_TABLES, Coordinator, client_app
from lungxray.federated.result import (FEDERATION, FOLDER, FederatedFit, federation_summary, load_weights,
                                      save_federated_model, save_weights, sites_section)
from lungxray.io import read_json, write_json, write_text

log = logging.getLogger("lungxray")

CONNECTION = "lungxray"  # the SuperLink's name in the coordinator's own Flower configuration
JOB, INITIAL = "job.json", "initial.npz"  # in RUN/federation/: what the ServerApp is to do, and from where
SITE_TABLES_FILE = "site-tables.npz"  # in a site's folder: its features, for its SuperNode

# The ClientApp each SuperNode runs, on the SiteTables its node config names.
client = client_app()

# The ServerApp the SuperLink runs: the job `coordinate` left in the run folder.
server = ServerApp()


@server.main()
def _coordinate(grid: Grid, context: Context) -> None:
    import fcntl

    folder = Path(str(context.run_config["folder"]))
    _end_with(int(context.run_config["server-pid"]))
    job = read_json(folder / JOB, DataError, "does not exist")
    with open(folder / ".coordinator.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one ServerApp writes a run folder at a time
        Coordinator(grid, Config.from_dict(job["config"]), Federation(**job["federation"]), job["classes"],
                    job["fingerprint"], folder, expected_sites=job["sites"]).run(load_weights(folder / INITIAL))


def _end_with(server: int) -> None:
    """End this ServerApp as soon as the `lungxray federate server` process that submitted it is gone.
    Flower's ServerApp outlives its SuperLink (it ignores SIGTERM and waits to reconnect), and would
    otherwise go on beside the ServerApp of a server restarted with --resume."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(server, 0)
            except ProcessLookupError:
                log.error("federation: the server process %d is gone; this ServerApp ends with it", server)
                os._exit(1)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


APP_PROJECT = """\
# The Flower App that `lungxray federate server` submits to its SuperLink (written by lungxray).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lungxray-federation"
version = "1.0.0"
description = "lungxray's federated training of the recipe's head"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "lungxray"

[tool.flwr.app.components]
serverapp = "lungxray.federated.deployment:server"
clientapp = "lungxray.federated.deployment:client"

[tool.flwr.app.config]
folder = ""
server-pid = 0
"""


def app_project(folder: Path) -> Path:
    """The Flower App project that names this module's apps."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PROJECT)
    return folder


def flower_command(name: str) -> str:
    """A Flower executable of this Python's environment (the SuperLink starts others by name)."""
    found = shutil.which(name, path=flower_environment()["PATH"])
    if found is None:
        raise ConfigError(f"{name} was not found: install lungxray's federated extra "
                          "(pip install 'lungxray[federated]')")
    return found


def flower_environment(home: Path | None = None) -> dict[str, str]:
    """The environment for Flower's processes: this Python's scripts first on PATH, and with `home`
    a Flower configuration of their own (FLWR_HOME) rather than the user's."""
    environment = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")])}
    if home is not None:
        environment["FLWR_HOME"] = str(home)
    return environment


class SuperLink:
    """Flower's SuperLink as a process of this one, with TLS and SuperNode authentication: only the
    SuperNodes whose public keys are registered (`admit`) may connect.

        with SuperLink(home, host, port, certificate, key, ca) as link:
            link.admit(Path("site-a.pub"))
            link.run(app_project(folder), {"folder": "..."})
    """

    def __init__(self, home: Path, host: str, port: int, certificate: Path, key: Path, ca: Path):
        for name, path in (("--tls-cert", certificate), ("--tls-key", key), ("--tls-ca", ca)):
            if not Path(path).is_file():
                raise ConfigError(f"{name} {path} does not exist")
        self.home, self.host, self.port = home, host, port
        self.certificate, self.key, self.ca = Path(certificate), Path(key), Path(ca)
        self.process: subprocess.Popen | None = None

    @property
    def local_address(self) -> str:
        """Where this machine reaches the SuperLink (its certificate must name it: IP 127.0.0.1)."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    def __enter__(self) -> "SuperLink":
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.local_address}"\nroot-certificates = "{self.ca.resolve()}"\n')
        with open(self.home / "superlink.log", "ab") as output:  # the child keeps its own copy of the file
            self.process = subprocess.Popen(
                [flower_command("flower-superlink"), "--ssl-certfile", str(self.certificate), "--ssl-keyfile",
                 str(self.key), "--ssl-ca-certfile", str(self.ca), "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--host", self.host, "--port", str(self.port),
                 "--database", str(self.home / "state.db")],
                env=flower_environment(self.home), stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=_ended_with_this_process())
        deadline = time.monotonic() + 60
        while not _accepts(self.local_address):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise ConfigError(f"Flower's SuperLink did not start on {self.host}:{self.port}: "
                                  f"{_tail(self.home / 'superlink.log')}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def admit(self, public_key: Path) -> None:
        """Register a site's public key (OpenSSH ECDSA, `ssh-keygen -t ecdsa -b 384`). A key registered
        before is left as it is: the SuperLink of a resumed federation keeps its keys in its database."""
        from flwr.common.constant import PUBLIC_KEY_ALREADY_IN_USE_MESSAGE

        try:
            self._flwr(["supernode", "register", str(public_key), CONNECTION], f"the site key {public_key}")
        except ConfigError as refusal:
            if PUBLIC_KEY_ALREADY_IN_USE_MESSAGE not in str(refusal):
                raise

    def run(self, project: Path, run_config: dict[str, str | int]) -> None:
        """Submit the Flower App `project` and stream its log here until the run ends."""
        overrides = " ".join(f'{key}={json.dumps(value)}' for key, value in run_config.items())
        self._flwr(["run", str(project), CONNECTION, "--stream", "--run-config", overrides], "the federation",
                   stream=True)

    def _flwr(self, arguments: list[str], what: str, stream: bool = False) -> None:
        done = subprocess.run([flower_command("flwr"), *arguments], env=flower_environment(self.home),
                              capture_output=not stream, text=True, preexec_fn=_ended_with_this_process())
        if done.returncode != 0:
            raise ConfigError(f"Flower refused {what}: {(done.stdout or '')[-1500:]}{(done.stderr or '')[-1500:]}")


def _ended_with_this_process():
    """For a child process: on Linux, have it sent SIGTERM when this process dies, even by SIGKILL, so that
    a server restarted after a crash finds its port free (the ServerApp ends itself: `_end_with`)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _tail(path: Path, characters: int = 2000) -> str:
    return path.read_text(errors="replace")[-characters:] if path.exists() else "(no log)"


def supernode_command(tables: Path, superlink: str, ca: Path, key: Path, port: int) -> list[str]:
    """Flower's SuperNode for a site: TLS to the SuperLink (`ca`), authenticated by the site's private
    `key`, its ClientApp given the site's features; `port`: its ClientApp API on this machine."""
    for name, path in (("--tls-ca", ca), ("--key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{name} {path} does not exist")
    return [flower_command("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(key), "--node-config", f'{SITE_TABLES}="{tables}"',
            "--port", str(port)]


# --- The commands ---------------------------------------------------------------------------------

def coordinate(out: str | Path | None, config: Config | None, federation: Federation | None, classes: list[str],
               site_keys: list[Path], certificate: Path, key: Path, ca: Path, host: str = "0.0.0.0",
               port: int = 9092, cache_dir: Path | None = None, resume: bool = False):
    """`lungxray federate server`: a SuperLink admitting the sites of `site_keys`, the federation run
    on it, and its result as the run folder `out`. The server holds no films: the run is evaluated by
    the sites' validation reports (its report's table of sites), and a site evaluates it on its own
    test films with `lungxray evaluate`. `resume` continues the federation in `out` that a crash
    stopped, with the settings saved there (config and federation None), from its last finished round."""
    import datetime

    from lungxray.federated.simulation import check_recipe
    from lungxray.rundir import RunDir

    if resume:
        config, federation, classes = saved_settings(out)
    check_recipe(config)
    check_server(federation, site_keys)
    run = RunDir.create(out, resume)  # a folder holding an unfinished federation is continued with --resume only
    folder = run.path(FOLDER)
    started, timings = time.perf_counter(), {}
    link = SuperLink(folder / "flower", host, port, certificate, key, ca)  # its files checked before any work

    import keras  # the checks above are said before TensorFlow loads

    from lungxray.federated.site import fingerprint
    from lungxray.training.engines import CachedEngine
    from lungxray.training.recipe import network, timed
    from lungxray.training.run_report import TrainResult

    keras.utils.set_random_seed(config.seed)
    model = network(config, len(classes))
    engine = CachedEngine(model, config, run, cache_dir)  # its feature cache's key: what the sites' must be
    if not resume:
        config.save(run.path(run.CONFIG))
        federation.save(run.path(FEDERATION))
        folder.mkdir(exist_ok=True)
        save_weights(folder / INITIAL, model.get_layer("head").get_weights())
        write_json(folder / JOB, {"config": config.to_dict(), "federation": federation.to_dict(), "classes": classes,
                                  "fingerprint": fingerprint(classes, config.views, engine.extractor.cache.meta),
                                  "sites": len(site_keys)})
    with timed(timings, "federation"), link:
        for site_key in site_keys:
            link.admit(Path(site_key))
        log.info("federation: the SuperLink admits %d site(s) at %s:%d; start them now", len(site_keys), host, port)
        link.run(app_project(folder / "app"), {"folder": str(folder.resolve()), "server-pid": os.getpid()})
    if not (folder / FederatedFit.FITTED).exists():
        raise DataError(f"the federation stopped before it finished; its log above (and {folder / 'flower'}) "
                        "says why")
    info = {"engine": "federated", "architecture": config.describe_model(),
            "trained": datetime.datetime.now().isoformat(timespec="seconds"), "data": None}
    _, history, by_round = save_federated_model(run, model, engine.extractor, config, federation, classes, info)
    timings["total"] = time.perf_counter() - started
    write_json(run.path(run.TIMINGS), timings)
    rounds = [h["round"] for h in history["rounds"]]
    result = TrainResult(run.folder, "federated", federation_summary(federation, len(history["sites"])), by_round,
                         rounds.index(history["best_round"]), None, timings)
    write_text(run.path(run.REPORT), "\n".join(server_report(run, result, history, config, classes)) + "\n")
    return result


def saved_settings(out) -> tuple[Config, Federation, list[str]]:
    """The recipe, federation settings and classes of the federation in `out`, to resume it."""
    if out is None:
        raise ConfigError("--resume continues the federation in --out: give it")
    job = read_json(Path(out) / FOLDER / JOB, DataError, "does not exist: the federation stopped before it began; "
                                                         "start it again without --resume")
    return Config.from_dict(job["config"]), Federation(**job["federation"]), job["classes"]


def check_server(federation: Federation, site_keys: list[Path]) -> None:
    """What the server needs before it starts: enough site keys, each a file."""
    if len(site_keys) < federation.min_sites:
        raise ConfigError(f"{len(site_keys)} site key(s) given; --min-sites is {federation.min_sites}")
    missing = [str(path) for path in site_keys if not Path(path).is_file()]
    if missing:
        raise ConfigError(f"--site-key: no such file: {', '.join(missing)}")


def server_report(run, result, history: dict, config: Config, classes: list[str]) -> list[str]:
    best = history["rounds"][result.best_epoch]
    return ["# lungxray run report", "",
            f"- Federated on Flower's Deployment Engine: {result.engine_reason}",
            f"- Model: {config.describe_model()}",
            f"- Configuration: [{run.CONFIG}]({run.CONFIG}) and [{FEDERATION}]({FEDERATION})",
            f"- Rounds: {len(history['rounds'])}; best {config.monitor} {best[config.monitor]:.4f} at round "
            f"{history['best_round']} (its head kept)",
            f"- Wall time: {result.timings['total']:.1f} s ([{run.TIMINGS}]({run.TIMINGS}))",
            "- Evaluation: the server holds no films. Below, each site's validation accuracy; at a site, "
            "`lungxray evaluate --model RUN --data ITS_TEST_FILMS` measures it on films it never trained on.", "",
            f"![loss]({run.plot('loss').name}) ![accuracy]({run.plot('accuracy').name})", "",
            *sites_section(history, classes)]


def join(data, name: str, out: str | Path, superlink: str, ca: Path, key: Path, config: Config,
         classes: list[str], port: int = 9094, cache_dir: Path | None = None) -> None:
    """`lungxray federate site`: this site's features, made from `data` (its own films, split as a
    centralised run splits them) into the folder `out` with its split; then this process becomes the
    site's SuperNode, connected to `superlink` until stopped (a signal reaches Flower itself)."""
    import keras

    from lungxray.federated.simulation import check_recipe, site_tables
    from lungxray.federated.site import fingerprint
    from lungxray.rundir import RunDir
    from lungxray.training.engines import CachedEngine
    from lungxray.training.recipe import network, start_run, training_data

    check_recipe(config)
    command = supernode_command(Path(out).resolve() / SITE_TABLES_FILE, superlink, ca, key, port)  # bad paths first
    keras.utils.set_random_seed(config.seed)
    dataset, _ = training_data(data, config, classes)
    run = start_run(out, config, dataset, resume=(Path(out) / RunDir.CONFIG).exists())  # a site joins again
    engine = CachedEngine(network(config, len(dataset.classes)), config, run, cache_dir)
    plan = engine.plan(dataset)
    tables = site_tables(plan, name, fingerprint(dataset.classes, config.views, engine.extractor.cache.meta))
    path = run.path(SITE_TABLES_FILE)
    tables.save(path)
    path.chmod(0o600)  # the site's features stay the site's
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, flower_environment())
