"""Hostile input never opens a door and never costs unbounded memory: deeply nested JSON, compression bombs,
endless uploads from clients that are going to be refused anyway."""

from __future__ import annotations

import gzip
import os
import socket
import ssl
import threading
import time

import pytest

from clrk import attributes as A
from tests.harness.gateway import (
    AGENT_TOKEN,
    Gateway,
    agent_docs,
    basic,
    gateway_doc,
    route,
    wait_read_by_peer,
)
from tests.harness.util import new_invocation


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class WholeHeadUpstream:
    """A TLS upstream with no limit on a request head (the fake upstream's http.server refuses a header line
    past 64 KiB): it reads each head whole, keeps it, and answers 200, so what reaches it is what the gateway
    passed on, with no race between its refusal and its close."""

    def __init__(self, server_pem):
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(server_pem))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as t:
                t.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head and (chunk := t.recv(1 << 20)):
                    head += chunk
                self.heads.append(head)
                t.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                          b"connection: close\r\n\r\n{}")
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def whole_head_upstream(pki):
    up = WholeHeadUpstream(pki[1])
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, whole_head_upstream):
    from tests.harness import fake_provider

    fake_provider.install(upstream)
    aliases = {h: upstream.address for h in ("allowed.test", "api.openai.com")} | {"other.test": whole_head_upstream.address}
    docs = [gateway_doc(aliases=aliases, ca_bundle=str(pki[0])),
            *agent_docs(), route("ok", ["allowed.test", "other.test"]),
            {"kind": "AIProviderRoute", "metadata": {"name": "mini", "namespace": "team-a"},
             "spec": {"rules": [{"matches": [{"provider": "openai", "models": ["gpt-4o-mini"]}],
                                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 10}}]}]}}]
    g = Gateway(tmp_path_factory.mktemp("hostile"), docs).start()
    yield g
    g.stop()


def test_json_nested_past_the_recursion_limit_is_denied_not_waved_through(gw, upstream):
    i = new_invocation()
    body = b'{"model":"o1-pro","messages":[],"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    t0 = time.time()
    with gw.client() as c:
        r = c.post("https://api.openai.com/v1/chat/completions", content=body,
                   headers={"content-type": "application/json", "clrk-invocation-id": i})
    assert r.status_code == 403, r.text
    assert not [x for x in upstream.requests_since(t0) if x.path == "/v1/chat/completions"]
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
    i = new_invocation()
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
    """The gateway stops taking the body of a request it refused (it does not read the upload on to throw it
    away) and its memory stays put. It stops reading rather than closing: the agent's send blocks once the
    socket buffers are full, and the 2 s send timeout is how the agent notices."""
    before = rss_kb(gw.proc.pid)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=2)
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
    assert sent < 64, f"the gateway took {sent} MB of an upload it refused"
    grown = rss_kb(gw.proc.pid) - before
    assert grown < 100_000, f"the proxy grew by {grown} kB while refusing a {sent} MB upload"


@pytest.mark.parametrize("size", [16_000, 200_000])
def test_huge_headers_neither_break_the_gateway_nor_swell_the_record(gw, whole_head_upstream, size):
    """A 16 KB and a 200 KB header value (under the 256 KiB bound of a request head): each is passed on whole
    and answered; the record keeps 8 KiB of it; the gateway serves the next request as usual."""
    i = new_invocation("inv-hdr")
    with gw.client() as c:
        r = c.get(f"https://other.test/json/{i}", headers={"x-big": "v" * size, "clrk-invocation-id": i})
    assert r.status_code == 200
    (head,) = [h for h in whole_head_upstream.heads if h.startswith(f"GET /json/{i} ".encode())]
    assert b"\r\nx-big: " + b"v" * size + b"\r\n" in head  # passed on whole
    rec = gw.wait_record(invocation=i)
    assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 200 and A.ERROR_TYPE not in rec
    assert len(rec[A.REQUEST_HEADERS]["x-big"]) < 8300
    assert rec[A.REQUEST_HEADERS]["x-big"].endswith("more characters not recorded]")
    with gw.client() as c:
        assert c.get("https://allowed.test/json/after-hdr").status_code == 200


def test_a_request_head_past_the_bound_gets_431_and_reaches_nothing(gw, whole_head_upstream):
    i = new_invocation("inv-hdr")
    with gw.client() as c:
        r = c.get(f"https://other.test/json/{i}", headers={"x-big": "v" * 2_000_000, "clrk-invocation-id": i})
        assert r.status_code == 431
        assert c.get("https://allowed.test/json/after-431").status_code == 200
    assert not [h for h in whole_head_upstream.heads if f"/json/{i} ".encode() in h]


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
    i = new_invocation()
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


def test_an_endless_request_head_is_cut_not_buffered(gw):
    """mitmproxy alone holds a head until its blank line, however long (200 MB grew the gateway by ~200 MB);
    clrk.proxy.limits answers 431 past 256 KiB, before the client has even authenticated."""
    before = rss_kb(gw.proc.pid)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sent = 0
    try:
        s.sendall(b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nx-endless: ")
        for _ in range(64):  # 64 MiB of one header line, never ended
            s.sendall(b"a" * (1 << 20))
            sent += 1
        wait_read_by_peer(s)  # all of it is in the gateway's hands now
    except OSError:
        pass  # the gateway hung up: what it should do
    grown = rss_kb(gw.proc.pid) - before
    s.close()
    assert grown < 32_000, f"the gateway grew by {grown} kB holding a {sent} MiB request head"
    assert sent < 64  # the gateway hung up long before
    assert "request head over 262144 bytes; answered 431" in gw.log()
