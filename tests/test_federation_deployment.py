"""A federation deployed for real on loopback: `lungxray federate server` (Flower's SuperLink, TLS,
SuperNode authentication) and three `lungxray federate site` processes, each with its own films. One
site is killed mid-federation and training finishes without it; a site whose key the server was not
given is refused; the first round equals a simulation of the same sites and seed."""

import csv
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lungxray.federated.deployment import flower_environment, supernode_command
from tests.test_dicom_node import certificate
from tests.test_distribute import free_ports
from tests.test_federated import sites_manifest

RECIPE = ["--weights", "none", "--image-size", "32", "--dense-units", "16", "--batch-size", "8"]


def site_key(folder, name: str):
    """A site's key pair in OpenSSH form, as `ssh-keygen -t ecdsa -b 384` makes it: (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def lungxray(*arguments: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lungxray.cli", *arguments], **options)


def test_a_deployed_federation_survives_a_killed_site_refuses_a_stranger_and_equals_a_simulation(tmp_path,
                                                                                               ray_alone):
    rows = list(csv.DictReader(open(sites_manifest(tmp_path))))
    cert, key = certificate(tmp_path, "server")  # self-signed: its own CA
    keys = {name: site_key(tmp_path, name) for name in ("A", "B", "C", "stranger")}
    port, *node_ports = free_ports(5)
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    server = lungxray("federate", "server", "--out", str(run), "--tls-cert", cert, "--tls-key", key, "--tls-ca", cert,
                      "--host", "127.0.0.1", "--port", str(port), "--cache", cache, *RECIPE,
                      *[a for name in "ABC" for a in ("--site-key", str(keys[name][1]))],
                      "--rounds", "2", "--local-steps", "2", "--aggregation", "fedavg", "--monitor", "val_loss",
                      stderr=subprocess.PIPE, text=True)
    sites = {}
    try:
        told = []
        for line in server.stderr:  # the sites are started once the server admits them, as its log tells
            told.append(line)
            if "start them now" in line:
                break
        else:
            pytest.fail("the server never admitted the sites: " + "".join(told[-30:]))
        log = []
        threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()
        for name, node_port in zip("ABC", node_ports):
            films = tmp_path / f"{name}.csv"
            with open(films, "w", newline="") as handle:  # each site its own films
                csv.writer(handle).writerows([("file", "label", "split")] + [
                    (r["file"], r["label"], r["split"]) for r in rows if r["source"] == name])
            sites[name] = lungxray("federate", "site", "--data", str(films), "--name", name, "--out",
                                   str(tmp_path / f"site-{name}"), "--superlink", f"127.0.0.1:{port}", "--tls-ca", cert,
                                   "--key", str(keys[name][0]), "--port", str(node_port), "--cache", cache, *RECIPE,
                                   stdout=open(tmp_path / f"site-{name}.log", "w"), stderr=subprocess.STDOUT)
        # A SuperNode with a key the server was not given, over the same TLS: refused before it joins.
        sites["stranger"] = subprocess.Popen(
            supernode_command(tmp_path / "none.npz", f"127.0.0.1:{port}", Path(cert), keys["stranger"][0],
                              node_ports[3]),
            env=flower_environment(), stdout=open(tmp_path / "site-stranger.log", "w"), stderr=subprocess.STDOUT)
        first = run / "federation" / "rounds" / "round-0001.npz"
        deadline = time.monotonic() + 300
        while not first.exists():  # the first round aggregated: C is killed while the sites evaluate it
            assert time.monotonic() < deadline and server.poll() is None, "".join(log[-40:])
            time.sleep(0.1)
        sites["C"].send_signal(signal.SIGTERM)  # SIGKILL does the same, once Flower's heartbeat misses it (~60 s)
        assert server.wait(timeout=400) == 0, "".join(log[-60:])
        assert sites["stranger"].wait(timeout=60) != 0
    finally:
        for process in [server, *sites.values()]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
    assert "Failed to activate SuperNode" in (tmp_path / "site-stranger.log").read_text()

    history = json.loads((run / "federation" / "history.json").read_text())
    roster = {site["name"]: site for site in history["sites"]}
    assert set(roster) == {"A", "B", "C"} and roster["C"]["dropped_during"] == "round 1"
    assert [(r["round"], r["sites"]) for r in history["rounds"]] == [(1, 2), (2, 2)]  # C's report never came
    assert (run / "model.keras").exists() and "| C | 0 | 0 | 8 | 4 | - |" in (run / "report.md").read_text()
    assert_first_round_equals_a_simulation(run, [tmp_path / f"site-{name}" / "site-tables.npz" for name in "ABC"])


def assert_first_round_equals_a_simulation(run, tables) -> None:
    """Round 1 had every site: Flower's simulation engine on the same site tables, initial head and
    settings makes the same head (to float32 sums in another order)."""
    from lungxray.config import Config, Federation
    from lungxray.federated.result import load_weights
    from lungxray.federated.simulation import run_federation

    job = json.loads((run / "federation" / "job.json").read_text())
    federation = Federation(**{**job["federation"], "rounds": 1})
    simulated = run.parent / "simulated"
    run_federation(simulated, Config.from_dict(job["config"]), federation, job["classes"],
                   load_weights(run / "federation" / "initial.npz"), job["fingerprint"], [str(t) for t in tables])
    deployed = load_weights(run / "federation" / "rounds" / "round-0001.npz")
    for ours, theirs in zip(deployed, load_weights(simulated / "rounds" / "round-0001.npz")):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_the_server_says_what_is_missing_before_it_starts(tmp_path, capsys):
    from lungxray.cli import main

    cert, key = certificate(tmp_path, "server")
    _, public = site_key(tmp_path, "A")
    common = ["federate", "server", "--tls-cert", cert, "--tls-key", key, "--tls-ca", cert]
    assert main([*common, "--out", str(tmp_path / "run"), "--site-key", str(public),
                 "--site-key", str(tmp_path / "B.pub")]) == 2
    assert f"--site-key: no such file: {tmp_path / 'B.pub'}" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "run"), "--site-key", str(public)]) == 2
    assert "1 site key(s) given; --min-sites is 2" in capsys.readouterr().err
    assert main(["federate", "server", "--tls-cert", cert, "--tls-key", str(tmp_path / "none.key"), "--tls-ca", cert,
                 "--out", str(tmp_path / "run"), "--site-key", str(public), "--site-key", str(public)]) == 2
    assert "--tls-key" in capsys.readouterr().err and not (tmp_path / "run" / "config.json").exists()
