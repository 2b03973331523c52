"""TLS Passthrough listeners, through a real gateway with two listeners (one terminating, one passthrough):
the agent's TLS goes end to end to the upstream (it trusts the upstream's CA, not the gateway's), the CONNECT
is decided at L4, the ClientHello must name the CONNECT target, and each tunnel is one record with
clrk.l4.bytes_upstream."""

from __future__ import annotations

import base64
import socket
import ssl
import time
import uuid

import httpx
import pytest

from clrk import attributes as A
from tests.harness.gateway import AGENT_TOKEN, Gateway, agent_docs, deny, free_port, gateway_doc, route


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
    """The CONNECT records for `host` that were not there before (`since`: span ids seen then)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in gw.records(host=host) if r[A.HTTP_REQUEST_METHOD] == "CONNECT" and r[A.SPAN_ID] not in since]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


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


def _connect(port: int, target: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = base64.b64encode(f"team-a.researcher:{AGENT_TOKEN}".encode()).decode()
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, "the gateway closed the connection instead of answering the CONNECT"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def test_a_client_hello_naming_another_host_is_refused(pgw, pki, upstream):
    since = _seen(pgw)
    before = upstream.connections
    s = _connect(pgw.pass_port, "allowed.test:443")
    ctx = ssl.create_default_context(cafile=str(pki[0]))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ctx.wrap_socket(s, server_hostname="denied.test").do_handshake()
    s.close()
    (rec,) = _tunnel_records(pgw, "allowed.test", since)
    assert rec[A.CLRK_DECISION] == "deny" and rec[A.CLRK_DECISION_RULE] == "passthrough"
    assert "TLS server name denied.test does not match the CONNECT target allowed.test" in rec[A.CLRK_DECISION_REASON]
    assert upstream.connections == before  # no upstream was dialled


def test_a_tunnel_that_does_not_start_with_tls_is_closed(pgw, upstream):
    since = _seen(pgw)
    before = upstream.connections
    s = _connect(pgw.pass_port, "allowed.test:443")
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
