"""Load test for `lungxray serve`: a server process, and clients in a separate process on loopback.

    python benchmarks/serve_load.py --model RUN_DIR [--images ../shared/cxr/test] [--requests 2000] [--clients 8]

Sends a bounded number of requests (about 10% invalid uploads), from `--clients` concurrent
connections, for at most `--seconds`, and prints throughput, latency percentiles, responses by
status and the server's memory before and after.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def payloads(folder: Path, count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    rng = random.Random(seed)
    chosen = [(p.name, p.read_bytes()) for p in rng.sample(files, min(count, len(files)))]
    bad = [("garbage.png", os.urandom(2000)), ("empty.jpg", b""), ("truncated.jpg", chosen[0][1][:500])]
    mix = []
    for i in range(count):
        mix.append(bad[i % len(bad)] if i % 10 == 9 else chosen[i % len(chosen)])
    return mix


def client_process(url: str, work: list, clients: int, deadline: float, out: multiprocessing.Queue) -> None:
    jobs = iter(work)
    lock = threading.Lock()
    results = []

    def run():
        with httpx.Client(timeout=30) as session:
            while time.time() < deadline:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    return
                name, data = job
                start = time.perf_counter()
                response = session.post(url, files={"file": (name, data, "application/octet-stream")})
                results.append((response.status_code, time.perf_counter() - start, name))

    threads = [threading.Thread(target=run) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((results, time.perf_counter() - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", default="../shared/cxr/test")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lungxray.cli", "serve", "--model", args.model,
                               "--port", str(port)], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            sys.exit("the server did not start")
        work = payloads(Path(args.images), args.requests)
        warm = payloads(Path(args.images), 50, seed=1)
        for name, data in warm:  # warm-up: first calls trace functions and fill caches
            httpx.post(f"{base}/api/predict", files={"file": (name, data)}, timeout=30)
        memory_before = rss_mb(server.pid)
        queue: multiprocessing.Queue = multiprocessing.Queue()
        process = multiprocessing.Process(target=client_process, args=(f"{base}/api/predict", work, args.clients,
                                                                          time.time() + args.seconds, queue))
        process.start()
        results, elapsed = queue.get()
        process.join()
        memory_after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    latencies = sorted(latency for status, latency, _ in results if status == 200)
    statuses = collections.Counter(status for status, _, _ in results)
    percentile = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(f"{len(results)} requests from {args.clients} concurrent clients in {elapsed:.1f} s; "
          f"{os.cpu_count()} CPUs")
    print("| predictions/s | p50 ms | p95 ms | p99 ms | responses by status | server RSS before → after MB |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(latencies) / elapsed:.0f} | {percentile(0.50):.1f} | {percentile(0.95):.1f} | {percentile(0.99):.1f} | "
          f"{json.dumps(dict(sorted(statuses.items())))} | {memory_before:.0f} → {memory_after:.0f} |")


if __name__ == "__main__":
    main()
