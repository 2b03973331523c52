"""How long a budget admission waits on the recorder's ledger (`clrk_budget_store=recorder`): a real recorder
process started by a real RecordSink (as a proxy starts it), admissions made one after another by
SharedLedger through it (each settled), idle and then while the same sink ships records at --rate per second
(bench/recorder_cpu.py's mix: the recorder expands, stores and flushes them meanwhile).

    .venv/bin/python bench/recorder_ledger.py [--seconds 5] [--rate 4000]

Prints p50 / p99 / max of the admission round trip, idle and under load; not a pass/fail check.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recorder_cpu import snapshots  # noqa: E402

from clrk.proxy.budget_store import Refusal, SharedLedger  # noqa: E402
from clrk.proxy.sink import RecordSink  # noqa: E402


async def admissions(ledger: SharedLedger, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        res = await ledger.admit("bench", 10**12, 100, None, 0.0)
        out.append(time.perf_counter() - t0)
        assert not isinstance(res, Refusal)
        ledger.settle(res, 90)
        await asyncio.sleep(0.002)
    return out


async def feed(sink: RecordSink, rate: int, seconds: float, records: list[dict]) -> int:
    n, tick = 0, 0.01
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(max(1, int(rate * tick))):
            sink.submit(dict(records[n % len(records)], ids=(f"{n:032x}", f"{n + 1:016x}", None)))
            n += 1
        await asyncio.sleep(tick)
    return n


def summary(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3  # noqa: E731
    return (f"{name:>6}: {len(xs):6d} admissions  p50 {statistics.median(xs) * 1e3:6.3f} ms  p99 {p(0.99):6.3f} ms  "
            f"max {xs[-1] * 1e3:7.3f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rate", type=int, default=4000)
    args = ap.parse_args()
    records = snapshots(2000, 1)
    with tempfile.TemporaryDirectory() as d:
        sink = RecordSink(str(Path(d) / "bench.duckdb"))
        ledger = SharedLedger("recorder")
        ledger.attach(sink)
        await sink.start()
        try:
            await ledger.admit("bench", 10**12, 1, None, 0.0)  # the day read, the window passed
            idle = await admissions(ledger, args.seconds)
            loaded, n = await asyncio.gather(admissions(ledger, args.seconds), feed(sink, args.rate, args.seconds,
                                                                                     records))
            flushed = await sink.flush(120)
            print(summary("idle", idle))
            print(summary("loaded", loaded) + f"   ({n} records shipped meanwhile, {flushed['written']} written)")
        finally:
            await ledger.close()
            await sink.stop()


if __name__ == "__main__":
    asyncio.run(main())
