"""Which model gave an answer: its name, version, fingerprint and the research-use notice, computed
once when the model is loaded and carried by the predictor to every output (the API, the DICOM SR,
an export's sidecar, the audit log and the monitoring record)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lungxray.io import sha256_of

NOTICE = "Research use only: not a medical device, not a diagnosis. Not for clinical decisions."
UNSAVED = "unsaved"


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """`fingerprint`: SHA-256 of the model file (a run's model.keras, or an export the user named);
    `id`, its first 12 hex digits, is what each answer and log line carries."""

    name: str
    version: str
    fingerprint: str
    notice: str = NOTICE

    @property
    def id(self) -> str:
        return self.fingerprint[:12] if self.fingerprint else UNSAVED

    @classmethod
    def of(cls, model_file: Path, name: str, trained: str | None) -> "ModelIdentity":
        """The identity of the model stored in `model_file` (hashed now), called `name`."""
        from lungxray import __version__

        return cls(name, f"lungxray {__version__}, trained {trained or 'unknown'}", sha256_of(Path(model_file)))

    @classmethod
    def unsaved(cls, trained: str | None = None) -> "ModelIdentity":
        """A model not yet written to a file (during training): no fingerprint yet."""
        from lungxray import __version__

        return cls(UNSAVED, f"lungxray {__version__}, trained {trained or 'unknown'}", "")
