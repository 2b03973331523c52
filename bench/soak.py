"""Load soak (issue #7): the clrk gateway for a long while at half its measured maximum throughput, with mixed
traffic — small JSON provider calls (hey), SSE streams (a client thread) and denied requests (hey) — while
the proxy's RSS is sampled. At the end: every request stored (row count = request count), no error, and the
RSS trend. Writes a table to docs/RELIABILITY.md.

    .venv/bin/python bench/soak.py [--minutes 30] [--write docs/RELIABILITY.md]

Not a CI test: it takes half an hour by design.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402


def hey_counts(out: str) -> dict[int, int]:
    return {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time, after the first third (warm-up)."""
    pts = samples[len(samples) // 3:]
    if len(pts) < 3:
        return 0.0
    ts = [t / 60 for t, _ in pts]
    ys = [y for _, y in pts]
    mt, my = statistics.mean(ts), statistics.mean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--write", default=str(B.REPO / "docs" / "RELIABILITY.md"))
    args = ap.parse_args()
    hey = B.ensure_hey()
    seconds = int(args.minutes * 60)
    with tempfile.TemporaryDirectory(prefix="clrk-soak-") as d, ExitStack() as es:
        stack = B.Stack(Path(d), es, otlp_cases=False)
        B.warm_up(hey, stack, smoke=False)
        pid = stack.pid("clrk")
        proxy = stack.proxy("clrk")
        peak = B.run_hey(hey, proxy, stack.url, 8, seconds=10).rps
        rate = max(1, int(peak / 2))
        workers = 8
        print(f"soak: max {peak:.0f} req/s; running {args.minutes:g} min at ~{rate} req/s of JSON, plus SSE and denials", file=sys.stderr)
        time.sleep(2)  # the records of the measurement run reach the store first
        rows_before = B.count_rows(stack.gateways["clrk"][1])
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        sse = {"ok": 0, "bad": 0}

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0, B.rss_mb(pid)))
                stop.wait(10)

        def streams() -> None:
            import base64

            user, _, hostport = proxy.removeprefix("http://").rpartition("@")
            phost, pport = hostport.rsplit(":", 1)
            ctx = ssl.create_default_context(cafile=str(stack.tmp / "certs" / "mitmproxy-ca-cert.pem"))
            conn = None
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = http.client.HTTPSConnection(phost, int(pport), context=ctx, timeout=30)
                        conn.set_tunnel("localhost", stack.upstream_port,
                                        headers={"Proxy-Authorization": "Basic " + base64.b64encode(user.encode()).decode()})
                    conn.request("GET", "/sse?n=5&delay=0.05")
                    r = conn.getresponse()
                    body = r.read()
                    sse["ok" if r.status == 200 and body.count(b"data:") == 5 else "bad"] += 1
                except (OSError, http.client.HTTPException):
                    sse["bad"] += 1
                    conn = None

        threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=streams, daemon=True)]
        for t in threads:
            t.start()
        denied_url = f"https://127.0.0.1:{stack.upstream_port}/v1/chat/completions"  # an IP: no route allows it
        json_run = subprocess.Popen([hey, "-z", f"{seconds}s", "-c", str(workers), "-q", str(max(1, rate // workers)), "-m", "POST",
                                     "-d", B.BODY, "-T", "application/json", "-x", proxy, stack.url], stdout=subprocess.PIPE, text=True)
        deny_run = subprocess.Popen([hey, "-z", f"{seconds}s", "-c", "1", "-q", "5", "-x", proxy, denied_url], stdout=subprocess.PIPE, text=True)
        json_out, _ = json_run.communicate()
        deny_out, _ = deny_run.communicate()
        stop.set()
        for t in threads:
            t.join(60)
        time.sleep(2)
        stored = B.count_rows(stack.gateways["clrk"][1]) - rows_before
    jc, dc = hey_counts(json_out), hey_counts(deny_out)
    sent = sum(jc.values()) + sum(dc.values()) + sse["ok"] + sse["bad"]
    json_errors = sum(n for c, n in jc.items() if c != 200) + len(re.findall(r"^\s+\[\d+\]\s", json_out.split("Error distribution:", 1)[1], re.M) if "Error distribution:" in json_out else [])
    deny_unexpected = sum(n for c, n in dc.items() if c != 403)
    rss = [m for _, m in samples]
    body = "\n".join([
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {B.machine()}. Command: "
        f"`.venv/bin/python bench/soak.py --minutes {args.minutes:g}`.",
        "",
        "| what | result |", "|---|---|",
        f"| duration | {args.minutes:g} min |",
        f"| clrk's maximum (c=8, 10 s) / soak rate | {peak:.0f} req/s / ~{rate} req/s of JSON provider calls |",
        f"| JSON provider calls | {sum(jc.values())} ({jc.get(200, 0)} × 200, {json_errors} errors) |",
        f"| SSE streams (5 events each) | {sse['ok']} complete, {sse['bad']} failed |",
        f"| denied requests | {sum(dc.values())} ({dc.get(403, 0)} × 403, {deny_unexpected} other) |",
        f"| records stored / requests made | {stored} / {sent} |",
        f"| proxy RSS first / last / max MB | {rss[0]:.0f} / {rss[-1]:.0f} / {max(rss):.0f} |",
        f"| RSS trend after warm-up | {slope_mb_per_min(samples):+.3f} MB/min |",
    ])
    print(body)
    path = Path(args.write)
    text = path.read_text() if path.exists() else "# Reliability\n"
    start, end = "<!-- soak:start -->", "<!-- soak:end -->"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    pre, rest = text.split(start, 1)
    _, post = rest.split(end, 1)
    path.write_text(f"{pre}{start}\n{body}\n{end}{post}")


if __name__ == "__main__":
    main()
