"""Orthanc -> lungxray -> Orthanc: chest films through a real PACS and the DICOM node, on loopback.

    python benchmarks/dicom_node.py --model RUN/export/model.tflite [--films ../shared/cxr/test] [--count 500]
        [--side 0] [--rate 20]

Orthanc (Debian's package) and `lungxray dicom listen` run as their own processes, set up as in
tests/test_pacs.py. The films are CRs made from ../shared/cxr films (one study each; `--side N`
enlarges them to N x N 12-bit pixels, the size of a real CR), uploaded to Orthanc before any clock
starts. Two phases, each with films the node has not seen:

- burst: Orthanc is asked to send `--count` films at once (one store job). Instances/s = films /
  (last report stored - the request). Latency per film: the node has received it (its audit log) ->
  its report is stored in Orthanc; it includes the wait behind the films before it.
- paced: Orthanc is asked to send one film every 1/`--rate` s. Latency: the request -> the report
  stored in Orthanc.

"Stored in Orthanc" is when the report first appears in Orthanc's /changes, polled every 25 ms.
Memory: the node process's peak resident set (VmHWM). CPU: seconds of the two cores each phase used,
by the node, by Orthanc and by the whole machine (this benchmark's own polling included), per film:
whether the cores, not a wait, set the pace.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungxray.dicom.node import hashed  # noqa: E402
from tests.test_dicom_node import listen  # noqa: E402
from tests.test_distribute import free_ports  # noqa: E402
from tests.test_pacs import Orthanc, cr_film  # noqa: E402


class ChangeWatcher(threading.Thread):
    """Polls Orthanc's /changes and notes when each new instance first appears (wall-clock time)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.seen, self.stopping = url, {}, threading.Event()
        self.since = httpx.get(f"{url}/changes", params={"last": ""}, timeout=10).json()["Last"]

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stopping.is_set():
                answer = client.get(f"{self.url}/changes", params={"since": self.since, "limit": 1000}).json()
                now = time.time()
                for change in answer["Changes"]:
                    if change["ChangeType"] == "NewInstance":
                        self.seen.setdefault(change["ID"], now)
                self.since = answer["Last"]
                if answer["Done"]:
                    time.sleep(0.025)

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)


def make_films(folder: Path, images: list[Path], side: int) -> list[Path]:
    films = []
    for index, image in enumerate(images):
        pixels = np.asarray(Image.open(image).convert("L"))
        bits = 8
        if side:
            pixels = np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR), np.float32)
            pixels, bits = np.uint16(pixels * 4095 / 255), 16
        films.append(cr_film(folder / f"film{index:04d}.dcm", pixels, bits=bits))
    return films


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def reported_at(watcher: ChangeWatcher, url: str) -> dict[str, float]:
    """When each report appeared in Orthanc, by the study it belongs to (one film a study)."""
    studies = {}
    with httpx.Client(timeout=10) as client:
        for instance, seen in watcher.seen.items():
            tags = client.get(f"{url}/instances/{instance}/simplified-tags").json()
            if tags.get("Modality") == "SR":
                studies[tags["StudyInstanceUID"]] = seen
    return studies


