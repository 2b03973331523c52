"""TLS Passthrough listeners, through a real gateway with two listeners (one terminating, one passthrough):
the agent's TLS goes end to end to the upstream (it trusts the upstream's CA, not the gateway's), the CONNECT
is decided at L4, the ClientHello must name the CONNECT target, and each tunnel is one record with
clrk.l4.bytes_upstream."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import struct
import time
import uuid

import httpx
import pytest

from clrk import attributes as A
from tests.harness.gateway import (
    AGENT_TOKEN,
    Gateway,
    agent_docs,
    connect,
    deny,
    free_port,
    gateway_doc,
    route,
    wait_read_by_peer,
)
from tests.harness.util import wait_for


@pytest.fixture(scope="module")
def pgw(tmp_path_factory, pki, upstream):
    closed = free_port()  # nothing listens here: an unreachable upstream
    pass_port = free_port()
    gw = Gateway(tmp_path_factory.mktemp("passthrough"), [])
    gdoc = gateway_doc(aliases={h: upstream.address for h in ("allowed.test", "other.test", "denied.test", "pastebin.com")}
                       | {"llm-b.test": f"127.0.0.1:{closed}"}, ca_bundle=str(pki[0]))
    gdoc["spec"]["listeners"] = [
        {"name": "terminate", "port": gw.port, "protocol": "TLS", "tls": {"mode": "Terminate"}},
        {"name": "passthrough", "port": pass_port, "protocol": "TLS", "tls": {"mode": "Passthrough"}},
    ]
    gw.write_policy([
        gdoc, *agent_docs(),
        route("hosts", ["allowed.test", "pastebin.com", "llm-b.test"]),
        route("get-only", ["other.test"], methods=["GET"]),
        deny("no-admin", ["pastebin.com"], paths=["/admin"]),
    ])
    gw.mitmproxy_args = ["--mode", "regular", "--mode", f"regular@{pass_port}"]
    gw.pass_port = pass_port
    gw.start()
    yield gw
    gw.stop()


def _agent(gw, pki, **kw) -> httpx.Client:
    # The agent trusts the upstream's own CA only: a terminated connection would fail its verification.
    return httpx.Client(proxy=f"http://team-a.researcher:{AGENT_TOKEN}@127.0.0.1:{gw.pass_port}",
                        verify=ssl.create_default_context(cafile=str(pki[0])), trust_env=False, timeout=15, **kw)


def _seen(gw) -> set[str]:
    return {r[A.SPAN_ID] for r in gw.records()}


def _tunnel_records(gw, host: str, since: set[str], n: int = 1, timeout: float = 10.0) -> list[dict]:
    """The CONNECT records for `host` that were not there before (`since`: span ids seen then), once there are `n`."""
    def new() -> list[dict] | None:
        rows = [r for r in gw.records(host=host) if r[A.HTTP_REQUEST_METHOD] == "CONNECT" and r[A.SPAN_ID] not in since]
        return rows if len(rows) >= n else None

    return wait_for(new, f"{n} new CONNECT record(s) for {host}", timeout)


def test_an_allowed_tunnel_goes_end_to_end_and_is_counted(pgw, pki, upstream):
    since = _seen(pgw)
    secret = f"Bearer sk-passthrough-{uuid.uuid4().hex[:8]}"
    with _agent(pgw, pki) as c:
        r = c.get("https://allowed.test/big?size=200000", headers={"authorization": secret})
        assert r.status_code == 200 and len(r.content) == 200000
        r2 = c.get("https://allowed.test/json/again")  # same tunnel
        assert r2.status_code == 200
    # The upstream got the agent's request as sent: nothing was terminated or rewritten in between.
    assert upstream.requests_to("/big")[-1].headers["authorization"] == secret
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert rec[A.CLRK_DECISION] == "allow" and rec[A.CLRK_DECISION_RULE] == "EgressRoute/default/hosts"
    assert rec[A.URL_FULL] == "allowed.test:443" and rec[A.CLRK_DST_NAME] == "allowed.test"
    assert rec[A.AGENT_NAME] == "researcher" and A.ERROR_TYPE not in rec
    up, down = rec[A.CLRK_L4_BYTES_UPSTREAM], rec[A.CLRK_RESP_BYTES]
    assert up == rec[A.CLRK_REQ_BYTES] and 300 < up < 20000  # ClientHello, two requests, TLS overhead
    assert down > 200000  # the body and the TLS around it
    # Nothing of the encrypted payload is captured, let alone the agent's secret.
    assert A.REQUEST_BODY not in rec and A.RESPONSE_BODY not in rec and secret not in str(rec)
    assert rec[A.CLRK_DURATION_MS] > 0


def test_the_terminating_listener_of_the_same_gateway_still_sees_l7(pgw):
    with pgw.client() as c:
        assert c.get("https://allowed.test/json/l7", headers={"clrk-invocation-id": "inv-l7-pass"}).status_code == 200
    rec = pgw.wait_record(invocation="inv-l7-pass")
    assert rec[A.HTTP_REQUEST_METHOD] == "GET" and A.CLRK_L4_BYTES_UPSTREAM not in rec


@pytest.mark.parametrize("host,reason", [
    ("denied.test", "no route allows denied.test:443"),
    # A route limited to methods cannot be checked on an opaque tunnel: it does not allow one.
    ("other.test", "no route allows other.test:443"),
    # A deny limited to a path cannot be either: it denies the tunnel whole.
    ("pastebin.com", "denied by EgressDenyPolicy/default/no-admin"),
])
def test_a_denied_connect_is_answered_on_the_connect_and_recorded(pgw, pki, host, reason):
    since = _seen(pgw)
    with _agent(pgw, pki) as c, pytest.raises(httpx.ProxyError, match="403"):
        c.get(f"https://{host}/json/x")
    (rec,) = _tunnel_records(pgw, host, since)
    assert rec[A.CLRK_DECISION] == "deny" and reason in rec[A.CLRK_DECISION_REASON], rec[A.CLRK_DECISION_REASON]


def test_a_client_hello_naming_another_host_is_refused(pgw, pki, upstream):
    since = _seen(pgw)
    before = upstream.connections
    s = connect(pgw.pass_port, "allowed.test:443")
    ctx = ssl.create_default_context(cafile=str(pki[0]))
    with pytest.raises(OSError):  # the gateway closes mid-handshake: an EOF or a reset, as the kernel delivers it
        ctx.wrap_socket(s, server_hostname="denied.test").do_handshake()
    s.close()
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert rec[A.CLRK_DECISION] == "deny" and rec[A.CLRK_DECISION_RULE] == "passthrough"
    assert "TLS server name denied.test does not match the CONNECT target allowed.test" in rec[A.CLRK_DECISION_REASON]
    assert upstream.connections == before  # no upstream was dialled


def test_a_tunnel_that_does_not_start_with_tls_is_closed(pgw, upstream):
    since = _seen(pgw)
    before = upstream.connections
    s = connect(pgw.pass_port, "allowed.test:443")
    s.sendall(b"GET /json/plain HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert s.recv(4096) == b""  # closed, nothing relayed
    s.close()
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert rec[A.CLRK_DECISION] == "deny" and "must start with a TLS ClientHello" in rec[A.CLRK_DECISION_REASON]
    assert upstream.connections == before


def test_an_unreachable_upstream_ends_the_tunnel_with_error_type(pgw, pki):
    since = _seen(pgw)
    with _agent(pgw, pki) as c, pytest.raises(httpx.HTTPError):
        c.get("https://llm-b.test/json/x")
    (rec,) = _tunnel_records(pgw, "llm-b.test", since)
    assert rec[A.CLRK_DECISION] == "allow" and rec[A.ERROR_TYPE] == "connection_refused"
    assert rec[A.CLRK_RESP_BYTES] == 0


# ------------------------------------------------------------------------------ the ClientHello gate (review)


def _hello_bio(pki, sni: str):
    """A client TLS session in memory: its ClientHello bytes, and the objects to finish the handshake."""
    ctx = ssl.create_default_context(cafile=str(pki[0]))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, inc, out, out.read()


def _finish_handshake(s: socket.socket, obj, inc, out) -> None:
    s.settimeout(5)
    while True:
        try:
            obj.do_handshake()
            return
        except ssl.SSLWantReadError:
            if o := out.read():
                s.sendall(o)
            d = s.recv(65536)
            if not d:
                raise ConnectionError("closed during the handshake") from None
            inc.write(d)


def _read_available(obj, inc) -> bytes:
    """Everything `obj` can decrypt from what `inc` holds. One read may stop after a post-handshake message
    (a TLS 1.3 session ticket) with application data still buffered behind it: read on while that makes
    progress, or the answer sits unread while the socket has nothing more to give."""
    got = b""
    while True:
        pending = inc.pending
        try:
            data = obj.read(65536)
        except ssl.SSLWantReadError:
            if inc.pending and inc.pending < pending:
                continue
            return got
        if not data:
            return got
        got += data


def _exchange(s: socket.socket, obj, inc, out, request: bytes) -> bytes:
    """Sends one request over the in-memory TLS session and reads until the JSON answer's end."""
    obj.write(request)
    s.sendall(out.read())
    got = b""
    s.settimeout(5)
    while b"}" not in got:
        d = s.recv(65536)
        if not d:
            break
        inc.write(d)
        got += _read_available(obj, inc)
    return got


