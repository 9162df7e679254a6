"""API keys for `lungxray serve --keys FILE`: `lungxray keys create NAME` prints a new token once;
the file keeps only a salted SHA-256 of it (a token is 256 random bits, so a fast hash is as safe as a
slow one and keeps every request cheap). A revoked key stays in the file, so that its token gets
403 ("revoked") rather than 401 ("unknown").

    keys = KeyStore("keys.json"); token = keys.create("radiology-pc-3")
    keys.identify(token)  -> Key(name="radiology-pc-3", revoked=None)
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import time
from pathlib import Path

from lungxray.errors import ConfigError
from lungxray.io import atomic_path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PREFIX = "lx_"  # so that a token is recognisable in a leaked file or log


@dataclasses.dataclass
class Key:
    name: str
    salt: str
    digest: str
    created: str
    revoked: str | None = None


def digest(salt: str, token: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + token.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys: dict[str, Key] = {}
        if self.path.exists():
            try:
                self.keys = {k["name"]: Key(**k) for k in json.loads(self.path.read_text())["keys"]}
            except (ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"{self.path} is not a lungxray keys file ({error}); make one with "
                                  "`lungxray keys create NAME --keys FILE`") from None

    def create(self, name: str) -> str:
        """A new key called `name`; its token, which is not kept anywhere."""
        if not NAME.match(name):
            raise ConfigError(f"key name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        if name in self.keys:
            raise ConfigError(f"a key called {name!r} exists in {self.path}; revoke it or choose another name")
        token = PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        self.keys[name] = Key(name, salt, digest(salt, token), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._save()
        return token

    def revoke(self, name: str) -> None:
        if name not in self.keys:
            raise ConfigError(f"no key called {name!r} in {self.path} (see `lungxray keys list`)")
        self.keys[name].revoked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._save()

    def identify(self, token: str) -> Key | None:
        """The key whose token this is, revoked or not; None for an unknown token. Every key is
        compared, in constant time, so the answer's timing tells nothing about the keys."""
        found = None
        for key in self.keys.values():
            if hmac.compare_digest(digest(key.salt, token), key.digest):
                found = key
        return found

    def _save(self) -> None:
        with atomic_path(self.path) as temporary:
            temporary.write_text(json.dumps({"keys": [dataclasses.asdict(k) for k in self.keys.values()]}, indent=1))
            temporary.chmod(0o600)  # hashes only, but nobody else's business
