"""`lungxray data fetch | audit | split | import | merge | probe`: the data tools."""

from __future__ import annotations

import sys
from pathlib import Path

from lungxray.cli.common import cache_dir, ratios
from lungxray.data.importers import COLLECTIONS
from lungxray.data.importers.base import UNCERTAIN_POLICIES


def add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download and unpack the reference Dataset.zip")
    fetch.add_argument("--url", help="archive URL (default: the reference Dropbox link)")
    fetch.add_argument("--dest", help="destination folder (default ~/.cache/lungxray/datasets)")
    fetch.add_argument("--print-path", action="store_true", help="print only the unpacked dataset's folder")
    fetch.set_defaults(run=run_fetch)
    audit = data.add_parser("audit", help="counts, unreadable files, duplicates, leakage and format shortcuts")
    audit.add_argument("data", help="any layout train accepts")
    audit.add_argument("--out", help="folder for audit.json and audit.md (default: audit/)", default="audit")
    audit.add_argument("--threshold", type=int, help="near-duplicate Hamming distance (default 10 of 256 bits)")
    audit.set_defaults(run=run_audit)
    split = data.add_parser("split", help="a leakage-free train/val/test manifest")
    split.add_argument("data", help="any layout train accepts")
    split.add_argument("--out", required=True, help="a .csv path, or a folder for split.csv")
    split.add_argument("--group-by", help="a manifest column (e.g. patient_id) whose groups never cross splits")
    split.add_argument("--dedupe", action="store_true", help="keep one image per near-duplicate cluster")
    split.add_argument("--ratios", default="0.7,0.2,0.1", help="train,val,test shares (default 0.7,0.2,0.1)")
    split.add_argument("--seed", type=int, default=21)
    split.set_defaults(run=run_split)
    imports = data.add_parser("import", help="a manifest from a public collection's own label files")
    imports.add_argument("kind", choices=COLLECTIONS, help="the collection (docs/data.md has each one's mapping)")
    imports.add_argument("root", help="the folder the collection unpacks to")
    imports.add_argument("--out", required=True, help="the manifest .csv to write")
    imports.add_argument("--uncertain", default="drop", choices=UNCERTAIN_POLICIES,
                         help="uncertain labels (CheXpert, MIMIC): leave the image out, or read them as "
                              "negative or positive (default drop)")
    imports.add_argument("--views", default="PA,AP", help="views kept, or 'all' (default PA,AP: no laterals)")
    imports.add_argument("--source", help="the manifest's source name (default: the collection's)")
    imports.set_defaults(run=run_import)
    merge = data.add_parser("merge", help="imported manifests as one, patient-disjoint splits, duplicates across "
                                          "collections kept in one split")
    merge.add_argument("manifests", nargs="+", help="manifests written by lungxray data import")
    merge.add_argument("--out", required=True, help="the merged manifest .csv")
    merge.add_argument("--ratios", default="0.7,0.2,0.1", help="train,val,test shares (default 0.7,0.2,0.1)")
    merge.add_argument("--seed", type=int, default=21)
    merge.set_defaults(run=run_merge)
    probe = data.add_parser("probe", help="can backbone features predict a nuisance column within a class?")
    probe.add_argument("data", help="a manifest CSV with the column")
    probe.add_argument("--by", required=True, help="the nuisance column, e.g. source or age_group")
    probe.add_argument("--weights", help="imagenet | none | PATH (default: $LUNGXRAY_WEIGHTS or imagenet)")
    probe.add_argument("--out", help="write probe.json here")
    probe.add_argument("--cache", help="feature cache folder")
    probe.set_defaults(run=run_probe)


def run_fetch(args) -> int:
    from lungxray.data.fetch import DEFAULT_URL, describe, fetch_dataset

    layout = fetch_dataset(args.url or DEFAULT_URL, Path(args.dest) if args.dest else None)
    print(layout if args.print_path else describe(layout))
    return 0


def run_audit(args) -> int:
    from lungxray.data.audit import NEAR_DUPLICATE_DISTANCE, audit, format_summary, write_audit
    from lungxray.data.records import load_dataset

    report = audit(load_dataset(args.data), args.threshold or NEAR_DUPLICATE_DISTANCE)
    write_audit(report, Path(args.out))
    print(format_summary(report))
    print(f"written: {Path(args.out) / 'audit.json'}, {Path(args.out) / 'audit.md'}")
    return 0


def print_counts(dataset, out: Path) -> None:
    for split, row in dataset.counts().items():
        print(f"{split:5s} " + "  ".join(f"{c}: {n}" for c, n in row.items()))
    print(f"written: {out} (use it as lungxray train --data {out})")


def run_split(args) -> int:
    from lungxray.data.records import load_dataset
    from lungxray.data.split import leakage_free_split, write_split

    dataset = leakage_free_split(load_dataset(args.data), ratios(args.ratios), args.seed, args.group_by, args.dedupe)
    print_counts(dataset, write_split(dataset, Path(args.out)))
    return 0


def run_import(args) -> int:
    from lungxray.data.importers import import_collection

    views = None if args.views == "all" else tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
    summary = import_collection(args.kind, args.root, args.out, args.uncertain, views, args.source)
    print("\n".join(summary.lines()))
    print(f"written: {summary.manifest} (merge it with lungxray data merge, or train on it as it is)")
    return 0


def run_merge(args) -> int:
    from lungxray.data.merge import check_manifest_name, merge_manifests, write_merge

    out = Path(args.out)
    check_manifest_name(out)
    result = merge_manifests(args.manifests, ratios(args.ratios), args.seed)
    table = write_merge(result, out)
    width = max(len(s) for s in result.table)
    print(f"{'source':{width}s} " + " ".join(f"{c:>10s}" for c in result.dataset.classes))
    for source, row in sorted(result.table.items()):
        print(f"{source:{width}s} " + " ".join(f"{n:10d}" for n in row.values()))
    print(f"{result.shared_films} film(s) appear in two or more collections: each kept within one split")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"class x source table: {table}")
    print_counts(result.dataset, out)
    return 0


def run_probe(args) -> int:
    from lungxray.config import default_weights
    from lungxray.evaluate.probe import format_probe, probe
    from lungxray.data.records import load_dataset
    from lungxray.io import write_json
    from lungxray.model.features import FeatureExtractor
    from lungxray.model.network import build_backbone

    backbone = build_backbone(args.weights or default_weights())
    result = probe(load_dataset(args.data), args.by, FeatureExtractor(backbone, 224, cache_dir=cache_dir(args)))
    print(format_probe(result))
    if args.out:
        write_json(Path(args.out) / "probe.json", result)
    return 0
