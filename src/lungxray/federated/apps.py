"""The Flower apps: the `ClientApp` each site runs on its own films, and the `ServerApp` that
coordinates them. The same apps run in the simulation engine (`simulation.py`) and under a SuperLink
and SuperNodes (`deployment.py`).

A federation, as the server drives it:

    check      every site says its name, its counts and the fingerprint of its features; a site whose
               backbone or input pipeline differs from the server's is refused, naming what differs;
               and the sums of its features, from which the server makes the federation's mean and
               deviation of each, in which every site takes its training steps (`site.Standardisation`)
    rounds     Flower's strategy (FedAvg, FedProx, FedAdam, or SCAFFOLD: FedAvg with server momentum
               and the sites' mean gradient sent out first) sends the head, each site trains it for a few batches
               and sends it back with its count (with secure aggregation, masked: `secure_aggregation.py`);
               after each round every site reports on its validation films, and the round's head and a
               checkpoint to resume from are kept (`RUN/federation/rounds/`, `checkpoint.py`)
    select     the best round by the recipe's monitor (pooled over sites; the worst class x site
               cell for val_worst_group_accuracy)
    statistics the selected head's calibration, conformal and gate statistics (`fitting.py`)

In local training the head's BatchNormalization normalises with its stored statistics, never a
batch's own (`site.LocalTrainer`), so the statistics travel unchanged and only its scale and shift
are learnt and averaged (docs/federated.md).
"""

from __future__ import annotations

import functools
import json
import logging
import time
import zlib
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedAvgM,
                                     FedProx)

from lungxray.config import Config, Federation
from lungxray.errors import ConfigError
from lungxray.federated import site as sites
from lungxray.federated.checkpoint import CHECKPOINT, Checkpoint, restore_strategy, strategy_state
from lungxray.federated.fitting import (conformal_from_histograms, gate_from_moments, quantile_from_histogram,
                                        temperature_from_nll)
from lungxray.federated.result import FederatedFit, load_weights, save_weights
from lungxray.federated.secure_aggregation import secure_aggregation_mod, secure_round
from lungxray.io import write_json

log = logging.getLogger("lungxray")

SITE_TABLES = "site-tables"  # a SuperNode's --node-config key: the path of its SiteTables file
REFUSED = 1  # the code of a site's refusal to join
ROUND_TIMEOUT = 3600  # seconds the server waits for the sites' training replies (Flower's default)
SITE_WAIT = 600  # seconds the server waits for every expected site before going on with --min-sites
# Seconds between the server's looks for the sites' replies. Flower's grids look every 0.1 s in a
# simulation, where a look costs microseconds and a round's two exchanges take 0.3-0.4 s each, and every
# 3 s deployed, longer than a small round's work.
SIMULATION_PULL_INTERVAL, DEPLOYMENT_PULL_INTERVAL = 0.01, 0.2


# --- The site -------------------------------------------------------------------------------------

