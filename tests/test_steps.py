"""Each step of clrk/proxy/steps/ in-process, with mitmproxy's own test helpers (`taddons`, `tflow`), the way
mitmproxy tests its addons: a real `Gateway` (or the one step), a policy compiled from dicts, flows made by
`tflow` and walked through the hooks mitmproxy would call. Milliseconds each; the end-to-end tests against a
real mitmdump stay for what needs the wire (TLS, sockets, the recorder process).

One section per step, in data-path order."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import ssl
import time

import pytest
import yaml
from mitmproxy import exceptions, flow, http, options
from mitmproxy.addons.dumper import Dumper
from mitmproxy.addons.proxyserver import Proxyserver as ProxyServer
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.test import taddons, tflow

from clrk.policy.compiled import BudgetConfig
from clrk.providers import DEFAULT_HOSTS, parser_for
from clrk.proxy.budget import utc_day
from clrk.proxy.capture import BodyCapture
from clrk.proxy.gateway import Gateway
from clrk.proxy.runtime import Runtime
from clrk.proxy.steps import routing
from clrk.proxy.steps.egress import EgressControl, websocket_problem
from clrk.proxy.steps.passthrough import CountingRelay
from clrk.proxy.steps.policy import PolicyLoader
from clrk.proxy.steps.routing import ProviderRouting, estimate
from clrk.proxy.transaction import METADATA_KEY
from tests.harness.gateway import basic
from tests.harness.util import clrk_message, compile_policy

TOKEN = "tok-bot-0123456789"
OPENAI_KEY = "sk-injected-STEP-SECRET"


def _doc(kind: str, name: str, spec: dict, ns: str | None = None) -> dict:
    return {"kind": kind, "metadata": {"name": name, **({"namespace": ns} if ns else {})}, "spec": spec}


DOCS = [
    _doc("EgressGateway", "gw", {}),
    _doc("Agent", "bot", {"credentials": {"tokenSha256": hashlib.sha256(TOKEN.encode()).hexdigest()}}, ns="team-a"),
    _doc("EgressRoute", "plain", {"hostnames": ["allowed.test"], "ports": [443, 80]}),
    _doc("Backend", "openai-main", {"schema": {"name": "openai"}, "upstream": {"host": "llm-b.test", "port": 8443},
                                    "modelRewrites": [{"from": "gpt-4o", "to": "gpt-4o-mini"}]}),
    _doc("AIProviderRoute", "openai", {"rules": [
        {"matches": [{"provider": "openai", "models": ["gpt-4o"]}], "backendRefs": [{"name": "openai-main"}]},
        {"matches": [{"provider": "openai", "models": ["budget-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1000, "reserveTokens": 100}}]},
        {"matches": [{"provider": "openai", "endpoints": ["/v1/completions"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1000}}]},
    ]}, ns="team-a"),
    _doc("Backend", "gemini-main", {"schema": {"name": "google_genai"},
                                    "upstream": {"host": "generativelanguage.googleapis.com", "port": 443},
                                    "modelRewrites": [{"from": "gemini-a", "to": "gemini-b"}]}),
    # Budgeted: routed on the request hook, after its query-parameter key went in on the headers.
    _doc("AIProviderRoute", "gemini", {"rules": [{"matches": [{"provider": "google_genai"}],
                                                  "backendRefs": [{"name": "gemini-main"}],
                                                  "filters": [{"type": "TokenBudget",
                                                               "tokenBudget": {"maxTokensPerDay": 10**9}}]}]}, ns="team-a"),
    _doc("CredentialInjectionPolicy", "openai-key", {
        "targetRefs": [{"kind": "AIProviderRoute", "name": "openai"}],
        "target": {"type": "Header", "name": "Authorization", "prefix": "Bearer "}, "secretRef": {"env": "K_OPENAI"}}),
    _doc("CredentialInjectionPolicy", "gemini-key", {
        "targetRefs": [{"kind": "AIProviderRoute", "name": "gemini"}],
        "target": {"type": "QueryParam", "name": "key"}, "secretRef": {"env": "K_GEMINI"}}),
]
POLICY = compile_policy(*DOCS, env={"K_OPENAI": OPENAI_KEY, "K_GEMINI": "AIza-STEP-SECRET"})


AUTH = basic("team-a.bot", TOKEN)


@pytest.fixture
def g() -> Gateway:
    gw = Gateway(Runtime())
    gw.rt.policy = POLICY
    gw.rt.ledger.load(utc_day(time.time()), {})  # as the recorder answers at start: nothing used today
    return gw


def connect(g: Gateway, host: str, port: int = 443, auth: str | None = AUTH) -> http.HTTPFlow:
    """A CONNECT through the gateway's http_connect hook; the tunnel's client connection is the flow's."""
    f = tflow.tflow(req=tflow.treq(method=b"CONNECT", host=host, port=port, authority=f"{host}:{port}".encode(),
                                   path=b"", headers=http.Headers(), content=b""))
    f.client_conn.sni = host  # the ClientHello that follows names the CONNECT target
    if auth is not None:
        f.request.headers["proxy-authorization"] = auth
    g.http_connect(f)
    return f


