"""The benchmark harness must not rot: a short smoke run (its numbers mean nothing and are not checked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_runs_end_to_end():
    if shutil.which("hey") is None:
        r = subprocess.run(["apt-get", "install", "-y", "-q", "hey"], capture_output=True, text=True)
        if shutil.which("hey") is None:
            pytest.skip(f"hey (Debian's load generator) is not installable here: {r.stderr.strip()[-200:]}")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--smoke", "--concurrency", "1,8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 8 |" in out.stdout and "Records stored for the clrk runs" in out.stdout