def client_app(tables: list[str] | None = None) -> ClientApp:
    """The ClientApp. A site finds its features at its node config's `site-tables`, or (simulation)
    at `tables[partition-id]`."""
    app = ClientApp(mods=[secure_aggregation_mod])

    def site_of(context: Context) -> sites.SiteTables:
        path = context.node_config.get(SITE_TABLES) or tables[int(context.node_config["partition-id"])]
        return _load_site(str(path))

    @app.query("check")
    def check(message: Message, context: Context) -> Message:
        site = site_of(context)
        differs = _differences(json.loads(message.content["config"]["fingerprint"]), json.loads(site.fingerprint))
        if differs:  # an error reply: its reason reaches the server as written, without a traceback
            return Message(Error(REFUSED, f"site {site.name}: its features were made with another {differs}; make "
                                          "them again with the federation's recipe"), reply_to=message)
        counts = np.bincount(site.train_labels, minlength=len(site.classes))
        _, sums, squares = sites.standardisation_sums(site.train[:, 0])
        return _reply(message, arrays=[sums, squares],
                      metrics={"num-examples": len(site.train), "validation": len(site.val),
                               **{f"films-{i}": int(n) for i, n in enumerate(counts)}},
                      config={"name": site.name, "classes": json.dumps(site.classes)})

    @app.query("gradient")
    def gradient(message: Message, context: Context) -> Message:
        site = site_of(context)
        return _reply(message, arrays=_gradient(site, message), metrics={"num-examples": len(site.train)})

    @app.train()
    def train(message: Message, context: Context) -> Message:
        site, settings = site_of(context), message.content["config"]
        trainer = _trainer(len(site.classes), site.train.shape[-1], settings["head"], settings["local-optimizer"])
        weights = message.content["arrays"].to_numpy_ndarrays()
        seed = _seed(site, int(settings["seed"]), int(settings["server-round"]))
        # SCAFFOLD: the federation's gradient at the global head less ours, from the server, which has both
        correction = message.content["correction"].to_numpy_ndarrays() if "correction" in message.content else None
        weights, loss, accuracy = trainer.update(
            site, weights, sites.Standardisation.from_config(settings), steps=int(settings["local-steps"]),
            batch_size=int(settings["batch-size"]), learning_rate=float(settings["learning-rate"]),
            proximal_mu=float(settings.get("proximal-mu", 0.0)), seed=seed, correction=correction)
        # "site-weight": the same for every site, by which a differentially private federation averages.
        return _reply(message, arrays=weights, metrics={"num-examples": len(site.train), "site-weight": 1,
                                                        "loss": loss, "accuracy": accuracy})

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        site, settings = site_of(context), message.content["config"]
        raw = _raw(site, settings, message)
        report = {"num-examples": len(site.val), **sites.validation_report(raw, site.val_labels, len(site.classes))}
        if "gradient-round" not in settings:
            return _reply(message, metrics=report)
        # SCAFFOLD: the gradient at this head that the next round needs, in this message rather than another
        return _reply(message, arrays=_gradient(site, message), metrics=report)

    add_statistics_queries(app, site_of)
    return app


def add_statistics_queries(app: ClientApp, site_of) -> None:
    """The queries after training: what calibration, the conformal sets and the gate are fitted from."""

    @app.query("calibration")
    def calibration(message: Message, context: Context) -> Message:
        site, settings = site_of(context), message.content["config"]
        raw = _raw(site, settings, message)
        count, sums = sites.feature_sums(site.train[:, 0])
        return _reply(message, arrays=[sites.temperature_nll(raw, site.val_labels),
                                       sites.conformal_histograms(raw, site.val_labels, len(site.classes)), sums],
                      metrics={"num-examples": count})

    @app.query("moments")
    def moments(message: Message, context: Context) -> Message:
        site = site_of(context)
        mean = message.content["arrays"].to_numpy_ndarrays()[0]
        scatter, fourth = sites.centred_moments(site.train[:, 0], mean)
        return _reply(message, arrays=[scatter], metrics={"num-examples": len(site.train), "fourth": fourth})

    @app.query("gate")
    def gate(message: Message, context: Context) -> Message:
        from lungxray.model.ood import OutOfDistribution

        site = site_of(context)
        mean, precision = message.content["arrays"].to_numpy_ndarrays()
        histogram = sites.gate_histogram(OutOfDistribution(mean, precision, np.inf), site.val)
        return _reply(message, arrays=[histogram], metrics={"num-examples": len(site.val)})


def _seed(site: sites.SiteTables, seed: int, server_round: int) -> int:
    """A site's seed for a round: the recipe's, the round and the site's name (not its node id,
    which a simulation draws anew)."""
    return seed * 1_000_003 + server_round * 1009 + zlib.crc32(site.name.encode())


def _gradient(site: sites.SiteTables, message: Message) -> list[np.ndarray]:
    """The site's mean gradient at the message's head, for SCAFFOLD's round `gradient-round`."""
    settings = message.content["config"]
    trainer = _trainer(len(site.classes), site.train.shape[-1], settings["head"], "adam")
    return trainer.gradient(site, message.content["arrays"].to_numpy_ndarrays(),
                            sites.Standardisation.from_config(settings),
                            seed=_seed(site, int(settings["seed"]), int(settings["gradient-round"])))


@functools.cache  # a simulation's worker plays every site in turn: four kept of nine were read again and again
def _load_site(path: str) -> sites.SiteTables:
    return sites.SiteTables.load(Path(path))


