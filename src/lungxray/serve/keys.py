"""API keys for `lungxray serve --keys FILE`: `lungxray keys create NAME` prints a new token once;
the file keeps only a salted SHA-256 of it (a token is 256 random bits, so a fast hash is as safe as a
slow one and keeps every request cheap). A revoked key stays in the file, so that its token gets
403 ("revoked") rather than 401 ("unknown").

    keys = KeyStore("keys.json"); token = keys.create("radiology-pc-3")
    keys.identify(token)  -> Key(name="radiology-pc-3", revoked=None)

A running server sees the file change: `identify` reads it again when it has changed (looked at
most every RELOAD_SECONDS), so a key revoked or created while it runs counts in every worker within
a second. Changes are made under an exclusive lock on FILE.lock, reading the file afresh, so that
concurrent `keys create` lose nothing; the file is written 0600 (through a symbolic link to its
target), and a file that is not a keys file is refused whole, unknown fields included.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from lungxray.errors import ConfigError
from lungxray.io import atomic_path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the whole name (fullmatch): no newline can end it
HEX = re.compile(r"[0-9a-f]+")
PREFIX = "lx_"  # so that a token is recognisable in a leaked file or log
RELOAD_SECONDS = 0.25  # how often a server looks at the file's identity (a stat)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Key:
    name: str
    salt: str
    digest: str
    created: str
    revoked: str | None = None


def digest(salt: str, token: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + token.encode()).hexdigest()


def checked_key(entry) -> Key:
    """A key of the file, or ValueError saying what is wrong with it."""
    fields = {f.name for f in dataclasses.fields(Key)}
    if not isinstance(entry, dict) or set(entry) - fields or not {"name", "salt", "digest", "created"} <= set(entry):
        raise ValueError(f"a key must have exactly the fields {sorted(fields)}")
    key = Key(**entry)
    if not isinstance(key.name, str) or not NAME.fullmatch(key.name):
        raise ValueError(f"key name {key.name!r} is not a valid name")
    if not (isinstance(key.salt, str) and HEX.fullmatch(key.salt) and len(key.salt) == 32
            and isinstance(key.digest, str) and HEX.fullmatch(key.digest) and len(key.digest) == 64):
        raise ValueError(f"key {key.name!r}: its salt and digest must be 32 and 64 lowercase hex digits")
    return key


def read_keys(path: Path) -> dict[str, Key]:
    """The keys in `path` ({} when it does not exist), or a ConfigError naming the file and the problem."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the keys file {path} ({getattr(error, 'strerror', None) or error})") from None
    except ValueError as error:
        raise ConfigError(f"{path} is not a lungxray keys file (not JSON: {error})") from None
    try:
        if not isinstance(content, dict) or set(content) != {"keys"} or not isinstance(content["keys"], list):
            raise ValueError('the file must be {"keys": [...]} and nothing else')
        keys = [checked_key(entry) for entry in content["keys"]]
        if len({k.name for k in keys}) != len(keys):
            raise ValueError("two keys have the same name")
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not a lungxray keys file ({error}); make one with "
                          "`lungxray keys create NAME --keys FILE`") from None
    return {k.name: k for k in keys}


def identity_of(path: Path):
    """What changes when the file is replaced or written: (inode, size, modification time)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


class KeyStore:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()  # a symbolic link is written through to its target
        self._seen, self._looked, self._lock = identity_of(self.path), time.monotonic(), threading.Lock()
        self.keys: dict[str, Key] = read_keys(self.path)

    def create(self, name: str) -> str:
        """A new key called `name`; its token, which is not kept anywhere."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"key name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        token = PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        with self._changing():
            if name in self.keys:
                raise ConfigError(f"a key called {name!r} exists in {self.path}; revoke it or choose another name")
            self.keys[name] = Key(name, salt, digest(salt, token), now())
        return token

    def revoke(self, name: str) -> None:
        with self._changing():
            if name not in self.keys:
                raise ConfigError(f"no key called {name!r} in {self.path} (see `lungxray keys list`)")
            self.keys[name].revoked = now()

    def identify(self, token: str) -> Key | None:
        """The key whose token this is, revoked or not; None for an unknown token. Every key is
        compared, in constant time, so the answer's timing tells nothing about the keys."""
        self._reload_if_changed()
        found = None
        for key in list(self.keys.values()):
            if hmac.compare_digest(digest(key.salt, token), key.digest):
                found = key
        return found

    def _reload_if_changed(self) -> None:
        """Read the file again if it changed; a file made unreadable keeps the keys last read (and
        says so), since refusing every caller for an editor's half-saved file helps nobody."""
        if time.monotonic() - self._looked < RELOAD_SECONDS:
            return
        with self._lock:
            self._looked, seen = time.monotonic(), identity_of(self.path)
            if seen == self._seen:
                return
            try:
                self.keys = read_keys(self.path)
            except ConfigError as error:
                log.error("keys file changed but cannot be used; the keys read before stay in force: %s", error)
            self._seen = seen

    @contextmanager
    def _changing(self):
        """Under an exclusive lock on FILE.lock: the keys read afresh, changed by the block, written."""
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.keys = read_keys(self.path)
            yield
            with atomic_path(self.path, mode=0o600) as temporary:  # hashes only, but nobody else's business
                temporary.write_text(json.dumps({"keys": [dataclasses.asdict(k) for k in self.keys.values()]},
                                                indent=1))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
