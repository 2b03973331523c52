"""How a clrk gateway process is started (`clrk run`, `clrk dev`)."""

from __future__ import annotations

import sys
from pathlib import Path


def gateway_command() -> list[str]:
    """The gateway process (`clrk.proxy`: mitmdump with clrk's addon built in, under `python -O`)."""
    return [sys.executable, "-O", "-m", "clrk.proxy"]


def gateway_argv(policies: str, db: str, certs: str, ports: list[int], host: str, fallback: str, extra: list[str]) -> list[str]:
    """The command line of a clrk gateway: mitmdump's options, clrk's set."""
    argv = gateway_command()
    for p in ports:
        argv += ["--mode", f"regular@{p}"]
    argv += [
        "--listen-host", host,
        "--set", f"clrk_policies={Path(policies).resolve()}",
        "--set", f"clrk_db={Path(db).resolve()}",
        "--set", f"clrk_certs={Path(certs).resolve()}",
        "--set", f"confdir={Path(certs).resolve()}",
    ]
    if fallback:
        argv += ["--set", f"clrk_dev_otlp_fallback_endpoint={fallback}"]
    return argv + extra
