"""WebSocket memory (issue #14): 100 MiB each way through one WebSocket session of the clrk gateway, the
proxy's RSS sampled before, during (peak) and after. Writes a table to docs/PERFORMANCE.md (section
`websocket`). The suite runs the same at 24 MiB (tests/test_websocket.py); this is the full size.

    .venv/bin/python bench/websocket_memory.py [--mib 100] [--message-kib 64] [--write docs/PERFORMANCE.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.sync.client import connect  # noqa: E402

import bench as B  # noqa: E402
from tests.harness.certs import make_upstream_pki  # noqa: E402
from tests.harness.gateway import Gateway, agent_docs, gateway_doc, route  # noqa: E402
from tests.harness.ws_upstream import WsUpstream  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--message-kib", type=int, default=64)
    ap.add_argument("--write", default=str(B.REPO / "docs" / "PERFORMANCE.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    size = args.message_kib * 1024
    n = args.mib * 1024 * 1024 // size
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ca, server_pem = make_upstream_pki(tmp / "pki", ["allowed.test"])
        up = WsUpstream(server_pem)
        gw = Gateway(tmp / "gw", [gateway_doc(aliases={"allowed.test": up.address}, ca_bundle=str(ca)), *agent_docs(),
                                  route("ws", ["allowed.test"])]).start()
        try:
            pid = gw.proc.pid
            peak = [0.0]
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], B.rss_mb(pid))
                    stop.wait(0.05)

            with connect("wss://allowed.test/sink", proxy=gw.proxy_url(), ssl=gw.ssl_context(), max_size=None,
                         compression=None, open_timeout=10) as ws:
                ws.send("count?")
                ws.recv(timeout=10)
                before = B.rss_mb(pid)
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                t0 = time.monotonic()
                chunk = b"\x01" * size
                for _ in range(n):
                    ws.send(chunk)
                ws.send("count?")
                assert int(ws.recv(timeout=300)) == n * size + 2 * len("count?")
                up_s = time.monotonic() - t0
                t0 = time.monotonic()
                ws.send(f"bulk:{n}:{size}")
                got = 0
                while (m := ws.recv(timeout=300)) != "bulk-done":
                    got += len(m)
                assert got == n * size
                down_s = time.monotonic() - t0
                stop.set()
                sampler.join()
                after = B.rss_mb(pid)
            rec = gw.wait_record(timeout=30, limit=1)
        finally:
            gw.stop()
            up.close()
    mib = n * size / 2**20
    body = (f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {B.machine()}; "
            f"`.venv/bin/python bench/websocket_memory.py --mib {args.mib} --message-kib {args.message_kib}`.\n\n"
            "| one session | clrk proxy RSS before MB | peak MB | after MB | growth MB |\n|---|---:|---:|---:|---:|\n"
            f"| {mib:.0f} MiB up ({mib / up_s:.0f} MiB/s), then {mib:.0f} MiB down ({mib / down_s:.0f} MiB/s), "
            f"{args.message_kib} KiB messages | {before:.0f} | {peak[0]:.0f} | {after:.0f} | {peak[0] - before:.1f} |\n\n"
            f"Recorded: {rec.get('clrk.ws.messages_up')} messages / {rec.get('clrk.req.bytes')} bytes up, "
            f"{rec.get('clrk.ws.messages_down')} / {rec.get('clrk.resp.bytes')} down.")
    print(body)
    if not args.no_write:
        B.write_section(Path(args.write), "websocket", body)


if __name__ == "__main__":
    main()
