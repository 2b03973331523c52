"""clrk benchmarks: ratios against bare mitmdump, measured interleaved in one run (A B A B ...).

    .venv/bin/python bench/bench.py [--rounds 3] [--seconds 5] [--smoke] [--write docs/PERFORMANCE.md]

Throughput and latency of small JSON chat completions through `mitmdump -q` (bare) and through the clrk
gateway with everything on: the upstream is an OpenAI-schema Backend behind an AIProviderRoute with a
TokenBudget, so each call is authenticated, decided on its model, budgeted, parsed for usage, captured,
stored in DuckDB and exported over OTLP to a local receiver. HTTPS keep-alive, `hey` at concurrency 1, 8, 32. Medians over the rounds; the table goes between the markers in
docs/PERFORMANCE.md. `--smoke` runs everything for a moment and writes nothing (CI runs it so the harness
cannot rot); numbers from a smoke run mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness.certs import make_upstream_pki  # noqa: E402

BIN = Path(sys.executable).parent
TOKEN = "bench-token-0123456789"
BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
START, END = "<!-- bench:throughput:start -->", "<!-- bench:throughput:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def ensure_hey() -> str:
    hey = shutil.which("hey")
    if hey:
        return hey
    print("bench: installing Debian's hey (the load generator)", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "hey"], check=True, stdout=subprocess.DEVNULL)
    hey = shutil.which("hey")
    if not hey:
        raise SystemExit("bench: hey is not installed and could not be installed (apt-get install hey)")
    return hey


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def run_hey(hey: str, proxy: str, url: str, conc: int, seconds: float) -> Result:
    out = subprocess.run(
        [hey, "-z", f"{seconds}s", "-c", str(conc), "-m", "POST", "-d", BODY, "-T", "application/json", "-x", proxy, url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = float(re.search(r"50% in ([\d.]+) secs", out).group(1)) * 1000
    p99 = float(re.search(r"99% in ([\d.]+) secs", out).group(1)) * 1000
    errors = sum(int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out) if code != "200")
    if "Error distribution:" in out:
        errors += sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", out.split("Error distribution:", 1)[1], re.M))
    return Result(rps, p50, p99, errors)


class Stack:
    """The processes under test: upstream, OTLP receiver, bare mitmdump, the clrk gateway."""

    def __init__(self, tmp: Path, es: ExitStack):
        self.tmp = tmp
        self.pids: dict[str, int] = {}
        ca, server_pem = make_upstream_pki(tmp / "pki", ["localhost"])
        self.upstream_port = free_port()
        self._spawn(es, [sys.executable, str(REPO / "bench" / "upstream.py"), str(server_pem), str(self.upstream_port)], "upstream")
        self.otlp_port = free_port()
        self._spawn(es, [sys.executable, str(REPO / "bench" / "otlp_sink.py"), str(self.otlp_port)], "otlp")
        wait_port(self.upstream_port)
        wait_port(self.otlp_port)

        self.bare_port = free_port()
        self._spawn(es, [str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(self.bare_port),
                         "--set", "ssl_insecure=true", "--set", f"confdir={tmp / 'bare-certs'}"], "bare")

        pol = tmp / "policies"
        pol.mkdir()
        (pol / "bench.yaml").write_text(f"""
kind: EgressGateway
metadata: {{name: bench}}
spec:
  otlp: {{endpoint: "http://127.0.0.1:{self.otlp_port}"}}
  upstreamTLS: {{caBundle: {ca}}}
---
kind: Agent
metadata: {{name: bench, namespace: team-a}}
spec: {{kind: BenchAgent, credentials: {{tokenSha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}}}}}
---
kind: Backend
metadata: {{name: bench-llm}}
spec: {{schema: {{name: openai}}, upstream: {{host: localhost, port: {self.upstream_port}}}}}
---
kind: AIProviderRoute
metadata: {{name: bench, namespace: team-a}}
spec:
  rules:
  - matches: [{{provider: openai}}]
    filters: [{{type: TokenBudget, tokenBudget: {{maxTokensPerDay: 1000000000000}}}}]