def request(tunnel: http.HTTPFlow, path: str = "/", method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None, host: str | None = None) -> http.HTTPFlow:
    """A request inside `tunnel`, as mitmproxy hands it to requestheaders: headers in, body not yet read."""
    target = host or tunnel.request.host
    hdrs = http.Headers(host=target, **{k.replace("-", "_"): v for k, v in (headers or {}).items()})
    if body is not None:
        hdrs["content-length"] = str(len(body))
    f = tflow.tflow(client_conn=tunnel.client_conn, req=tflow.treq(
        host=target, port=tunnel.request.port, scheme=b"https", method=method.encode(), path=path.encode(),
        headers=hdrs, content=None))
    f.metadata["body"] = body
    return f


def send(g: Gateway, f: http.HTTPFlow) -> http.HTTPFlow:
    """requestheaders, then (body read) request: what happens before the request would leave. A request the
    gateway answered or killed meanwhile ends as mitmproxy ends it (the response or error hook)."""
    assert g.requestheaders(f) is None
    if f.response is None and f.error is None and not f.request.stream:
        f.request.raw_content = f.metadata["body"] or b""
        assert g.request(f) is None
    if f.response is not None:
        g.response(f)
    elif f.error is not None:
        g.error(f)
    return f


def answer(g: Gateway, f: http.HTTPFlow, status: int = 200, body: bytes = b"{}",
           ctype: str = "application/json") -> dict:
    """The upstream's answer through responseheaders, the body (through the stream a step set, in two pieces,
    or whole) and response; the snapshot the recorder is handed."""
    f.response = tflow.tresp(status_code=status, headers=http.Headers(content_type=ctype, content_length=str(len(body))),
                             content=None)
    g.responseheaders(f)
    if callable(f.response.stream):
        for piece in (body[: len(body) // 2], body[len(body) // 2 :], b""):
            f.response.stream(piece)
    else:
        f.response.raw_content = body
    g.response(f)
    return g.rt.unsent[-1]


def denied(f: http.HTTPFlow) -> tuple[int, str]:
    """(status, the `clrk: ...` text) of the gateway's answer, in clrk's shape or the provider's."""
    assert f.response is not None, "not denied"
    return f.response.status_code, clrk_message(json.loads(f.response.content))


# ------------------------------------------------------------------------------------------------ PolicyLoader


def test_policy_loader_loads_forces_mitmproxy_settings_and_keeps_the_last_good_policy(tmp_path):
    rt = Runtime()
    loader = PolicyLoader(rt)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump_all(DOCS[:3]))
    with taddons.context(ProxyServer(), Dumper(), loader) as tctx:
        tctx.configure(loader, clrk_policies=str(policy), clrk_certs=str(tmp_path / "certs"), clrk_db=str(tmp_path / "db"),
                       connection_strategy="eager", flow_detail=3, rawtcp=True)
        assert rt.policy is not None and [r.name for r in rt.policy.routes] == ["plain"]
        opts = tctx.options
        assert (opts.connection_strategy, opts.flow_detail, opts.rawtcp) == ("lazy", 0, False)
        assert opts.confdir == str((tmp_path / "certs").resolve())
        # A later `set` cannot undo them.
        tctx.configure(loader, connection_strategy="eager")
        assert opts.connection_strategy == "lazy"
        good = rt.policy
        bad = tmp_path / "bad.yaml"
        bad.write_text("kind: EgressRoute\nmetadata: {name: x}\nspec: {hostnames: 7}\n")
        with pytest.raises(exceptions.OptionsError, match="is invalid"):
            tctx.configure(loader, clrk_policies=str(bad))
        assert rt.policy is good


def test_policy_loader_reloads_a_changed_file_and_ignores_a_broken_one(tmp_path, caplog):
    rt = Runtime()
    loader = PolicyLoader(rt)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump_all(DOCS[:3]))
    with taddons.context(ProxyServer(), Dumper(), loader) as tctx:
        tctx.configure(loader, clrk_policies=str(policy), clrk_certs=str(tmp_path / "certs"), clrk_db=str(tmp_path / "db"))
        def reload() -> None:  # one round of the watch loop, on the context's event loop
            tctx.master.event_loop.run_until_complete(loader._reload_if_changed())

        first = rt.policy
        reload()
        assert rt.policy is first  # nothing changed: not read again
        policy.write_text(yaml.safe_dump_all([*DOCS[:2], _doc("EgressRoute", "other", {"hostnames": ["other.test"]})]))
        reload()
        assert [r.name for r in rt.policy.routes] == ["other"]
        second = rt.policy
        policy.write_text("kind: Nope\n")
        reload()
        assert rt.policy is second and "last good policy stays in force" in caplog.text


# ------------------------------------------------------------------------------------------------ ProxyAuth


def test_connect_with_credentials_opens_a_tunnel_and_drops_the_header(g):
    c = connect(g, "allowed.test")
    assert c.response is None and "proxy-authorization" not in c.request.headers
    t = g.rt.tunnels[c.client_conn.id]
    assert (t.agent.ref, t.host, t.port) == ("team-a/bot", "allowed.test", 443)
    assert g.rt.unsent == []  # an accepted CONNECT is not a transaction; its requests are


