"""Federated training: what the server fits from the sites' statistics equals what a centralised
run fits on the pooled films (within the documented quantisation), and a simulated federation on
Flower's engine makes an ordinary run folder."""

import json

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from lungxray.config import Federation
from lungxray.errors import ConfigError
from lungxray.federated import apps
from lungxray.federated import site as sites
from lungxray.federated.fitting import (conformal_from_histograms, gate_from_moments, quantile_from_histogram,
                                        temperature_from_nll)
from lungxray.model.calibration import fit_temperature
from lungxray.model.conformal import ConformalSets
from lungxray.model.ood import OutOfDistribution, log_scaled

CLASSES = ["covid", "normal", "pneumonia"]


def three_sites(rng, dim=12):
    """Feature rows of three sites with different means (as hospitals' films differ)."""
    return [np.abs(rng.normal(shift, 1.0, (n, dim))) for shift, n in ((0.0, 150), (0.5, 90), (1.0, 60))]


def softmax_outputs(rng, n):
    logits = rng.normal(0, 2.0, (n, 3))
    labels = np.where(rng.random(n) < 0.7, logits.argmax(axis=1), rng.integers(3, size=n))
    raw = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return raw, labels


def test_the_gate_from_the_sites_sums_is_ledoit_wolf_on_the_pooled_features():
    parts = three_sites(np.random.default_rng(0))
    sums = [sites.feature_sums(p) for p in parts]
    count = sum(n for n, _ in sums)
    mean = sum(s for _, s in sums) / count
    moments = [sites.centred_moments(p, mean) for p in parts]
    gate = gate_from_moments(count, mean, sum(m[0] for m in moments), sum(m[1] for m in moments))
    pooled = LedoitWolf().fit(log_scaled(np.concatenate(parts)))
    np.testing.assert_allclose(gate.mean, pooled.location_, rtol=1e-10)
    np.testing.assert_allclose(gate.precision, pooled.precision_, rtol=1e-7, atol=1e-9)


def test_the_gate_threshold_is_within_a_bin_of_the_pooled_percentile():
    rng = np.random.default_rng(1)
    parts = three_sites(rng)
    gate = OutOfDistribution.fit(np.concatenate(parts), np.concatenate(parts))
    histogram = sum(sites.gate_histogram(gate, p) for p in parts)
    pooled = float(np.quantile(gate.score(np.concatenate(parts)), 0.99))
    federated = quantile_from_histogram(histogram)
    assert pooled <= federated <= pooled * 1.002
    assert federated == pytest.approx(gate.threshold, rel=2e-3)


def test_conformal_sets_from_histograms_are_never_smaller_and_differ_by_at_most_a_bin():
    rng = np.random.default_rng(2)
    parts = [softmax_outputs(rng, n) for n in (200, 120, 80)]
    raw, labels = (np.concatenate([p[i] for p in parts]) for i in range(2))
    exact = ConformalSets.fit(raw, labels, CLASSES)
    federated = conformal_from_histograms(sum(sites.conformal_histograms(r, y, 3) for r, y in parts), CLASSES)
    test, _ = softmax_outputs(rng, 500)
    exact_p, federated_p = exact.p_values(test), federated.p_values(test)
    assert np.all(federated_p >= exact_p)
    assert np.all(federated.sets(test) >= exact.sets(test))
    for c in CLASSES:  # the same counts, each score moved up by less than a bin
        assert len(federated.scores[c]) == len(exact.scores[c])
        assert np.all((federated.scores[c] - exact.scores[c] >= -1e-7) & (federated.scores[c] - exact.scores[c] <= 1e-4 + 1e-7))


def test_the_temperature_from_summed_likelihoods_is_within_a_grid_step_of_the_pooled_fit():
    rng = np.random.default_rng(3)
    parts = [softmax_outputs(rng, n) for n in (300, 100)]
    raw, labels = (np.concatenate([p[i] for p in parts]) for i in range(2))
    federated = temperature_from_nll(sum(sites.temperature_nll(r, y) for r, y in parts))
    assert federated == pytest.approx(fit_temperature(raw, labels), rel=4e-3)


def test_a_site_whose_features_were_made_otherwise_is_refused_naming_what_differs():
    from lungxray.federated.apps import _differences

    server = json.loads(sites.fingerprint(CLASSES, 2, {"backbone_fingerprint": "aa", "interpolation": "nearest"}))
    site = json.loads(sites.fingerprint(CLASSES, 2, {"backbone_fingerprint": "aa", "interpolation": "bilinear"}))
    assert _differences(server, site) == "interpolation ('bilinear', the server's 'nearest')"
    assert _differences(server, server) == ""


