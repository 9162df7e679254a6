"""Train the reference recipe with both engines in one invocation and print where the time goes.

    python benchmarks/train_speed.py --data ../shared/cxr --weights PATH [--epochs 30] [--engines cached,keras]

Each engine runs in its own process (so peak memory is its own), on a fresh feature cache; the
cached engine then runs once more on the warm cache. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
started = time.perf_counter()
from lungxray import Config, train
from lungxray.data.records import load_dataset
imported = time.perf_counter() - started
args = json.loads(sys.argv[1])
config = Config(weights=args["weights"], epochs=args["epochs"], engine=args["engine"])
result = train(args["data"], args["out"], config, cache_dir=args["cache"])
n = len(load_dataset(args["data"]).records)
print("RESULT " + json.dumps({
    "timings": {"import": imported, **result.timings},
    "images": n,
    "epochs_run": len(result.history["loss"]),
    "test_accuracy": result.test_metrics["accuracy"],
    "test_macro_f1": result.test_metrics["macro_f1"],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""

DECODE = r"""
import json, sys, time
from lungxray.data.pipeline import scan_images
from lungxray.data.records import load_dataset
records = load_dataset(sys.argv[1]).records
start = time.perf_counter()
_, errors = scan_images(records, 224, desc="decode only")
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "images": len(records)}))
"""


def run_child(code: str, *args: str) -> dict:
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if process.returncode != 0:
        sys.exit(f"benchmark child failed:\n{process.stderr[-3000:]}")
    line = next(l for l in process.stdout.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/cxr")
    parser.add_argument("--weights", default=os.environ.get("LUNGXRAY_WEIGHTS", "imagenet"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--engines", default="cached,keras")
    parser.add_argument("--out", default=None, help="keep run folders here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="lungxray-bench-"))

    decode = run_child(DECODE, args.data)
    results = {}
    for engine in args.engines.split(","):
        spec = {"data": args.data, "weights": args.weights, "epochs": args.epochs, "engine": engine,
                "out": str(work / engine), "cache": str(work / f"cache-{engine}")}
        results[engine] = run_child(CHILD, json.dumps(spec))
        if engine == "cached":
            results["cached (warm cache)"] = run_child(CHILD, json.dumps({**spec, "out": str(work / "cached-warm")}))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{decode['images']} images, {args.epochs} epochs; run folders in {work}")
    print(f"decode only (Pillow, threads): {decode['seconds']:.1f} s, {decode['images'] / decode['seconds']:.0f} images/s\n")
    header = ["engine", "process wall s", "import s", "setup s", "decode+extract / check s", "head training s",
              "evaluation s", "train() total s", "epochs", "images/s", "peak RSS MB", "test acc", "macro F1"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in results.items():
        t = r["timings"]
        print(f"| {name} | {r['wall']:.1f} | {t['import']:.1f} | {t['setup']:.1f} | {t['prepare']:.1f} | "
              f"{t['head_training']:.1f} | {t['evaluation']:.1f} | {t['total']:.1f} | {r['epochs_run']} | "
              f"{r['images'] * r['epochs_run'] / t['total']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} |")
    if "cached" in results and "keras" in results:
        ratio = results["keras"]["wall"] / results["cached"]["wall"]
        print(f"\nkeras / cached, whole process wall time: {ratio:.1f}x "
              f"(warm cache: {results['keras']['wall'] / results['cached (warm cache)']['wall']:.1f}x)")


if __name__ == "__main__":
    main()
