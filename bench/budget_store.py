"""What a shared budget admission costs: the bench's budgeted chat completion (bench/bench.py) through
three clrk gateways that differ only in their ledger — the local one, a shared one on a redis-server of
its own on loopback (CLRK_BUDGET_STORE=redis://...), and one held by the gateway's recorder
(CLRK_BUDGET_STORE=recorder, what `clrk run --workers N` uses) — measured interleaved (local, redis,
recorder, local, ...) with hey.

    .venv/bin/python bench/budget_store.py [--rounds 3] [--seconds 5] [--concurrency 1,8]

Prints a table of medians (req/s, p50, p99) and each shared ledger's ratio to the local one; not a pass/fail check.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import REPO, clrk_argv, clrk_proxy, ensure_hey, free_port, run_hey, upstream_and_sink, wait_port  # noqa: E402
from clrk import wire  # noqa: E402
from tests.harness.redis_server import RedisServer  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", default="1,8")
    args = ap.parse_args()
    hey = ensure_hey()
    concs = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as d, ExitStack() as es:
        tmp = Path(d)
        backing = es.enter_context(upstream_and_sink(tmp))
        store = RedisServer(tmp / "redis").start()
        es.callback(store.stop)
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, env in (("local", {}), ("redis", {"CLRK_BUDGET_STORE": store.url}),
                          ("recorder", {"CLRK_BUDGET_STORE": "recorder"})):
            ports[name] = port = free_port()
            db = tmp / f"data-{name}" / "clrk.duckdb"
            log = open(tmp / f"{name}.log", "wb")
            p = subprocess.Popen(clrk_argv(port, backing.policies, db, tmp / "certs"), cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT, env={**os.environ, **env})
            pids[name] = p.pid

            def stop(p=p, log=log) -> None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
                log.close()

            es.callback(stop)
            wait_port(port)
            deadline = time.monotonic() + 30
            while not wire.recorder_ready(wire.socket_path(db)):
                assert time.monotonic() < deadline, (tmp / f"{name}.log").read_text()
                time.sleep(0.05)
        for name, port in ports.items():  # warm up (and check that it serves)
            r = run_hey(hey, clrk_proxy(port), backing.url, 4, n=400)
            assert r.errors == 0, f"{name}: {r.errors} errors"
        results: dict[tuple[str, int], list] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for c in concs:
                for name, port in ports.items():
                    before = cpu_seconds(pids[name])
                    r = run_hey(hey, clrk_proxy(port), backing.url, c, args.seconds)
                    cpu.setdefault((name, c), []).append((cpu_seconds(pids[name]) - before) / (r.rps * args.seconds) * 1e6)
                    results.setdefault((name, c), []).append(r)
        print("| concurrency | ledger | req/s | p50 ms | p99 ms | proxy CPU µs/request | errors | req/s vs local |")
        print("|---|---|---|---|---|---|---|---|")
        for c in concs:
            base = statistics.median(r.rps for r in results[("local", c)])
            for name in ports:
                rs = results[(name, c)]
                rps = statistics.median(r.rps for r in rs)
                print(f"| {c} | {name} | {rps:.0f} | {statistics.median(r.p50_ms for r in rs):.2f} | "
                      f"{statistics.median(r.p99_ms for r in rs):.2f} | {statistics.median(cpu[(name, c)]):.0f} | "
                      f"{sum(r.errors for r in rs)} | {rps / base:.2f} |")


if __name__ == "__main__":
    main()
