"""TLS for DICOM associations (DICOM PS3.15 B.1, the secure transport connection profile): the
node's side (certificate and key; with a CA, callers must present a certificate it signed) and
the caller's (the CA that signed the node's certificate; optionally a certificate of its own)."""

from __future__ import annotations

import ssl
from pathlib import Path

from lungxray.errors import ConfigError


def _load(context: ssl.SSLContext, cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    try:
        if cert:
            context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as error:
        names = ", ".join(str(Path(p)) for p in (cert, key, ca) if p)
        raise ConfigError(f"cannot load the TLS files ({names}): {error}") from None
    return context


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    context = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key, ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
