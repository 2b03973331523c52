"""The gateway against a hostile agent, over raw sockets and hand-written TLS/HTTP: one destination per request
whatever names it, no uninspected relay, path rules that mean what they say. Every attack here worked on an
earlier version of the gateway; each must be denied (403 by the gateway, recorded; or 400 by the HTTP parser
before any hook, for what is no well-formed request) without reaching any upstream that policy does not
allow — and the allowed upstream must not see the request either when it was refused."""

from __future__ import annotations

import base64
import socket
import time
import uuid

import pytest

from clrk import attributes as A
from tests.harness.gateway import (
    AGENT_TOKEN,
    Gateway,
    agent_docs,
    basic,
    deny,
    exchange,
    gateway_doc,
    h2_exchange,
    read_all,
    route,
    status_of,
    tunnel,
)
from tests.harness.util import new_invocation

ALLOWED = "allowed.test"
SECRET = "sk-injected-route-secret-4242"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, forbidden_upstream):
    aliases = {ALLOWED: upstream.address}
    aliases.update({h: forbidden_upstream.address for h in ("denied.test", "other.test")})
    docs = [gateway_doc(aliases=aliases, ca_bundle=str(pki[0])), *agent_docs(),
            route("only-one", [ALLOWED], sourceAgents={"names": ["team-a/researcher"]}),
            {"kind": "CredentialInjectionPolicy", "metadata": {"name": "key"},
             "spec": {"targetRefs": [{"kind": "EgressRoute", "name": "only-one"}],
                      "target": {"type": "Header", "name": "x-api-key"}, "secretRef": {"env": "CLRK_TEST_ROUTE_SECRET"}}}]
    g = Gateway(tmp_path_factory.mktemp("adversary"), docs, env={"CLRK_TEST_ROUTE_SECRET": SECRET}).start()
    yield g
    g.stop()


# --------------------------------------------------------------------------- one destination per request


@pytest.mark.parametrize("request_head", [
    # absolute-form naming another host, with the allowed Host header
    "GET https://denied.test/json/{i} HTTP/1.1\r\nHost: allowed.test\r\n",
    # absolute-form, no Host header at all
    "GET https://denied.test/json/{i} HTTP/1.1\r\n",
    "GET https://denied.test/json/{i} HTTP/1.0\r\n",
    # absolute-form naming the allowed host on another port
    "GET http://allowed.test:80/json/{i} HTTP/1.1\r\nHost: allowed.test\r\n",
    # the allowed host in the URL, another in Host
    "GET https://allowed.test/json/{i} HTTP/1.1\r\nHost: denied.test\r\n",
    # repeated Host headers: the upstream may read the second one
    "GET /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nHost: denied.test\r\n",
    "GET /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nhost: allowed.test\r\n",
    # obs-folded header lines
    "GET /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nX-A: b\r\n Host: denied.test\r\n",
    "GET /json/{i} HTTP/1.1\r\nHost: allowed.test\r\n\tx\r\n",
    # a bare CR inside a value: some upstreams end the line there
    "GET /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nX-A: b\rHost: denied.test\r\n",
    # no Host at all: the upstream would pick a name of its own
    "GET /json/{i} HTTP/1.0\r\n",
    "GET /json/{i} HTTP/1.1\r\n",
])
def test_a_request_naming_another_destination_inside_an_allowed_tunnel_is_denied(gw, upstream, forbidden_upstream,
                                                                                 request_head):
    i = new_invocation()
    raw = (request_head.format(i=i) + f"clrk-invocation-id: {i}\r\nConnection: close\r\n\r\n").encode()
    out = exchange(gw, raw)
    # The gateway's refusal (a policy decision: 403 with its own body), not a parser's 400.
    assert status_of(out) == 403, out[:300]
    assert b"clrk:" in out
    assert not upstream.requests_with(i) and forbidden_upstream.connections == 0
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION] == "deny"
    assert rec[A.CLRK_DECISION_RULE] == "destination-check"