def test_local_training_with_a_proximal_term_stays_closer_to_the_global_head():
    from lungxray.model.network import build_head

    rng = np.random.default_rng(4)
    one_class = sites.SiteTables("A", CLASSES, rng.normal(size=(64, 2, 8)).astype(np.float32), np.zeros(64, int),
                                 rng.normal(size=(10, 8)).astype(np.float32), np.zeros(10, int), "{}")
    trainer = sites.LocalTrainer(build_head(8, 3, 16, 0.2, 21))
    standardisation = sites.Standardisation.from_sums(*sites.standardisation_sums(one_class.train[:, 0]))
    start = [w.copy() for w in trainer.head.get_weights()]
    distance = {}
    for mu in (0.0, 10.0, 0.0):  # the same trainer: each round starts afresh from the weights given
        weights, loss, accuracy = trainer.update(one_class, start, standardisation, steps=20, batch_size=16,
                                                 learning_rate=1e-2, proximal_mu=mu, seed=0)
        if mu in distance:
            assert distance[mu] == sum(float(np.sum((w - s) ** 2)) for w, s in zip(weights, start))
        distance[mu] = sum(float(np.sum((w - s) ** 2)) for w, s in zip(weights, start))
        assert np.isfinite(loss) and 0 <= accuracy <= 1
    assert 0 < distance[10.0] < distance[0.0]


