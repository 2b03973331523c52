"""clrk's own cost per request, in-process: a real `Gateway` under the bench policy (an authenticated,
budgeted chat completion through an OpenAI-schema Backend, as bench.py sends it), driven over flows made
with mitmproxy's test helpers (`tflow`) through the hooks mitmproxy calls for one keep-alive request in an
open tunnel: requestheaders, request, responseheaders, response, each record encoded as the sink encodes it.

    .venv/bin/python -O bench/steps.py [--requests 20000] [--profile] [--per-step] [--cold 50000]

What it leaves out is mitmproxy's own work (the connection, TLS, the addon machinery): compare versions of
clrk's steps with it, the whole proxy with bench/instructions.py. `--per-step` times each step of each hook
alone (the hooks' own dispatch left out); `--profile` prints cProfile's top functions.

`--cold N` walks N small dicts before each request, outside the timing: in the proxy, mitmproxy's own work
(≈ 500–1,000 µs a request) runs between two requests' hooks and leaves little of clrk's code and data in the
CPU's caches. Timed hot, the hooks cost ≈ 40 µs; with `--cold 50000` ≈ 80 µs, closer to the ≈ 100–150 µs
clrk adds per request in a real proxy (docs/PERFORMANCE.md). A change that touches less memory per request
shows here where it does not hot.
"""

from __future__ import annotations

import argparse
import base64
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mitmproxy import http  # noqa: E402
from mitmproxy.test import taddons, tflow  # noqa: E402

import bench as B  # noqa: E402
from clrk import wire  # noqa: E402
from clrk.policy import load_policy  # noqa: E402
from clrk.proxy.budget import utc_day  # noqa: E402
from clrk.proxy.gateway import Gateway  # noqa: E402
from clrk.proxy.runtime import Runtime  # noqa: E402

HOOKS = ("requestheaders", "request", "responseheaders", "response")


class EncodingSink:
    """What RecordSink.submit pays per record (the encode and an append), without a recorder."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []

    def submit(self, record) -> None:
        self.pending.append(wire.pack_record(record))


def gateway(tmp: Path) -> tuple[Gateway, http.HTTPFlow]:
    ca, _ = B.make_upstream_pki(tmp / "pki", ["localhost"])
    pol = tmp / "pol"
    pol.mkdir()
    B.write_policy(pol, "http://127.0.0.1:9", ca, 8443)
    g = Gateway(Runtime())
    g.rt.policy = load_policy(str(pol))
    g.rt.ledger.load(utc_day(time.time()), {})
    g.rt.sink = EncodingSink()  # type: ignore[assignment]
    auth = "Basic " + base64.b64encode(f"team-a.bench:{B.TOKEN}".encode()).decode()
    c = tflow.tflow(req=tflow.treq(method=b"CONNECT", host="localhost", port=8443, authority=b"localhost:8443",
                                   path=b"", headers=http.Headers(proxy_authorization=auth), content=b""))
    c.client_conn.sni = "localhost"
    c.client_conn.timestamp_tls_setup = time.time()
    g.http_connect(c)
    assert c.response is None, c.response
    return g, c


def flows(c: http.HTTPFlow, n: int) -> list[tuple[http.HTTPFlow, http.Response]]:
    """Requests as hey sends them in the tunnel (headers in, body not yet read), and the upstream's answer."""
    body = B.BODY.encode()
    out = []
    for _ in range(n):
        hdrs = http.Headers([(b"Host", b"localhost:8443"), (b"User-Agent", b"hey/0.0.1"),
                             (b"Content-Length", str(len(body)).encode()), (b"Content-Type", b"application/json"),
                             (b"Accept-Encoding", b"gzip")])
        f = tflow.tflow(client_conn=c.client_conn, req=tflow.treq(
            host="localhost", port=8443, scheme=b"https", method=b"POST", path=b"/v1/chat/completions",
            headers=hdrs, content=None))
        f.metadata["body"] = body
        resp = tflow.tresp(status_code=200, headers=http.Headers(
            [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(UPSTREAM_BODY))]), content=None)
        out.append((f, resp))
    return out


UPSTREAM_BODY = (b'{"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini", "choices": '
                 b'[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there!"}}], '
                 b'"usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}')


COLD: list[dict] = []


def chill() -> int:
    """Walks `COLD` (see --cold): what it touches pushes clrk's code and data out of the caches."""
    total = 0
    for d in COLD:
        total += d["n"]
    return total


def one(g: Gateway, f: http.HTTPFlow, resp: http.Response) -> None:
    g.requestheaders(f)
    f.request.raw_content = f.metadata["body"]
    g.request(f)
    f.response = resp
    g.responseheaders(f)
    resp.raw_content = UPSTREAM_BODY
    g.response(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", nargs="?", const="tottime", choices=("tottime", "cumtime"),
                    help="print cProfile's top functions, by own time (default) or with callees")
    ap.add_argument("--per-step", action="store_true")
    ap.add_argument("--cold", type=int, default=0, metavar="N",
                    help="walk N small dicts before each request (outside the timing), as mitmproxy's own work would")
    args = ap.parse_args()
    COLD[:] = [{"n": i, "s": str(i)} for i in range(args.cold)]
    with tempfile.TemporaryDirectory() as d, taddons.context():
        g, c = gateway(Path(d))
        f, resp = flows(c, 1)[0]
        one(g, f, resp)
        assert f.response is resp and f.request.host == "localhost", "the bench call was not allowed"
        assert f.request.headers.get("authorization") is None
        assert g.rt.sink.pending, "no record"
        best = float("inf")
        for _ in range(args.rounds):
            batch = flows(c, args.requests)
            g.rt.sink.pending.clear()
            gc.collect()
            gc.disable()
            clock = time.perf_counter
            took = 0.0
            if COLD:
                for f, resp in batch:
                    chill()
                    t = clock()
                    one(g, f, resp)
                    took += clock() - t
            else:
                t = clock()
                for f, resp in batch:
                    one(g, f, resp)
                took = clock() - t
            best = min(best, took / args.requests)
            gc.enable()
        cold = f", caches chilled with {args.cold} dicts before each" if args.cold else ""
        print(f"clrk's hooks per request (best of {args.rounds} x {args.requests}{cold}): {best * 1e6:.1f} µs")
        if args.per_step:
            per_step(g, c, args.requests)
        if args.profile:
            import cProfile
            import pstats
            batch = flows(c, args.requests)
            prof = cProfile.Profile()
            prof.enable()
            for f, resp in batch:
                one(g, f, resp)
            prof.disable()
            pstats.Stats(prof).sort_stats(args.profile).print_stats(60)


def per_step(g: Gateway, c: http.HTTPFlow, n: int) -> None:
    """Each step's own time per request: the steps called one by one, as run_steps calls them."""
    totals: dict[str, float] = {}
    clock = time.perf_counter
    batch = flows(c, n)
    gc.collect()
    gc.disable()
    for f, resp in batch:
        chill()
        for hook in HOOKS:
            if hook == "request":
                f.request.raw_content = f.metadata["body"]
            elif hook == "responseheaders":
                f.response = resp
            elif hook == "response":
                resp.raw_content = UPSTREAM_BODY
            for step in g.steps[hook]:
                t = clock()
                step(f)
                key = f"{type(step.__self__).__name__}.{hook}"
                totals[key] = totals.get(key, 0.0) + clock() - t
    gc.enable()
    for key, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {key:40} {v / n * 1e6:6.2f} µs")
    print(f"  {'(sum)':40} {sum(totals.values()) / n * 1e6:6.2f} µs")


if __name__ == "__main__":
    main()