@pytest.mark.parametrize(("request_line", "host"), [
    ("GET https://allowed.test/json/{i} HTTP/1.1\r\nHost: allowed.test\r\n", "allowed.test"),
    # no Host: the upstream is sent the URL's authority as the agent wrote it (a name is case-insensitive)
    ("GET https://ALLOWED.test:443/json/{i} HTTP/1.1\r\n", "allowed.test:443"),
    # inside TLS the scheme is the tunnel's: sent over TLS, never in clear
    ("GET http://allowed.test/json/{i} HTTP/1.1\r\nHost: allowed.test\r\n", "allowed.test"),
])
def test_absolute_form_that_agrees_with_the_tunnel_is_sent_in_origin_form_and_recorded_as_sent(gw, upstream, request_line,
                                                                                               host):
    i = new_invocation()
    out = exchange(gw, (request_line.format(i=i) + f"clrk-invocation-id: {i}\r\nConnection: close\r\n\r\n").encode())
    assert status_of(out) == 200
    seen = upstream.requests_with(i)
    assert len(seen) == 1 and seen[0].headers["x-api-key"] == SECRET
    assert seen[0].path == f"/json/{i}" and seen[0].headers["host"].lower() == host
    rec = gw.wait_record(invocation=i)
    assert rec[A.URL_FULL] == f"https://allowed.test/json/{i}" and rec[A.CLRK_DST_NAME] == ALLOWED


@pytest.mark.parametrize("raw", [
    # white space before the colon (RFC 9112 §5.1), a name that is no token
    "GET /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nHost : denied.test\r\n\r\n",
    "GET /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nX(y): z\r\n\r\n",
    # conflicting framing: the upstream and the gateway would split requests differently
    "POST /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /json/{i} HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
])
def test_malformed_framing_is_refused_by_the_protocol_layer_and_reaches_nothing(gw, upstream, forbidden_upstream, raw):
    """mitmproxy's HTTP parser answers these itself (400) before any hook runs: there is no request to judge or
    record, and nothing is sent anywhere."""
    i = new_invocation()
    out = exchange(gw, raw.format(i=i).encode())
    assert status_of(out) == 400, out[:300]
    assert not upstream.requests_with(i) and forbidden_upstream.connections == 0


@pytest.mark.parametrize("fields", [
    [(":method", "GET"), (":scheme", "https"), (":authority", ALLOWED), (":path", "https://denied.test/json/{i}")],
    [(":method", "GET"), (":scheme", "https"), (":authority", ALLOWED), (":path", "//denied.test/json/{i}")],
    [(":method", "GET"), (":scheme", "https"), (":path", "/json/{i}"), ("host", "denied.test")],
    [(":method", "GET"), (":scheme", "https"), (":authority", "denied.test"), (":path", "/json/{i}")],
])
def test_http2_pseudo_headers_cannot_name_another_destination(gw, upstream, forbidden_upstream, fields):
    i = new_invocation()
    headers = [(k, v.format(i=i)) for k, v in fields] + [("clrk-invocation-id", i)]
    assert h2_exchange(gw, headers) == 403
    assert not upstream.requests_with(i) and forbidden_upstream.connections == 0
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION] == "deny"


@pytest.mark.parametrize("fields", [
    [(":method", "GET"), (":scheme", "https"), (":authority", ALLOWED), (":path", "/json/{i}"), ("host", "denied.test")],
    [(":method", "GET"), (":scheme", "https"), (":authority", "denied.test"), (":path", "/json/{i}"), ("host", ALLOWED)],
    [(":method", "GET"), (":scheme", "https"), (":authority", ALLOWED), (":path", "/json/{i}"), (":protocol", "websocket")],
    [(":method", "GET"), (":scheme", "https"), (":authority", ALLOWED), (":path", "/json/{i}"), ("upgrade", "websocket")],
    [(":method", "GET"), (":scheme", "https"), (":path", "/json/{i}")],
    [(":method", "GET"), (":scheme", "https"), (":authority", ALLOWED), (":path", "/json/{i}"), ("host", ALLOWED),
     ("host", "denied.test")],
])
def test_http2_requests_the_protocol_layer_refuses_reach_nothing(gw, upstream, forbidden_upstream, fields):
    """h2/mitmproxy reject these as protocol errors (mismatched :authority and Host, unknown pseudo-headers,
    connection-specific headers, no authority at all) before any hook runs."""
    i = new_invocation()
    assert h2_exchange(gw, [(k, v.format(i=i)) for k, v in fields]) is None
    assert not upstream.requests_with(i) and forbidden_upstream.connections == 0