def test_the_sites_train_the_same_head_in_the_federations_standardised_coordinates():
    """The standardisation made from the sites' sums is the pooled features' mean and deviation, and
    the head carried into its coordinates is the same function of the films."""
    from lungxray.model.network import build_head

    rng = np.random.default_rng(8)
    features = [f.astype(np.float32) for f in three_sites(rng)]
    features[1][:, 3] = features[0][:, 3] = features[2][:, 3] = 2.5  # a feature that never varies
    summed = [sites.standardisation_sums(f) for f in features]
    standardisation = sites.Standardisation.from_sums(sum(c for c, _, _ in summed), sum(s for _, s, _ in summed),
                                                      sum(q for _, _, q in summed))
    pooled = np.concatenate(features).astype(np.float64)
    deviation = pooled.std(axis=0)
    deviation[3] = 1.0
    np.testing.assert_allclose(standardisation.mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(standardisation.scale, deviation, rtol=1e-9)
    assert np.abs(standardisation.features(pooled)[:, 3]).max() < 1e-6
    head = build_head(12, 3, 16, 0.2, 21)
    head.layers[1].set_weights([rng.normal(size=16), rng.normal(size=16), rng.normal(size=16), 1 + rng.random(16)])
    weights = head.get_weights()
    on_features = head.predict(pooled.astype(np.float32), verbose=0)
    head.set_weights(standardisation.to_standardised(weights))
    np.testing.assert_allclose(head.predict(standardisation.features(pooled), verbose=0), on_features, atol=1e-5)
    for back, original in zip(standardisation.from_standardised(standardisation.to_standardised(weights)), weights):
        np.testing.assert_allclose(back, original, atol=1e-6)
    again = sites.Standardisation.from_config(standardisation.to_config())
    assert np.array_equal(again.mean, standardisation.mean) and np.array_equal(again.scale, standardisation.scale)


def test_federation_settings_are_checked_like_the_recipe():
    with pytest.raises(ConfigError, match="'aggregation' must be one of"):
        Federation(aggregation="fedsgd")
    with pytest.raises(ConfigError, match="'rounds' must be an int in the range"):
        Federation(rounds=0)
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        Federation(dp_noise_multiplier=1.0)  # SCAFFOLD by default


def sites_manifest(root, seed=0):
    """Synthetic films of three hospitals with skewed class mixes (C holds pneumonia alone)."""
    import csv

    from PIL import Image

    from tests.conftest import synthetic_image

    rng = np.random.default_rng(seed)
    mixes = {"A": {0: 6, 1: 6, 2: 6}, "B": {0: 8, 1: 4}, "C": {2: 8}}
    rows = []
    for site, mix in mixes.items():
        for label, per_split in mix.items():
            for split, n in (("train", per_split), ("val", max(2, per_split // 2)), ("test", 2)):
                for i in range(n):
                    path = root / "films" / f"{site}-{CLASSES[label]}-{split}-{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(synthetic_image(label, rng)).save(path)
                    rows.append([str(path), CLASSES[label], split, site])
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "label", "split", "source"], *rows])
    return manifest


def test_a_simulated_federation_makes_a_run_that_predicts_like_any_other(tmp_path, ray_alone):
    """Three sites on Flower's simulation engine, through the command line: an ordinary run folder
    whose model was fitted from the sites' replies (rounds kept, the best chosen, calibration, sets
    and gate fitted across sites), which `load_predictor` takes. The federation is FedAvg under
    Flower's central DP: the sites' updates clipped, noise added, and the epsilon in the history and
    the report the one Google's dp-accounting gives for that noise and those rounds."""
    import dp_accounting

    from lungxray.cli import main
    from lungxray.infer.answer import answer_files
    from lungxray.infer.loader import load_predictor
    from lungxray.rundir import RunDir
    from tests.conftest import TINY

    manifest, out = sites_manifest(tmp_path), tmp_path / "run"
    code = main(["federate", "simulate", "--data", str(manifest), "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--weights", "none", "--image-size", str(TINY), "--dense-units", "16", "--batch-size", "8",
                 "--rounds", "3", "--local-steps", "2", "--monitor", "val_loss", "--aggregation", "fedavg",
                 "--dp-noise-multiplier", "1.2", "--dp-clipping-norm", "0.5", "--dp-delta", "1e-4"])
    assert code == 0
    history = json.loads((out / "federation" / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3]
    assert sorted(s["name"] for s in history["sites"]) == ["A", "B", "C"]
    assert {s["name"]: s["train_by_class"] for s in history["sites"]}["C"] == [0, 0, 8]
    losses = [r["val_loss"] for r in history["rounds"]]
    assert history["best_round"] == 1 + int(np.argmin(losses)) and len(set(losses)) == 3  # each round trained
    assert all(0 <= r["loss"] and 0 <= r["accuracy"] <= 1 for r in history["rounds"])
    assert len(list((out / "federation" / "rounds").glob("round-*.npz"))) == 3
    described = json.loads((out / "model.json").read_text())
    assert described["engine"] == "federated" and described["federation"]["aggregation"] == "fedavg"
    assert 0.05 <= described["temperature"] <= 20
    predictor = load_predictor(out, tmp_path / "cache")
    answer = answer_files(predictor, sorted((tmp_path / "films").glob("A-normal-test-*.png"))[:1])[0]
    assert answer.decision in CLASSES + ["withheld"] and answer.ood_score is not None and answer.set is not None
    assert json.loads((out / RunDir.EVALUATION / "metrics.json").read_text())["accuracy"] >= 0
    report = (out / RunDir.REPORT).read_text()
    assert (out / RunDir.REFERENCE).stat().st_size > 0 and "**federated**" in report
    assert "| C | 0 | 0 | 8 | 4 |" in report  # the sites' table: C trained on 8 pneumonia films, validated on 4
    assert json.loads((out / "federation.json").read_text())["rounds"] == 3
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.2), 3)
    privacy = history["privacy"]
    assert privacy["rounds"] == 3 and privacy["epsilon"] == pytest.approx(accountant.get_epsilon(1e-4), rel=1e-6)
    assert f"epsilon {privacy['epsilon']:.3g} at delta 0.0001" in report


def test_a_federation_with_a_site_whose_features_differ_stops_naming_the_difference(tmp_path, ray_alone):
    from lungxray.config import Config
    from lungxray.federated.simulation import run_federation
    from lungxray.model.network import build_head

    rng = np.random.default_rng(5)
    server = sites.fingerprint(CLASSES, 2, {"backbone_fingerprint": "aa", "interpolation": "nearest"})
    other = sites.fingerprint(CLASSES, 2, {"backbone_fingerprint": "aa", "interpolation": "bilinear"})
    paths = []
    for name, recipe in (("A", server), ("B", other)):
        table = sites.SiteTables(name, CLASSES, rng.normal(size=(12, 2, 8)).astype(np.float32), np.arange(12) % 3,
                                 rng.normal(size=(6, 8)).astype(np.float32), np.arange(6) % 3, recipe)
        paths.append(str(tmp_path / f"{name}.npz"))
        table.save(tmp_path / f"{name}.npz")
    with pytest.raises(ConfigError, match=r"^site B: its features were made with another interpolation \('bilinear', "
                                        r"the server's 'nearest'\)"):
        run_federation(tmp_path / "server", Config(dense_units=4), Federation(rounds=1), CLASSES,
                       build_head(8, 3, 4).get_weights(), server, paths)
    assert not (tmp_path / "server" / "head.npz").exists()