@pytest.mark.parametrize("auth", [None, basic("team-a.bot", "wrong-token-000"), basic("team-a.nobody", TOKEN), "Bearer x"])
def test_connect_without_valid_credentials_is_a_407_recorded_without_the_secret(g, auth):
    c = connect(g, "allowed.test", auth=auth)
    status, error = denied(c)
    assert status == 407 and c.response.headers["proxy-authenticate"] == 'Basic realm="clrk"'
    assert c.client_conn.id not in g.rt.tunnels
    rec = g.rt.unsent[-1]
    assert rec["decision"][0] == "deny" and rec["agent"] is None
    assert "wrong-token" not in repr(rec) + error and "nobody" not in error


def test_connect_inside_a_tunnel_is_refused(g):
    outer = connect(g, "allowed.test")
    inner = tflow.tflow(client_conn=outer.client_conn, req=tflow.treq(
        method=b"CONNECT", host="other.test", port=443, authority=b"other.test:443", path=b"", headers=http.Headers(),
        content=b""))
    inner.request.headers["proxy-authorization"] = AUTH
    g.http_connect(inner)
    assert denied(inner)[0] == 403 and g.rt.tunnels[outer.client_conn.id].host == "allowed.test"


def test_an_agent_revoked_while_its_tunnel_is_open_is_refused_on_its_next_request(g):
    c = connect(g, "allowed.test")
    assert send(g, request(c)).response is None
    g.rt.policy = compile_policy(*DOCS[:1], *DOCS[2:3])  # the agent is gone
    status, error = denied(send(g, request(c)))
    assert status == 407 and "no longer valid" in g.rt.unsent[-1]["decision"][2]


def test_plain_http_proxying_authenticates_every_request(g):
    def plain(auth: str | None) -> http.HTTPFlow:
        f = tflow.tflow(req=tflow.treq(host="allowed.test", port=80, headers=http.Headers(host="allowed.test"), content=None))
        f.client_conn.timestamp_tls_setup = None  # no tunnel, no TLS: the agent speaks HTTP to the proxy
        if auth is not None:
            f.request.headers["proxy-authorization"] = auth
        f.metadata["body"] = None
        return send(g, f)

    assert denied(plain(None))[0] == 407
    assert denied(plain(basic("team-a.bot", "wrong-token-000")))[0] == 407
    f = plain(AUTH)
    assert f.response is None and "proxy-authorization" not in f.request.headers


# ------------------------------------------------------------------------------------------------ Passthrough

PASS_PORT, TERM_PORT = 9443, 8080
PASS_POLICY = compile_policy(
    _doc("EgressGateway", "gw", {"listeners": [
        {"name": "t", "port": TERM_PORT, "protocol": "TLS", "tls": {"mode": "Terminate"}},
        {"name": "p", "port": PASS_PORT, "protocol": "TLS", "tls": {"mode": "Passthrough"}}]}),
    DOCS[1],
    _doc("EgressRoute", "hosts", {"hostnames": ["allowed.test", "pastebin.com"]}),
    _doc("EgressRoute", "get-only", {"hostnames": ["other.test"], "methods": ["GET"]}),
    _doc("EgressDenyPolicy", "no-admin", {"hostnames": ["pastebin.com"], "paths": ["/admin"]}),
)


def client_hello(sni: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl) naming `sni`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no trust store needed: the handshake stops at its first flight
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.fixture
def pg() -> Gateway:
    gw = Gateway(Runtime())
    gw.rt.policy = PASS_POLICY
    return gw


def pass_connect(g: Gateway, host: str, port: int = 443) -> http.HTTPFlow:
    c = tflow.tflow(req=tflow.treq(method=b"CONNECT", host=host, port=port, authority=f"{host}:{port}".encode(),
                                   path=b"", headers=http.Headers(proxy_authorization=AUTH), content=b""))
    c.client_conn.sockname = ("127.0.0.1", PASS_PORT)
    g.http_connect(c)
    return c


@pytest.mark.parametrize("host,allowed,why", [
    ("allowed.test", True, None),
    ("other.test", False, "no route allows"),  # a route limited to methods cannot be checked on a tunnel
    ("pastebin.com", False, "no-admin"),  # a deny limited to paths denies the tunnel whole
    ("evil.test", False, "no route allows"),
])
def test_a_passthrough_connect_is_decided_at_l4_and_a_denial_is_its_answer(pg, host, allowed, why):
    c = pass_connect(pg, host)
    if allowed:
        assert c.response is None and pg.rt.tunnels[c.client_conn.id].l4.allow
        assert (host, 443) in pg.rt.allowed[c.client_conn.id]
        return
    status, error = denied(c)
    assert status == 403 and why in error and c.client_conn.id not in pg.rt.tunnels
    assert pg.rt.unsent[-1]["method"] == b"CONNECT" and pg.rt.unsent[-1]["decision"][0] == "deny"


def test_the_same_connect_on_a_terminating_listener_is_left_to_the_request_decisions(pg):
    c = tflow.tflow(req=tflow.treq(method=b"CONNECT", host="other.test", port=443, authority=b"other.test:443",
                                   path=b"", headers=http.Headers(proxy_authorization=AUTH), content=b""))
    c.client_conn.sockname = ("127.0.0.1", TERM_PORT)
    pg.http_connect(c)
    assert c.response is None and pg.rt.tunnels[c.client_conn.id].l4 is None


