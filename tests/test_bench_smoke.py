"""The benchmark harness must not rot: a short smoke run of every section. Its numbers mean nothing and are
not checked — only that each section ran, and that clrk served every request it was sent."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_runs_every_section():
    if shutil.which("hey") is None:
        r = subprocess.run(["apt-get", "install", "-y", "-q", "hey"], capture_output=True, text=True)
        if shutil.which("hey") is None:
            pytest.skip(f"hey (Debian's load generator) is not installable here: {r.stderr.strip()[-200:]}")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--smoke", "--concurrency", "1,8"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for section in ("## throughput", "## otlp", "## sse", "## memory", "## store"):
        assert section in out.stdout, section
    # The throughput tables' rows: concurrency | target | req/s | ratio | p50 | added | p99 | errors
    rows = [r for line in out.stdout.splitlines() if (r := line.split("|")) and len(r) == 10 and r[2].strip().startswith("clrk")]
    assert rows and all(r[-2].strip() == "0" for r in rows), "clrk answered errors in the smoke run:\n" + out.stdout
    assert "records stored" in out.stdout