def test_http2_scheme_is_the_tunnels(gw, upstream):
    """`:scheme: http` inside a TLS tunnel is still sent over TLS to the tunnel's target, and recorded so."""
    i = new_invocation()
    assert h2_exchange(gw, [(":method", "GET"), (":scheme", "http"), (":authority", ALLOWED), (":path", f"/json/{i}"),
                            ("clrk-invocation-id", i)]) == 200
    assert len(upstream.requests_with(i)) == 1
    assert gw.wait_record(invocation=i)[A.URL_FULL] == f"https://allowed.test/json/{i}"


def test_http2_to_the_allowed_host_is_served(gw, upstream):
    i = new_invocation()
    assert h2_exchange(gw, [(":method", "GET"), (":scheme", "https"), (":authority", ALLOWED), (":path", f"/json/{i}")]) == 200
    assert len(upstream.requests_with(i)) == 1


def test_connect_inside_a_tunnel_is_refused(gw, upstream, forbidden_upstream):
    """Inside a tunnel only origin-form requests are HTTP: mitmproxy's parser answers an authority-form CONNECT
    with 400 before any hook runs, so nothing is judged, recorded or dialled."""
    i = new_invocation()
    auth = basic("team-a.researcher", AGENT_TOKEN)
    out = exchange(gw, f"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\nProxy-Authorization: {auth}\r\n"
                       f"clrk-invocation-id: {i}\r\n\r\n".encode())
    assert status_of(out) == 400, out[:300]
    assert forbidden_upstream.connections == 0


# --------------------------------------------------------------------------- no uninspected relays


@pytest.fixture(scope="module")
def upgrading_upstream(upstream):
    """An allowed upstream that switches protocols for anything, then echoes: an opaque pipe if let through."""
    def switch(handler, seen):
        proto = handler.headers.get("upgrade", "tcp")
        handler.wfile.write(f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n".encode())
        handler.wfile.flush()
        handler.connection.settimeout(5)
        try:
            while data := handler.connection.recv(4096):
                handler.connection.sendall(b"echo:" + data)
        except OSError:
            pass
        handler.close_connection = True

    upstream.handlers["switch"] = switch
    return upstream


WS_KEY = base64.b64encode(b"0123456789abcdef").decode()


@pytest.mark.parametrize("upgrade_headers", [
    "Connection: Upgrade\r\nUpgrade: tcp\r\n",
    "Connection: upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    "Connection: UPGRADE\r\nUPGRADE: TLS/1.2\r\n",
    "Connection: keep-alive, Upgrade\r\nUpgrade: websocket, tcp\r\n",
    # WebSocket in name only: wrong version, no key, a key that is not 16 bytes
    f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 12\r\nSec-WebSocket-Key: {WS_KEY}\r\n",
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n",
    # an Upgrade header without the Connection token still invites a 101
    "Upgrade: tcp\r\n",
])
def test_an_upgrade_that_is_not_a_wellformed_websocket_is_refused(gw, upgrading_upstream, upgrade_headers):
    i = new_invocation()
    raw = (f"GET /handler/switch/{i} HTTP/1.1\r\nHost: {ALLOWED}\r\n{upgrade_headers}clrk-invocation-id: {i}\r\n\r\n"
           "after-the-upgrade").encode()
    out = exchange(gw, raw)  # the refusal ends the connection: the bytes after the request are never read
    assert status_of(out) == 403, out[:300]  # refused by the gateway's rule, not by a parser
    assert out.count(b"HTTP/1.1 ") == 1 and b"connection: close" in out.lower()
    assert b"echo:" not in out
    assert not upgrading_upstream.requests_with(i)
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION] == "deny"