@pytest.mark.parametrize("sni,relayed,why", [
    ("allowed.test", True, None),
    (None, True, None),  # no server name (an IP-address client): the CONNECT target is what was judged
    ("other.test", False, "TLS server name other.test does not match the CONNECT target allowed.test"),
])
def test_a_passthrough_tunnel_is_relayed_only_when_its_client_hello_names_the_target(pg, sni, relayed, why):
    c = pass_connect(pg, "allowed.test")
    hello = parse_client_hello(client_hello(sni))
    assert hello is not None
    ctx = Context(c.client_conn, options.Options())
    ctx.server.address = ("allowed.test", 443)
    layer = pg.passthrough._tunnel_layer(ctx, pg.rt.tunnels[c.client_conn.id], hello, None)
    if relayed:
        assert isinstance(layer, CountingRelay) and c.client_conn.id in pg.passthrough.open
        pg.passthrough.done()  # the gateway stops with it open: recorded as far as it went
        rec = pg.rt.unsent[-1]
        assert rec["decision"][0] == "allow" and rec["error"] == "clrk: gateway stopped with the tunnel open"
    else:
        assert not isinstance(layer, CountingRelay) and c.client_conn.id not in pg.passthrough.open
        rec = pg.rt.unsent[-1]
        assert rec["decision"] == ("deny", "passthrough", why)


# ------------------------------------------------------------------------------------------------ EgressControl


def test_an_allowed_request_may_dial_its_destination_and_nothing_else(g):
    c = connect(g, "allowed.test")
    f = send(g, request(c))
    assert f.response is None and f.metadata[METADATA_KEY].decision.allow
    assert ("allowed.test", 443) in g.rt.allowed[c.client_conn.id]
    other = server_hooks.ServerConnectionHookData(tflow.tserver_conn(), c.client_conn)
    other.server.address = ("elsewhere.test", 443)
    g.server_connect(other)
    assert other.server.error == "clrk: connection to elsewhere.test:443 is not allowed by policy"
    assert g.rt.blocked[c.client_conn.id] == other.server.error


def test_a_host_no_route_allows_is_denied_before_anything_is_dialled(g):
    c = connect(g, "evil.test")
    status, error = denied(send(g, request(c)))
    assert status == 403 and c.client_conn.id not in g.rt.allowed
    rec = g.rt.unsent[-1]
    assert rec["decision"][0] == "deny" and rec["dst"] == "evil.test"


@pytest.mark.parametrize("host_header", ["evil.test", "allowed.test:444", "allowed.test.evil.test"])
def test_a_host_header_disagreeing_with_the_tunnel_is_refused(g, host_header):
    c = connect(g, "allowed.test")
    f = request(c)
    f.request.headers["host"] = host_header
    status, error = denied(send(g, f))
    assert status == 403 and error == f"clrk: Host {host_header}{'' if ':' in host_header else ':443'} does not match " \
                                      "the connection's destination allowed.test:443"
    assert c.client_conn.id not in g.rt.allowed


def test_an_absolute_form_request_agreeing_with_its_tunnel_leaves_in_origin_form(g):
    c = connect(g, "allowed.test")
    f = request(c, path="/x?q=1")
    f.request.authority = "allowed.test"
    del f.request.headers["host"]
    send(g, f)
    assert f.response is None and f.request.authority == "" and f.request.headers["host"] == "allowed.test"


ALIAS_POLICY = compile_policy(
    _doc("EgressGateway", "gw", {"upstreamTLS": {"hostAliases": {"aliased.test": "127.0.0.1:9999"}}}),
    DOCS[1],
    _doc("EgressRoute", "names", {"hostnames": ["aliased.test", "localhost"]}),
)


def dial(g: Gateway, tunnel: http.HTTPFlow, host: str, port: int = 443) -> server_hooks.ServerConnectionHookData:
    """mitmproxy about to open the upstream connection `tunnel`'s request needs; whatever the guard returned
    to be awaited, awaited."""
    data = server_hooks.ServerConnectionHookData(tflow.tserver_conn(), tunnel.client_conn)
    data.server.address, data.server.sni = (host, port), None
    pending = g.server_connect(data)
    if pending is not None:
        asyncio.run(pending)
    return data


def test_an_alias_is_dialled_and_the_destination_restored_once_connected(g):
    g.rt.policy = ALIAS_POLICY
    c = connect(g, "aliased.test")
    assert send(g, request(c)).response is None
    data = dial(g, c, "aliased.test")
    assert data.server.error is None and data.server.address == ("127.0.0.1", 9999)
    assert data.server.sni == "aliased.test"  # TLS and its certificate check name the real host
    g.server_connected(data)
    assert data.server.address == ("aliased.test", 443)  # connection reuse matches on what was allowed


def test_a_name_that_leads_to_loopback_is_refused_and_the_address_judged_is_the_one_dialled(g):
    g.rt.policy = ALIAS_POLICY
    c = connect(g, "localhost")
    assert send(g, request(c)).response is None  # allowed by name
    data = dial(g, c, "localhost")
    assert data.server.error.startswith("clrk: localhost is not allowed: it resolves to 127.0.0.1")
    assert g.rt.blocked[c.client_conn.id] == data.server.error