def _closed(s: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the gateway closes the connection within `timeout` (whatever it sends before)."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except TimeoutError:  # before OSError: socket.timeout is one
        return False
    except OSError:  # reset
        return True


@pytest.mark.parametrize("first", [1, 2, 10, 200])
def test_a_client_hello_in_pieces_is_judged_whole(pgw, pki, upstream, first):
    """However the ClientHello is cut (the first piece too short to tell it is TLS at all, or mid-record), the
    gate reads it whole: a name other than the CONNECT target is refused and recorded, and the upstream is
    never dialled; the right name is relayed end to end (the agent sees the upstream's own certificate)."""
    since = _seen(pgw)
    before = upstream.connections
    obj, inc, out, hello = _hello_bio(pki, "denied.test")
    s = connect(pgw.pass_port, "allowed.test:443")
    s.sendall(hello[:first])
    wait_read_by_peer(s)  # the gateway has the first piece alone
    s.sendall(hello[first:])
    assert _closed(s)
    s.close()
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert rec[A.CLRK_DECISION] == "deny" and "TLS server name denied.test does not match" in rec[A.CLRK_DECISION_REASON]
    assert upstream.connections == before

    since = _seen(pgw)
    obj, inc, out, hello = _hello_bio(pki, "allowed.test")
    s = connect(pgw.pass_port, "allowed.test:443")
    s.sendall(hello[:first])
    wait_read_by_peer(s)
    s.sendall(hello[first:])
    _finish_handshake(s, obj, inc, out)  # verified against the upstream's CA: not intercepted
    got = _exchange(s, obj, inc, out, b"GET /json/pieces HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    s.close()
    assert b"200 OK" in got
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert rec[A.CLRK_DECISION] == "allow" and rec[A.CLRK_L4_BYTES_UPSTREAM] > len(hello)


def test_a_tunnel_that_starts_with_one_byte_then_something_else_is_closed(pgw, upstream):
    since = _seen(pgw)
    before = upstream.connections
    s = connect(pgw.pass_port, "allowed.test:443")
    s.sendall(b"S")
    wait_read_by_peer(s)  # one byte, too little to tell: the gateway has it and waits for more
    s.sendall(b"SH-2.0-OpenSSH_9.6\r\n")
    assert _closed(s)
    s.close()
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert "must start with a TLS ClientHello" in rec[A.CLRK_DECISION_REASON] and upstream.connections == before


def test_a_client_hello_with_two_server_names_is_refused(pgw, pki, upstream):
    since = _seen(pgw)
    _, _, _, hello = _hello_bio(pki, "allowed.test")
    s = connect(pgw.pass_port, "allowed.test:443")
    s.sendall(_with_server_names(hello, [b"denied.test", b"allowed.test"]))
    assert _closed(s)
    s.close()
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert "server name is not one valid host name" in rec[A.CLRK_DECISION_REASON]


def _with_server_names(record: bytes, names: list[bytes]) -> bytes:
    """The one-record ClientHello with its server_name extension replaced by a list of host names."""
    hs = record[9:]  # record header (5) + handshake header (4)
    p = 2 + 32
    p += 1 + hs[p]
    p += 2 + struct.unpack("!H", hs[p:p + 2])[0]
    p += 1 + hs[p]
    ext_start, end = p, p + 2 + struct.unpack("!H", hs[p:p + 2])[0]
    p += 2
    exts = []
    while p < end:
        t, n = struct.unpack("!HH", hs[p:p + 4])
        exts.append((t, hs[p + 4:p + 4 + n]))
        p += 4 + n
    names_list = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in names)
    sni = struct.pack("!H", len(names_list)) + names_list
    body = b"".join(struct.pack("!HH", t, len(sni if t == 0 else b)) + (sni if t == 0 else b) for t, b in exts)
    new_hs = hs[:ext_start] + struct.pack("!H", len(body)) + body
    msg = b"\x01" + struct.pack("!I", len(new_hs))[1:] + new_hs
    return record[:3] + struct.pack("!H", len(msg)) + msg


def _tiny_records(n: int) -> list[bytes]:
    """A ClientHello announced as 1 MiB, sent as 4-byte TLS records: what makes a naive parser quadratic."""
    hs = b"\x01" + struct.pack("!I", 1024 * 1024 - 4)[1:] + b"\x00" * (4 * n)
    return [b"\x16\x03\x01\x00\x04" + hs[i:i + 4] for i in range(0, 4 * n, 4)]


@pytest.mark.parametrize("listener", ["passthrough", "terminate"])
def test_a_client_hello_that_never_ends_is_cut_and_others_are_not_slowed(pgw, pki, listener):
    """200 KiB of 4-byte TLS records that never complete a ClientHello (mitmproxy alone would keep buffering
    up to 16 MiB, re-parsing all of it on every piece): the gateway cuts the tunnel past 64 KiB, and another
    agent's request meanwhile is answered at once."""
    port = pgw.pass_port if listener == "passthrough" else pgw.port
    s = connect(port, "allowed.test:443")
    records = _tiny_records(200 * 1024 // 9)
    burst = 10 * 1024 // 9
    with pgw.client() as c:
        cut = False
        t0 = time.monotonic()
        for i in range(0, len(records), burst):
            try:
                s.sendall(b"".join(records[i:i + burst]))
            except OSError:
                cut = True
                break
            time.sleep(0.02)  # the scenario: a client trickling records, each burst read on its own
        cut = cut or _closed(s, 3)
        assert cut and time.monotonic() - t0 < 8
        t1 = time.monotonic()
        assert c.get("https://allowed.test/json/meanwhile").status_code == 200
        assert time.monotonic() - t1 < 2
    s.close()


def test_tls_spoken_to_the_proxy_port_itself_is_refused(pgw):
    s = socket.create_connection(("127.0.0.1", pgw.port), timeout=5)
    s.sendall(b"".join(_tiny_records(50)))
    assert _closed(s)
    s.close()
    assert "refused TLS spoken to the proxy port" in pgw.log()


def test_a_split_client_hello_on_a_terminating_tunnel_is_still_intercepted(pgw):
    """The gate in front of mitmproxy's own TLS layers changes nothing for a well-formed, fragmented hello."""
    obj_ctx = pgw.ssl_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = obj_ctx.wrap_bio(inc, out, server_hostname="allowed.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    s = connect(pgw.port, "allowed.test:443")
    s.sendall(hello[:7])
    wait_read_by_peer(s)
    s.sendall(hello[7:])
    _finish_handshake(s, obj, inc, out)  # the gateway CA's certificate, as on any terminated tunnel
    got = _exchange(s, obj, inc, out, b"GET /json/split-terminate HTTP/1.1\r\nHost: allowed.test\r\n"
                                      b"clrk-invocation-id: inv-split-t\r\n\r\n")
    s.close()
    assert b"200 OK" in got
    assert pgw.wait_record(invocation="inv-split-t")[A.HTTP_REQUEST_METHOD] == "GET"


# ------------------------------------------------------------------------------ lifetimes (review)


def _single_passthrough_gateway(tmp_path, pki, upstream):
    pass_port = free_port()
    gw = Gateway(tmp_path, [])
    gdoc = gateway_doc(aliases={"allowed.test": upstream.address}, ca_bundle=str(pki[0]))
    gdoc["spec"]["listeners"] = [{"name": "p", "port": pass_port, "protocol": "TLS", "tls": {"mode": "Passthrough"}}]
    gw.gdoc = gdoc
    gw.write_policy([gdoc, *agent_docs(), route("hosts", ["allowed.test"])])
    gw.mitmproxy_args = ["--mode", f"regular@{pass_port}"]
    gw.pass_port = pass_port
    return gw.start()


def test_a_tunnel_open_when_the_gateway_stops_is_recorded(tmp_path, pki, upstream):
    gw = _single_passthrough_gateway(tmp_path, pki, upstream)
    s = connect(gw.pass_port, "allowed.test:443")
    t = ssl.create_default_context(cafile=str(pki[0])).wrap_socket(s, server_hostname="allowed.test")
    t.sendall(b"GET /sse?n=200&delay=0.3 HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert t.recv(100).startswith(b"HTTP/1.1 200")
    gw.proc.send_signal(signal.SIGTERM)  # drains: the open tunnel is in flight
    gw.wait_log("SIGTERM: accepting no new connections")  # the first signal was taken as the graceful one
    gw.stop(signal.SIGTERM)  # again: stop now
    t.close()
    (rec,) = [r for r in gw.records() if r[A.HTTP_REQUEST_METHOD] == "CONNECT"]
    assert rec[A.ERROR_TYPE] == "gateway_stopped" and rec[A.CLRK_RESP_BYTES] > 0 and rec[A.CLRK_L4_BYTES_UPSTREAM] > 0


def test_an_open_tunnel_ends_when_the_policy_stops_allowing_it(tmp_path, pki, upstream):
    gw = _single_passthrough_gateway(tmp_path, pki, upstream)
    try:
        s = connect(gw.pass_port, "allowed.test:443")
        t = ssl.create_default_context(cafile=str(pki[0])).wrap_socket(s, server_hostname="allowed.test")
        t.sendall(b"GET /json/before HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        assert t.recv(4096).startswith(b"HTTP/1.1 200")
        gw.write_policy([gw.gdoc, *agent_docs()])  # the route is gone; the agent is still known
        gw.wait_log("policy reloaded", timeout=5)
        with contextlib.suppress(OSError):
            t.sendall(b"GET /json/after-revocation HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        assert _closed(t)
        t.close()
        assert not upstream.requests_to("/json/after-revocation")
        recs = wait_for(lambda: [r for r in gw.records() if r[A.HTTP_REQUEST_METHOD] == "CONNECT"],
                        "the record of the revoked tunnel", timeout=5)
        assert recs[0][A.ERROR_TYPE] == "policy_blocked" and recs[0][A.CLRK_DECISION] == "allow"
    finally:
        gw.stop()
