"""`clrk demo` as a new user runs it: within a minute, no provider key, no network, and what it prints is
what the gateway did (the records in its store say the same)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clrk import attributes as A
from clrk.cli.demo.provider import PROVIDER_KEY
from clrk.recorder.store import fetch_records, open_readonly

CLRK = str(Path(sys.executable).parent / "clrk")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One run of `clrk demo` for the module: (its output, its directory, seconds it took)."""
    d = tmp_path_factory.mktemp("demo")
    t0 = time.monotonic()
    out = subprocess.run([CLRK, "demo", "--dir", str(d)], capture_output=True, text=True, timeout=90)
    return out, d, time.monotonic() - t0


def test_clrk_demo_shows_the_ai_features_in_a_minute(demo):
    out, tmp_path, took = demo
    assert out.returncode == 0, out.stdout + out.stderr
    assert took < 60, took
    text = out.stdout
    for said in ("-> 'Hello from the demo provider (gpt-4o-mini).'",          # the Backend's model rewrite
                 "-> 'Hello from the demo provider (claude-sonnet-4-5).'",
                 "-> 'Hello from the demo provider (gemini-2.5-flash).'",
                 "-> 429 from the gateway: clrk: token budget exceeded for route openai",
                 "0 request(s) reached the provider",
                 "budgets today (UTC)", "gen_ai.usage.input_tokens"):
        assert said in text, said
    spend = text[text.index("$ clrk spend"):text.index("$ clrk records")]
    # `clrk records`, text view: the request's path, and every column where the one above has it.
    records = text[text.index("$ clrk records"):text.index("The gen_ai attributes")].strip().splitlines()[1:]
    assert len(records) == 5 and all(":443/v1/" in line for line in records)
    for column in (r"\s(\S+:443/)", r"\s(allow|deny)\s", r"\s(200|429)\s"):
        assert len({re.search(column, line).start(1) for line in records}) == 1, (column, records)
    assert "demo/openai" in spend and "demo/anthropic" in spend and "demo/gemini" in spend

    con = open_readonly(str(tmp_path / "data" / "clrk.duckdb"))
    try:
        rows = fetch_records(con, {"limit": 0})
    finally:
        con.close()
    assert len(rows) == 5
    by_provider = sorted((r[A.GEN_AI_PROVIDER_NAME], r[A.HTTP_RESPONSE_STATUS_CODE]) for r in rows)
    assert by_provider == [("anthropic", 200), ("gcp.gemini", 200), ("openai", 200), ("openai", 200), ("openai", 429)]
    assert all(r[A.AGENT_NAME] == "agent" and r[A.AGENT_NAMESPACE] == "demo" for r in rows)
    assert all(r[A.GEN_AI_USAGE_INPUT_TOKENS] for r in rows if r[A.HTTP_RESPONSE_STATUS_CODE] == 200)
    # The injected key reached the provider (it answers nothing without it) and nothing else.
    log = (tmp_path / "gateway.log").read_text()
    # One timestamp format in the gateway's log, mitmproxy's lines and the recorder's alike.
    assert "clrk-recorder INFO: recorder" in log
    assert all(re.match(r"\[\d\d:\d\d:\d\d\.\d{3}\][ [][^ ]", line) for line in log.splitlines()), log
    everything = text + out.stderr + log + repr(rows)
    assert PROVIDER_KEY not in everything
    assert "sk-the-agent-has-no-key" not in everything


def test_clrk_version_and_run_help():
    out = subprocess.run([CLRK, "--version"], capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"clrk \d+\.\d+\.\d+\S*\n", out), out
    usage = subprocess.run([CLRK, "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: clrk run [options] [-- mitmdump args ...]" in usage and "passed to mitmdump" in usage


def test_records_on_a_terminal_has_a_header(demo):
    """On a terminal `clrk records` names its store and columns (piped, it prints records only, one per line)."""
    import os
    import pty

    tmp_path = demo[1]
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([CLRK, "records", "--db", str(tmp_path / "data" / "clrk.duckdb")], stdout=follower,
                              stderr=subprocess.PIPE, timeout=60, check=True)
        assert proc.returncode == 0
        os.close(follower)
        follower = -1
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO once the terminal's other end is closed and read dry
                break
            if not chunk:
                break
            out += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    lines = out.decode().splitlines()
    assert lines[0] == f"5 records from {tmp_path / 'data' / 'clrk.duckdb'}, newest first, at most 100 (--limit)"
    assert lines[1].split() == ["time", "agent", "decision", "method", "status", "ms", "model", "tokens", "usd", "destination"]
    assert len(lines) == 7 and lines[2].index("POST") == lines[1].index("method")