@pytest.mark.parametrize("ip", ["10.1.2.3", "169.254.169.254", "127.0.0.1"])
def test_an_address_in_a_private_network_is_refused_even_where_a_decision_allowed_it(g, ip):
    c = connect(g, "allowed.test")
    assert send(g, request(c)).response is None
    g.rt.allow(c.client_conn, ip, 443, g.rt.tunnels[c.client_conn.id].agent)  # as if a decision had
    data = dial(g, c, ip)
    assert data.server.error is not None and "is not allowed" in data.server.error


def test_the_invocation_header_stays_home_and_the_trace_continues_from_the_gateway(g):
    c = connect(g, "allowed.test")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    f = send(g, request(c, headers={"clrk-invocation-id": "inv-step-1", "traceparent": parent}))
    assert "clrk-invocation-id" not in f.request.headers
    tx = f.metadata[METADATA_KEY]
    assert f.request.headers["traceparent"] == tx.trace.traceparent() != parent
    assert tx.trace.trace_id == "0af7651916cd43dd8448eb211c80319c" and tx.trace.parent_span_id == "b7ad6b7169203331"
    assert answer(g, f)["inv"] == "inv-step-1"


def test_a_101_nobody_asked_for_is_cut(g):
    c = connect(g, "allowed.test")
    f = send(g, request(c))
    f.response = tflow.tresp(status_code=101, headers=http.Headers(upgrade="h2c", connection="upgrade"), content=b"")
    g.responseheaders(f)
    assert f.error is not None and f.metadata[METADATA_KEY].error_type == "protocol_error"


def test_what_acts_on_a_101_or_a_handshake_alone_is_not_called_for_other_requests(monkeypatch):
    """The Gateway leaves out, per request, the step hooks marked for a 101 answer or a WebSocket handshake
    alone (what ordinary requests pay for nothing); a 101 still reaches every one of them."""
    import functools

    from clrk.proxy.steps.websocket import WebSocketSessions

    called: list[str] = []
    for cls, hook in ((EgressControl, "responseheaders"), (WebSocketSessions, "responseheaders"), (WebSocketSessions, "request")):
        orig = getattr(cls, hook)

        @functools.wraps(orig)  # keeps the mark
        def spy(self, flow, orig=orig, name=f"{cls.__name__}.{hook}"):
            called.append(name)
            return orig(self, flow)

        monkeypatch.setattr(cls, hook, spy)
    g = Gateway(Runtime())
    g.rt.policy = POLICY
    c = connect(g, "allowed.test")
    f = send(g, request(c))
    answer(g, f)
    assert called == []
    f = send(g, request(c))
    f.response = tflow.tresp(status_code=101, headers=http.Headers(upgrade="h2c", connection="upgrade"), content=b"")
    g.responseheaders(f)
    assert called == ["WebSocketSessions.responseheaders", "EgressControl.responseheaders"] and f.error is not None


@pytest.mark.parametrize("headers,problem", [
    ({"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
      "sec-websocket-key": base64.b64encode(b"k" * 16).decode()}, None),
    ({"upgrade": "h2c", "connection": "Upgrade"}, "only WebSocket"),
    ({"upgrade": "websocket", "connection": "keep-alive", "sec-websocket-version": "13",
      "sec-websocket-key": base64.b64encode(b"k" * 16).decode()}, "Connection: Upgrade"),
    ({"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "8",
      "sec-websocket-key": base64.b64encode(b"k" * 16).decode()}, "version 13"),
    ({"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
      "sec-websocket-key": "short"}, "16 base64"),
])
def test_websocket_handshakes_are_checked(headers, problem):
    req = tflow.treq(headers=http.Headers(**{k.replace("-", "_"): v for k, v in headers.items()}))
    found = websocket_problem(req, {k: v for k, v in headers.items()})
    assert found is None if problem is None else problem in found


# ------------------------------------------------------------------------------------------------ Providers


def test_a_provider_call_is_recognised_and_its_gzipped_body_read(g):
    c = connect(g, "api.openai.com")
    doc = {"model": "budget-a", "max_tokens": 7, "n": 2, "messages": []}
    body = gzip.compress(json.dumps(doc).encode())
    f = request(c, "/v1/chat/completions", "POST", body, {"content-encoding": "gzip", "content-type": "application/json"})
    send(g, f)
    genai = f.metadata[METADATA_KEY].genai
    assert genai.result.operation == "chat" and genai.result.request_model == "budget-a"
    assert (genai.max_output_tokens, genai.choices) == (7, 2)
    assert f.request.raw_content == body  # the agent's bytes go on as they came


def test_a_decision_left_pending_on_the_headers_is_finished_under_the_policy_in_force(g):
    """A provider call is judged on its headers (who, where, deny rules) and finished on its model once the body
    is in, without judging the headers twice; a policy swapped in between is applied whole."""
    c = connect(g, "api.openai.com")
    body = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    f = request(c, "/v1/chat/completions", "POST", body, {"content-type": "application/json"})
    assert g.requestheaders(f) is None and f.response is None
    assert f.metadata[METADATA_KEY].decision is None  # the model is in the body
    deny = _doc("EgressDenyPolicy", "no-openai", {"hostnames": ["api.openai.com"],
                                                 "denyResponse": {"statusCode": 451, "message": "not today"}})
    g.rt.policy = compile_policy(*DOCS, deny, env={"K_OPENAI": OPENAI_KEY, "K_GEMINI": "AIza-STEP-SECRET"})
    f.request.raw_content = body
    assert g.request(f) is None
    assert denied(f) == (451, "clrk: not today")
    assert "authorization" not in f.request.headers
    # Under an unchanged policy the same call is allowed on its model.
    g.rt.policy = POLICY
    f = send(g, request(c, "/v1/chat/completions", "POST", body, {"content-type": "application/json"}))
    assert f.response is None and f.metadata[METADATA_KEY].decision.rule.startswith("AIProviderRoute/team-a/openai")


