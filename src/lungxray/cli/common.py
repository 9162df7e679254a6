"""What several command groups share: the cache folder, the Ray cluster, the ratios flag."""

from __future__ import annotations

from pathlib import Path

from lungxray.errors import ConfigError


def cache_dir(args) -> Path | None:
    return Path(args.cache) if getattr(args, "cache", None) else None


def cluster(args, engine: str):
    """The Ray cluster an `--engine ray` (or `--extract-engine ray`) command runs on; None for local."""
    if engine != "ray":
        return None
    from lungxray.cluster import RayCluster

    return RayCluster(args.address, args.workers)


def ratios(text: str) -> tuple[float, float, float]:
    from lungxray.data.records import check_ratios

    try:
        return check_ratios(text.split(","))
    except ValueError:
        raise ConfigError(f"--ratios {text}: give three numbers summing to 1, such as 0.7,0.2,0.1") from None
