"""Archive scoring at scale: the single-process engine against Ray with 1 and 2 workers, in one run.

    python benchmarks/scale.py --model RUN_DIR_or_EXPORT [--n 100000] [--workdir /tmp/lungxray-scale]

Makes `--n` JPEGs from ../shared/cxr (each film re-encoded at quality 95, 85 or 75, plain or
mirrored, until there are enough; kept in WORKDIR/images between runs), then scores them all with
`lungxray predict --out` three times, each a fresh process writing a fresh folder: `--engine local`,
`--engine ray --workers 1`, `--engine ray --workers 2` (a Ray instance started by the command).
Each row: wall time of the whole command (Ray's start-up included), images/s, and the peak resident
memory of the command's process tree (for Ray: the driver, GCS, raylet and workers), sampled
every 0.2 s from /proc.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image, ImageOps

from lungxray.parallel import bounded_map, progress

CXR = Path(__file__).resolve().parents[2] / "shared" / "cxr"
VARIANTS = [(95, False), (95, True), (85, False), (85, True), (75, False), (75, True)]


def make_images(n: int, folder: Path) -> Path:
    """`n` JPEGs in folders of 1,000, listed in folder/list.csv; reused when already there."""
    listing = folder / "list.csv"
    if listing.is_file() and sum(1 for _ in open(listing)) - 1 >= n:
        return listing
    films = [row["file"] for row in csv.DictReader(open(CXR / "manifest.csv"))]

    def one(i: int) -> str:
        quality, mirrored = VARIANTS[(i // len(films)) % len(VARIANTS)]
        image = Image.open(CXR / films[i % len(films)]).convert("L")
        name = f"{i // 1000:03d}/{i:06d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (ImageOps.mirror(image) if mirrored else image).save(folder / name, quality=quality)
        return name

    names = list(progress(bounded_map(one, range(n)), n, "making images"))
    with open(listing, "w", newline="") as handle:
        csv.writer(handle).writerows([["file"]] + [[name] for name in names])
    return listing


def tree_rss_mb(root: int) -> float:
    """Resident memory of `root` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    family, grew = {root}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in family} - family
        family |= new
        grew = bool(new)
    total = 0
    for pid in family:
        try:
            total += next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak MB of the process tree, last line of output) of `command`."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output, errors = process.communicate()
    sampler.join()
    if process.returncode:
        said = errors.strip().splitlines()[-1] if errors.strip() else "nothing on stderr"
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {said}")
    return time.perf_counter() - started, peak[0], output.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run folder (its LiteRT export is used) or an export")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lungxray-scale"))
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()

    listing = make_images(args.n, args.workdir / "images")
    lungxray = str(Path(sys.executable).parent / "lungxray")
    rows = [("single process (`--engine local`, 2 threads)", ["--engine", "local"]),
            ("Ray, 1 worker", ["--engine", "ray", "--workers", "1"]),
            ("Ray, 2 workers", ["--engine", "ray", "--workers", "2"])]
    print(f"{args.n:,} JPEGs, batches of {args.batch_size}, {os.cpu_count()} cores\n")
    print("| engine | wall s | images/s | peak memory MB | against single process |\n|---|---|---|---|---|")
    baseline = None
    for name, engine in rows:
        out = args.workdir / "scored"
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak, said = timed([lungxray, "predict", "--model", args.model, "--out", str(out),
                                     "--batch-size", str(args.batch_size), *engine, str(listing)])
        rate = args.n / seconds
        baseline = baseline or rate
        print(f"| {name} | {seconds:.1f} | {rate:.0f} | {peak:.0f} | {rate / baseline:.2f} |  <!-- {said} -->",
              flush=True)


if __name__ == "__main__":
    main()
