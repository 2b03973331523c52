"""clrk benchmarks: ratios against bare mitmdump, measured interleaved in one run (A B A B ...).

    .venv/bin/python bench/bench.py [--rounds 3] [--seconds 5] [--smoke] [--only throughput,sse,memory,store,otlp]
    .venv/bin/python bench/bench.py --profile FILE      # py-spy the clrk proxy under load instead

What is measured (docs/PERFORMANCE.md states the targets):
  throughput  small JSON chat completions through `mitmdump -q` (bare; also under `python -O`, the mode clrk
              runs in, to show clrk's own cost) and through the clrk gateway as `clrk run` starts it, everything on —
              the upstream is an OpenAI-schema Backend behind an AIProviderRoute with a TokenBudget, so each
              call is authenticated, decided on its model, budgeted, parsed for usage, captured, stored in
              DuckDB and exported over OTLP to a local receiver. HTTPS keep-alive, `hey` at c = 1, 8, 32.
  sse         time to first byte and total time of a paced SSE stream: direct, bare, clrk.
  memory      peak RSS of the clrk proxy through a 1 GiB download and through 100k transactions.
  store       `clrk spend` and `clrk records --since 1h` over a store of 1M records, through the recorder.
  otlp        the throughput run with the OTLP endpoint refusing connections and answering in 2 s.
  workers     `clrk run --workers 2` (a supervisor, two gateway processes sharing the port and one recorder)
              against bare mitmdump and one clrk gateway, same calls and settings as throughput, at c = 16.

Medians over rounds; tables go between the markers in docs/PERFORMANCE.md with the machine, the command and
the date. `--smoke` runs everything small and briefly and writes nothing (CI runs it so the harness cannot
rot; its numbers mean nothing).
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
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clrk import wire  # noqa: E402
from clrk.launch import gateway_command  # noqa: E402
from clrk.workers import supervisor_argv  # noqa: E402
from tests.harness.certs import make_upstream_pki  # noqa: E402

BIN = Path(sys.executable).parent
TOKEN = "bench-token-0123456789"
BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
SECTIONS = ("throughput", "sse", "memory", "store", "otlp", "workers")
WORKERS = 2  # the workers section: `clrk run --workers 2`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
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


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def run_hey(hey: str, proxy: str, url: str, conc: int, seconds: float | None = None, n: int | None = None) -> Result:
    amount = ["-z", f"{seconds}s"] if seconds else ["-n", str(n)]
    out = subprocess.run(
        [hey, *amount, "-c", str(conc), "-m", "POST", "-d", BODY, "-T", "application/json", "-x", proxy, url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50% in ([\d.]+) secs", out)
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    errors = sum(int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out) if code != "200")
    if "Error distribution:" in out:
        errors += sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", out.split("Error distribution:", 1)[1], re.M))
    return Result(rps, float(p50.group(1)) * 1000 if p50 else 0.0, float(p99.group(1)) * 1000 if p99 else 0.0, errors)


def bare_argv(port: int, confdir: Path, optimized: bool = False, noop: bool = False, script: bool = False) -> list[str]:
    """Bare mitmdump as it ships (the contract's baseline), under the `python -O` the clrk gateway runs with,
    or (`noop`) started exactly as the gateway is, with a do-nothing addon in its place (`bench/noop_proxy.py`),
    or (`script`) as mitmdump loads `-s addons/clrk.py`, with a do-nothing script (`bench/noop_addon.py`)."""
    python = [sys.executable, "-O"] if optimized or noop else []
    entry = str(REPO / "bench" / "noop_proxy.py") if noop else str(BIN / "mitmdump")
    extra = ["-s", str(REPO / "bench" / "noop_addon.py")] if script else []
    return [*python, entry, "-q", *extra, "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", "ssl_insecure=true", "--set", f"confdir={confdir}"]


SCRIPT_GATEWAY = [str(BIN / "mitmdump"), "-q", "-s", str(REPO / "addons" / "clrk.py")]  # the `-s` way to run clrk


def clrk_argv(port: int, policies: Path, db: Path, certs: Path, command: list[str] | None = None) -> list[str]:
    """The clrk gateway as `clrk run` starts it (or under `command`, e.g. `mitmdump -s SCRIPT`)."""
    return [*(command or gateway_command()), "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", f"clrk_policies={policies}", "--set", f"clrk_db={db}", "--set", f"clrk_certs={certs}"]


def clrk_proxy(port: int) -> str:
    return f"http://team-a.bench:{TOKEN}@127.0.0.1:{port}"


@dataclass
class Backing:
    url: str  # the chat-completions URL of the upstream
    policies: Path  # the bench policy, exporting to the OTLP sink


@contextmanager
def upstream_and_sink(tmp: Path) -> Iterator[Backing]:
    """An HTTPS upstream, an OTLP sink and the bench policy for one gateway (tools measuring one proxy at a time)."""
    ca, server_pem = make_upstream_pki(tmp / "pki", ["localhost"])
    up_port, sink = free_port(), free_port()
    up = subprocess.Popen([sys.executable, str(REPO / "bench" / "upstream.py"), str(server_pem), str(up_port)])
    otlp = subprocess.Popen([sys.executable, str(REPO / "bench" / "otlp_sink.py"), str(sink)])
    try:
        wait_port(up_port)
        pol = tmp / "pol"
        pol.mkdir()
        write_policy(pol, f"http://127.0.0.1:{sink}", ca, up_port)
        yield Backing(f"https://localhost:{up_port}/v1/chat/completions", pol)
    finally:
        up.terminate()
        otlp.terminate()


class Stack:
    """The processes under test: upstream, OTLP receivers, bare mitmdump, clrk gateways (one per OTLP case)."""

    def __init__(self, tmp: Path, es: ExitStack, otlp_cases: bool, bare_optimized: bool = False, workers: int = 1):
        self.tmp, self.es = tmp, es
        tmp.mkdir(parents=True, exist_ok=True)
        self.pids: dict[str, int] = {}
        self.ca, server_pem = make_upstream_pki(tmp / "pki", ["localhost"])
        self.upstream_port = free_port()
        self._spawn([sys.executable, str(REPO / "bench" / "upstream.py"), str(server_pem), str(self.upstream_port)], "upstream")
        sink = free_port()
        self._spawn([sys.executable, str(REPO / "bench" / "otlp_sink.py"), str(sink)], "otlp")
        wait_port(self.upstream_port)
        wait_port(sink)
        # Bare mitmdump as it ships (the contract's baseline) and, to show clrk's own cost apart from what
        # -O takes off mitmproxy, under the same `python -O` the clrk gateway runs with.
        self.bares: dict[str, int] = {}
        for name in ["bare", *(["bare -O", "noop -O", "noop -s"] if bare_optimized else [])]:
            self.bares[name] = port = free_port()
            slug = name.replace(" ", "-")
            self._spawn(bare_argv(port, tmp / f"{slug}-certs", optimized=name in ("bare -O", "noop -O"), noop=name == "noop -O",
                                  script=name == "noop -s"), slug)
        self.bare_port = self.bares["bare"]
        self.gateways: dict[str, tuple[int, Path]] = {}
        endpoints = {"clrk": f"http://127.0.0.1:{sink}"}
        if otlp_cases:
            slow = free_port()
            self._spawn([sys.executable, str(REPO / "bench" / "otlp_sink.py"), str(slow), "--delay", "2"], "otlp-slow")
            wait_port(slow)
            endpoints["clrk otlp down"] = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
            endpoints["clrk otlp slow"] = f"http://127.0.0.1:{slow}"
        for name, endpoint in endpoints.items():
            self.gateways[name] = self._gateway(name, endpoint)
        if bare_optimized:  # the contract's like for like: `mitmdump -s addons/clrk.py` against a do-nothing script
            self.gateways["clrk -s"] = self._gateway("clrk -s", endpoints["clrk"], command=SCRIPT_GATEWAY)
        if workers > 1:  # the same gateway, as `clrk run --workers N` starts it
            self.gateways[f"clrk x{workers}"] = self._gateway(f"clrk x{workers}", endpoints["clrk"], workers)
        for port in self.bares.values():
            wait_port(port)
        for name, (port, db) in self.gateways.items():
            wait_port(port)
            deadline = time.monotonic() + 90  # seconds normally; past 30 once with the machine loaded by other tests
            while not wire.recorder_ready(wire.socket_path(db)) or connected(db) < (workers if " x" in name else 1):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {name} gateway's recorder (or its workers) did not start; see {self.tmp}")
                time.sleep(0.05)
        self.url = f"https://localhost:{self.upstream_port}/v1/chat/completions"

    def _gateway(self, name: str, endpoint: str, workers: int = 1, command: list[str] | None = None) -> tuple[int, Path]:
        slug = name.replace(" ", "-")
        pol = self.tmp / f"policies-{slug}"
        pol.mkdir()
        write_policy(pol, endpoint, self.ca, self.upstream_port)

        db = self.tmp / f"data-{slug}" / "clrk.duckdb"
        port = free_port()
        argv = clrk_argv(port, pol, db, self.tmp / "certs", command)
        self._spawn(supervisor_argv(workers, [f"127.0.0.1:{port}"], argv) if workers > 1 else argv, slug)
        return port, db

    def _spawn(self, argv: list[str], name: str) -> None:
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

        self.es.callback(stop)

    def proxy(self, name: str) -> str:
        if name in self.bares:
            return f"http://127.0.0.1:{self.bares[name]}"
        return clrk_proxy(self.gateways[name][0])

    def pid(self, name: str) -> int:
        return self.pids[name.replace(" ", "-")]


def write_policy(directory: Path, otlp_endpoint: str, ca: Path, upstream_port: int) -> None:
    """The gateway under test: the upstream is an OpenAI-schema Backend behind an AIProviderRoute with a
    TokenBudget, so each call is authenticated, decided on its model, budgeted and parsed. The Backend's host,
    localhost, is resolved and judged per upstream connection like any name: an EgressRoute's cidrs let it lead
    to loopback (blockPrivateNetworks refuses it otherwise)."""
    (directory / "bench.yaml").write_text(f"""
kind: EgressGateway
metadata: {{name: bench}}
spec:
  otlp: {{endpoint: "{otlp_endpoint}"}}
  upstreamTLS: {{caBundle: {ca}}}
---
kind: Agent
metadata: {{name: bench, namespace: team-a}}
spec: {{kind: BenchAgent, credentials: {{tokenSha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}}}}}
---
kind: Backend
metadata: {{name: bench-llm}}
spec: {{schema: {{name: openai}}, upstream: {{host: localhost, port: {upstream_port}}}}}
---
kind: EgressRoute
metadata: {{name: bench-llm-on-loopback}}
spec: {{hostnames: [localhost], ports: [{upstream_port}], cidrs: [127.0.0.0/8, "::1/128"]}}
---
kind: AIProviderRoute
metadata: {{name: bench, namespace: team-a}}
spec:
  rules:
  - matches: [{{provider: bench-llm}}]
    filters: [{{type: TokenBudget, tokenBudget: {{maxTokensPerDay: 1000000000000}}}}]
