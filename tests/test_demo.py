"""`clrk demo` as a new user runs it: within a minute, no provider key, no network, and what it prints is
what the gateway did (the records in its store say the same)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from clrk import attributes as A
from clrk.cli.demo.provider import PROVIDER_KEY
from clrk.recorder.store import fetch_records, open_readonly

CLRK = str(Path(sys.executable).parent / "clrk")


def test_clrk_demo_shows_the_ai_features_in_a_minute(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([CLRK, "demo", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t0
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
    everything = text + out.stderr + (tmp_path / "gateway.log").read_text() + repr(rows)
    assert PROVIDER_KEY not in everything
    assert "sk-the-agent-has-no-key" not in everything


def test_clrk_version_and_run_help():
    out = subprocess.run([CLRK, "--version"], capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"clrk \d+\.\d+\.\d+\S*\n", out), out
    usage = subprocess.run([CLRK, "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: clrk run [options] [-- mitmdump args ...]" in usage and "passed to mitmdump" in usage