@functools.lru_cache(maxsize=4)
def _head_model(num_classes: int, dim: int, head_settings: str):
    from lungxray.model.network import build_head

    settings = json.loads(head_settings)
    return build_head(dim, num_classes, settings["dense_units"], settings["dropout"], settings["seed"])


@functools.lru_cache(maxsize=4)
def _trainer(num_classes: int, dim: int, head_settings: str, optimizer: str) -> sites.LocalTrainer:
    return sites.LocalTrainer(_head_model(num_classes, dim, head_settings), optimizer)


def _head(site: sites.SiteTables, head_settings: str):
    return _head_model(len(site.classes), site.train.shape[-1], head_settings)


def _raw(site: sites.SiteTables, settings: ConfigRecord, message: Message) -> np.ndarray:
    head = _head(site, settings["head"])
    head.set_weights(message.content["arrays"].to_numpy_ndarrays())
    return sites.probabilities(head, site.val)


def _differences(expected: dict, actual: dict) -> str:
    return ", ".join(f"{key} ({actual.get(key)!r}, the server's {value!r})"
                     for key, value in expected.items() if actual.get(key) != value)


def _reply(message: Message, arrays: list[np.ndarray] | None = None, metrics: dict | None = None,
           config: dict | None = None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord([np.asarray(a) for a in arrays])
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if config is not None:
        content["config"] = ConfigRecord(config)
    return Message(content=content, reply_to=message)


# --- The server -----------------------------------------------------------------------------------

def server_app(folder: Path, config: Config, federation: Federation, classes: list[str],
               initial: list[np.ndarray], fingerprint: str, sites: int) -> ServerApp:
    """The ServerApp of a simulation: waits for its `sites`, trains from the `initial` head weights and
    writes what it fitted to `folder` (`FederatedFit.save`). `fingerprint`: `site.fingerprint` of the
    server's recipe."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        Coordinator(grid, config, federation, classes, fingerprint, folder, sites,
                    pull_interval=SIMULATION_PULL_INTERVAL).run(initial)

    return app


class Scaffold(FedAvgM):
    """FedAvg whose sites correct their drift: SCAFFOLD (Karimireddy et al., 2020) with the control
    variates of its "option I" made afresh each round. Before a round every site sends its gradient
    at the global head (with its report on that head, in one message); each is sent back its
    correction, the average of those gradients (weighted by counts) less its own, and each local step
    follows the site's gradient plus its correction. A site holding one class then stops pulling the
    head towards it. It costs each site a second head's size a round. The server adds momentum to
    the averaged step (Flower's FedAvgM): the federation underfits in 30 rounds more than it drifts
    (docs/federated.md)."""

    def __init__(self, site_gradients, **options):
        super().__init__(**options)
        self.site_gradients = site_gradients

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        counts, gradients = self.site_gradients(server_round, arrays.to_numpy_ndarrays())
        mean = [sum(counts[node] * gradients[node][i] for node in gradients) / sum(counts.values())
                for i in range(len(next(iter(gradients.values()))))]
        messages = list(super().configure_train(server_round, arrays, config, grid))  # the sites that answered
        for message in messages:
            content = RecordDict(dict(message.content))  # the strategy's messages share one record
            content["correction"] = ArrayRecord([m - g for m, g in zip(mean, gradients[message.metadata.dst_node_id])])
            message.content = content
        return messages


class CheckedSites:
    """The grid as Flower's strategies see it: only the sites that passed the check and still take
    part, so that a SuperNode connecting later, unchecked, is never sent the head; and replies looked
    for every `pull_interval` seconds."""

    def __init__(self, grid: Grid, sites: dict, pull_interval: float):
        self._grid, self._sites, self.pull_interval = grid, sites, pull_interval

    def get_node_ids(self):
        connected = set(self._grid.get_node_ids())
        return [node for node in self._sites if node in connected]

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        """Flower's `Grid.send_and_receive` (push, then pull until every reply or the timeout is in),
        at this grid's pull interval."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while True:
            arrived = list(self._grid.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting or (deadline is not None and time.monotonic() > deadline):
                return replies
            time.sleep(self.pull_interval)

    def __getattr__(self, name):
        return getattr(self._grid, name)


class Coordinator:
    """The server's side of one federation, step by step (the module's docstring). A site whose
    reply is an error (it stopped, or Flower found it offline) takes no further part; the
    federation goes on while `federation.min_sites` remain."""

    def __init__(self, grid: Grid, config: Config, federation: Federation, classes: list[str], fingerprint: str,
                 folder: Path, expected_sites: int | None = None, pull_interval: float = DEPLOYMENT_PULL_INTERVAL):
        self.grid, self.config, self.federation, self.folder = grid, config, federation, folder
        self.classes, self.fingerprint = list(classes), fingerprint
        self.expected_sites = max(expected_sites or 0, federation.min_sites)
        self.head_settings = json.dumps({"dense_units": config.dense_units, "dropout": config.dropout,
                                         "seed": config.seed})
        self.sites: dict[int, dict] = {}  # node id: name, counts, of the sites still taking part
        self.checked_sites = CheckedSites(grid, self.sites, pull_interval)  # the grid the rounds go through
        self.roster: list[dict] = []  # every site that passed the check (a dropped one says when it left)
        self.history: list[dict] = []
        self.resumed_after: list[int] = []  # the rounds after which a restarted server resumed
        self.strategy = None  # Flower's strategy, made once the sites are known
        self.privacy = None  # with differential privacy, its accountant
        self.next_gradients = None  # SCAFFOLD: (round, each site's gradient at the head that round starts from)
        self.feature_sums: dict[int, list[np.ndarray]] = {}  # node id: the sum and sum of squares of its features
        self.standardisation = None  # the federation's, once the sites are known

    def run(self, initial: list[np.ndarray]) -> None:
        self.check_sites()
        self.standardisation = self.standardise()
        self.strategy = self.make_strategy()
        arrays, done = self.resume() or (ArrayRecord(initial), 0)
        train_config = ConfigRecord({"local-steps": self.federation.local_steps, "batch-size": self.config.batch_size,
                                     **self.local_optimizer(), "seed": self.config.seed, "head": self.head_settings,
                                     **self.standardisation.to_config()})
        for server_round in range(done + 1, self.federation.rounds + 1):
            log.info("federation: round %d of %d", server_round, self.federation.rounds)
            aggregated, trained = self.train_round(self.checked_sites, server_round, arrays, train_config)
            if aggregated is None:
                raise RuntimeError(f"round {server_round}: no site finished its training (their errors are in the log)")
            arrays = aggregated
            self.after_round(server_round, arrays, trained or {})
        best = self.best_round()
        weights = self.round_weights(best)
        fit = self.fit_statistics(weights)
        write_json(self.folder / "history.json", {"rounds": self.history, "best_round": best, "sites": self.roster,
                                                  "resumed_after": self.resumed_after,
                                                  "privacy": self.privacy_spent()})
        fit.save(self.folder)

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, train_config: ConfigRecord
                    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The sites' heads trained from `arrays` and averaged by Flower's strategy, or with secure
        aggregation by SecAgg+ (FedAvg, FedProx's term added at the sites)."""
        if not self.federation.secure_aggregation:
            replies = grid.send_and_receive(self.strategy.configure_train(server_round, arrays, train_config, grid),
                                            timeout=ROUND_TIMEOUT)
            return self.strategy.aggregate_train(server_round, replies)
        proximal = {"proximal-mu": self.federation.proximal_mu} if self.federation.aggregation == "fedprox" else {}
        return secure_round(grid, {node: site["train"] for node, site in self.sites.items()}, server_round, arrays,
                            {**train_config, **proximal}, ROUND_TIMEOUT)

    def resume(self) -> tuple[ArrayRecord, int] | None:
        """The head, strategy state, history and privacy ledger of the last finished round, if an
        earlier server kept one (`checkpoint.py`). The sites are those that passed the check now; one
        that took part before and not now is recorded as dropped at the restart."""
        checkpoint = Checkpoint.load(self.folder)
        if checkpoint is None:
            return None
        here = {site["name"]: site for site in self.sites.values()}
        absent = {site["name"]: {**site, "dropped_during": site.get("dropped_during") or
                                 f"the restart after round {checkpoint.round}"} for site in checkpoint.roster}
        self.roster = [here.get(name, absent[name]) for name in absent] + [s for n, s in here.items() if n not in absent]
        self.history = checkpoint.history
        self.resumed_after = [*checkpoint.resumed_after, checkpoint.round]
        restore_strategy(self.strategy, checkpoint.strategy_state)
        if self.privacy is not None:
            try:
                self.privacy.load_state_dict(checkpoint.privacy)
            except ValueError as error:  # e.g. another number of sites than the rounds before were accounted for
                raise ConfigError(f"the privacy accounting of the rounds before cannot go on: {error}") from None
        log.info("federation: resuming after round %d of %d, kept in %s", checkpoint.round, self.federation.rounds,
                 self.folder / CHECKPOINT)
        return ArrayRecord(checkpoint.head), checkpoint.round

    def privacy_spent(self) -> dict | None:
        """The (epsilon, delta) differential privacy of what the sites' heads reveal, or None without."""
        if self.privacy is None:
            return None
        spent = self.privacy.get_privacy_spent()
        log.info("federation: differential privacy epsilon %.3g at delta %g over %d rounds", spent.epsilon,
                 spent.delta, spent.num_releases)
        return {"epsilon": spent.epsilon, "delta": spent.delta, "rounds": spent.num_releases,
                "noise_multiplier": self.federation.dp_noise_multiplier,
                "clipping_norm": self.federation.dp_clipping_norm, "accounting": spent.accounting_method}

    # The steps.
    def check_sites(self) -> None:
        """Every expected site checked, or after 10 minutes those checked if they are `min_sites` or
        more. A site that does not answer is asked again: after a restart the SuperLink lists the
        sites it knew before they have reconnected."""
        import time

        deadline = time.monotonic() + SITE_WAIT
        while len(self.sites) < self.expected_sites:
            unchecked = [node for node in self.grid.get_node_ids() if node not in self.sites]
            if unchecked:
                self.check(unchecked)
            if len(self.sites) >= self.expected_sites:
                break
            if time.monotonic() > deadline:
                if len(self.sites) >= self.federation.min_sites:
                    break
                raise ConfigError(f"{len(self.sites)} site(s) joined in {SITE_WAIT // 60} minutes; --min-sites is "
                                  f"{self.federation.min_sites}")
            time.sleep(1)
        log.info("federation: %d sites (%s)", len(self.sites), ", ".join(s["name"] for s in self.sites.values()))

    def check(self, nodes: list[int]) -> None:
        """Ask `nodes` for their names, counts and fingerprints; those that answer join the federation,
        and any refusal stops it."""
        asked = self.ask(nodes, "query.check", {"fingerprint": self.fingerprint})
        replies = {node: reply for node, reply in asked.items() if reply is not None}
        refusals = [reply.error.reason for reply in replies.values() if reply.has_error()]
        if refusals:
            raise ConfigError("; ".join(refusals))
        for node, reply in replies.items():
            metrics = reply.content["metrics"]
            self.sites[node] = {"name": reply.content["config"]["name"], "train": int(metrics["num-examples"]),
                                "validation": int(metrics["validation"]),
                                "train_by_class": [int(metrics[f"films-{i}"]) for i in range(self.num_classes)]}
            self.feature_sums[node] = reply.content["arrays"].to_numpy_ndarrays()
            self.roster.append(self.sites[node])

    def standardise(self) -> sites.Standardisation:
        """The federation's mean and deviation of each feature, from the checked sites' sums (added in
        the order of their names, so that every run of the same sites adds them alike). A restarted
        server makes it again from the sites it has."""
        nodes = sorted(self.sites, key=lambda node: self.sites[node]["name"])
        sums, squares = (sum(self.feature_sums[node][i] for node in nodes) for i in range(2))
        return sites.Standardisation.from_sums(sum(self.sites[node]["train"] for node in nodes), sums, squares)

    def make_strategy(self):
        federation = self.federation
        common = dict(fraction_evaluate=0.0, min_train_nodes=federation.min_sites,
                      min_available_nodes=federation.min_sites)
        if federation.dp_noise_multiplier:  # the sites weigh alike: the noise is calibrated to one site's update
            common["weighted_by_key"] = "site-weight"
        if federation.aggregation == "fedprox":
            strategy = FedProx(proximal_mu=federation.proximal_mu, **common)
        elif federation.aggregation == "fedadam":
            strategy = FedAdam(eta=federation.server_learning_rate, **common)
        elif federation.aggregation == "scaffold":
            strategy = Scaffold(self.site_gradients, server_learning_rate=1.0,
                                server_momentum=federation.server_momentum, **common)
        else:
            strategy = FedAvg(**common)
        if not federation.dp_noise_multiplier:
            return strategy
        return DifferentialPrivacyServerSideFixedClipping(
            strategy, federation.dp_noise_multiplier, federation.dp_clipping_norm, len(self.sites),
            accountant=self.accountant())

    def accountant(self):
        """Flower's Renyi-DP accountant of site-level privacy: every site in every round (no sampling to
        amplify it), neighbouring federations differing by one site."""
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

        self.privacy = RdpAccountant(PrivacyConfig(
            target_delta=self.federation.dp_delta, population_size=len(self.sites),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        return self.privacy

    def site_gradients(self, server_round: int, weights: list[np.ndarray]
                       ) -> tuple[dict[int, float], dict[int, list[np.ndarray]]]:
        """Each site's training count and mean gradient at the global head, for SCAFFOLD: from the
        last round's evaluation, which carried them, or asked for (in the first round, or resumed)."""
        if self.next_gradients is None or self.next_gradients[0] != server_round:
            replies = self.answers(self.ask(list(self.sites), "query.gradient",
                                            {"head": self.head_settings, **self.gradient_config(server_round)}, weights))
            self.next_gradients = server_round, {r.metadata.src_node_id: r.content["arrays"].to_numpy_ndarrays()
                                                 for r in replies}
        gradients = {node: gradient for node, gradient in self.next_gradients[1].items() if node in self.sites}
        return {node: float(self.sites[node]["train"]) for node in gradients}, gradients

    def gradient_config(self, server_round: int) -> dict:
        return {"seed": self.config.seed, "gradient-round": server_round,
                **self.standardisation.to_config()}

    def local_optimizer(self) -> dict:
        """FedAdam's sites take plain gradient steps, so that the server's Adam sees their average
        gradient; otherwise each site runs the recipe's Adam."""
        if self.federation.aggregation == "fedadam":
            return {"local-optimizer": "sgd", "learning-rate": self.federation.local_learning_rate}
        return {"local-optimizer": "adam", "learning-rate": self.config.learning_rate}

    def after_round(self, server_round: int, arrays: ArrayRecord, trained: MetricRecord) -> None:
        """After each round: the head kept, every site's validation report, and the checkpoint a
        restarted server resumes from."""
        head = arrays.to_numpy_ndarrays()  # the next round starts from it as it is (FedAdam's is float64)
        weights = [w.astype(np.float32) for w in head]
        rounds = self.folder / "rounds"
        rounds.mkdir(parents=True, exist_ok=True)
        save_weights(rounds / f"round-{server_round:04d}.npz", weights)
        config = {"head": self.head_settings}
        if self.federation.aggregation == "scaffold" and server_round < self.federation.rounds:
            config.update(self.gradient_config(server_round + 1))  # the next round's gradients, in the same message
        replies = self.answers(self.ask(list(self.sites), "evaluate", config, weights))
        if "gradient-round" in config:
            self.next_gradients = server_round + 1, {r.metadata.src_node_id: r.content["arrays"].to_numpy_ndarrays()
                                                     for r in replies}
        summary = self.summarise(server_round, {r.metadata.src_node_id: r.content["metrics"] for r in replies})
        summary.update({key: float(trained[key]) for key in ("loss", "accuracy") if key in trained})
        self.history.append(summary)
        log.info("round %d: val_loss %.4f, val_accuracy %.4f, worst class x site %.4f", server_round,
                 summary["val_loss"], summary["val_accuracy"], summary["val_worst_group_accuracy"])
        Checkpoint(server_round, head, strategy_state(self.strategy), self.history,
                   self.roster, self.resumed_after,
                   None if self.privacy is None else self.privacy.state_dict()).save(self.folder)

    def summarise(self, server_round: int, reports: dict[int, MetricRecord]) -> dict:
        films = np.array([[r[f"films-{i}"] for i in range(self.num_classes)] for r in reports.values()])
        right = np.array([[r[f"right-{i}"] for i in range(self.num_classes)] for r in reports.values()])
        cells = films >= 1
        by_site = {self.sites[n]["name"]: float(right[k].sum() / max(films[k].sum(), 1))
                   for k, n in enumerate(reports)}
        return {"round": server_round, "sites": len(reports),
                "val_loss": float(sum(r["loss-sum"] for r in reports.values()) / films.sum()),
                "val_accuracy": float(right.sum() / films.sum()),
                "val_worst_group_accuracy": float(np.min(right[cells] / films[cells])),
                "val_accuracy_by_site": by_site}

    def best_round(self) -> int:
        from lungxray.training.engines import monitor_mode

        values = [h[self.config.monitor] for h in self.history]
        pick = np.argmin if monitor_mode(self.config.monitor) == "min" else np.argmax
        return int(self.history[int(pick(values))]["round"])

    def round_weights(self, server_round: int) -> list[np.ndarray]:
        return load_weights(self.folder / "rounds" / f"round-{server_round:04d}.npz")

    def fit_statistics(self, weights: list[np.ndarray]) -> FederatedFit:
        """The statistics of the sites that answer every step; a site lost on the way means again
        from the start without it (the steps build on each other's sums)."""
        while True:
            nodes = list(self.sites)
            fit = self.fit_statistics_of(nodes, weights)
            if list(self.sites) == nodes:
                return fit

    def fit_statistics_of(self, nodes: list[int], weights: list[np.ndarray]) -> FederatedFit:
        replies = self.answers(self.ask(nodes, "query.calibration", {"head": self.head_settings}, weights))
        nll, histograms, sums = (sum(r.content["arrays"].to_numpy_ndarrays()[i] for r in replies) for i in range(3))
        count = int(sum(r.content["metrics"]["num-examples"] for r in replies))
        mean = sums / count
        replies = self.answers(self.ask(nodes, "query.moments", {}, [mean]))
        scatter = sum(r.content["arrays"].to_numpy_ndarrays()[0] for r in replies)
        fourth = float(sum(r.content["metrics"]["fourth"] for r in replies))
        gate = gate_from_moments(count, mean, scatter, fourth)
        replies = self.answers(self.ask(nodes, "query.gate", {}, [gate.mean, gate.precision]))
        gate.threshold = quantile_from_histogram(sum(r.content["arrays"].to_numpy_ndarrays()[0] for r in replies))
        return FederatedFit(weights, temperature_from_nll(nll), conformal_from_histograms(histograms, self.classes),
                            gate)

    # Messages.
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def ask(self, nodes: list[int], message_type: str, config: dict, arrays: list[np.ndarray] | None = None
            ) -> dict[int, Message]:
        content = RecordDict({"config": ConfigRecord(config)})
        if arrays is not None:
            content["arrays"] = ArrayRecord([np.asarray(a) for a in arrays])
        messages = [Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes]
        replies = {reply.metadata.src_node_id: reply for reply in self.checked_sites.send_and_receive(messages)}
        return {node: replies.get(node) for node in nodes}  # None: the site left without a reply

    def step(self) -> str:
        """Where the federation is: the round under way, or the statistics after the last."""
        done = len(self.history)
        return f"round {done + 1}" if done < self.federation.rounds else "the statistics"

    def answers(self, replies: dict[int, Message | None]) -> list[Message]:
        """The replies without error. A site that replied with one, or not at all, takes no further
        part; too few sites left is the end of the federation."""
        for node, reply in replies.items():
            if (reply is None or reply.has_error()) and node in self.sites:
                dropped, during = self.sites.pop(node), self.step()
                dropped["dropped_during"] = during
                log.warning("federation: site %s dropped out during %s (%s)", dropped["name"], during,
                            "no reply" if reply is None else reply.error.reason)
        if len(self.sites) < self.federation.min_sites:
            raise RuntimeError(f"{len(self.sites)} site(s) remain; --min-sites is {self.federation.min_sites}")
        return [reply for reply in replies.values() if reply is not None and not reply.has_error()]