""")


def connected(db: Path) -> int:
    """How many gateway processes are connected to the recorder of `db` (the workers of `clrk run --workers`)."""
    with wire.BlockingClient(wire.socket_path(db)) as c:
        return int(c.request({"t": "status"})["proxies"])


def count_rows(db: Path) -> int:
    with wire.BlockingClient(wire.socket_path(db)) as c:
        return int(c.request({"t": "status"})["seq"])


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def md(n: float, digits: int = 2) -> str:
    return f"{n:.{digits}f}"


# ------------------------------------------------------------------------------------------ sections


def bench_throughput(hey, stack: Stack, rounds: int, seconds: float, concs: list[int], names: list[str]) -> str:
    results: dict[tuple[str, int], list[Result]] = {}
    before = {n: count_rows(stack.gateways[n][1]) for n in names if n in stack.gateways}
    sent = dict.fromkeys(before, 0)
    for r in range(rounds):
        for c in concs:
            order = names if (r + c) % 2 == 0 else list(reversed(names))
            for name in order:
                res = run_hey(hey, stack.proxy(name), stack.url, c, seconds=seconds)
                results.setdefault((name, c), []).append(res)
                if name in sent:
                    sent[name] += round(res.rps * seconds)
                print(f"round {r + 1} c={c:<3} {name:15} {res.rps:8.1f} req/s  p50 {res.p50_ms:6.2f} ms  "
                      f"p99 {res.p99_ms:6.2f} ms  errors {res.errors}", file=sys.stderr)
    time.sleep(1.5)
    stored = {n: count_rows(stack.gateways[n][1]) - b for n, b in before.items()}
    med = {k: (statistics.median(x.rps for x in v), statistics.median(x.p50_ms for x in v),
               statistics.median(x.p99_ms for x in v), sum(x.errors for x in v)) for k, v in results.items()}
    lines = ["| concurrency | target | req/s | ratio to bare | p50 ms | added p50 ms | p99 ms | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in concs:
        b = med[("bare", c)]
        for name in names:
            m = med[(name, c)]
            ratio = "" if name == "bare" else f"**{m[0] / b[0]:.2f}**" if name in stack.gateways else f"{m[0] / b[0]:.2f}"
            added = "" if name == "bare" else f"{m[1] - b[1]:+.2f}"
            lines.append(f"| {c} | {name} | {m[0]:.0f} | {ratio} | {md(m[1])} | {added} | {md(m[2])} | {m[3]} |")
    at = f"at c = {' / '.join(map(str, concs))}"
    if "noop -s" in names and "clrk -s" in names:
        like = " / ".join(f"{med[('clrk -s', c)][0] / med[('noop -s', c)][0]:.2f}" for c in concs)
        lines += ["", f"**Like for like, loaded as a script** — `mitmdump -q -s addons/clrk.py` against `mitmdump -q -s "
                      f"bench/noop_addon.py` (a do-nothing addon with Gateway's hooks), same interpreter, same flags: "
                      f"**{like}** {at}."]
    if "noop -O" in names:
        like = " / ".join(f"{med[('clrk', c)][0] / med[('noop -O', c)][0]:.2f}" for c in concs)
        lines += ["", f"**Like for like, as `clrk run` starts** — clrk against mitmdump started the same way (`python -O`, "
                      f"clrk's master with its planned event dispatch, a do-nothing addon with Gateway's hooks in its "
                      f"place; `bench/noop_proxy.py`): **{like}** {at}."]
    if "bare -O" in names:
        own = " / ".join(f"{med[('clrk', c)][0] / med[('bare -O', c)][0]:.2f}" for c in concs)
        lines += ["", f"clrk against bare mitmdump under the same `python -O`, no addon at all: {own} at c = "
                      f"{' / '.join(map(str, concs))}."]
    for n in stored:
        lines.append("")
        lines.append(f"{n}: {stored[n]} records stored of ~{sent[n]} requests sent (hey's count is rate × duration, approximate).")
    return "\n".join(lines)


def _sse_times(stack: Stack, via: str | None, n: int, delay: float) -> list[tuple[float, float]]:
    """(time to first event, total) in ms of two SSE streams on one client connection: the first pays for the
    connection to the upstream (clrk opens it only once a request is allowed), the second reuses it."""
    import base64
    import http.client

    host, port = "localhost", stack.upstream_port
    if via is None:
        conn = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=str(stack.ca)), timeout=30)
    else:
        user, _, hostport = via.removeprefix("http://").rpartition("@")
        phost, pport = hostport.rsplit(":", 1)
        ca = stack.tmp / ("bare-certs" if int(pport) == stack.bare_port else "certs") / "mitmproxy-ca-cert.pem"
        conn = http.client.HTTPSConnection(phost, int(pport), context=ssl.create_default_context(cafile=str(ca)), timeout=30)
        headers = {"Proxy-Authorization": "Basic " + base64.b64encode(user.encode()).decode()} if user else {}
        conn.set_tunnel(host, port, headers=headers)
    conn.connect()
    out = []
    for _ in range(2):
        start = time.perf_counter()
        conn.request("GET", f"/sse?n={n}&delay={delay}")
        resp = conn.getresponse()
        first = None
        while chunk := resp.read1(65536):
            if first is None and b"data:" in chunk:
                first = time.perf_counter()
        out.append((((first or float("nan")) - start) * 1000, (time.perf_counter() - start) * 1000))
    conn.close()
    return out


def bench_sse(stack: Stack, rounds: int, connections: int | None = None) -> str:
    targets = {"direct": None, "bare": stack.proxy("bare"), "clrk": stack.proxy("clrk")}
    n, delay = 10, 0.05
    connections = connections or rounds * 5
    got: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in targets}
    for r in range(connections):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        for name in order:
            got[name].append(_sse_times(stack, targets[name], n, delay))
    lines = [f"{n} events {int(delay * 1000)} ms apart; {connections} client connections per path, two streams on "
             "each (the first opens the upstream connection, the second reuses it); medians.", "",
             "| path | first stream: first event ms | second stream: first event ms | vs direct | total ms |",
             "|---|---:|---:|---:|---:|"]
    direct = statistics.median(x[1][0] for x in got["direct"])
    for name, vals in got.items():
        cold = statistics.median(x[0][0] for x in vals)
        warm = statistics.median(x[1][0] for x in vals)
        total = statistics.median(x[1][1] for x in vals)
        vs = "" if name == "direct" else f"{warm - direct:+.2f}"
        lines.append(f"| {name} | {md(cold)} | {md(warm)} | {vs} | {md(total, 1)} |")
    return "\n".join(lines)


def _peaks_while(pids: dict[str, int], work) -> dict[str, float]:
    """The peak RSS (MB) of each process while `work()` runs, sampled every 50 ms."""
    peak = {k: rss_mb(p) for k, p in pids.items()}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k, p in pids.items():
                peak[k] = max(peak[k], rss_mb(p))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        work()
    finally:
        stop.set()
        th.join()
    return peak


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def bench_memory(hey: str, stack: Stack, download_bytes: int, transactions: int) -> str:
    """Peak RSS of the proxy and of the recorder it started (each its own peak: their sum is an upper bound of
    what they held at once)."""
    pid = stack.pid("clrk")
    recorders = _children(pid)
    procs = {"proxy": pid, **({"recorder": recorders[0]} if recorders else {})}
    base = {k: rss_mb(p) for k, p in procs.items()}
    url = f"https://localhost:{stack.upstream_port}/bytes?size={download_bytes}"
    curl = shutil.which("curl")
    cacert = str(stack.tmp / "certs" / "mitmproxy-ca-cert.pem")

    def download():
        subprocess.run([curl, "-s", "-o", "/dev/null", "--cacert", cacert, "-x", stack.proxy("clrk"), url], check=True)

    def peaks(work) -> tuple[dict[str, float], float]:
        t0 = time.monotonic()
        out = _peaks_while(procs, work)
        return out, time.monotonic() - t0

    peak_dl, secs = peaks(download)
    peak_tx, _ = peaks(lambda: run_hey(hey, stack.proxy("clrk"), stack.url, 8, n=transactions))
    mib = download_bytes / 2**20

    def row(what: str, peak: dict[str, float]) -> str:
        total = sum(peak.values())
        return (f"| {what} | {base['proxy']:.0f} | {peak['proxy']:.0f} | {base.get('recorder', 0):.0f} | "
                f"{peak.get('recorder', 0):.0f} | {total:.0f} |")

    return "\n".join([
        "| run | proxy RSS before MB | proxy peak MB | recorder before MB | recorder peak MB | both, peak MB |",
        "|---|---:|---:|---:|---:|---:|",
        row(f"{mib:.0f} MiB download ({mib / secs:.0f} MiB/s)", peak_dl),
        row(f"{transactions} transactions (c=8)", peak_tx),
    ])


def bench_store(tmp: Path, rows: int) -> str:
    """A store of `rows` synthetic records (a day's traffic of several agents, routes and models), queried
    through a running recorder the way `clrk spend` and `clrk records` do while a gateway runs."""
    from clrk import attributes as A
    from clrk.recorder.store import Store

    db = tmp / "big" / "clrk.duckdb"
    store = Store(db)
    now = time.time()
    batch = 100_000
    agents = [("team-a", "researcher"), ("team-a", "writer"), ("team-b", "reviewer"), ("team-c", "ops")]
    models = ["gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet", "gemini-2.0-flash"]
    for start in range(0, rows, batch):
        chunk = []
        for i in range(start, min(rows, start + batch)):
            ns, name = agents[i % 4]
            chunk.append({A.TIME: now - (i % 86400), A.END_TIME: now - (i % 86400) + 0.2, A.TRACE_ID: f"{i:032x}",
                          A.SPAN_ID: f"{i:016x}", A.HTTP_REQUEST_METHOD: "POST", A.URL_FULL: "https://api.openai.com/v1/chat/completions",
                          A.SERVER_ADDRESS: "api.openai.com", A.SERVER_PORT: 443, A.HTTP_RESPONSE_STATUS_CODE: 200,
                          A.AGENT_NAMESPACE: ns, A.AGENT_NAME: name, A.CLRK_APR_NAMESPACE: ns, A.CLRK_APR_NAME: "llm",
                          A.GEN_AI_SYSTEM: "openai", A.GEN_AI_REQUEST_MODEL: models[i % 4], A.GEN_AI_USAGE_INPUT_TOKENS: 100 + i % 50,
                          A.GEN_AI_USAGE_OUTPUT_TOKENS: 20 + i % 7, A.CLRK_DECISION: "allow", A.CLRK_COMPONENT: A.COMPONENT_EGRESS,
                          A.GEN_AI_USAGE_COST: None if i % 10 == 0 else (100 + i % 50) * 2.5e-6,
                          A.CLRK_COST_SOURCE: "unknown" if i % 10 == 0 else "genai-prices 0.2.3"})
        store.insert(chunk)
    store.close()
    sock = wire.socket_path(db)
    rec = subprocess.Popen([sys.executable, "-m", "clrk.recorder", "--db", str(db), "--socket", sock],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not wire.recorder_ready(sock):
            if time.monotonic() > deadline:
                raise RuntimeError("the recorder for the big store did not start")
            time.sleep(0.1)
        clrk = str(BIN / "clrk")
        timings = {}
        for label, argv in (("clrk spend (by day, agent, route, model)", [clrk, "spend", "--db", str(db), "--json"]),
                            ("clrk spend --since 1h --budgets", [clrk, "spend", "--db", str(db), "--since", "1h", "--budgets"]),
                            ("clrk spend --usd (by day, agent, route, model)", [clrk, "spend", "--db", str(db), "--usd"]),
                            ("clrk records --since 1h (newest 100)", [clrk, "records", "--db", str(db), "--since", "1h"]),
                            ("clrk records --agent team-a/writer --json --limit 1000",
                             [clrk, "records", "--db", str(db), "--agent", "team-a/writer", "--json", "--limit", "1000"])):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                runs.append(time.perf_counter() - t0)
            timings[label] = statistics.median(runs)
    finally:
        rec.send_signal(signal.SIGTERM)
        rec.wait(60)
    lines = [f"{rows:,} records, queried through the running recorder (medians of 3, whole command including Python start-up).",
             "", "| query | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in timings.items()]
    return "\n".join(lines)


def profile(hey: str, stack: Stack, out: str, seconds: float) -> str:
    """py-spy samples bare mitmdump (under the same `python -O` as the gateway) and the clrk proxy under the
    same c=8 load, one after the other; the summary is per request (sampled time / requests served), so the
    two can be subtracted: what clrk adds, function by function (inclusive), and its own functions."""
    per_req: dict[str, tuple[dict[str, float], dict[str, float], float]] = {}
    lines = []
    for name in ["bare -O", "clrk"]:
        raw = f"{out}.{name.split()[0]}"
        spy = subprocess.Popen([str(BIN / "py-spy"), "record", "-p", str(stack.pid(name)), "-d", str(int(seconds) + 1),
                                "-r", "500", "-f", "raw", "-o", raw], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        res = run_hey(hey, stack.proxy(name), stack.url, 8, seconds=seconds)
        if spy.wait(60) != 0 or not Path(raw).exists():
            raise SystemExit(f"bench: py-spy could not sample the {name} proxy (it needs ptrace permission)")
        per_req[name] = _profile_per_request(Path(raw), res.rps * seconds, 1e6 / 500)
        lines.append(f"{name}: {res.rps:.0f} req/s under the profiler, {per_req[name][2]:.0f} µs of event-loop samples per request")
    bare_incl, _, _ = per_req["bare -O"]
    clrk_incl, _, _ = per_req["clrk"]
    lines.append("")
    lines.append("what clrk adds per request, inclusive µs (clrk − bare -O), largest first:")
    diffs = sorted(((clrk_incl.get(k, 0.0) - bare_incl.get(k, 0.0), k) for k in set(bare_incl) | set(clrk_incl)), reverse=True)
    shown = 0
    for d, k in diffs:
        if "asyncio/" in k or "<module>" in k or "mitmproxy/tools/main.py" in k:
            continue  # the event loop's own frames: everything is under them
        lines.append(f"  {d:+7.1f}  {k}")
        shown += 1
        if shown == 25:
            break
    lines.append("")
    lines.append("clrk's own functions, inclusive µs per request:")
    own = sorted(((v, k) for k, v in clrk_incl.items() if "clrk/" in k), reverse=True)[:20]
    lines += [f"  {v:7.1f}  {k}" for v, k in own]
    text = "\n".join(lines)
    Path(out).write_text(text + "\n")
    return text


def _profile_per_request(path: Path, requests: float, us_per_sample: float) -> tuple[dict[str, float], dict[str, float], float]:
    """(inclusive µs per request by function, self µs per request by function, total) from py-spy's raw output,
    counting only the event-loop thread (the one that serves traffic)."""
    incl: dict[str, float] = {}
    own: dict[str, float] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if not any("run_forever" in f for f in frames):
            continue
        total += count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    scale = us_per_sample / max(requests, 1.0)
    return ({k: v * scale for k, v in incl.items()}, {k: v * scale for k, v in own.items()}, total * scale)


def warm_up(hey: str, stack: Stack, smoke: bool) -> None:
    for name in [*stack.bares, *stack.gateways]:  # TLS, caches, recorders
        run_hey(hey, stack.proxy(name), stack.url, 8, seconds=0.3 if smoke else 1.0)


def write_section(path: Path, name: str, body: str) -> None:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else "# Performance\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    pre, rest = text.split(start, 1)
    _, post = rest.split(end, 1)
    path.write_text(f"{pre}{start}\n{body}\n{end}{post}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--smoke", action="store_true", help="everything, small and short: checks the harness; writes nothing")
    ap.add_argument("--write", default=str(REPO / "docs" / "PERFORMANCE.md"))
    ap.add_argument("--profile", metavar="FILE", help="only profile: py-spy on bare (-O) and clrk under c=8 load, per-request "
                    "differences written to FILE (raw samples in FILE.bare, FILE.clrk)")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    download, transactions, store_rows = 2**30, 100_000, 1_000_000
    if args.smoke:
        args.rounds, args.seconds = 1, 0.4
        download, transactions, store_rows = 8 * 2**20, 500, 5_000
    concs = [int(c) for c in args.concurrency.split(",")]
    hey = ensure_hey()
    stamp = f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()}."
    sections: dict[str, str] = {}
    cmd = f"`.venv/bin/python bench/bench.py --rounds {args.rounds} --seconds {args.seconds:g}`"
    with tempfile.TemporaryDirectory(prefix="clrk-bench-") as d:
        # Only what a section measures runs during it: idle gateways still poll and would tax the others.
        if args.profile or {"throughput", "sse", "memory"} & set(only):
            with ExitStack() as es:
                stack = Stack(Path(d) / "main", es, otlp_cases=False, bare_optimized=bool(args.profile) or "throughput" in only)
                warm_up(hey, stack, args.smoke)
                if args.profile:
                    print(profile(hey, stack, args.profile, args.seconds))
                    return
                if "throughput" in only:
                    sections["throughput"] = f"{stamp} Command: {cmd}.\n\n" + bench_throughput(
                        hey, stack, args.rounds, args.seconds, concs, [*stack.bares, "clrk", *(["clrk -s"] if "clrk -s" in stack.gateways else [])])
                if "sse" in only:
                    sections["sse"] = f"{stamp}\n\n" + bench_sse(stack, args.rounds, 1 if args.smoke else None)
                if "memory" in only:
                    sections["memory"] = f"{stamp}\n\n" + bench_memory(hey, stack, download, transactions)
        if "otlp" in only:
            with ExitStack() as es:
                stack = Stack(Path(d) / "otlp", es, otlp_cases=True)
                warm_up(hey, stack, args.smoke)
                sections["otlp"] = f"{stamp} c=8, {args.rounds} interleaved rounds, all four running.\n\n" + bench_throughput(
                    hey, stack, args.rounds, args.seconds, [8], ["bare", "clrk", "clrk otlp down", "clrk otlp slow"])
        if "workers" in only:
            with ExitStack() as es:
                stack = Stack(Path(d) / "workers", es, otlp_cases=False, workers=WORKERS)
                warm_up(hey, stack, args.smoke)
                sections["workers"] = (f"{stamp} c=16, {args.rounds} interleaved rounds of {args.seconds:g} s; `clrk x{WORKERS}` "
                                       f"is `clrk run --workers {WORKERS}`.\n\n") + bench_throughput(
                    hey, stack, args.rounds, args.seconds, [16], ["bare", "clrk", f"clrk x{WORKERS}"])
        if "store" in only:
            sections["store"] = f"{stamp}\n\n" + bench_store(Path(d), store_rows)
    for name, body in sections.items():
        print(f"\n## {name}\n{body}")
        if not args.smoke:
            write_section(Path(args.write), name, body)
    if not args.smoke:
        print(f"bench: wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