""")
        self.db = tmp / "data" / "clrk.duckdb"
        self.clrk_port = free_port()
        self._spawn(es, [str(BIN / "mitmdump"), "-s", str(REPO / "addons" / "clrk.py"), "--listen-host", "127.0.0.1",
                         "-p", str(self.clrk_port), "--set", f"clrk_policies={pol}", "--set", f"clrk_db={self.db}",
                         "--set", f"clrk_certs={tmp / 'certs'}"], "clrk")
        wait_port(self.bare_port)
        wait_port(self.clrk_port)
        deadline = time.monotonic() + 30
        while not Path(str(self.db) + ".sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = f"https://localhost:{self.upstream_port}/v1/chat/completions"

    def _spawn(self, es: ExitStack, argv: list[str], name: str) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.pids[name] = p.pid

        def stop() -> None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()

        es.callback(stop)

    @property
    def proxies(self) -> dict[str, str]:
        return {"bare": f"http://127.0.0.1:{self.bare_port}", "clrk": f"http://team-a.bench:{TOKEN}@127.0.0.1:{self.clrk_port}"}


def count_rows(db: Path) -> int:
    from clrk import wire

    with wire.BlockingClient(wire.socket_path(db)) as c:
        return len(c.request({"t": "query", "query": {"limit": 0}})["rows"])


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--smoke", action="store_true", help="a short run that checks the harness works; writes nothing")
    ap.add_argument("--write", default=str(REPO / "docs" / "PERFORMANCE.md"))
    ap.add_argument("--profile", metavar="FILE", help="only profile the clrk proxy under c=8 load with py-spy; "
                    "write its folded stacks to FILE and print where the time goes")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.seconds = 1, 1.0
    concs = [int(c) for c in args.concurrency.split(",")]
    hey = ensure_hey()
    results: dict[tuple[str, int], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="clrk-bench-") as d, ExitStack() as es:
        stack = Stack(Path(d), es)
        for proxy in stack.proxies.values():  # warm up both (TLS, caches, recorder start)
            run_hey(hey, proxy, stack.url, 8, 1.0 if not args.smoke else 0.3)
        if args.profile:
            profile(hey, stack, args.profile, args.seconds)
            return
        rows_before = count_rows(stack.db)
        sent = 0
        for r in range(args.rounds):
            for c in concs:
                order = ["bare", "clrk"] if (r + c) % 2 == 0 else ["clrk", "bare"]
                for name in order:
                    res = run_hey(hey, stack.proxies[name], stack.url, c, args.seconds)
                    results.setdefault((name, c), []).append(res)
                    if name == "clrk":
                        sent += round(res.rps * args.seconds)
                    print(f"round {r + 1} c={c:<3} {name:5} {res.rps:8.1f} req/s  p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:6.2f} ms", file=sys.stderr)
        time.sleep(1.0)
        stored = count_rows(stack.db) - rows_before
    table = render(results, concs, args, stored, sent)
    print(table)
    if not args.smoke:
        write_section(Path(args.write), table)


def profile(hey: str, stack: Stack, out: str, seconds: float) -> None:
    pid = stack.pids["clrk"]
    spy = subprocess.Popen([str(BIN / "py-spy"), "record", "-p", str(pid), "-d", str(int(seconds) + 1), "-r", "250",
                            "-f", "raw", "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    res = run_hey(hey, stack.proxies["clrk"], stack.url, 8, seconds)
    spy.wait(60)
    print(f"clrk under profile: {res.rps:.0f} req/s", file=sys.stderr)
    print(summarize_profile(Path(out)))


def summarize_profile(path: Path) -> str:
    """Share of the proxy thread's samples per clrk function (inclusive) and per mitmproxy area."""
    total = 0
    clrk: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = stack.split(";")
        if not any("run_forever" in f for f in frames):
            continue  # idle or helper threads: only the event loop thread serves traffic
        total += count
        seen = set()
        for f in frames:
            name = re.sub(r":\d+\)$", ")", f)
            if ("clrk/" in name) and name not in seen:
                seen.add(name)
                clrk[name] = clrk.get(name, 0) + count
    lines = [f"event-loop samples: {total}", "clrk functions (inclusive share of the event loop's samples):"]
    for name, n in sorted(clrk.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"  {100 * n / total:5.1f}%  {name}")
    return "\n".join(lines)


def render(results, concs, args, stored: int, sent: int) -> str:
    med = {k: (statistics.median(r.rps for r in v), statistics.median(r.p50_ms for r in v), statistics.median(r.p99_ms for r in v))
           for k, v in results.items()}
    lines = [
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()}.",
        f"Command: `.venv/bin/python bench/bench.py --rounds {args.rounds} --seconds {args.seconds:g}` "
        f"(hey, POST of a small JSON chat completion over HTTPS keep-alive; medians of {args.rounds} interleaved rounds).",
        "",
        "| concurrency | bare req/s | clrk req/s | ratio | bare p50 ms | clrk p50 ms | added p50 ms | bare p99 ms | clrk p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concs:
        b, k = med[("bare", c)], med[("clrk", c)]
        lines.append(f"| {c} | {b[0]:.0f} | {k[0]:.0f} | **{k[0] / b[0]:.2f}** | {b[1]:.2f} | {k[1]:.2f} | {k[1] - b[1]:+.2f} | {b[2]:.2f} | {k[2]:.2f} |")
    lines += ["", f"Records stored for the clrk runs: {stored} of ~{sent} requests sent (hey's count is approximate: rate × duration)."]
    return "\n".join(lines)


def write_section(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"# Performance\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    path.write_text(f"{pre}{START}\n{table}\n{END}{post}")
    print(f"bench: wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
