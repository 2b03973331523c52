"""How a clrk gateway process is started (`clrk run`, `clrk dev`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from clrk import storeref


def gateway_command() -> list[str]:
    """The gateway process (`clrk.proxy`: mitmdump with clrk's addon built in, under `python -O`)."""
    return [sys.executable, "-O", "-m", "clrk.proxy"]


def gateway_env(db: str) -> dict[str, str]:
    """The gateway's environment: a ClickHouse URL is handed over as CLRK_DB (it holds a password, and
    command lines are readable by every local user), a DuckDB file on the command line as before."""
    return {**os.environ, "CLRK_DB": db} if storeref.is_clickhouse(db) else dict(os.environ)


def gateway_argv(policies: str, db: str, certs: str, ports: list[int], host: str, fallback: str, extra: list[str]) -> list[str]:
    """The command line of a clrk gateway: mitmdump's options, clrk's set. The gateway opens the policy's
    listeners itself (clrk/proxy/listeners.py); `ports` replaces them (`--port`: one mode per port, so the
    gateway leaves them as given), and `host` overrides every listener's address (`--listen-host`)."""
    argv = gateway_command()
    for p in ports:
        argv += ["--mode", f"regular@{host or '127.0.0.1'}:{p}"]
    if host:
        argv += ["--listen-host", host]
    argv += [
        "--set", f"clrk_policies={Path(policies).resolve()}",
        *(() if storeref.is_clickhouse(db) else ("--set", f"clrk_db={Path(db).resolve()}")),
        "--set", f"clrk_certs={Path(certs).resolve()}",
        "--set", f"confdir={Path(certs).resolve()}",
    ]
    if fallback:
        argv += ["--set", f"clrk_dev_otlp_fallback_endpoint={fallback}"]
    return argv + extra


def stop_gateway(proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    """Stops a gateway process the way Ctrl-C would (SIGTERM: transactions in flight finish, records are
    flushed), killing it only if it has not ended within `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