def test_a_request_to_a_non_provider_host_is_not_parsed(g):
    f = send(g, request(connect(g, "allowed.test"), "/v1/chat/completions", "POST", b'{"model": "gpt-4o"}'))
    assert f.metadata[METADATA_KEY].genai is None


# ------------------------------------------------------------------------------------------------ ProviderRouting


def test_a_backend_moves_the_call_and_rewrites_only_the_model(g):
    c = connect(g, "api.openai.com")
    body = b'{"messages": [{"role":"user","content":"caf\\u00e9"}], "model" : "gpt-4o", "temperature": 0.50}'
    f = send(g, request(c, "/v1/chat/completions", "POST", body, {"content-type": "application/json"}))
    assert f.response is None
    assert (f.request.host, f.request.port) == ("llm-b.test", 8443)
    assert ("llm-b.test", 8443) in g.rt.allowed[c.client_conn.id]
    assert f.request.raw_content == body.replace(b'"gpt-4o"', b'"gpt-4o-mini"')  # nothing else re-encoded
    rec = answer(g, f, body=b'{"model":"gpt-4o-mini-2024","usage":{"prompt_tokens":3,"completion_tokens":4}}')
    assert rec["rewritten"] is True
    assert rec["genai"]["gen_ai.request.model"] == "gpt-4o" and rec["genai"]["gen_ai.response.model"] == "gpt-4o-mini-2024"


def test_a_backend_renames_a_model_named_by_the_path_and_leaves_the_query_and_body(g):
    c = connect(g, "generativelanguage.googleapis.com")
    body = b'{"contents": [], "model": "gemini-a"}'  # a body member of that name is not the model here
    f = send(g, request(c, "/v1beta/models/gemini-a:streamGenerateContent?alt=sse", "POST", body))
    assert f.request.path == "/v1beta/models/gemini-b:streamGenerateContent?alt=sse&key=AIza-STEP-SECRET"
    assert f.request.raw_content == body
    rec = answer(g, f)
    assert rec["rewritten"] is True and rec["genai"]["gen_ai.request.model"] == "gemini-a"
    unchanged = send(g, request(c, "/v1beta/models/gemini-c:generateContent", "POST", body))
    assert unchanged.request.path == "/v1beta/models/gemini-c:generateContent?key=AIza-STEP-SECRET"
    assert answer(g, unchanged)["rewritten"] is False