def test_a_switch_of_protocols_the_agent_did_not_ask_for_is_cut(gw, upgrading_upstream):
    """A cooperating upstream answers 101 to a plain request: that must not become a raw relay."""
    i = new_invocation()
    t = tunnel(gw)
    t.sendall(f"GET /handler/switch/{i} HTTP/1.1\r\nHost: {ALLOWED}\r\nclrk-invocation-id: {i}\r\n\r\n".encode())
    t.settimeout(5)
    head = b""
    try:
        while b"\r\n\r\n" not in head and (chunk := t.recv(4096)):
            head += chunk
        t.sendall(b"smuggled bytes")
        more = read_all(t, 3)
    except OSError:
        more = b""
    t.close()
    assert b"echo:" not in head + more
    assert not head.startswith(b"HTTP/1.1 101")
    rec = gw.wait_record(invocation=i)
    assert rec[A.ERROR_TYPE] == "protocol_error"


def test_a_wellformed_websocket_upgrade_to_an_allowed_host_passes(gw, upstream):
    i = new_invocation()
    raw = (f"GET /json/{i} HTTP/1.1\r\nHost: {ALLOWED}\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n"
           f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\nConnection: close\r\n\r\n").encode()
    exchange(gw, raw)
    seen = upstream.requests_with(i)
    assert len(seen) == 1 and seen[0].headers["upgrade"].lower() == "websocket"


# --------------------------------------------------------------------------- path rules


@pytest.fixture(scope="module")
def paths_gw(tmp_path_factory, pki, upstream):
    docs = [gateway_doc(aliases={ALLOWED: upstream.address}, ca_bundle=str(pki[0])), *agent_docs(),
            route("models", [ALLOWED], paths=["/json/models", "/json/public/"]),
            deny("no-admin", [ALLOWED], paths=["/json/public/admin"], methods=["DELETE"])]
    g = Gateway(tmp_path_factory.mktemp("adversary-paths"), docs).start()
    yield g
    g.stop()


@pytest.mark.parametrize(("path", "status"), [
    ("/json/models", 200),
    ("/json/models/gpt-4o", 200),
    ("/json/models?x=1", 200),
    ("/json/public/a", 200),
    ("/json/%70ublic/a", 200),                 # an escaped unreserved character is that character
    ("/json/models-internal", 403),            # a prefix matches whole segments only
    ("/json/modelsX/a", 403),
    ("/json/public", 403),                     # the rule says /json/public/, with the slash
    ("/json/public/../secret", 403),
    ("/json/public/%2e%2e/secret", 403),
    ("/json/public/%2E%2E/secret", 403),
    ("/json/public/..%2fsecret", 403),
    ("/json/public/%2fsecret", 403),           # encoded '/': servers disagree on it
    ("/json/public/..%5csecret", 403),         # encoded '\'
    ("/json/public/..\\secret", 403),          # a backslash is a separator to some servers
    ("/json/public/a;/../../secret", 403),     # ';' parameters
    ("/json/public/%252e%252e/secret", 403),   # encoded '%': decoded twice by some servers
    ("//json/public/a", 403),                  # double slashes
    ("/json/public//a", 403),
    ("/json/models/./a", 403),
])
def test_path_prefixes_match_whole_segments_and_ambiguous_paths_are_refused(paths_gw, upstream, path, status):
    i = new_invocation()
    out = exchange(paths_gw, f"GET {path.replace('/json/', f'/json/{i}-', 0)} HTTP/1.1\r\nHost: {ALLOWED}\r\n"
                             f"clrk-invocation-id: {i}\r\nConnection: close\r\n\r\n".encode())
    assert status_of(out) == status, (path, out[:300])
    rec = paths_gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION] == ("allow" if status == 200 else "deny")


