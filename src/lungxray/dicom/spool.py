"""The node's disk: every received film and every report waits here until it is done, so that a
node killed at any moment resumes without losing or repeating anything. Films and reports are on the
disk (fsynced, ~1 ms a film here) before anything depends on them, so a power cut loses none either.

    incoming/<uid>.dcm   received, written whole before the C-STORE success is returned
    failed/<uid>.dcm     received, but no report could be made (kept for a person to look at)
    outbox/<uid>.dcm     the report for film <uid>, written whole before the film leaves incoming/
    outbox/<uid>.heatmap.dcm   its heat map (`--heatmap`), written before the report
    sent/<uid>           the report was delivered (or, by choice, none is sent): a film with this
                         marker is never reported again; sent/<uid>.heatmap for its heat map.
                         Markers older than the node's --keep-sent-days are pruned.
    refused/<uid>.dcm    a report (or heat map) the PACS refused with a failure status: kept for a
                         person, never sent again, never in the way of the others
    identities/<uid>     the digests of the identifying attributes each film came with (`key_for`)

<uid> is the film's key: its SOP Instance UID (checked to be a UID, so that it is safe as a file name),
or for a corrected resend the UID, "-" and the corrected attributes' digest. What waits in the outbox
and what is marked sent go by key: <uid> for a report, <uid>.heatmap for a heat map.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from lungxray.io import write_durably

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
KEY = re.compile(r"^[0-9]+(\.[0-9]+)*(-[0-9a-f]{16})?$")


class Spool:
    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        for name in ("incoming", "outbox", "sent", "failed", "refused", "identities"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        # Bytes waiting (films and reports), counted once here and then kept as files come and go:
        # adding up the folders at every film made receiving slower the fuller the spool.
        self._bytes = sum(p.stat().st_size for name in ("incoming", "outbox") for p in self._files(name))
        self._lock = threading.Lock()

    def size(self) -> int:
        return self._bytes

    def key_for(self, uid: str, identity: str) -> tuple[str, str]:
        """(the key a film is kept under, "new", "duplicate" or "correction"), for a film with SOP
        Instance UID `uid` whose identifying attributes hash to `identity`: a film sent again unchanged
        is a duplicate, kept once; sent again with changed attributes it is a correction, kept anew."""
        record = self.folder / "identities" / uid
        known = record.read_text().split() if UID.match(uid) and record.exists() else []
        key = uid if not known or known[0] == identity else f"{uid}-{identity}"
        return key, "duplicate" if identity in known else "correction" if known else "new"

    def remember(self, uid: str, identity: str) -> None:
        with self._lock, open(self.folder / "identities" / uid, "a") as handle:
            handle.write(identity + "\n")

    def accept(self, uid: str, data: bytes) -> str | None:
        """Keep a received film under the key `uid` (`key_for`); None, or why it is refused."""
        if not KEY.match(uid) or len(uid) > 64 + 17:
            return f"SOP Instance UID {uid[:70]!r} is not a UID"
        if self.seen(uid):
            return None  # sent again by the PACS: already kept or answered, kept once
        with self._lock:  # films arrive on several associations at once: each takes its room first
            if self._bytes + len(data) > self.max_bytes:
                return f"spool full ({self.max_bytes // 2**20} MB)"
            self._bytes += len(data)
        try:
            write_durably(self.incoming(uid), data)
        except BaseException:
            self._count(-len(data))
            raise
        return None

    def seen(self, uid: str) -> bool:
        return any(p.exists() for p in (self.incoming(uid), self.outbox(uid), self.sent(uid),
                                        self.folder / "failed" / f"{uid}.dcm"))

    def incoming(self, uid: str) -> Path:
        return self.folder / "incoming" / f"{uid}.dcm"

    def outbox(self, key: str) -> Path:
        return self.folder / "outbox" / f"{key}.dcm"

    def sent(self, key: str) -> Path:
        return self.folder / "sent" / key

    def waiting(self) -> list[str]:
        """Films received and not yet reported, oldest first. A film whose report reached the outbox
        just before a crash is not reported again: it leaves incoming/ here."""
        uids = []
        for path in self._files("incoming"):
            if self.outbox(path.stem).exists() or self.sent(path.stem).exists():
                self._remove(path)
            else:
                uids.append(path.stem)
        return uids

    def undelivered(self) -> list[str]:
        """The keys of what waits in the outbox, oldest first."""
        return [p.stem for p in self._files("outbox")]

    def _files(self, name: str) -> list[Path]:
        """A folder's finished files, oldest first (not the temporary files being written)."""
        files = [p for p in (self.folder / name).glob("*.dcm") if not p.name.startswith(".")]
        return sorted(files, key=lambda p: p.stat().st_mtime)

    def reported(self, uid: str, report: bytes, heatmap: bytes | None = None) -> None:
        """The heat map (unless one was delivered before a crash) and then the report go into the
        outbox whole, then the film leaves incoming/."""
        if heatmap is not None and not self.sent(f"{uid}.heatmap").exists():
            self._write(self.outbox(f"{uid}.heatmap"), heatmap)
        self._write(self.outbox(uid), report)
        self._remove(self.incoming(uid))

    def answered_with_nothing(self, uid: str) -> None:
        """A film that, by choice, gets no report: marked as answered, then it leaves incoming/."""
        self.sent(uid).touch()
        self._remove(self.incoming(uid))

    def set_aside(self, uid: str) -> Path:
        """Move a film no report can be made for out of the way; where it now is."""
        return self._move_aside(self.incoming(uid), "failed")

    def delivered(self, key: str) -> None:
        self.sent(key).touch()
        self._remove(self.outbox(key))

    def refused(self, key: str) -> Path:
        """Move a report the PACS refused out of the outbox; where it now is."""
        return self._move_aside(self.outbox(key), "refused")

    def _move_aside(self, path: Path, folder: str) -> Path:
        """`path` moved to `folder`, kept for a person and no longer counted as waiting."""
        target = self.folder / folder / path.name
        self._count(-path.stat().st_size)
        path.replace(target)
        return target

    def prune_sent(self, older_than_days: float) -> int:
        """Remove the sent/ markers (and the identities of their films) older than that; how many."""
        cutoff, pruned = time.time() - older_than_days * 86400, 0
        for marker in (self.folder / "sent").iterdir():
            if marker.stat().st_mtime < cutoff:
                marker.unlink()
                (self.folder / "identities" / marker.name.split("-")[0]).unlink(missing_ok=True)
                pruned += 1
        return pruned

    def _write(self, path: Path, data: bytes) -> None:
        write_durably(path, data)
        self._count(len(data))

    def _remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        path.unlink()
        self._count(-size)

    def _count(self, change: int) -> None:
        with self._lock:
            self._bytes += change
