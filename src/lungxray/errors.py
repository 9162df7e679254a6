"""The errors a user can act on. The command line prints any of them as one line and exits 2.

They live in a module of their own, with no heavy imports, so that code at every level can raise
them and the command line can catch them without importing TensorFlow."""

from __future__ import annotations


class LungxrayError(ValueError):
    """A problem with the user's input (a setting, a file, a folder) that a message can explain."""


class ConfigError(LungxrayError):
    """A setting is out of range, of the wrong type, or unknown."""


class DataError(LungxrayError):
    """The data source itself is unusable (missing folder, empty class, bad CSV)."""


class ImageError(LungxrayError):
    """One image cannot be used; names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class WeightsError(LungxrayError):
    """Backbone weights or a saved model cannot be found or loaded."""
