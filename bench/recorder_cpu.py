"""The recorder's CPU per record, alone: a real `python -m clrk.recorder` process fed synthetic transaction
snapshots over its socket (as a proxy sends them), exporting to bench/otlp_sink.py; its CPU time (all its
threads: expand, DuckDB, SDK spans/logs/metrics and their export) is read from /proc before and after.

Several source trees can be compared, interleaved round by round (e.g. a `git archive` of the base commit):

    python bench/recorder_cpu.py --tree base=/tmp/clrk-base --tree new=. --config new:metrics+prom \\
        --rounds 5 --records 20000

A config is `<tree>:<name>`, name one of: default (the gateway as the policy writes it without the new
fields), nometrics (spec.otlp.metrics.enabled false), metrics+prom (a Prometheus endpoint too),
ratio0.1 (spec.otlp.sampling.ratio 0.1). The base tree ignores the fields it does not know.

The recorder's memory is reported too: resident once configured (idle), and its peak by the end; with
`--paced N` the bench waits for the store every N records, as a proxy's traffic would, so the peak is the
recorder's own rather than a backlog of everything sent at once:

    python bench/recorder_cpu.py --tree base=/tmp/clrk-base --tree new=. --rounds 1 --records 100000 --paced 2048

A name ending in `@ch` stores into ClickHouse instead of DuckDB: `--clickhouse URL`, or `--clickhouse auto`
to start a clickhouse-server on loopback for the run (tests/harness/clickhouse.py); the server's own CPU
per record is reported beside the recorder's:

    python bench/recorder_cpu.py --tree new=. --config new:nometrics --config new:nometrics@ch \
        --config new:default@ch --clickhouse auto --rounds 3 --records 10000
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, every thread


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM): resident now and at its peak, MB."""
    got = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) / 1024
    return got["VmRSS"], got["VmHWM"]


def snapshots(n: int, seed: int) -> list[dict]:
    """A mix like an agent fleet's: 70% plain HTTPS calls, 25% model calls (a fifth streamed), 5% denials."""
    rng = random.Random(seed)
    now = time.time()
    out = []
    for i in range(n):
        t0 = now + i * 1e-4
        kind = rng.random()
        raw = {
            "t0": t0, "t1": t0 + 0.05, "ids": (f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(64):016x}", None),
            "method": b"GET", "scheme": "https", "host": "api.github.com", "port": 443,
            "path": b"/repos/python/cpython?per_page=10", "status": 200, "gateway": "bench-gw",
            "dst": "api.github.com", "inv": f"inv-{i % 50}",
            "decision": ("allow", "EgressRoute/default/github-read", "allowed by EgressRoute default/github-read"),
            "agent": ("TaskAgent", "team-a", ["researcher", "writer", "ops"][i % 3], "uid-1", "3"),
            "rewritten": False,
            "req_headers": [(b"host", b"api.github.com"), (b"user-agent", b"bench/1.0"), (b"accept", b"*/*"),
                            (b"authorization", b"Bearer ghp_secret")],
            "resp_headers": [(b"content-type", b"application/json"), (b"content-length", b"512")],
            "req_body": (0, None, False), "resp_body": (512, b'{"id": 1, "name": "cpython"}' * 8, False),
            "error": None, "error_type": None, "upstream": True,
        }
        if kind < 0.25:
            stream = rng.random() < 0.2
            raw.update({
                "method": b"POST", "host": "api.openai.com", "dst": "api.openai.com", "path": b"/v1/chat/completions",
                "decision": ("allow", "AIProviderRoute/team-a/llm#rules[0]", "allowed"),
                "req_body": (120, b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}', False),
                "genai": {"gen_ai.system": "openai", "gen_ai.provider.name": "openai", "gen_ai.operation.name": "chat",
                          "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024",
                          "gen_ai.usage.input_tokens": 12 + i % 40, "gen_ai.usage.output_tokens": 5 + i % 9,
                          "gen_ai.response.stream": stream},
                "genai_error": None, "apr": ("llm", "team-a"),
                "budget": ("AIProviderRoute/team-a/llm#rules[0]", False, 1_000_000, 1000 + i, 17), "budget_reserved": 30,
            })
            if stream:
                raw["first_chunk"] = t0 + 0.01
        elif kind < 0.30:
            raw.update({"status": 403, "upstream": False, "host": "pastebin.com", "dst": "pastebin.com",
                        "decision": ("deny", "EgressGateway/bench-gw/defaultPolicy", "no route allows it"),
                        "resp_body": (40, b'{"error": "clrk: no route allows it"}', False)})
        out.append(raw)
    return out


def gateway_config(name: str, sink: str, prom_port: int) -> dict:
    cfg: dict = {"endpoint": sink, "headers": {}}
    if name == "nometrics":
        cfg["metrics"] = None
    elif name == "metrics+prom":
        cfg["prometheus"] = ["127.0.0.1", prom_port]
    elif name == "ratio0.1":
        cfg["sampling"] = {"ratio": 0.1}
    return {"t": "config", "gateways": {"bench-gw": cfg}, "fallback": "", "redact_headers": [], "redact_query": []}


