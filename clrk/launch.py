"""How a clrk gateway process is started (`clrk run`, `clrk dev`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


class LaunchError(Exception):
    pass


def gateway_argv(policies: str, db: str, certs: str, ports: list[int], host: str, fallback: str, extra: list[str]) -> list[str]:
    """The mitmdump command line of a clrk gateway."""
    mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or shutil.which("mitmdump")
    if mitmdump is None:
        raise LaunchError("mitmdump is not installed in this environment (run scripts/setup)")
    argv = [mitmdump, "-s", str(Path(__file__).with_name("mitmaddon.py"))]
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
