"""Hostile input never opens a door and never costs unbounded memory: deeply nested JSON, compression bombs,
endless uploads from clients that are going to be refused anyway."""

from __future__ import annotations

import gzip
import os
import socket
import time
import uuid

import pytest

from clrk import attributes as A
from tests.harness.gateway import AGENT_TOKEN, Gateway, agent_docs, basic, gateway_doc, route


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream):
    from tests.harness import fake_provider

    fake_provider.install(upstream)
    docs = [gateway_doc(aliases={h: upstream.address for h in ("allowed.test", "api.openai.com")}, ca_bundle=str(pki[0])),
            *agent_docs(), route("ok", ["allowed.test"]),
            {"kind": "AIProviderRoute", "metadata": {"name": "mini", "namespace": "team-a"},
             "spec": {"rules": [{"matches": [{"provider": "openai", "models": ["gpt-4o-mini"]}],
                                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 10}}]}]}}]
    g = Gateway(tmp_path_factory.mktemp("hostile"), docs).start()
    yield g
    g.stop()


def test_json_nested_past_the_recursion_limit_is_denied_not_waved_through(gw, upstream):
    i = f"inv-{uuid.uuid4().hex[:8]}"
    body = b'{"model":"o1-pro","messages":[],"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    t0 = time.time()
    with gw.client() as c:
        r = c.post("https://api.openai.com/v1/chat/completions", content=body,
                   headers={"content-type": "application/json", "clrk-invocation-id": i})
    assert r.status_code == 403, r.text
    assert not [x for x in upstream.requests if x.time >= t0 and x.path == "/v1/chat/completions"]
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION] == "deny"


def test_an_unauthenticated_compression_bomb_is_refused_on_its_headers(gw):
    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024))  # 200 MB inflated, ~200 KB on the wire
    before = rss_kb(gw.proc.pid)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
              b"content-type: application/json\r\ncontent-encoding: gzip\r\n" + f"content-length: {len(bomb)}\r\n\r\n".encode() + bomb)
    reply = s.recv(4096)
    s.close()
    assert reply.startswith(b"HTTP/1.1 407")
    assert rss_kb(gw.proc.pid) - before < 50_000  # kB: the bomb was never inflated


def test_an_agents_compressed_body_is_decoded_within_bounds(gw, upstream):
    """An authenticated, allowed provider call with a gzip bomb for a body: parsed within the 32 MiB bound."""
    i = f"inv-{uuid.uuid4().hex[:8]}"
    bomb = gzip.compress(b'{"model":"gpt-4o-mini","messages":[' + b" " * (100 * 1024 * 1024) + b"]}")
    before = rss_kb(gw.proc.pid)
    with gw.client() as c:
        r = c.post("https://api.openai.com/v1/chat/completions", content=bomb,
                   headers={"content-type": "application/json", "content-encoding": "gzip", "clrk-invocation-id": i})
    # Decoded only up to the 32 MiB the gateway reads of a provider call: the model is unknown, and the route
    # allows gpt-4o-mini only.
    assert r.status_code == 403, r.text
    assert rss_kb(gw.proc.pid) - before < 150_000
    assert gw.wait_record(invocation=i)[A.CLRK_DECISION] == "deny"


def test_a_refused_upload_of_unknown_length_is_cut_not_buffered(gw):
    before = rss_kb(gw.proc.pid)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"POST http://denied.test/upload HTTP/1.1\r\nHost: denied.test\r\n" + f"Proxy-Authorization: {basic('team-a.researcher', AGENT_TOKEN)}\r\n".encode()
              + b"transfer-encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"z" * (1 << 20))
    sent = 0
    try:
        for _ in range(300):  # up to 300 MB
            s.sendall(chunk)
            sent += 1
    except OSError:
        pass  # the gateway hung up: what it should do
    s.close()
    grown = rss_kb(gw.proc.pid) - before
    assert grown < 100_000, f"the proxy grew by {grown} kB while refusing a {sent} MB upload"


def test_huge_headers_neither_break_the_gateway_nor_swell_the_record(gw, upstream):
    """A 16 KB header passes and is recorded cut to 8 KiB; a 2 MB one is refused or failed by mitmproxy's own
    limits, recorded just as bounded; the gateway serves the next request as usual."""
    for size in (16_000, 2_000_000):
        i = f"inv-hdr-{uuid.uuid4().hex[:8]}"
        with gw.client() as c:
            try:
                c.get("https://allowed.test/json/hdr", headers={"x-big": "v" * size, "clrk-invocation-id": i})
            except Exception:  # noqa: BLE001 - how mitmproxy answers a 2 MB header is its business
                pass
        rec = gw.wait_record(invocation=i)
        assert len(rec[A.REQUEST_HEADERS]["x-big"]) < 8300
        assert rec[A.REQUEST_HEADERS]["x-big"].endswith("more characters not recorded]")
    with gw.client() as c:
        assert c.get("https://allowed.test/json/after-hdr").status_code == 200


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def bomb_gw(tmp_path_factory, pki, upstream):
    member = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros, ~64 KiB on the wire

    def bomb(handler, seen):  # 4 GiB decoded from ~4 MiB: 64 concatenated gzip members are one gzip body
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-encoding", "gzip")
        handler.send_header("content-length", str(len(member) * 64))
        handler.end_headers()
        for _ in range(64):
            handler.wfile.write(member)
        handler.wfile.flush()

    upstream.handlers["bomb"] = bomb
    docs = [gateway_doc(aliases={"api.openai.com": upstream.address}, ca_bundle=str(pki[0])), *agent_docs(),
            {"kind": "AIProviderRoute", "metadata": {"name": "any-openai", "namespace": "team-a"},
             "spec": {"rules": [{"matches": [{"provider": "openai"}]}]}}]
    g = Gateway(tmp_path_factory.mktemp("bomb"), docs).start()
    yield g
    g.stop()


def test_a_decompression_bomb_from_an_upstream_costs_the_gateway_a_bounded_effort(bomb_gw):
    """The agent gets the upstream's bytes untouched; the gateway decodes them (for usage) only up to 50:1 and
    0.5 s of work, instead of inflating 4 GiB on the thread every connection shares."""
    i = f"inv-{uuid.uuid4().hex[:8]}"
    cpu0 = cpu_seconds(bomb_gw.proc.pid)
    with bomb_gw.client() as c, c.stream("GET", "https://api.openai.com/handler/bomb",
                                          headers={"clrk-invocation-id": i, "accept-encoding": "gzip"}) as r:
        assert r.status_code == 200
        wire = sum(len(b) for b in r.iter_raw())  # the encoded bytes, as the upstream sent them
    assert wire == int(r.headers["content-length"])
    rec = bomb_gw.wait_record(invocation=i)
    spent = cpu_seconds(bomb_gw.proc.pid) - cpu0
    assert rec[A.CLRK_RESP_BYTES] == wire
    assert rec[A.CLRK_RESP_TRUNCATED] is True
    assert spent < 1.5, f"the gateway spent {spent:.1f} s of CPU on one bomb"
    assert "compression bomb" in bomb_gw.log()
