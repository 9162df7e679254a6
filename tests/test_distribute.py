"""`train --strategy multi-worker`: two worker processes on 127.0.0.1, named by TF_CONFIG, train the
same model as one process (each takes half of every batch; gradients and batch statistics are
all-reduced), and only the chief writes the run folder."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungxray import Config, KerasPredictor, train
from lungxray.cli import main
from lungxray.data.pipeline import EpochPlan
from tests.conftest import TINY, write_class_folders

# Same images, same seeds; dropout 0 because each replica draws its own mask for its share. Features
# from Keras, in the workers and in the comparison: LiteRT would convert each fine-tuned backbone
# (~10 s each) and is not what is tested here.
# The cached engine's head on features, then fine-tuning on images: both of the distributed paths
# (features; images through `image_data` and `fit_phase`, which the Keras engine's head training is
# made of too, so that a run of the Keras engine alone would add ~50 s and no path).
CONFIG = Config(weights="none", image_size=TINY, engine="cached", epochs=2, batch_size=8, dense_units=16, dropout=0.0,
                feature_runtime="keras", fine_tune_epochs=1, fine_tune_layers=5)
# The all-reduce and the synchronised batch statistics add in another order (~1e-7); Adam turns a
# gradient that is ~0 in both runs into a step of about the learning rate either way, so a weight
# may differ by up to that; the predictions by far less.
WEIGHT_TOLERANCE = 2 * CONFIG.learning_rate
TOLERANCE = 1e-4


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_each_replica_gets_its_share_of_every_batch():
    plan = EpochPlan(10, batch_size=4, seed=0, views=2)
    whole = [(o.tolist(), f.tolist()) for o, f in plan()]
    halves = [[(o.numpy().tolist(), f.numpy().tolist()) for o, f in plan.dataset(((i,), 2))] for i in (0, 1)]
    for (order, flips), first, second in zip(whole, *halves):
        assert first == (order[0::2], flips[0::2]) and second == (order[1::2], flips[1::2])
    both = [[(o.numpy().tolist(), f.numpy().tolist()) for o, f in plan.dataset(((0, 1), 2))]]
    assert [pair for pairs in zip(*halves) for pair in pairs] == both[0]


def test_two_workers_on_loopback_train_the_model_one_process_trains(tmp_path):
    config = CONFIG
    data = write_class_folders(tmp_path / "data", per_class=8, splits=["train", "val", "test"])
    alone = train(data, tmp_path / "alone", config, cache_dir=tmp_path / "cache", strategy="none")
    config.save(tmp_path / "config.json")
    ports = free_ports(2)
    lungxray = str(Path(sys.executable).parent / "lungxray")
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                                       "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [lungxray, "train", "--data", str(data), "--out", str(tmp_path / "together"), "--config",
             str(tmp_path / "config.json"), "--cache", str(tmp_path / f"cache-{index}"), "--strategy", "multi-worker"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    assert "run folder" in outputs[0][0] and "the chief wrote the run folder" in outputs[1][0]
    assert all("strategy: multi-worker, 2 replicas" in err for _, err in outputs)

    together = KerasPredictor.load(tmp_path / "together", runtime="keras", cache_dir=tmp_path / "cache")
    head = KerasPredictor.load(alone.run_dir, runtime="keras", cache_dir=tmp_path / "cache")
    for mine, theirs in zip(together.head.get_weights(), head.head.get_weights()):
        np.testing.assert_allclose(mine, theirs, atol=WEIGHT_TOLERANCE)
    files = sorted((data / "test").rglob("*.png"))
    np.testing.assert_allclose(together.predict_files(files).probabilities, head.predict_files(files).probabilities,
                               atol=TOLERANCE)
    history = [(run / "history.csv").read_text().splitlines() for run in (alone.run_dir, tmp_path / "together")]
    assert len(history[0]) == len(history[1]) == 1 + config.epochs + config.fine_tune_epochs


def test_multi_worker_without_tf_config_says_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert main(["train", "--data", str(tmp_path), "--strategy", "multi-worker"]) == 2
    assert "needs TF_CONFIG" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["not json", '{"cluster": {}}'])
def test_a_bad_tf_config_is_named(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("TF_CONFIG", value)
    assert main(["train", "--data", str(tmp_path), "--strategy", "multi-worker"]) == 2
    assert "TF_CONFIG is not a tf.distribute cluster description" in capsys.readouterr().err
