"""Writing files so that an interruption never leaves a half-written one behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds. `mode`:
    the file's permissions from its creation on (0o600 for a secret: never readable by others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix keeps the whole name: Keras checks for endings such as ".weights.h5".
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name}")
    os.close(handle)
    os.chmod(temporary, mode)  # mkstemp's 0600 would make every artefact private to its writer
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_durably(path: str | Path, data: bytes) -> None:
    """Write `path` whole (as `atomic_path` does) and on the disk before returning: the file is
    flushed to the device before it is moved into place, and its folder after. A received film is
    kept this way before its sender is told it is stored: a power cut must not lose it either."""
    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def atomic_folder(path: str | Path):
    """`atomic_path` for a folder (a SavedModel): a temporary folder beside `path` replaces it whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name}"))
    os.chmod(temporary, 0o755)
    try:
        yield temporary
        remove(path)
        os.replace(temporary, path)
    finally:
        remove(temporary)


def remove(path: Path) -> None:
    """Delete a file or a folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def file_hash(data: bytes) -> str:
    """A file's identity wherever lungxray keys on content (feature cache, training overlap, outputs)."""
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    """A file's SHA-256, or a folder's (a SavedModel): its files' names and contents in order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | Path, value) -> None:
    write_text(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def read_json(path: str | Path, error: type[Exception], missing: str):
    """The JSON value in `path`, or `error` saying the file is `missing` (e.g. "does not exist;
    evaluate first") or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path} {missing}") from None
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not valid JSON: {problem}") from None


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
