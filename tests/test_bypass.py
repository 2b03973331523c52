"""Deny-all cannot be bypassed: every attempt against a policy that allows one host is denied and recorded,
and nothing reaches the upstream that stands in for the forbidden destinations."""

from __future__ import annotations

import base64
import socket
import time

import httpx
import pytest

from clrk import attributes as A
from tests.harness.gateway import (
    AGENT_TOKEN,
    OTHER_TOKEN,
    Gateway,
    agent_docs,
    basic,
    connect,
    exchange,
    gateway_doc,
    h2_exchange,
    proxy_connect,
    read_all,
    route,
    status_of,
)
from tests.harness.util import new_invocation

ALLOWED = "allowed.test"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, forbidden_upstream):
    aliases = {ALLOWED: upstream.address}
    # Anything else a bypass might reach would be dialled here, and the fixture asserts it never is.
    aliases.update({h: forbidden_upstream.address for h in ("denied.test", "pastebin.com", "other.test")})
    docs = [gateway_doc(aliases=aliases, ca_bundle=str(pki[0])), *agent_docs(),
            route("only-one", [ALLOWED], sourceAgents={"names": ["team-a/researcher"]})]
    g = Gateway(tmp_path_factory.mktemp("bypass"), docs).start()
    yield g
    g.stop()


def test_the_allowed_host_works(gw):
    with gw.client() as c:
        assert c.get(f"https://{ALLOWED}/json/ok").status_code == 200


@pytest.mark.parametrize("target", [
    "127.0.0.1",            # an IP literal (this is where allowed.test is aliased to)
    "2130706433",           # decimal IPv4
    "0x7f000001",           # hex IPv4
    "017700000001",         # octal IPv4
    "[::1]",                # IPv6 literal
    "[::ffff:127.0.0.1]",   # IPv4-mapped IPv6
    "allowed.test.evil.test",
    "xallowed.test",
    "denied.test",
])
def test_destinations_that_are_not_the_allowed_hostname(gw, target, forbidden_upstream):
    i = new_invocation()
    sni = target if not target.startswith("[") and not target[0].isdigit() else ALLOWED  # no SNI for IPs: claim the allowed name
    out = exchange(gw, f"GET /json/x HTTP/1.1\r\nHost: {target}\r\nclrk-invocation-id: {i}\r\nConnection: close\r\n\r\n".encode(),
                   target=f"{target}:443", sni=sni)
    assert status_of(out) == 403, (target, out[:200])
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION] == "deny"
    assert forbidden_upstream.connections == 0


@pytest.mark.parametrize("spelled", ["ALLOWED.TEST", "Allowed.Test.", "allowed.test."])
def test_case_and_trailing_dot_are_the_same_host_not_a_loophole(gw, spelled):
    """Spellings of the allowed name are that name: allowed (and judged as such), never a different rule."""
    i = new_invocation()
    with gw.client() as c:
        r = c.get(f"https://{spelled}/json/case", headers={"clrk-invocation-id": i})
    assert r.status_code == 200
    assert gw.wait_record(invocation=i)[A.CLRK_DECISION_RULE] == "EgressRoute/default/only-one"


@pytest.mark.parametrize("spelled", ["DENIED.TEST", "denied.test."])
def test_case_and_trailing_dot_do_not_open_a_denied_host(gw, spelled):
    i = new_invocation()
    with gw.client() as c:
        assert c.get(f"https://{spelled}/x", headers={"clrk-invocation-id": i}).status_code == 403


def test_connect_to_allowed_then_inner_host_of_a_denied_one_http1(gw, forbidden_upstream):
    i = new_invocation()
    out = exchange(gw, f"GET /x HTTP/1.1\r\nHost: denied.test\r\nclrk-invocation-id: {i}\r\nConnection: close\r\n\r\n".encode())
    assert status_of(out) == 403
    assert gw.wait_record(invocation=i)[A.CLRK_DECISION_RULE] == "destination-check"
    assert forbidden_upstream.connections == 0


def test_connect_to_allowed_then_inner_authority_of_a_denied_one_http2(gw, forbidden_upstream):
    i = new_invocation()
    status = h2_exchange(gw, [(":method", "GET"), (":path", "/x"), (":scheme", "https"), (":authority", "denied.test"),
                              ("clrk-invocation-id", i)])
    assert status == 403
    assert gw.wait_record(invocation=i)[A.CLRK_DECISION_RULE] == "destination-check"
    assert forbidden_upstream.connections == 0


def test_sni_of_a_denied_host_inside_an_allowed_connect(gw, forbidden_upstream):
    i = new_invocation()
    out = exchange(gw, f"GET /x HTTP/1.1\r\nHost: {ALLOWED}\r\nclrk-invocation-id: {i}\r\nConnection: close\r\n\r\n".encode(),
                   sni="denied.test")
    assert status_of(out) == 403
    assert "TLS server name denied.test" in gw.wait_record(invocation=i)[A.CLRK_DECISION_REASON]


def test_connect_to_the_allowed_host_on_another_port(gw, forbidden_upstream):
    i = new_invocation()
    out = exchange(gw, f"GET /x HTTP/1.1\r\nHost: {ALLOWED}:8443\r\nclrk-invocation-id: {i}\r\nConnection: close\r\n\r\n".encode(),
                   target=f"{ALLOWED}:8443")
    assert status_of(out) == 403
    assert gw.wait_record(invocation=i)[A.SERVER_PORT] == 8443