@pytest.mark.parametrize("spelled", [("DELETE", "/json/public/admin"), ("delete", "/json/public/admin"),
                                     ("DELETE", "/json/public/ADMIN"), ("Delete", "/json/public/Admin/x")])
def test_deny_rules_match_methods_and_paths_case_insensitively(paths_gw, upstream, spelled):
    method, path = spelled
    i = new_invocation()
    out = exchange(paths_gw, f"{method} {path}?{i} HTTP/1.1\r\nHost: {ALLOWED}\r\nclrk-invocation-id: {i}\r\n"
                             "Connection: close\r\n\r\n".encode())
    assert status_of(out) == 403, out[:300]
    assert paths_gw.wait_record(invocation=i)[A.CLRK_DECISION_RULE] == "EgressDenyPolicy/default/no-admin"
    assert not upstream.requests_with(i)


# --------------------------------------------------------------------------- host names in one form


def test_rule_hosts_must_be_written_in_their_normal_form(tmp_path):
    from clrk.policy import PolicyError, load_policy

    for written, fix in (("straße.de", "xn--strae-oqa.de"), ("Example.COM", "example.com"), ("example.com.", "example.com")):
        p = tmp_path / f"p-{uuid.uuid4().hex[:6]}.yaml"
        p.write_text(f"kind: EgressRoute\nmetadata: {{name: r}}\nspec: {{hostnames: ['{written}']}}\n")
        with pytest.raises(PolicyError) as e:
            load_policy(str(p))
        assert fix in str(e.value), str(e.value)


def test_idna2008_names_are_one_name(tmp_path):
    """IDNA 2003 folds ß to ss: `straße.de` and `strasse.de` are different domains since IDNA 2008."""
    from clrk.hostnames import norm_host

    assert norm_host("straße.de") == "xn--strae-oqa.de"
    assert norm_host("STRASSE.de") == "strasse.de"
    assert norm_host("xn--strae-oqa.de.") == "xn--strae-oqa.de"


def test_the_record_names_what_the_upstream_was_asked_for(gw, upstream):
    i = new_invocation()
    out = exchange(gw, f"GET /json/{i}?a=1 HTTP/1.1\r\nHost: Allowed.Test.\r\nclrk-invocation-id: {i}\r\n"
                       "Connection: close\r\n\r\n".encode(), target="ALLOWED.test.:443")
    assert status_of(out) == 200
    rec = gw.wait_record(invocation=i)
    assert rec[A.URL_FULL] == f"https://allowed.test/json/{i}?a=1" and rec[A.SERVER_ADDRESS] == ALLOWED


# --------------------------------------------------------------------------- bounded work per agent


def test_idle_client_connections_are_closed_after_the_policys_timeout(tmp_path, pki, upstream):
    gw_doc = gateway_doc(aliases={ALLOWED: upstream.address}, ca_bundle=str(pki[0]))
    gw_doc["spec"]["idleTimeoutSeconds"] = 2
    g = Gateway(tmp_path, [gw_doc, *agent_docs(), route("ok", [ALLOWED])]).start()
    try:
        silent = socket.create_connection(("127.0.0.1", g.port), timeout=15)  # connects, never speaks
        half = socket.create_connection(("127.0.0.1", g.port), timeout=15)  # half a request head, then silence
        half.sendall(b"GET http://allowed.test/ HTTP/1.1\r\nHost: allow")
        t = tunnel(g)  # a tunnel whose client stays silent after the handshake
        t.settimeout(15)
        t0 = time.monotonic()
        for s in (silent, half, t):
            read_all(s, timeout=15)  # returns when the gateway closes the connection
        waited = time.monotonic() - t0
        assert 1.5 <= waited < 10, waited
        # A connection in use is not cut: a request after a pause shorter than the timeout is served.
        t2 = tunnel(g)
        time.sleep(1.0)
        t2.sendall(f"GET /json/idle HTTP/1.1\r\nHost: {ALLOWED}\r\nConnection: close\r\n\r\n".encode())
        assert status_of(read_all(t2)) == 200
    finally:
        g.stop()
