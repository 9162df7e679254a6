"""Load test for `lungxray serve`, in one run: the predictor in-process, then the server with and
without dynamic batching, each with 1, 8 and 32 concurrent clients.

    python benchmarks/serve_load.py --model RUN_DIR_or_EXPORT [--images ../shared/cxr/test]
                                    [--requests 2000] [--clients 1,8,32] [--max-batch 32] [--workers 2] [--records]

The server is a separate process (`lungxray serve`, its audit log written to a file as in service);
the clients run in another process on loopback and send pre-encoded HTTP/1.1 requests over raw
keep-alive sockets, so that the client's own cost on these shared cores is as small as it can be.
One upload in ten is invalid (random bytes, empty, truncated). It prints predictions/s (answers
with 200 per second), that figure against the in-process one measured just before the row, latency percentiles of the 200s,
responses by status, the mean images per predicted batch (from /metrics), the server's CPU time per
answer (its processes' user + system time over the row, over the answers with 200) and its memory.
`--workers N` adds a row per client count for an unbatched `serve --workers N` (N processes on the
port, sharing their limits and metrics); `--records` one for an unbatched server that writes each
answer's monitoring record (`--records FILE`), measured right after the unbatched one without.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BOUNDARY = "lungxray-load"


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (a server's workers and their manager)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += rss_mb(int(child))
    return total


def cpu_seconds(pid: int) -> float:
    """User + system time of a process and its descendants so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += cpu_seconds(int(child))
    return total


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def payloads(files: list[Path], count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    chosen = [(p.name, p.read_bytes()) for p in rng.sample(files, min(count, len(files)))]
    bad = [("garbage.png", os.urandom(2000)), ("empty.jpg", b""), ("truncated.jpg", chosen[0][1][:500])]
    return [bad[i % len(bad)] if i % 10 == 9 else chosen[i % len(chosen)] for i in range(count)]


def http_request(name: str, data: bytes) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_status(stream) -> int:
    """Read one whole response from a keep-alive connection; its status."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    stream.read(length)
    return status


def client_process(port: int, work: list[bytes], clients: int, deadline: float, out: multiprocessing.Queue) -> None:
    jobs = iter(work)
    lock = threading.Lock()
    results = []

    def run():
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = connection.makefile("rb")
            while time.time() < deadline:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    return
                start = time.perf_counter()
                connection.sendall(job)
                results.append((read_status(stream), time.perf_counter() - start))

    threads = [threading.Thread(target=run) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((results, time.perf_counter() - started))


class InProcess:
    """The predictor that `serve` would load, run on files in this process: images/s."""

    def __init__(self, model: str, files: list[Path]):
        from lungxray.infer.loader import load_predictor
        from lungxray.infer.lite_predictor import is_export
        from lungxray.rundir import RunDir

        self.predictor, self.files = load_predictor(model if is_export(model) else RunDir.open(model).model), files
        self.predictor.predict_files(files[:50], desc=None)  # warm-up

    def images_per_second(self) -> float:
        started = time.perf_counter()
        self.predictor.predict_files(self.files, desc=None)
        return len(self.files) / (time.perf_counter() - started)


def batch_totals(base: str) -> tuple[float, float]:
    """Images predicted and calls made so far, from the server's /metrics."""
    totals = dict(line.split() for line in httpx.get(f"{base}/metrics").text.splitlines()
                  if line.startswith(("lungxray_batch_images_sum ", "lungxray_batch_images_count ")))
    return float(totals["lungxray_batch_images_sum"]), float(totals["lungxray_batch_images_count"])


@contextlib.contextmanager
def server(model: str, max_batch: int, audit: Path, workers: int = 1, options: tuple[str, ...] = ()):
    """A `lungxray serve` process: yields (port, process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Every client runs on this machine: one address, which the server would otherwise cap at 16 connections.
    process = subprocess.Popen([sys.executable, "-m", "lungxray.cli", "serve", "--model", model, "--port", str(port),
                                "--max-batch", str(max_batch), "--audit-log", str(audit), "--workers", str(workers),
                                "--max-connections-per-client", "100", *options],
                               stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            sys.exit("the server did not start")
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=60)


def measure(port: int, process, work: list[bytes], warm: list[bytes], clients: int, seconds: float) -> dict:
    base = f"http://127.0.0.1:{port}"
    run_load(port, warm, min(clients, 8), time.time() + 60)  # warm-up: traced functions, caches
    images_before, calls_before = batch_totals(base)
    memory_before, cpu_before = rss_mb(process.pid), cpu_seconds(process.pid)
    results, elapsed = run_load(port, work, clients, time.time() + seconds)
    images, calls = batch_totals(base)
    return {"clients": clients, "results": results, "elapsed": elapsed,
            "batch": (images - images_before) / max(1.0, calls - calls_before),
            "cpu": cpu_seconds(process.pid) - cpu_before, "memory": (memory_before, rss_mb(process.pid))}


def run_load(port: int, work: list[bytes], clients: int, deadline: float):
    queue: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=client_process, args=(port, work, clients, deadline, queue))
    process.start()
    results, elapsed = queue.get()
    process.join()
    return results, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", default="../shared/cxr/test")
    parser.add_argument("--requests", type=int, default=2000, help="per row")
    parser.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=32, help="the batching server's (default: 32)")
    parser.add_argument("--seconds", type=float, default=120, help="at most, per row")
    parser.add_argument("--workers", type=int, default=1,
                        help="add rows for an unbatched server with this many worker processes (default 1: none)")
    parser.add_argument("--records", action="store_true",
                        help="add rows for an unbatched server that writes each answer's monitoring record")
    args = parser.parse_args()

    files = image_files(Path(args.images))
    reference = InProcess(args.model, random.Random(2).sample(files, min(1000, len(files))))
    work = [http_request(*p) for p in payloads(files, args.requests)]
    warm = [http_request(*p) for p in payloads(files, 100, seed=1)]
    rows = []
    # Both servers up at once (an idle one costs nothing) and their rows interleaved, each beside its
    # own in-process figure: these machines drift by tens of percent within minutes.
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as servers:
        unbatched = servers.enter_context(server(args.model, 1, Path(folder) / "off.jsonl"))
        batched = servers.enter_context(server(args.model, args.max_batch, Path(folder) / "on.jsonl"))
        several = (servers.enter_context(server(args.model, 1, Path(folder) / "workers.jsonl", args.workers))
                   if args.workers > 1 else None)
        recording = (servers.enter_context(server(args.model, 1, Path(folder) / "recording.jsonl",
                                                  options=("--records", str(Path(folder) / "records.jsonl"))))
                     if args.records else None)
        for clients in args.clients:
            kinds = [("off", unbatched), *([("off, --records", recording)] if recording else []),
                     (f"up to {args.max_batch}", batched)]
            for name, (port, process) in kinds:
                in_process = reference.images_per_second()
                rows.append({"batching": name, "in_process": in_process,
                             **measure(port, process, work, warm, clients, args.seconds)})
            if several is not None:
                in_process = reference.images_per_second()
                rows.append({"batching": f"off, {args.workers} workers", "in_process": in_process,
                             **measure(*several, work, warm, clients, args.seconds)})

    print(f"{args.requests} requests per row; {os.cpu_count()} CPUs")
    print("| batching | clients | in-process images/s | predictions/s | × in-process | p50 ms | p95 ms | p99 ms "
          "| responses by status | images per batch | server CPU ms per answer | server RSS before → after MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        latencies = sorted(latency for status, latency in row["results"] if status == 200)
        statuses = collections.Counter(status for status, _ in row["results"])
        percentile = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
        served = len(latencies) / row["elapsed"]
        print(f"| {row['batching']} | {row['clients']} | {row['in_process']:.0f} | {served:.0f} "
              f"| {served / row['in_process']:.2f} | {percentile(0.5):.1f} | {percentile(0.95):.1f} "
              f"| {percentile(0.99):.1f} | {json.dumps(dict(sorted(statuses.items())))} | {row['batch']:.1f} "
              f"| {1000 * row['cpu'] / len(latencies):.2f} | {row['memory'][0]:.0f} → {row['memory'][1]:.0f} |")


if __name__ == "__main__":
    main()