def test_absolute_form_and_plain_http_proxying(gw, forbidden_upstream):
    """Plain HTTP through the proxy: judged the same way (the route allows 443 only, so even the allowed host
    is denied on 80), and the URL and Host must agree."""
    for url, host in ((f"http://{ALLOWED}/x", ALLOWED), ("http://denied.test/x", "denied.test"), (f"http://{ALLOWED}/x", "denied.test")):
        i = new_invocation()
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: {basic("team-a.researcher", AGENT_TOKEN)}\r\n"
                  f"clrk-invocation-id: {i}\r\nConnection: close\r\n\r\n".encode())
        out = read_all(s)
        s.close()
        assert status_of(out) == 403, (url, host, out[:100])
        rec = gw.wait_record(invocation=i)
        assert rec[A.CLRK_DECISION] == "deny" and rec[A.AGENT_NAME] == "researcher"
    # Absolute-form inside an allowed tunnel, naming a denied host.
    i = new_invocation()
    out = exchange(gw, f"GET https://denied.test/x HTTP/1.1\r\nHost: denied.test\r\nclrk-invocation-id: {i}\r\n"
                       "Connection: close\r\n\r\n".encode())
    assert status_of(out) == 403
    assert forbidden_upstream.connections == 0


def test_websocket_upgrade_to_a_denied_host(gw, forbidden_upstream):
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://denied.test/ws", headers={"connection": "upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
                                                     "sec-websocket-key": base64.b64encode(b"0123456789abcdef").decode(),
                                                     "clrk-invocation-id": i})
    assert r.status_code == 403
    assert gw.wait_record(invocation=i)[A.CLRK_DECISION] == "deny"
    assert forbidden_upstream.connections == 0


def test_raw_tcp_inside_an_allowed_tunnel_never_reaches_any_upstream(gw, upstream):
    """Bytes that are neither TLS nor HTTP are read as HTTP and refused by the parser (nothing to judge or
    record); once the gateway has logged the end of that client connection, no upstream was dialled for it."""
    before = upstream.connections
    s = connect(gw.port, f"{ALLOWED}:443")
    client_port = s.getsockname()[1]
    s.sendall(b"\x00\x01not tls, not http\r\n\r\n" * 4)
    out = read_all(s)
    s.close()
    assert status_of(out) == 400, out[:200]
    gw.wait_client_gone(client_port)
    assert upstream.connections == before


@pytest.mark.parametrize("auth", [None, "Basic " + base64.b64encode(b"team-a.researcher:").decode(), "Bearer xyz",
                                  "Basic !!notbase64!!", basic("team-a.researcher", OTHER_TOKEN),
                                  basic("team-b.reviewer", AGENT_TOKEN), basic("team-a.researcher:x", AGENT_TOKEN)])
def test_no_bad_or_borrowed_credentials(gw, auth):
    s, head = proxy_connect(gw.port, f"{ALLOWED}:443", auth)
    s.close()
    assert head.startswith(b"HTTP/1.1 407"), head


def test_another_agent_with_its_own_valid_token_is_not_this_agent(gw):
    """team-b.reviewer is a valid agent but the route names only team-a/researcher."""
    i = new_invocation()
    with gw.client("team-b.reviewer", OTHER_TOKEN) as c:
        assert c.get(f"https://{ALLOWED}/json/x", headers={"clrk-invocation-id": i}).status_code == 403
    assert gw.wait_record(invocation=i)[A.AGENT_NAME] == "reviewer"


def test_the_upstream_never_sees_proxy_credentials_or_the_invocation_header(gw, upstream):
    t0 = time.time()
    with httpx.Client(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False) as c:
        c.get(f"https://{ALLOWED}/json/creds", headers={"clrk-invocation-id": "x"})
    seen = [r for r in upstream.requests_since(t0) if r.path == "/json/creds"]
    assert seen and "proxy-authorization" not in seen[0].headers and "clrk-invocation-id" not in seen[0].headers


def test_a_name_that_resolves_to_a_denied_ip_is_refused_at_connect(tmp_path, pki, upstream):
    """allow-all with the loopback address denied: `localhost` is allowed by name, but it leads to 127.0.0.1."""
    docs = [{**gateway_doc(aliases={}, ca_bundle=str(pki[0]), default="allow-all")}, *agent_docs(),
            {"kind": "EgressDenyPolicy", "metadata": {"name": "no-loopback"}, "spec": {"hostnames": ["127.0.0.1", "::1"]}}]
    g = Gateway(tmp_path, docs).start()
    try:
        before = upstream.connections
        i = new_invocation()
        with g.client() as c:
            r = c.get(f"https://localhost:{upstream.port}/json/x", headers={"clrk-invocation-id": i})
            r2 = c.get(f"https://2130706433:{upstream.port}/json/x")
        assert r.status_code == 502 and r2.status_code == 403
        rec = g.wait_record(invocation=i)
        assert rec[A.CLRK_DECISION] == "allow" and rec[A.ERROR_TYPE] == "policy_blocked"
        assert upstream.connections == before
        assert "resolves to 127.0.0.1, denied by EgressDenyPolicy/default/no-loopback" in g.log()
    finally:
        g.stop()


def test_dot_segments_do_not_walk_out_of_an_allowed_path(tmp_path, pki, upstream):
    docs = [gateway_doc(aliases={ALLOWED: upstream.address}, ca_bundle=str(pki[0])), *agent_docs(),
            route("public", [ALLOWED], paths=["/json/public/"])]
    g = Gateway(tmp_path, docs).start()
    try:
        for path, status in (("/json/public/a", 200), ("/json/public/../secret", 403), ("/json/public/%2e%2e/secret", 403),
                             ("//json/secret", 403)):
            out = exchange(g, f"GET {path} HTTP/1.1\r\nHost: {ALLOWED}\r\nConnection: close\r\n\r\n".encode())
            assert status_of(out) == status, (path, out[:120])
    finally:
        g.stop()
