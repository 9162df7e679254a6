"""A federation deployed for real on loopback: `lungxray federate server` (Flower's SuperLink, TLS,
SuperNode authentication) and three `lungxray federate site` processes, each with its own films. The
server is killed after round 1 and resumes with --resume; one site is stopped mid-round and the
federation finishes without it; a site whose key the server was not given is refused; the rounds every
site trained equal a simulation of the same sites and seed."""

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

from lungxray.federated.deployment import _accepts, flower_environment, supernode_command
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


def test_a_deployed_federation_survives_a_killed_site_and_server_refuses_a_stranger_and_equals_a_simulation(
        tmp_path, ray_lock):
    rows = list(csv.DictReader(open(sites_manifest(tmp_path))))
    cert, key = certificate(tmp_path, "server")  # self-signed: its own CA
    keys = {name: site_key(tmp_path, name) for name in ("A", "B", "C", "stranger")}
    port, *node_ports = free_ports(5)
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    server_options = ["--out", str(run), "--tls-cert", cert, "--tls-key", key, "--tls-ca", cert, "--host", "127.0.0.1",
                      "--port", str(port), "--cache", cache, *[a for n in "ABC" for a in ("--site-key", str(keys[n][1]))]]
    server, log = start_server(*server_options, *RECIPE, "--rounds", "2", "--local-steps", "2",
                               "--aggregation", "fedadam", "--monitor", "val_loss")
    sites = {}
    try:
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
        # The server crashes once round 1 is kept; restarted with --resume, it goes on from round 2.
        wait_for(run / "federation" / "checkpoint.npz", server, log)
        server.kill()
        server.wait()
        deadline = time.monotonic() + 60
        while _accepts(f"127.0.0.1:{port}"):  # its SuperLink went with it
            assert time.monotonic() < deadline, "the SuperLink outlived the server that started it"
            time.sleep(0.5)
        server, log = start_server(*server_options, "--resume")
        # Site C is stopped once round 2 is aggregated, while the sites evaluate it: the federation's report
        # on round 2 and its statistics come from A and B.
        wait_for(run / "federation" / "rounds" / "round-0002.npz", server, log)
        sites["C"].send_signal(signal.SIGTERM)  # SIGKILL does the same, once Flower's heartbeat misses it (~60 s)
        assert server.wait(timeout=400) == 0, "".join(log[-60:])
        assert sites["stranger"].wait(timeout=60) != 0
    finally:
        for process in [server, *sites.values()]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
        for node_port in node_ports:  # a ClientApp whose message the crash cut off waits forever (Flower 1.42)
            subprocess.run(["pkill", "-9", "-f", f"flwr-clientapp --runtime-api-address 127.0.0.1:{node_port} "])
    assert "Failed to activate SuperNode" in (tmp_path / "site-stranger.log").read_text()

    history = json.loads((run / "federation" / "history.json").read_text())
    roster = {site["name"]: site for site in history["sites"]}
    assert set(roster) == {"A", "B", "C"} and roster["C"]["dropped_during"] == "round 2"
    assert [(r["round"], r["sites"]) for r in history["rounds"]] == [(1, 3), (2, 2)]  # C stopped before its report
    assert history["resumed_after"] == [1]
    assert (run / "model.keras").exists() and "| C | 0 | 0 | 8 | 4 | - |" in (run / "report.md").read_text()
    # Rounds 1 and 2 had every site, round 2 on a restarted server: a simulation without a crash.
    with ray_lock():  # the deployment itself runs without Ray
        assert_rounds_equal_a_simulation(run, [tmp_path / f"site-{name}" / "site-tables.npz" for name in "ABC"], 2)


def start_server(*options: str) -> tuple[subprocess.Popen, list[str]]:
    """`lungxray federate server`, once it has admitted the sites (its log says to start them), and
    its log as it comes."""
    server = lungxray("federate", "server", *options, stderr=subprocess.PIPE, text=True)
    told = []
    for line in server.stderr:
        told.append(line)
        if "start them now" in line:
            break
    else:
        pytest.fail("the server never admitted the sites: " + "".join(told[-30:]))
    threading.Thread(target=lambda: told.extend(server.stderr), daemon=True).start()
    return server, told


def wait_for(path: Path, server: subprocess.Popen, log: list[str]) -> None:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert time.monotonic() < deadline and server.poll() is None, "".join(log[-40:])
        time.sleep(0.1)


def assert_rounds_equal_a_simulation(run, tables, rounds: int) -> None:
    """Rounds in which every site trained: Flower's simulation engine on the same site tables, initial
    head and settings makes the same heads (to float32 sums in another order)."""
    from lungxray.config import Config, Federation
    from lungxray.federated.result import load_weights
    from lungxray.federated.simulation import run_federation

    job = json.loads((run / "federation" / "job.json").read_text())
    federation = Federation(**{**job["federation"], "rounds": rounds})
    simulated = run.parent / "simulated"
    run_federation(simulated, Config.from_dict(job["config"]), federation, job["classes"],
                   load_weights(run / "federation" / "initial.npz"), job["fingerprint"], [str(t) for t in tables])
    for server_round in range(1, rounds + 1):
        name = f"round-{server_round:04d}.npz"
        deployed, simulation = (load_weights(folder / "rounds" / name) for folder in (run / "federation", simulated))
        for ours, theirs in zip(deployed, simulation):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=f"round {server_round}")


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
    # --resume continues a federation with its own settings, in the folder that holds it.
    assert main([*common, "--resume", "--site-key", str(public), "--site-key", str(public)]) == 2
    assert "--resume continues the federation in --out: give it" in capsys.readouterr().err
    assert main([*common, "--resume", "--out", str(tmp_path / "run"), "--rounds", "5", "--site-key", str(public)]) == 2
    assert "leave out --rounds" in capsys.readouterr().err
    assert main([*common, "--resume", "--out", str(tmp_path / "run"), "--site-key", str(public)]) == 2
    assert "the federation stopped before it began; start it again without --resume" in capsys.readouterr().err