def run_once(tree: Path, config: str, raws: list[dict], sink: str, batch: int, clickhouse: str = "",
             server_pid: int | None = None, paced: int = 0) -> tuple[float, float | None, tuple[float, float]]:
    """Records per CPU second of one fresh recorder of `tree` under `config`; with a ClickHouse store whose
    server runs here, also the server's CPU seconds per record; and the recorder's memory (MB resident once
    configured and idle, and at its peak by the end)."""
    sys.path.insert(0, str(tree))
    from clrk import wire

    config, _, store = config.partition("@")
    with tempfile.TemporaryDirectory() as d:
        db = clickhouse if store == "ch" else str(Path(d) / "clrk.duckdb")
        sock = wire.socket_path(db) if store == "ch" else wire.socket_path(Path(db))
        env = {**os.environ, "PYTHONPATH": str(tree), "CLRK_RECORDER_DB": db}  # a URL stays off the command line
        on_argv = [] if store == "ch" else ["--db", db]  # an older tree knows only --db
        proc = subprocess.Popen([sys.executable, "-O", "-m", "clrk.recorder", *on_argv, "--socket", sock],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree)
        server_pid = server_pid if store == "ch" else None
        try:
            deadline = time.monotonic() + 60
            while not wire.recorder_ready(sock):
                if time.monotonic() > deadline:
                    raise RuntimeError("recorder did not start")
                time.sleep(0.05)
            with wire.BlockingClient(sock, timeout=300) as c:
                c.send({"t": "hello", "role": "bench"})
                c.send(gateway_config(config, sink, free_port()))
                c.request({"t": "flush"})
                time.sleep(0.5)  # let the SDK set-up threads settle before counting
                idle_mb = memory_mb(proc.pid)[0]
                packed = [wire.pack_record(r) for r in raws]
                before = cpu_seconds(proc.pid)
                server_before = cpu_seconds(server_pid) if server_pid else 0.0
                for i in range(0, len(packed), batch):
                    c.sock.sendall(wire.pack_rows(packed[i:i + batch]))
                    if paced and (i // batch + 1) % max(1, paced // batch) == 0:
                        c.request({"t": "flush"})  # as a proxy sends: at most `paced` records ahead of the store
                c.request({"t": "flush"})
                # The batch processors export in their own threads: wait until they are idle (CPU stops rising).
                last = cpu_seconds(proc.pid)
                while True:
                    time.sleep(1.0)
                    now = cpu_seconds(proc.pid)
                    if now - last < 0.02:
                        break
                    last = now
                used = last - before
                server_used = cpu_seconds(server_pid) - server_before if server_pid else None
                st = c.request({"t": "status"})
                assert st["written"] == len(raws), st
                peak_mb = memory_mb(proc.pid)[1]
        finally:
            proc.terminate()
            proc.wait(30)
    sys.path.remove(str(tree))
    for mod in [m for m in sys.modules if m == "clrk" or m.startswith("clrk.")]:
        del sys.modules[mod]
    return len(raws) / used, (server_used / len(raws) if server_used is not None else None), (idle_mb, peak_mb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="name=path of a source tree")
    ap.add_argument("--config", action="append", default=[], help="tree:config (default: <tree>:default for each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--clickhouse", default="", help="URL of the ClickHouse for @ch configs, or auto")
    ap.add_argument("--paced", type=int, default=0, help="wait for the store every N records (as a proxy's "
                    "traffic would) instead of sending them all at once: the peak RSS is then the recorder's, not "
                    "the backlog's")
    args = ap.parse_args()
    server = None
    if args.clickhouse == "auto":
        sys.path.insert(0, str(HERE.parent))
        from tests.harness.clickhouse import ClickHouseServer

        server = ClickHouseServer(Path(tempfile.mkdtemp(prefix="clrk-bench-ch-"))).start()
        args.clickhouse = server.url(database="bench")
    trees = dict(t.split("=", 1) for t in args.tree)
    configs = [c.split(":", 1) for c in args.config] or [[t, "default"] for t in trees]
    configs = [[t, "default"] for t in trees if [t, "default"] not in configs] + configs
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, str(HERE / "otlp_sink.py"), str(sink_port)])
    raws = snapshots(args.records, 16)
    results: dict[str, list[float]] = {f"{t}:{c}": [] for t, c in configs}
    server_cpu: dict[str, list[float]] = {f"{t}:{c}": [] for t, c in configs}
    memory: dict[str, list[tuple[float, float]]] = {f"{t}:{c}": [] for t, c in configs}
    try:
        time.sleep(0.5)
        for r in range(args.rounds):
            for t, c in configs:
                rate, per_record, mem = run_once(Path(trees[t]).resolve(), c, raws, f"http://127.0.0.1:{sink_port}",
                                            args.batch, args.clickhouse, server.proc.pid if server else None,
                                            args.paced)
                results[f"{t}:{c}"].append(rate)
                memory[f"{t}:{c}"].append(mem)
                if per_record is not None:
                    server_cpu[f"{t}:{c}"].append(per_record)
                print(f"round {r + 1} {t}:{c}: {rate:,.0f} records per CPU second, recorder RSS {mem[0]:.0f} MB "
                      f"idle, {mem[1]:.0f} MB peak", flush=True)
    finally:
        sink.terminate()
        if server:
            server.stop()
    print("\n| tree:config | records per CPU second (median) | µs CPU per record | runs | server µs CPU per record "
          "| RSS idle MB | RSS peak MB |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for k, v in results.items():
        med = statistics.median(v)
        srv = f"{statistics.median(server_cpu[k]) * 1e6:.0f}" if server_cpu[k] else ""
        idle, peak = (statistics.median(m[i] for m in memory[k]) for i in (0, 1))
        print(f"| {k} | {med:,.0f} | {1e6 / med:.0f} | {', '.join(f'{x:,.0f}' for x in v)} | {srv} | {idle:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