def received_at(audit: Path) -> dict[str, float]:
    """When the node had received each instance, by its hashed SOP Instance UID."""
    from datetime import datetime

    times = {}
    for line in audit.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "received":
            times[event["instance"]] = datetime.fromisoformat(event["time"]).timestamp()
    return times


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU time of the whole machine so far, all cores, not idle or waiting on the disk."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds the node, Orthanc and the machine spend between start() and stop()."""

    def __init__(self, node_pid: int, orthanc_pid: int):
        self.pids = {"node": node_pid, "orthanc": orthanc_pid}

    def start(self) -> None:
        self.began = {name: cpu_seconds(pid) for name, pid in self.pids.items()} | {"machine": machine_cpu_seconds()}

    def stop(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()} | {"machine": machine_cpu_seconds()}
        return {name: now[name] - self.began[name] for name in now}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export (or run folder) for `dicom listen`")
    parser.add_argument("--films", default="../shared/cxr/test")
    parser.add_argument("--count", type=int, default=500, help="films in the burst")
    parser.add_argument("--paced", type=int, default=200, help="films in the paced phase")
    parser.add_argument("--rate", type=float, default=20.0, help="films a second in the paced phase")
    parser.add_argument("--side", type=int, default=0, help="enlarge films to SIDE x SIDE 12-bit pixels (0: as they are)")
    parser.add_argument("--orthanc-nodelay", action="store_true",
                        help="start Orthanc with TCP_NODELAY=1 (DCMTK, inside Orthanc, then turns Nagle's algorithm off)")
    args = parser.parse_args()

    images = sorted(p for p in Path(args.films).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    images = [images[i % len(images)] for i in range(args.count + args.paced)]
    work = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    (work / "films").mkdir()
    films = make_films(work / "films", images, args.side)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in films]
    node_port = free_ports(1)[0]
    orthanc = Orthanc(work / "orthanc", node_port, {"TCP_NODELAY": "1"} if args.orthanc_nodelay else None).start()
    node = listen(args.model, work / "spool", node_port, orthanc.dicom_port, send_to_aet="ORTHANC")
    try:
        ids = [orthanc.upload(f) for f in films]
        print(f"{len(films)} films of {films[0].stat().st_size / 2**20:.2f} MB uploaded to Orthanc", flush=True)
        rows = []
        meter = CpuMeter(node.pid, orthanc.process.pid)

        watcher = ChangeWatcher(orthanc.url)
        watcher.start()
        meter.start()
        burst = slice(0, args.count)
        started = time.time()
        httpx.post(f"{orthanc.url}/modalities/lungxray/store", json={"Resources": ids[burst], "Asynchronous": True},
                   timeout=60).raise_for_status()
        watcher.wait_for(args.count, timeout=600)
        cpu = meter.stop()
        watcher.stopping.set()
        watcher.join()
        stored = reported_at(watcher, orthanc.url)
        received = received_at(work / "spool" / "audit.jsonl")
        latencies = [stored[d.StudyInstanceUID] - received[hashed(str(d.SOPInstanceUID))]
                     for d in datasets[burst] if d.StudyInstanceUID in stored]
        elapsed = max(stored.values()) - started
        rows.append(("burst", len(stored), elapsed, len(stored) / elapsed, latencies, cpu))

        watcher = ChangeWatcher(orthanc.url)
        watcher.start()
        asked = {}
        meter.start()
        paced_start = time.time()
        with httpx.Client(timeout=60) as client:
            for index in range(args.count, len(ids)):
                pause = paced_start + (index - args.count) / args.rate - time.time()
                if pause > 0:
                    time.sleep(pause)
                asked[datasets[index].StudyInstanceUID] = time.time()
                client.post(f"{orthanc.url}/modalities/lungxray/store",
                            json={"Resources": [ids[index]], "Asynchronous": True}).raise_for_status()
        watcher.wait_for(args.paced, timeout=600)
        cpu = meter.stop()
        watcher.stopping.set()
        watcher.join()
        stored = reported_at(watcher, orthanc.url)
        latencies = [stored[study] - at for study, at in asked.items() if study in stored]
        elapsed = max(stored.values()) - paced_start
        rows.append((f"paced {args.rate:g}/s", len(stored), elapsed, len(stored) / elapsed, latencies, cpu))
        memory = peak_rss_mb(node.pid)
    finally:
        node.terminate()
        node.wait(timeout=60)
        orthanc.stop()

    print(f"\nfilms {'%dx%d 12-bit' % (args.side, args.side) if args.side else 'as in ' + args.films}, "
          f"model {args.model}, Orthanc {'with TCP_NODELAY=1' if args.orthanc_nodelay else 'as shipped'}")
    print(f"{'phase':<14}{'reports':>9}{'seconds':>9}{'per s':>8}{'p50 s':>8}{'p95 s':>8}{'max s':>8}"
          f"{'cores busy':>12}{'node ms/film':>14}{'Orthanc ms/film':>17}")
    for phase, count, elapsed, rate, latencies, cpu in rows:
        print(f"{phase:<14}{count:>9}{elapsed:>9.1f}{rate:>8.1f}{percentile(latencies, 50):>8.3f}"
              f"{percentile(latencies, 95):>8.3f}{max(latencies, default=float('nan')):>8.3f}"
              f"{cpu['machine'] / elapsed:>12.2f}{1000 * cpu['node'] / count:>14.1f}{1000 * cpu['orthanc'] / count:>17.1f}")
    print(f"node peak memory {memory:.0f} MB; mean latency burst {statistics.fmean(rows[0][4]):.2f} s")


if __name__ == "__main__":
    main()
