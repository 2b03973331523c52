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
    for section in ("## throughput", "## otlp", "## sse", "## memory", "## store", "## workers"):
        assert section in out.stdout, section
    # The throughput tables' rows: concurrency | target | req/s | ratio | p50 | added | p99 | errors
    rows = [r for line in out.stdout.splitlines() if (r := line.split("|")) and len(r) == 10 and r[2].strip().startswith("clrk")]
    assert rows and all(r[-2].strip() == "0" for r in rows), "clrk answered errors in the smoke run:\n" + out.stdout
    assert "records stored" in out.stdout


def test_bench_profile_smoke(tmp_path):
    """`--profile` (py-spy on bare and clrk, per-request differences) must not rot either."""
    if shutil.which("hey") is None:
        pytest.skip("hey is not installed (see the test above)")
    out_file = tmp_path / "profile.txt"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--smoke", "--profile", str(out_file)],
                         capture_output=True, text=True, timeout=300)
    if "needs ptrace permission" in out.stderr:
        pytest.skip("py-spy cannot attach to processes here")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out_file.read_text()
    assert "what clrk adds per request" in text and "clrk's own functions" in text
    own = text.split("clrk's own functions", 1)[1]
    assert "clrk/" in own, text  # the gateway's functions were sampled under load


def test_perfdiff_smoke(tmp_path):
    """`bench/perfdiff.py` (perf with Python's trampolines, bare -O vs clrk per function) must not rot."""
    if shutil.which("hey") is None or shutil.which("perf") is None:
        pytest.skip("hey or perf is not installed")
    probe = subprocess.run(["perf", "record", "-o", str(tmp_path / "probe.data"), "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"perf cannot sample here: {probe.stderr.strip()[-200:]}")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "perfdiff.py"), "--requests", "300", "--top", "400"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "µs per request" in out.stdout
    steps = ("auth", "providers", "egress", "routing", "credentials", "capture", "recording", "failsafe", "gateway", "dispatch")
    assert any(f"({step}.py)" in out.stdout for step in steps), out.stdout  # clrk's steps were sampled, by Python function name
