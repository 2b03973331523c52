"""The gateway's certificate authority, kept in `certs/` (private key mode 0600, never committed)."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import certs

BASENAME = "mitmproxy"  # the file names mitmproxy's TLS addon looks for in its confdir


def ensure_ca(directory: str | Path) -> Path:
    """Creates the CA on first run; returns the path of the certificate agents must trust."""
    d = Path(directory)
    cert = d / f"{BASENAME}-ca-cert.pem"
    if not (d / f"{BASENAME}-ca.pem").exists():
        d.mkdir(parents=True, exist_ok=True)
        certs.CertStore.create_store(d, BASENAME, 2048, organization="clrk", cn="clrk egress gateway CA")
    return cert