def test_the_server_keeps_the_replies_that_came_before_its_timeout():
    """`CheckedSites.send_and_receive`, Flower's push-then-pull at the server's own pull interval:
    every reply once all are in; with a timeout, those that came in time."""
    import time
    from types import SimpleNamespace

    class Grid:  # node "late" never replies; each reply is there at the second look
        def __init__(self):
            self.looks = 0

        def push_messages(self, messages):
            return [f"to-{node}" for node in messages]

        def pull_messages(self, ids):
            self.looks += 1
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                    for i in ids if self.looks > 1 and i != "to-late"]

    grid = Grid()
    replies = apps.CheckedSites(grid, {}, pull_interval=0.001).send_and_receive(["a", "b"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["to-a", "to-b"] and grid.looks == 2
    started = time.monotonic()
    replies = apps.CheckedSites(Grid(), {}, pull_interval=0.001).send_and_receive(["a", "late"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["to-a"] and time.monotonic() - started >= 0.2


def test_a_checkpoint_gives_flowers_strategies_back_what_they_carry_between_rounds(tmp_path):
    """A restarted server's strategy resumes with the momentum (FedAvgM) or moments (FedAdam, also
    inside differential privacy) that the crashed one held, and the head in its own precision."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvgM

    from lungxray.federated.checkpoint import Checkpoint, restore_strategy, strategy_state

    rng = np.random.default_rng(3)
    shapes = [(4, 3), (3,)]
    momentum, adam, private = (FedAvgM(server_momentum=0.9), FedAdam(),
                               DifferentialPrivacyServerSideFixedClipping(FedAdam(), 1.0, 1.0, 3))
    momentum.momentum_vector = [rng.normal(size=s) for s in shapes]
    for strategy in (adam, private.strategy):
        strategy.m_t, strategy.v_t = ({str(i): rng.normal(size=s) for i, s in enumerate(shapes)} for _ in range(2))
    head = [rng.normal(size=s) for s in shapes]  # FedAdam's head is float64
    for crashed, restarted in ((momentum, FedAvgM(server_momentum=0.9)), (adam, FedAdam()),
                               (private, DifferentialPrivacyServerSideFixedClipping(FedAdam(), 1.0, 1.0, 3))):
        Checkpoint(2, head, strategy_state(crashed), [{"round": 1}, {"round": 2}], [{"name": "A"}], [1],
                   None).save(tmp_path)
        kept = Checkpoint.load(tmp_path)
        assert (kept.round, kept.history[-1], kept.roster, kept.resumed_after) == (2, {"round": 2}, [{"name": "A"}], [1])
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(kept.head, head))
        restore_strategy(restarted, kept.strategy_state)
        for name in ("momentum_vector", "m_t", "v_t"):
            theirs = getattr(getattr(crashed, "strategy", crashed), name, None)
            ours = getattr(getattr(restarted, "strategy", restarted), name, None)
            if isinstance(theirs, dict):
                assert list(ours) == list(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
            elif theirs:
                assert len(ours) == len(theirs) and all(np.array_equal(o, t) for o, t in zip(ours, theirs))


def test_secure_aggregation_averages_the_heads_as_fedavg_does_within_its_quantisation(tmp_path, ray_alone):
    """SecAgg+ (Flower's, through its legacy workflow) over three sites of unequal size: the same
    round-1 head as FedAvg's average of the sites' own training (done here, by the sites' trainer
    and seeds), to within the documented quantisation, and not bit for bit (the heads were masked
    and quantised on the way)."""
    from lungxray.federated.result import load_weights
    from lungxray.federated.secure_aggregation import quantisation_bound
    from lungxray.federated.simulation import run_federation

    config, tables, paths, initial = unequal_sites(tmp_path)
    run_federation(tmp_path / "secure", config, Federation(aggregation="fedavg", rounds=1, local_steps=3,
                                                            secure_aggregation=True),
                   CLASSES, initial, tables[0].fingerprint, paths)
    heads = {True: load_weights(tmp_path / "secure" / "rounds" / "round-0001.npz")}
    heads[False] = sites_first_round(config, tables, initial)
    counts = [len(table.train) for table in tables]
    differences = [float(np.abs(a - b).max()) for a, b in zip(heads[False], heads[True])]
    assert 0 < max(differences) <= quantisation_bound(counts), differences
    assert max(float(np.abs(a - b).max()) for a, b in zip(heads[False], initial)) > 100 * max(differences)
    with pytest.raises(ConfigError, match="with --secure-aggregation, choose --aggregation fedavg or fedprox"):
        Federation(secure_aggregation=True)  # SCAFFOLD by default


def test_scaffold_corrects_every_sites_steps_by_the_federations_gradient(tmp_path, ray_alone):
    """SCAFFOLD's first round on Flower's engine: every site's steps follow its gradient plus its
    correction (the sites' mean gradient at the global head, weighted by films, less its own), in the
    federation's standardised coordinates; the round's head is the sites' heads averaged by films
    (FedAvgM's first step). Done here by the sites' trainer, it is the head Flower's engine made, and
    not FedAvg's."""
    from lungxray.federated.result import load_weights
    from lungxray.federated.simulation import run_federation

    config, tables, paths, initial = unequal_sites(tmp_path)
    run_federation(tmp_path / "scaffold", config, Federation(aggregation="scaffold", rounds=1, local_steps=3),
                   CLASSES, initial, tables[0].fingerprint, paths)
    made = load_weights(tmp_path / "scaffold" / "rounds" / "round-0001.npz")
    counts = np.array([len(table.train) for table in tables], float)
    trainer, standardisation = site_trainer(config, tables)
    gradients = [trainer.gradient(table, initial, standardisation, seed=apps._seed(table, config.seed, 1))
                 for table in tables]
    mean = [sum(n * g[i] for n, g in zip(counts, gradients)) / counts.sum() for i in range(len(gradients[0]))]
    corrected = sites_first_round(config, tables, initial, [[m - g for m, g in zip(mean, own)] for own in gradients])
    for ours, flowers in zip(corrected, made):
        np.testing.assert_allclose(ours, flowers, rtol=0, atol=1e-5)
    fedavg = sites_first_round(config, tables, initial)
    assert max(float(np.abs(a - b).max()) for a, b in zip(fedavg, made)) > 1e-3


def unequal_sites(folder):
    """Three sites of unequal size and class mix, as site tables saved in `folder`: (config, tables,
    their paths, the initial head)."""
    from lungxray.config import Config
    from lungxray.model.network import build_head

    rng = np.random.default_rng(6)
    recipe = sites.fingerprint(CLASSES, 2, {"backbone_fingerprint": "aa"})
    tables, paths = [], []
    for name, n in {"A": 40, "B": 25, "C": 12}.items():
        tables.append(sites.SiteTables(name, CLASSES, np.abs(rng.normal(size=(n, 2, 8))).astype(np.float32),
                                       rng.integers(3, size=n), np.abs(rng.normal(size=(6, 8))).astype(np.float32),
                                       np.arange(6) % 3, recipe))
        paths.append(str(folder / f"{name}.npz"))
        tables[-1].save(folder / f"{name}.npz")
    return Config(dense_units=4, batch_size=8, monitor="val_loss"), tables, paths, build_head(8, 3, 4).get_weights()


def site_trainer(config, tables):
    """The sites' trainer, and the federation's standardisation of the tables' features."""
    settings = json.dumps({"dense_units": config.dense_units, "dropout": config.dropout, "seed": config.seed})
    summed = [sites.standardisation_sums(table.train[:, 0]) for table in tables]
    return apps._trainer(3, 8, settings, "adam"), sites.Standardisation.from_sums(*(sum(p) for p in zip(*summed)))


def sites_first_round(config, tables, initial, corrections=None):
    """The sites' heads after 3 local steps of round 1 (each with its SCAFFOLD correction, if given),
    averaged by their films, as the sites and FedAvg compute them."""
    trainer, standardisation = site_trainer(config, tables)
    trained = [trainer.update(table, initial, standardisation, steps=3, batch_size=config.batch_size,
                              learning_rate=config.learning_rate, proximal_mu=0.0,
                              seed=apps._seed(table, config.seed, 1),
                              correction=None if corrections is None else corrections[k])[0]
               for k, table in enumerate(tables)]
    counts = [len(table.train) for table in tables]
    return [sum(n * w[i] for n, w in zip(counts, trained)) / sum(counts) for i in range(len(initial))]
