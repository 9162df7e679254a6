"""Download the reference Dataset.zip: resumable, verified, and unpacked without path escapes."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from lungxray.config import default_cache_dir
from lungxray.data.records import SPLITS
from lungxray.errors import DataError

DEFAULT_URL = "https://www.dropbox.com/s/73s9n7nugqrv1h7/Dataset.zip?dl=1"
CHUNK = 1 << 20


def default_dest() -> Path:
    return default_cache_dir() / "datasets"


def download(url: str, target: Path, attempts: int = 5, timeout: float = 30.0) -> Path:
    """Download `url` to `target`, resuming a partial `target.part` with HTTP Range requests."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _ in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:  # the server ignored Range: start again
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as handle, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=target.name) as bar:
                    while chunk := response.read(CHUNK):
                        handle.write(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size < total:
                    raise ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")
            os.replace(part, target)
            return target
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # the range starts past the end: already complete
                os.replace(part, target)
                return target
            raise DataError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            last_error = error
    raise DataError(f"download of {url} failed after {attempts} attempts ({last_error}); "
                    f"rerun to resume from {part}")


def verify_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a valid zip archive; delete it and download again") from None
    if broken is not None:
        raise DataError(f"{path}: member {broken} is corrupt (CRC mismatch); delete it and download again")


def safe_extract(path: Path, dest: Path) -> None:
    """Unpack `path` into `dest`, refusing members that would land outside it."""
    dest = dest.resolve()
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            name = PurePosixPath(member.filename.replace("\\", "/"))
            target = (dest / name).resolve()
            if name.is_absolute() or ".." in name.parts or not target.is_relative_to(dest):
                raise DataError(f"{path}: member '{member.filename}' would be written outside {dest}; refusing")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"{path}: member '{member.filename}' is a symbolic link; refusing")
        for member in archive.infolist():
            target = dest / member.filename
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)


def find_layout(root: Path) -> Path:
    """The folder holding train/val/test (the archive may wrap it in a top folder)."""
    root = root.resolve()
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if all((candidate / s).is_dir() for s in SPLITS):
            return candidate
    raise DataError(f"no train/val/test folders found under {root}")


def describe(layout: Path) -> str:
    lines = [f"dataset at {layout}"]
    for split in SPLITS:
        counts = {c.name: sum(1 for f in c.rglob("*") if f.is_file()) for c in sorted((layout / split).iterdir())
                  if c.is_dir()}
        lines.append(f"  {split:5s} " + "  ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)


def fetch_dataset(url: str = DEFAULT_URL, dest: Path | None = None) -> Path:
    """Download, verify and unpack the archive at `url` into `dest`; return the folder holding train/val/test."""
    dest = Path(dest or default_dest())
    archive = dest / "Dataset.zip"
    unpacked = dest / "Dataset"
    if not unpacked.exists():  # it appears only whole, after a verified archive was unpacked
        if not archive.exists():
            download(url, archive)
        verify_zip(archive)
        staging = dest / "Dataset.partial"
        shutil.rmtree(staging, ignore_errors=True)
        safe_extract(archive, staging)
        os.replace(staging, unpacked)
    return find_layout(unpacked)