def test_a_budgeted_call_is_admitted_on_its_estimate_and_settled_on_its_usage(g):
    c = connect(g, "api.openai.com")
    body = json.dumps({"model": "budget-a", "max_tokens": 50, "stream": True, "messages": []}).encode()
    f = send(g, request(c, "/v1/chat/completions", "POST", body, {"content-type": "application/json"}))
    tx = f.metadata[METADATA_KEY]
    assert f.response is None and tx.reservation is not None and tx.budget_reserved == 50 + len(body) // 4
    # Usage asked for in the stream (a budget settles on usage it can see); the rest of the body as sent.
    assert json.loads(f.request.raw_content) == {**json.loads(body), "stream_options": {"include_usage": True}}
    assert f.request.raw_content.endswith(body[1:])
    sse = (b'data: {"id":"c1","model":"budget-a","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
           b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\ndata: [DONE]\n\n')
    rec = answer(g, f, body=sse, ctype="text/event-stream")
    pool, was_denied, most, used, charged = rec["budget"]
    assert pool.startswith("AIProviderRoute/team-a/openai#") and (was_denied, most, used, charged) == (False, 1000, 11, 11)


@pytest.mark.parametrize("path,doc,status,why", [
    ("/v1/chat/completions", {"model": "budget-a", "max_tokens": 5000}, 429, "may cost up to 5010 tokens, more than the whole day's 1000"),
    ("/v1/chat/completions", {"model": "budget-a", "n": "many"}, 400, "n must be a positive integer, not 'many'"),
    ("/v1/chat/completions", {"model": "budget-a", "max_tokens": True}, 400, "max_tokens must be a positive integer, not true"),
    # Input the provider holds is estimated at serverContextTokens (128k by default): past this pool's day.
    ("/v1/responses", {"model": "budget-a", "previous_response_id": "r"}, 429, "more than the whole day's 1000"),
    ("/v1/batches", {"model": "budget-a"}, 403, "billed after this request is answered"),
])
def test_a_budgeted_call_is_refused_before_the_upstream_when_its_cost_cannot_be_bounded(g, path, doc, status, why):
    c = connect(g, "api.openai.com")
    f = send(g, request(c, path, "POST", json.dumps(doc).encode(), {"content-type": "application/json"}))
    got, error = denied(f)
    assert got == status and why in error, error
    rec = g.rt.unsent[-1]
    assert rec["decision"][0] == "deny" and rec["budget"][4] is None  # nothing charged
    assert g.rt.ledger.used_today(rec["budget"][0]) == 0


def test_a_budgeted_call_whose_body_the_gateway_does_not_read_is_cut_before_it_is_sent(g):
    """Allowed on its headers (the route matches the endpoint), but chunked: no estimate, no usage to settle
    on. Answering would mean reading the body first, so the connection is cut, and the record says why."""
    c = connect(g, "api.openai.com")
    f = request(c, "/v1/completions", "POST", None, {"transfer-encoding": "chunked", "content-type": "application/json"})
    send(g, f)
    assert f.response is None and f.error is not None  # killed: nothing reached the upstream
    rec = g.rt.unsent[-1]
    assert rec["decision"][0] == "deny" and "Content-Length body of at most 32 MiB" in rec["decision"][2]


def test_until_the_ledger_is_read_a_budgeted_call_waits_then_is_answered_503(g, monkeypatch):
    g.rt.ledger.loaded = False
    monkeypatch.setattr(routing, "LEDGER_WAIT_SECONDS", 0.0)
    c = connect(g, "api.openai.com")
    f = request(c, "/v1/chat/completions", "POST", b'{"model": "budget-a"}', {"content-type": "application/json"})
    assert g.requestheaders(f) is None
    f.request.raw_content = f.metadata["body"]
    pending = g.request(f)
    assert pending is not None and f.response is None  # mitmproxy awaits it before the request can leave
    asyncio.run(pending)
    assert denied(f)[0] == 503


def test_estimate_is_output_times_generations_plus_input_plus_held_context():
    budget = BudgetConfig(max_tokens_per_day=10**6, per_agent=False, reserve_tokens=100, server_context_tokens=1000)
    assert estimate(None, budget) == 100
    p = parser_for(DEFAULT_HOSTS, "api.openai.com", "/v1/responses")
    body = json.dumps({"model": "m", "max_output_tokens": 10, "n": 3, "previous_response_id": "r"}).encode()
    p.request_body(body)
    assert estimate(p, budget) == 10 * 3 + len(body) // 4 + 1000


# ------------------------------------------------------------------------------------------------ Credentials


def test_the_route_key_replaces_what_the_agent_sent_and_stays_out_of_the_record(g):
    c = connect(g, "api.openai.com")
    f = send(g, request(c, "/v1/chat/completions", "POST", b'{"model": "gpt-4o"}',
                        {"authorization": "Bearer sk-agent-own", "content-type": "application/json"}))
    assert f.request.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    rec = answer(g, f)
    assert OPENAI_KEY not in repr(rec) and "sk-agent-own" not in repr(rec)


def test_a_query_parameter_key_goes_to_its_route_only(g):
    c = connect(g, "generativelanguage.googleapis.com")
    f = send(g, request(c, "/v1beta/models/gemini-2.0-flash:generateContent?alt=sse", "POST", b"{}"))
    assert f.request.query["key"] == "AIza-STEP-SECRET" and f.request.query["alt"] == "sse"
    assert "AIza" not in repr(answer(g, f))
    plain = send(g, request(connect(g, "allowed.test"), "/v1beta/models/x:generateContent"))
    assert "key" not in plain.request.query and "authorization" not in plain.request.headers


# ------------------------------------------------------------------------------------------------ Capture


def test_small_bodies_are_left_to_mitmproxy_and_unknown_lengths_are_streamed_through_a_bounded_capture(g):
    c = connect(g, "allowed.test")
    small = send(g, request(c, "/", "POST", b"x" * 10))
    assert not small.request.stream and small.metadata[METADATA_KEY].req_capture is None
    chunked = request(c, "/", "POST", None, {"transfer-encoding": "chunked", "content-type": "application/json"})
    assert g.requestheaders(chunked) is None
    capture = chunked.metadata[METADATA_KEY].req_capture
    assert isinstance(capture, BodyCapture) and chunked.request.stream == capture.feed
    capture.feed(b"y" * 10_000)
    assert capture.wire_bytes == 10_000 and len(capture.captured) <= POLICY.gateways[0].capture.max_bytes


def test_an_event_stream_reaches_the_provider_parser_piece_by_piece(g):
    c = connect(g, "api.openai.com")
    f = send(g, request(c, "/v1/chat/completions", "POST", b'{"model":"gpt-4o","stream":true}'))
    f.response = tflow.tresp(status_code=200, headers=http.Headers(content_type="text/event-stream"), content=None)
    g.responseheaders(f)
    assert callable(f.response.stream)
    for piece in (b'data: {"id":"x","model":"m","choices":[{"index":0,"fini', b'sh_reason":"stop"}]}\n', b"\n"):
        f.response.stream(piece)
    assert f.metadata[METADATA_KEY].genai.result.finish_reasons == ["stop"]


# ------------------------------------------------------------------------------------------------ Recording


def test_every_transaction_is_recorded_once_and_leaves_its_flow(g):
    c = connect(g, "allowed.test")
    f = send(g, request(c, "/a?token=s3cret", headers={"authorization": "Bearer agent-secret"}))
    answer(g, f)
    g.response(f)  # a second end: nothing more
    assert len(g.rt.unsent) == 1 and METADATA_KEY not in f.metadata
    rec = g.rt.unsent[0]
    assert rec["status"] == 200 and rec["decision"][0] == "allow"
    assert "agent-secret" not in repr(rec) and "s3cret" not in repr(rec)



def test_a_secret_split_between_stream_pieces_is_redacted_beside_usage_counts(g):
    """The record's body is redacted whole, not piece by piece: a name cut by a chunk boundary is still seen,
    and the usage counts the pre-check passes over do not hide the secret next to them."""
    c = connect(g, "allowed.test")
    f = send(g, request(c, "/events"))
    body = b'data: {"usage": {"prompt_tokens": 3, "total_tokens": 5}, "access_token": "s3cr3t-value"}\n\n'
    f.response = tflow.tresp(status_code=200, headers=http.Headers(content_type="text/event-stream"), content=None)
    g.responseheaders(f)
    assert callable(f.response.stream)
    cut = body.index(b"_token") + 3  # between "_to" and "ken"
    for piece in (body[:cut], body[cut:], b""):
        f.response.stream(piece)
    g.response(f)
    captured = g.rt.unsent[-1]["resp_body"][1]
    assert captured == body.replace(b'"s3cr3t-value"', b'"[REDACTED]"')


def test_a_reload_that_changes_what_is_captured_applies_to_the_next_record(g):
    c = connect(g, "allowed.test")
    assert answer(g, send(g, request(c, "/")), body=b'{"a": 1}')["resp_body"] == (8, b'{"a": 1}', False)
    text_only = _doc("EgressGateway", "gw", {"otlp": {"captureBody": {"includeContentTypes": ["text/plain"]}}})
    g.rt.policy = compile_policy(text_only, *DOCS[1:], env={"K_OPENAI": OPENAI_KEY, "K_GEMINI": "AIza-STEP-SECRET"})
    assert answer(g, send(g, request(c, "/")), body=b'{"a": 1}')["resp_body"] == (8, None, False)
    assert answer(g, send(g, request(c, "/")), body=b"hello", ctype="text/plain")["resp_body"] == (5, b"hello", False)
    g.rt.policy = POLICY
    assert answer(g, send(g, request(c, "/")), body=b'{"a": 1}')["resp_body"] == (8, b'{"a": 1}', False)


def test_an_upstream_connection_refused_by_policy_is_recorded_as_policy_blocked(g):
    c = connect(g, "allowed.test")
    f = send(g, request(c))
    g.rt.blocked[c.client_conn.id] = msg = "clrk: connection to 10.0.0.1:443 is not allowed by policy"
    f.error = tflow.terr(msg)
    g.error(f)
    assert g.rt.unsent[-1]["error_type"] == "policy_blocked"


# ------------------------------------------------------------------------------------------------ Failsafe


def test_a_step_that_raises_leaves_a_denial_not_an_open_door(g, monkeypatch):
    def broken(self, flow):
        raise RuntimeError("boom")

    monkeypatch.setattr(EgressControl, "requestheaders", broken)
    f = send(_rebuilt(g), request(connect(g, "allowed.test")))
    assert denied(f)[0] == 500


def _rebuilt(g: Gateway) -> Gateway:
    """A Gateway on `g`'s runtime, its hooks taken from the steps as they are now (after a monkeypatch)."""
    return Gateway(g.rt)


def test_a_budgeted_call_never_admitted_is_denied_by_the_failsafe(g, monkeypatch):
    def broken(self, flow, tx, rule):
        raise RuntimeError("boom")

    monkeypatch.setattr(ProviderRouting, "_route_call", broken)
    gw = _rebuilt(g)
    c = connect(gw, "api.openai.com")
    f = send(gw, request(c, "/v1/chat/completions", "POST", b'{"model":"budget-a"}', {"content-type": "application/json"}))
    status, error = denied(f)
    assert status == 500 and "token budget" in error


def test_a_running_gateway_records_a_transaction_in_the_loops_next_turn_and_a_late_error_records_it_once(g):
    """Once running, the record is made after the response hook returns (mitmproxy then sends the answer): in
    the event loop's next turn, once; an error hook of the same flow before that turn records it itself."""
    async def run() -> None:
        g.recording._loop = asyncio.get_running_loop()  # what Recording.running sets
        c = connect(g, "allowed.test")
        f = send(g, request(c, "/a"))
        assert f.response is None and f.metadata[METADATA_KEY].decision.allow
        f.response = tflow.tresp(status_code=200, headers=http.Headers(content_length="2"), content=None)
        g.responseheaders(f)
        f.response.raw_content = b"{}"
        before = len(g.rt.unsent)
        g.response(f)
        assert len(g.rt.unsent) == before and METADATA_KEY in f.metadata  # not yet: the answer goes first
        await asyncio.sleep(0)
        assert len(g.rt.unsent) == before + 1 and METADATA_KEY not in f.metadata
        assert g.rt.unsent[-1]["status"] == 200 and g.rt.in_flight == 0

        f2 = send(g, request(c, "/b"))
        f2.response = tflow.tresp(status_code=200, headers=http.Headers(content_length="2"), content=b"{}")
        g.responseheaders(f2)
        g.response(f2)
        f2.error = flow.Error("client disconnected")
        g.error(f2)  # as the answer is written: recorded here, with its error
        assert len(g.rt.unsent) == before + 2 and g.rt.unsent[-1]["error"] == "client disconnected"
        await asyncio.sleep(0)
        assert len(g.rt.unsent) == before + 2  # the turn after finds it recorded
    asyncio.run(run())
