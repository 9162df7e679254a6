"""Leakage-free splits: near-duplicate clusters (and, with a manifest, any grouping column such as
the patient) never cross splits; stratified by class; seeded."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from lungxray.data.audit import NEAR_DUPLICATE_DISTANCE, compare_hashes, image_facts
from lungxray.data.records import Dataset, write_manifest
from lungxray.errors import DataError
from lungxray.parallel import bounded_map, progress


def duplicate_groups(dataset: Dataset, group_by: str | None = None,
                     threshold: int = NEAR_DUPLICATE_DISTANCE) -> np.ndarray:
    """A group id per record: records linked by near-duplicate pairs or a shared `group_by` value share it."""
    records = dataset.records
    if group_by and not any(group_by in r.extra for r in records):
        raise DataError(f"--group-by {group_by}: no such column in {dataset.origin}")
    facts = list(progress(bounded_map(image_facts, records), len(records), "hashing"))
    readable = [i for i, f in enumerate(facts) if f.dhash is not None]
    links: list[tuple[int, int]] = []
    if readable:
        hashes = np.stack([facts[i].dhash for i in readable])
        mirrors = np.stack([facts[i].dhash_mirror for i in readable])
        links += [(readable[a], readable[b]) for a, b, _ in compare_hashes(hashes, mirrors, threshold)[0]]
    if group_by:
        first: dict[str, int] = {}
        links += [(i, first.setdefault(r.extra[group_by], i)) for i, r in enumerate(records) if r.extra.get(group_by)]
    rows, columns = np.array(links, dtype=np.int64).reshape(-1, 2).T
    graph = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(records), len(records)))
    return connected_components(graph, directed=False)[1]


def _folds_for(ratios) -> tuple[int, list[int]]:
    """The fewest folds that express `ratios` exactly (at most 100), and the folds per split."""
    for folds in range(2, 101):
        counts = [Fraction(r).limit_denominator(1000) * folds for r in ratios]
        if all(c.denominator == 1 for c in counts):
            return folds, [int(c) for c in counts]
    return 100, [round(r * 100) for r in ratios]


def leakage_free_split(dataset: Dataset, ratios=(0.7, 0.2, 0.1), seed: int = 21, group_by: str | None = None,
                       dedupe: bool = False) -> Dataset:
    groups = duplicate_groups(dataset, group_by)
    records = dataset.records
    if dedupe:
        keep = sorted({g: i for i, g in reversed(list(enumerate(groups)))}.values())
        records, groups = [records[i] for i in keep], groups[keep]
    folds, per_split = _folds_for(ratios)
    labels = [r.label for r in records]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(records), int)
    for fold, (_, members) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
        fold_of[members] = fold
    bounds = np.cumsum(per_split)
    names = np.array(["train", "val", "test"])[np.searchsorted(bounds, fold_of, side="right")]
    records = [dataclasses.replace(r, split=str(s), extra={**r.extra, "group": str(g)})
               for r, s, g in zip(records, names, groups)]
    return dataclasses.replace(dataset, records=records)


def write_split(dataset: Dataset, out: Path) -> Path:
    """Write the split manifest to `out` (a .csv), or to `out`/split.csv for a folder; its path."""
    out = out if out.suffix.lower() == ".csv" else out / "split.csv"
    write_manifest(dataset, out)
    return out
