"""The node's disk: every received film and every report waits here until it is done, so that a
node killed at any moment resumes without losing or repeating anything.

    incoming/<uid>.dcm   received, written whole before the C-STORE success is returned
    failed/<uid>.dcm     received, but no report could be made (kept for a person to look at)
    outbox/<uid>.dcm     the report for film <uid>, written whole before the film leaves incoming/
    sent/<uid>           the report was delivered: a film with this marker is never reported again

<uid> is the film's SOP Instance UID (checked to be a UID, so that it is safe as a file name).
"""

from __future__ import annotations

import re
from pathlib import Path

from lungxray.io import atomic_path

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Spool:
    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        for name in ("incoming", "outbox", "sent", "failed"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)

    def size(self) -> int:
        """Bytes waiting (films and reports); the worker moves files meanwhile, so some vanish."""
        total = 0
        for name in ("incoming", "outbox"):
            for path in (self.folder / name).iterdir():
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    pass
        return total

    def accept(self, uid: str, data: bytes) -> str | None:
        """Keep a received film; None, or why it is refused."""
        if not UID.match(uid) or len(uid) > 64:
            return f"SOP Instance UID {uid[:70]!r} is not a UID"
        if self.seen(uid):
            return None  # sent again by the PACS: already kept or answered, kept once
        if self.size() + len(data) > self.max_bytes:
            return f"spool full ({self.max_bytes // 2**20} MB)"
        with atomic_path(self.incoming(uid)) as temporary:
            temporary.write_bytes(data)
        return None

    def seen(self, uid: str) -> bool:
        return any(p.exists() for p in (self.incoming(uid), self.outbox(uid), self.sent(uid),
                                        self.folder / "failed" / f"{uid}.dcm"))

    def incoming(self, uid: str) -> Path:
        return self.folder / "incoming" / f"{uid}.dcm"

    def outbox(self, uid: str) -> Path:
        return self.folder / "outbox" / f"{uid}.dcm"

    def sent(self, uid: str) -> Path:
        return self.folder / "sent" / uid

    def waiting(self) -> list[str]:
        """Films received and not yet reported, oldest first. A film whose report reached the outbox
        just before a crash is not reported again: it leaves incoming/ here."""
        uids = []
        for path in self._files("incoming"):
            if self.outbox(path.stem).exists() or self.sent(path.stem).exists():
                path.unlink(missing_ok=True)
            else:
                uids.append(path.stem)
        return uids

    def undelivered(self) -> list[str]:
        return [p.stem for p in self._files("outbox")]

    def _files(self, name: str) -> list[Path]:
        """A folder's finished files, oldest first (not the temporary files being written)."""
        files = [p for p in (self.folder / name).glob("*.dcm") if not p.name.startswith(".")]
        return sorted(files, key=lambda p: p.stat().st_mtime)

    def reported(self, uid: str, report: bytes) -> None:
        """The report goes into the outbox whole, then the film leaves incoming/."""
        with atomic_path(self.outbox(uid)) as temporary:
            temporary.write_bytes(report)
        self.incoming(uid).unlink(missing_ok=True)

    def set_aside(self, uid: str) -> Path:
        """Move a film no report can be made for out of the way; where it now is."""
        target = self.folder / "failed" / f"{uid}.dcm"
        self.incoming(uid).replace(target)
        return target

    def delivered(self, uid: str) -> None:
        self.sent(uid).touch()
        self.outbox(uid).unlink(missing_ok=True)
