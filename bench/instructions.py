"""Instructions per request, bare mitmdump vs the clrk proxy, counted by valgrind's callgrind.

    .venv/bin/python bench/instructions.py [--requests 300] [--script addons/clrk.py] [--no-bare]

Throughput on this shared 2-core machine moves ±5% between runs, which hides the effect of most single
changes to the hot path. Instruction counts do not move: each proxy runs under callgrind, the counters are
zeroed after a warm-up, N sequential requests are made, and the instructions counted in that window are
divided by N. (It measures work, not time: cache misses and the like are not in it. Use it to compare
versions of clrk; use bench.py for the ratios of the contract.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402


def counted(argv: list[str], proxy: str, url: str, requests: int, out: Path, warmup: int = 50) -> float:
    """Runs `argv` under callgrind; returns instructions per request over `requests` requests."""
    log = out.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                                cwd=B.REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        port = int(proxy.rsplit(":", 1)[1])
        deadline = time.monotonic() + 300
        while not B.port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start under callgrind:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        hey = B.ensure_hey()
        B.run_hey(hey, proxy, url, 1, n=warmup)  # TLS set-up, caches, the recorder started
        time.sleep(1)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        B.run_hey(hey, proxy, url, 1, n=requests)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(120)
    # callgrind_control -d writes `<out>.1` (the window measured); `<out>` is written at exit (the rest).
    window = Path(str(out) + ".1")
    if keep := os.environ.get("CLRK_KEEP_CALLGRIND"):  # a directory to keep the window's profile in
        shutil.copy(window, Path(keep) / (out.stem + ".callgrind"))
    text = window.read_text(errors="replace")
    totals = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text, re.M)
    return int(totals.group(1)) / requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--script", help="count `mitmdump -s SCRIPT` instead of the gateway as `clrk run` starts it "
                    "(to compare a variant of the addon)")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare mitmdump counts")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="clrk-instr-") as d, B.upstream_and_sink(Path(d)) as backing:
        tmp = Path(d)
        # Bare mitmdump as it ships, and under the `python -O` the clrk gateway runs with.
        for name, optimized in [] if args.no_bare else [("bare mitmdump", False), ("bare mitmdump -O", True)]:
            port = B.free_port()
            counts[name] = counted(B.bare_argv(port, tmp / "bare-certs", optimized), f"http://127.0.0.1:{port}",
                                   backing.url, args.requests, tmp / f"bare{len(counts)}.cg")
        port = B.free_port()
        command = [str(B.BIN / "mitmdump"), "-s", args.script] if args.script else None
        name = f"clrk (mitmdump -s {Path(args.script).name})" if args.script else "clrk"
        counts[name] = counted(B.clrk_argv(port, backing.policies, tmp / "data" / "clrk.duckdb", tmp / "certs", command),
                               B.clrk_proxy(port), backing.url, args.requests, tmp / "clrk.cg")
    print(f"instructions per request over {args.requests} sequential requests (proxy process only):")
    for n, v in counts.items():
        rel = "   ".join(f"{v / counts[b]:.3f}x {b}" for b in ("bare mitmdump", "bare mitmdump -O") if b in counts and b != n)
        print(f"  {n:32} {v / 1e6:8.3f} M   {rel}")


if __name__ == "__main__":
    main()
