"""Where the clrk proxy's extra microseconds per request go, per Python function: `perf` against bare mitmdump.

    .venv/bin/python bench/perfdiff.py [--requests 8000] [--top 40]

Both proxies run with Python's perf trampolines (PYTHONPERFSUPPORT=1), one after the other under the same
c=8 load; `perf record --call-graph dwarf` samples each (cpu-clock, ~1 kHz: little overhead, unlike a
sampler that stops the process). Each sample is charged to the innermost Python function on its stack,
C callees included (a function's own time, with the C it calls: dict lookups, allocation, the collector
when it happens to run there), and the table lists µs per request, bare vs clrk, by largest difference.
The baseline is bare mitmdump under the same `python -O` the gateway runs with, so the difference is
clrk's own cost. Needs `perf` (linux-tools) and perf_event_paranoid ≤ 2.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402

PY_FRAME = re.compile(r"py::(\S+?):(\S+?)\+")


def record(argv: list[str], proxy: str, url: str, requests: int, out: Path, frequency: int) -> float:
    """Runs a proxy, samples it under load; returns the number of requests sampled."""
    env = dict(os.environ, PYTHONPERFSUPPORT="1")
    proc = subprocess.Popen(argv, env=env, cwd=B.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        B.wait_port(int(proxy.rsplit(":", 1)[1]), timeout=60)
        hey = B.ensure_hey()
        B.run_hey(hey, proxy, url, 8, n=1000)  # TLS, caches, the recorder
        perf = subprocess.Popen(["perf", "record", "-F", str(frequency), "--call-graph", "dwarf", "-o", str(out),
                                 "-p", str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        B.run_hey(hey, proxy, url, 8, n=requests)
        perf.send_signal(signal.SIGINT)
        perf.wait(120)
    finally:
        proc.terminate()
        proc.wait(60)
    return requests


def per_function(data: Path, requests: float) -> dict[str, float]:
    """µs per request charged to each innermost Python function (or C symbol, when no Python frame is seen)."""
    script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True, check=True).stdout
    out: collections.Counter[str] = collections.Counter()
    for block in script.split("\n\n"):
        lines = [ln for ln in block.strip().splitlines() if ln.strip()]
        m = re.search(r"(\d+) cpu-clock", lines[0]) if lines else None
        if not m:
            continue
        key = None
        for ln in lines[1:]:
            if f := PY_FRAME.search(ln):
                key = f"{f.group(1)} ({f.group(2).rsplit('/', 1)[-1]})"
                break
        if key is None:
            key = "C: " + (lines[1].split()[1].split("+")[0] if len(lines) > 1 else "?")
        out[key] += int(m.group(1))  # sample period in ns
    return {k: v / 1e3 / requests for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--frequency", type=int, default=999)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is not installed (apt-get install linux-perf)")
    got = {}
    with tempfile.TemporaryDirectory(prefix="clrk-perfdiff-") as d, B.upstream_and_sink(Path(d)) as backing:
        tmp = Path(d)
        bare_port, clrk_port = B.free_port(), B.free_port()
        runs = {
            "bare -O": (B.bare_argv(bare_port, tmp / "bare-certs", optimized=True), f"http://127.0.0.1:{bare_port}"),
            "clrk": (B.clrk_argv(clrk_port, backing.policies, tmp / "data" / "clrk.duckdb", tmp / "certs"),
                     B.clrk_proxy(clrk_port)),
        }
        for name, (argv, proxy) in runs.items():
            data = tmp / f"{name.replace(' ', '')}.perf"
            got[name] = per_function(data, record(argv, proxy, backing.url, args.requests, data, args.frequency))
    bare, clrk = got["bare -O"], got["clrk"]
    print(f"µs per request (perf cpu-clock, c=8, {args.requests} requests): bare -O {sum(bare.values()):.0f}, "
          f"clrk {sum(clrk.values()):.0f}\n")
    print(f"{'innermost Python function (own time + the C it calls)':78} {'bare -O':>8} {'clrk':>8} {'diff':>8}")
    keys = sorted(set(bare) | set(clrk), key=lambda k: clrk.get(k, 0.0) - bare.get(k, 0.0), reverse=True)
    for k in keys[:args.top]:
        b, c = bare.get(k, 0.0), clrk.get(k, 0.0)
        print(f"{k[:78]:78} {b:8.1f} {c:8.1f} {c - b:+8.1f}")


if __name__ == "__main__":
    main()
