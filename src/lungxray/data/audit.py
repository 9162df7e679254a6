"""Data audit: what a dataset holds, and the leaks, duplicates and shortcuts hiding in it.

Near duplicates are found with a 256-bit difference hash (`imagehash.dhash`, 16x16) of each image
and of its mirror image, compared all against all as packed bits (XOR and popcount in NumPy,
row blocks at a time): exact, not quadratic in Python. The threshold, a Hamming distance of 10,
was measured on real X-rays from ../shared/cxr (docs/results.md): JPEG re-encoding at quality
75 moves the hash by at most 8 bits, quality 50 by at most 12 (99th percentile 9), resizing by at
most 7, while 600 distinct images were never closer than 17 to each other.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps

from lungxray.data.images import is_dicom, read_image
from lungxray.data.records import Dataset, Record
from lungxray.errors import ImageError
from lungxray.io import file_hash, write_json, write_text
from lungxray.parallel import bounded_map, progress

NEAR_DUPLICATE_DISTANCE = 10
HASH_SIZE = 16  # 16 x 16 = 256 bits
SHORTCUT_SHARE = 0.9  # a property held by >= 90% of one class and <= 10% of another is flagged


@dataclasses.dataclass
class ImageFacts:
    sha256: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    dhash: np.ndarray | None = None  # packed bits, (4,) uint64
    dhash_mirror: np.ndarray | None = None
    error: str | None = None


def _packed(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.flatten()).view(np.uint64)


def image_facts(record: Record) -> ImageFacts:
    try:
        data = record.path.read_bytes()
    except OSError as error:
        return ImageFacts(error=f"cannot read file ({error.strerror or error})")
    facts = ImageFacts(sha256=file_hash(data))
    try:
        pixels = read_image(data, name=str(record.path))
        if is_dicom(data):  # Pillow cannot open DICOM; the decoded pixels give the size
            facts.height, facts.width, facts.mode, facts.format = *pixels.shape[:2], "DICOM", "DICOM"
        else:
            with Image.open(io.BytesIO(data)) as header:
                facts.width, facts.height, facts.mode, facts.format = *header.size, header.mode, header.format or ""
    except (ImageError, OSError, ValueError) as error:
        facts.error = getattr(error, "reason", str(error))
        return facts
    gray = Image.fromarray(pixels).convert("L")
    facts.dhash = _packed(imagehash.dhash(gray, HASH_SIZE).hash)
    facts.dhash_mirror = _packed(imagehash.dhash(ImageOps.mirror(gray), HASH_SIZE).hash)
    return facts


def compare_hashes(hashes: np.ndarray, mirrors: np.ndarray, threshold: int,
                   block: int = 256) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """All against all, in one pass over blocks of rows. The distance of two images is the smaller
    of their hashes' Hamming distance and that of one's hash to the other's mirror image's.

    Returns the pairs (i, j, distance), i < j, within `threshold`, and each image's distance to its
    nearest other image (for choosing the threshold)."""
    pairs, nearest = [], np.empty(len(hashes), np.int64)
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        direct = np.bitwise_count(rows[:, None, :] ^ hashes[None, :, :]).sum(axis=2)
        mirrored = np.bitwise_count(rows[:, None, :] ^ mirrors[None, :, :]).sum(axis=2)
        distance = np.minimum(direct, mirrored)
        distance[np.arange(len(rows)), np.arange(start, start + len(rows))] = 1 << 20  # not itself
        nearest[start:start + len(rows)] = distance.min(axis=1)
        pairs += [(start + int(i), int(j), int(distance[i, j]))
                  for i, j in zip(*np.nonzero(distance <= threshold)) if start + i < j]
    return pairs, nearest


def audit(dataset: Dataset, threshold: int = NEAR_DUPLICATE_DISTANCE) -> dict:
    records = dataset.records
    facts = list(progress(bounded_map(image_facts, records), len(records), "auditing"))
    readable = [i for i, f in enumerate(facts) if f.dhash is not None]
    unreadable = [{"file": records[i].file or str(records[i].path), "reason": f.error}
                  for i, f in enumerate(facts) if f.error]

    duplicates = []
    hashes = np.stack([facts[i].dhash for i in readable]) if readable else np.zeros((0, 4), np.uint64)
    mirrors = np.stack([facts[i].dhash_mirror for i in readable]) if readable else hashes
    pairs, nearest = compare_hashes(hashes, mirrors, threshold)
    for a, b, distance in pairs:
        i, j = readable[a], readable[b]
        kind = "exact" if facts[i].sha256 == facts[j].sha256 else "near"
        duplicates.append(_pair(records[i], records[j], kind, distance))
    nearest = nearest if len(hashes) > 1 else np.zeros(0)

    return {
        "source": dataset.origin, "layout": dataset.layout, "images": len(records),
        "counts": dataset.counts(),
        "unreadable": unreadable,
        "properties": _properties(records, facts),
        "shortcuts": _shortcuts(records, facts, dataset.classes),
        "duplicates": duplicates,
        "summary": _summary(duplicates),
        "near_duplicate_method": {"hash": f"imagehash.dhash, {HASH_SIZE * HASH_SIZE} bits, and of the mirror image",
                                  "threshold": threshold,
                                  "nearest_distance_histogram": np.bincount(nearest.astype(int)).tolist()
                                  if len(nearest) else []},
    }


def _pair(a: Record, b: Record, kind: str, distance: int) -> dict:
    return {"a": a.file or str(a.path), "b": b.file or str(b.path), "kind": kind, "distance": distance,
            "split_a": a.split, "split_b": b.split, "label_a": a.label, "label_b": b.label}


def _summary(duplicates: list[dict]) -> dict:
    leaks = [d for d in duplicates if d["split_a"] != d["split_b"] and "train" in (d["split_a"], d["split_b"])]
    leaked = sorted({d["a"] if d["split_b"] == "train" else d["b"] for d in leaks})
    return {
        "exact_pairs": sum(d["kind"] == "exact" for d in duplicates),
        "near_pairs": sum(d["kind"] == "near" for d in duplicates),
        "within_split_pairs": sum(d["split_a"] == d["split_b"] for d in duplicates),
        "cross_split_pairs": sum(d["split_a"] != d["split_b"] for d in duplicates),
        "leaked_eval_images": leaked,  # val/test images with a copy in train
        "label_conflicts": [d for d in duplicates if d["label_a"] != d["label_b"]],
    }


def _properties(records: list[Record], facts: list[ImageFacts]) -> dict:
    """Per split and class: image sizes, modes and formats (the most common few, with counts)."""
    table: dict = {}
    for record, f in zip(records, facts):
        if f.error and not f.mode:
            continue
        cell = table.setdefault(record.split or "all", {}).setdefault(
            record.label, {"size": collections.Counter(), "mode": collections.Counter(), "format": collections.Counter()})
        cell["size"][f"{f.width}x{f.height}"] += 1
        cell["mode"][f.mode] += 1
        cell["format"][f.format] += 1
    return {split: {label: {k: dict(v.most_common(5)) for k, v in cell.items()} for label, cell in row.items()}
            for split, row in table.items()}


def _shortcuts(records: list[Record], facts: list[ImageFacts], classes: list[str]) -> list[dict]:
    """A size, mode or format that nearly all of one class has and almost none of another."""
    flagged = []
    for attribute, value_of in (("format", lambda f: f.format), ("mode", lambda f: f.mode),
                                ("size", lambda f: f"{f.width}x{f.height}")):
        shares: dict[str, collections.Counter] = {}
        for record, f in zip(records, facts):
            if f.mode:
                shares.setdefault(record.label, collections.Counter())[value_of(f)] += 1
        for label, counter in shares.items():
            value, count = counter.most_common(1)[0]
            share = count / sum(counter.values())
            if share < SHORTCUT_SHARE:
                continue
            for other, other_counter in shares.items():
                other_share = other_counter[value] / sum(other_counter.values())
                if other != label and other_share <= 1 - SHORTCUT_SHARE:
                    flagged.append({"attribute": attribute, "value": value, "class": label, "share": share,
                                    "other_class": other, "other_share": other_share})
    return flagged


def format_summary(report: dict) -> str:
    s = report["summary"]
    lines = [f"{report['images']} images in {report['source']} ({report['layout']} layout)"]
    for split, row in report["counts"].items():
        lines.append(f"  {split:5s} " + "  ".join(f"{c}: {n}" for c, n in row.items()))
    lines.append(f"unreadable: {len(report['unreadable'])}")
    lines.append(f"duplicates (Hamming distance <= {report['near_duplicate_method']['threshold']}): "
                 f"{s['exact_pairs']} exact pairs, {s['near_pairs']} near pairs; {s['within_split_pairs']} within a split, "
                 f"{s['cross_split_pairs']} across splits")
    lines.append(f"leakage: {len(s['leaked_eval_images'])} val/test images have a copy in train")
    lines.append(f"label conflicts: {len(s['label_conflicts'])} pairs show the same picture under two labels")
    for flag in report["shortcuts"]:
        lines.append(f"shortcut: {flag['share']:.0%} of '{flag['class']}' has {flag['attribute']} {flag['value']}, "
                     f"against {flag['other_share']:.0%} of '{flag['other_class']}'")
    return "\n".join(lines)


def write_audit(report: dict, out: Path) -> None:
    out = Path(out)
    write_json(out / "audit.json", report)
    s = report["summary"]
    lines = ["# Data audit", "", "```", format_summary(report), "```", "",
             "## Properties per split and class", "", "| split | class | sizes | modes | formats |", "|---|---|---|---|---|"]
    for split, row in report["properties"].items():
        for label, cell in row.items():
            lines.append(f"| {split} | {label} | " + " | ".join(
                ", ".join(f"{k} ({v})" for k, v in cell[key].items()) for key in ("size", "mode", "format")) + " |")
    lines += ["", "## Val/test images with a copy in train", ""]
    lines += [f"- `{f}`" for f in s["leaked_eval_images"][:200]] or ["None found."]
    lines += ["", "## Label conflicts", ""]
    lines += [f"- `{d['a']}` ({d['label_a']}) and `{d['b']}` ({d['label_b']}), distance {d['distance']}"
              for d in s["label_conflicts"][:200]] or ["None found."]
    lines += ["", "## Unreadable files", ""]
    lines += [f"- `{u['file']}`: {u['reason']}" for u in report["unreadable"][:200]] or ["None."]
    lines += ["", f"Every duplicate pair is listed in audit.json ({len(report['duplicates'])} pairs)."]
    write_text(out / "audit.md", "\n".join(lines) + "\n")
