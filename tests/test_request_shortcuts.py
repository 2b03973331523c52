"""The request side's shortcuts (what is remembered instead of worked out per request) give the answers the
long way gives, and never an answer of a policy that has been replaced: a reload between a provider call's
headers and its body, an agent revoked and reinstated mid-tunnel, agents that share an id's slot, hostile
lengths, the one-draw trace ids' rare branch."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from mitmproxy import http

from clrk import identity
from clrk.decision import AuthResult, RequestFacts, decide
from clrk.hostnames import request_target
from clrk.memo import LONGEST
from clrk.policy.compiled import AgentIdentity
from clrk.proxy.gateway import Gateway
from clrk.proxy.transaction import METADATA_KEY
from tests.harness.util import compile_policy
from tests.test_steps import DOCS, OPENAI_KEY, POLICY, _doc, connect, denied, request, send
from tests.test_steps import g as _g

ONLY_MINI = _doc("AIProviderRoute", "openai", {"rules": [
    {"matches": [{"provider": "openai", "models": ["gpt-4o-mini"]}]}]}, ns="team-a")


g = pytest.fixture(_g.__wrapped__, name="g")  # the step tests' gateway: the bench-like policy, a loaded ledger

TEAM_A_ONLY = _doc("AIProviderRoute", "openai", {"sourceAgents": {"namespaces": ["team-a"]}, "rules": [
    {"matches": [{"provider": "openai", "models": ["gpt-4o"]}]}]}, ns="team-a")


def _call(c: http.HTTPFlow, model: str) -> http.HTTPFlow:
    return request(c, "/v1/chat/completions", "POST", json.dumps({"model": model}).encode(),
                   headers={"content-type": "application/json"})


def _facts(model: str | None, path: str = "/v1/chat/completions") -> RequestFacts:
    return RequestFacts("api.openai.com", 443, "POST", path, provider="openai",
                        provider_names=POLICY.provider_names_by_host["api.openai.com"], model=model)


def test_a_reload_between_headers_and_body_is_decided_by_the_new_policy(g: Gateway):
    c = connect(g, "api.openai.com")
    assert send(g, _call(c, "gpt-4o")).response is None  # allowed (and remembered) under POLICY
    f = _call(c, "gpt-4o")
    assert g.requestheaders(f) is None and f.metadata[METADATA_KEY].decision is None  # the model is pending
    g.rt.policy = compile_policy(*[d for d in DOCS if d["metadata"]["name"] != "openai"], ONLY_MINI,
                                 env={"K_OPENAI": OPENAI_KEY, "K_GEMINI": "x"})
    f.request.raw_content = f.metadata["body"]
    assert g.request(f) is None
    status, text = denied(f)
    assert status == 403 and "no AIProviderRoute rule matches openai model gpt-4o" in text
    assert "authorization" not in f.request.headers  # no key went on a denied call
    f2 = _call(c, "gpt-4o-mini")
    assert send(g, f2).response is None and f2.request.headers["authorization"] == f"Bearer {OPENAI_KEY}"


def test_an_agent_revoked_mid_tunnel_then_reinstated_is_judged_under_each_policy(g: Gateway):
    c = connect(g, "allowed.test")
    assert send(g, request(c)).response is None
    g.rt.policy = compile_policy(DOCS[0], DOCS[2])  # the agent is gone
    assert denied(send(g, request(c)))[0] == 407
    assert denied(send(g, request(c)))[0] == 407  # still refused: the remembered answer is the revocation
    g.rt.policy = POLICY  # back (the same token)
    assert send(g, request(c)).response is None
    rekeyed = dict(DOCS[1], spec={"credentials": {"tokenSha256": "0" * 64}})
    g.rt.policy = compile_policy(DOCS[0], rekeyed, DOCS[2])  # the same name, another token
    assert denied(send(g, request(c)))[0] == 407


def test_two_host_headers_are_refused_and_one_host_takes_the_short_path(g: Gateway):
    c = connect(g, "allowed.test")
    f = request(c)
    f.request.headers.add("Host", "evil.test")
    status, text = denied(send(g, f))
    assert status == 403 and "2 Host headers" in text
    f = request(c, host="allowed.test:443")
    assert send(g, f).response is None
    f = request(c, host="allowed.test:8443")
    assert denied(send(g, f))[0] == 403


@pytest.mark.parametrize("host,expect", [
    ("ok.com:8443", ("ok.com", 8443, None)), ("ok.com:", ("ok.com", 443, None)), ("OK.COM", ("ok.com", 443, None)),
    ("ok.com:0", "is not a host name"), ("ok.com:08443x", "is not a host name"), ("ok.comx", ("ok.comx", 443, None)),
    ("", "is not a host name"), ("ok.com:\u0661", "is not a host name"), ("ok.com@evil.com", "is not a host name"),
])
def test_one_host_field_is_read_as_a_list_of_names_would_be(host, expect):
    got = request_target("ok.com", 443, "", [host], "/x", "GET")
    if isinstance(expect, tuple):
        assert got == expect
    else:
        assert got[:2] == (None, None) and expect in got[2]


def test_provider_answers_are_the_policy_s_and_per_agent():
    p = compile_policy(DOCS[0], DOCS[1], TEAM_A_ONLY)
    bot = p.agents["team-a.bot"][0]
    d1 = decide(p, p.gateways[0], AuthResult(bot), _facts("gpt-4o"))
    assert d1 is not None and d1.allow and d1.rule.endswith("#rules[0]")
    assert decide(p, p.gateways[0], AuthResult(bot), _facts("gpt-4o")) is d1  # remembered
    # Another agent (not in the selector's namespace), asked the same: its own answer, not bot's.
    other = AgentIdentity("team-b", "bot", "Agent", None, None, {})
    d2 = decide(p, p.gateways[0], AuthResult(other), _facts("gpt-4o"))
    assert d2 is not None and not d2.allow and d2.rule == "EgressGateway/gw/defaultPolicy"
    # A policy made from it (replace) starts with an empty memory: its own rules decide.
    q = dataclasses.replace(p, provider_rules=())
    assert q.provider_answers == {} and q.provider_rules_for(bot) == ()
    d3 = decide(q, q.gateways[0], AuthResult(bot), _facts("gpt-4o"))
    assert d3 is not None and not d3.allow


def test_an_agent_s_answer_is_not_given_to_another_in_its_slot():
    p = compile_policy(DOCS[0], DOCS[1], TEAM_A_ONLY)
    bot = p.agents["team-a.bot"][0]
    p.provider_rules_for(bot)
    key = id(bot)
    impostor = AgentIdentity("team-b", "bot", "Agent", None, None, {})
    # What a reused id would look like: the memory's entry for `key` holds another agent than the one asking.
    p._agent_rules[id(impostor)] = (bot, p.provider_rules)
    assert p.provider_rules_for(impostor) == ()
    assert p._agent_rules[key][0] is bot


def test_long_models_and_paths_are_decided_but_never_kept():
    p = POLICY
    bot = p.agents["team-a.bot"][0]
    before = len(p.provider_answers)
    long_model = "budget-" + "x" * LONGEST
    d = decide(p, p.gateways[0], AuthResult(bot), _facts(long_model))
    assert d is not None and d.allow and d.rule.endswith("#rules[1]") and long_model in d.reason
    d = decide(p, p.gateways[0], AuthResult(bot), _facts("gpt-4o" + "x" * LONGEST))
    assert d is not None and not d.allow
    d = decide(p, p.gateways[0], AuthResult(bot), _facts("gpt-4o", "/v1/chat/completions/" + "y" * LONGEST))
    assert d is not None and d.allow and d.rule.endswith("#rules[0]")
    assert len(p.provider_answers) == before


def test_a_flood_of_models_keeps_the_memory_bounded():
    p = compile_policy(*DOCS, env={"K_OPENAI": OPENAI_KEY, "K_GEMINI": "x"})
    bot = p.agents["team-a.bot"][0]
    for i in range(5000):
        d = decide(p, p.gateways[0], AuthResult(bot), _facts(f"budget-{i}"))
        assert d is not None and d.allow and d.rule.endswith("#rules[1]") and f"budget-{i}" in d.reason
    assert len(p.provider_answers) <= 4096


def test_trace_and_span_ids_from_one_draw():
    seen = set()
    for _ in range(200):
        t = identity.trace_context(None)
        assert re.fullmatch(r"[0-9a-f]{32}", t.trace_id) and t.trace_id != "0" * 32
        assert re.fullmatch(r"[0-9a-f]{16}", t.span_id) and t.span_id != "0" * 16
        assert t.parent_span_id is None and t.flags == "01"
        seen.add(t.trace_id)
    assert len(seen) == 200


@pytest.mark.parametrize("draw", [0, 1 << 64, 1])  # all zero; a zero span; a zero trace
def test_an_all_zero_trace_or_span_id_is_drawn_again(monkeypatch, draw):
    draws = iter([draw])
    real = identity.randbytes
    monkeypatch.setattr(identity, "randbytes", lambda n: next(draws).to_bytes(24, "big") if n == 24 else real(n))
    t = identity.trace_context(None)
    assert t.trace_id != "0" * 32 and t.span_id != "0" * 16
    assert len(t.trace_id) == 32 and len(t.span_id) == 16


def test_mcp_and_websocket_requests_still_get_their_steps(g: Gateway):
    c = connect(g, "allowed.test")
    f = request(c, headers={"mcp-protocol-version": "2025-06-18"})
    assert g.requestheaders(f) is None and f.metadata[METADATA_KEY].mcp is not None
    f = request(c, headers={"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
                            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-extensions": "x"})
    assert g.requestheaders(f) is None and f.metadata[METADATA_KEY].websocket
    assert "sec-websocket-extensions" not in f.request.headers


def test_requestheaders_skips_only_the_upgrade_step_and_keeps_the_order(g: Gateway):
    every = g.steps["requestheaders"]
    assert g._rh_first is every[0] and g._rh_rest == every[1:]
    assert g._rh_no_upgrade == tuple(s for s in every[1:] if s != g.websocket.requestheaders)
    assert g.failsafe.requestheaders in g._rh_no_upgrade and g._rh_no_upgrade[-1] == g.failsafe.requestheaders


def test_an_upgrade_header_in_any_case_still_gets_the_websocket_step(g: Gateway):
    c = connect(g, "allowed.test")
    f = request(c)
    for name, value in ((b"UPGRADE", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Version", b"13"),
                        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"Sec-WebSocket-Extensions", b"x")):
        f.request.headers.fields += ((name, value),)
    assert g.requestheaders(f) is None and f.metadata[METADATA_KEY].websocket
    assert "sec-websocket-extensions" not in f.request.headers


def test_a_first_step_that_raises_cannot_let_a_request_upstream(monkeypatch):
    from clrk.proxy.steps.auth import ProxyAuth

    def boom(self, flow):
        raise RuntimeError("hostile input")

    monkeypatch.setattr(ProxyAuth, "requestheaders", boom)
    gw = _g.__wrapped__()
    c = connect(gw, "allowed.test")
    f = request(c, headers={"upgrade": "websocket", "sec-websocket-extensions": "x"})
    send(gw, f)
    status, text = denied(f)
    assert status == 500 and "could not decide" in text  # the Failsafe, last, ran


@pytest.mark.parametrize("upgrade", [False, True])
def test_the_steps_after_a_first_step_that_waits_run_once_it_is_done(monkeypatch, upgrade):
    import asyncio

    from clrk.proxy.steps.auth import ProxyAuth

    real = ProxyAuth.requestheaders
    waited = []

    async def wait():
        await asyncio.sleep(0)
        waited.append(True)

    def waits(self, flow):
        assert real(self, flow) is None
        return wait()

    monkeypatch.setattr(ProxyAuth, "requestheaders", waits)
    gw = _g.__wrapped__()
    c = connect(gw, "allowed.test")
    extra = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
             "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-extensions": "x"} if upgrade else {}
    f = request(c, headers=extra)
    pending = gw.requestheaders(f)
    tx = f.metadata[METADATA_KEY]
    assert pending is not None and tx.decision is None  # nothing after the first step ran yet
    asyncio.run(pending)
    assert waited and tx.decision is not None and tx.decision.allow and f.response is None
    if upgrade:  # the WebSocket step ran too, after the wait
        assert tx.websocket and "sec-websocket-extensions" not in f.request.headers


@pytest.mark.parametrize("h", [
    {}, {"content-length": "0"}, {"content-length": ""}, {"content-length": "80"}, {"content-length": " 80"},
    {"content-length": "-1"}, {"content-length": "+5"}, {"content-length": "1e3"}, {"content-length": "٣"},
    {"content-length": str(32 * 1024 * 1024)}, {"content-length": str(32 * 1024 * 1024 + 1)}, {"content-length": "9" * 400},
    {"transfer-encoding": "chunked"}, {"transfer-encoding": "chunked", "content-length": "5"},
    {"transfer-encoding": "", "content-length": "0"}, {"content-length": "00"}, {"content-length": "5, 5"},
])
def test_buffered_as_provider_is_request_is_buffered(h):
    from clrk.proxy.capture import request_is_buffered
    from clrk.proxy.transaction import Transaction

    tx = Transaction(0.0, identity.trace_context(None))
    tx.req_h = h
    assert tx.buffered_as_provider() is request_is_buffered(h, provider=True)
    assert tx.buffered_as_provider() is request_is_buffered(h, provider=True)  # and once remembered


def test_request_skips_only_the_encoded_body_step_and_keeps_the_order(g: Gateway):
    every = g.steps["request"]
    assert g._plain_body == tuple(s for s in every if s not in (g.capture.request, g.websocket.request))
    assert g._plain_body[-1] == g.failsafe.request


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", None])
def test_an_encoded_request_body_is_still_captured_and_a_plain_one_is_left_to_the_record(g: Gateway, encoding):
    import gzip

    c = connect(g, "allowed.test")
    plain = b'{"hello": "world"}'
    headers = {"content-type": "application/json"}
    if encoding:
        headers["content-encoding"] = encoding
    f = send(g, request(c, "/upload", "POST", gzip.compress(plain) if encoding else plain, headers))
    tx = f.metadata[METADATA_KEY]
    assert f.response is None and tx.decision.allow
    if encoding:
        assert tx.req_capture is not None and bytes(tx.req_capture.captured) == plain
    else:
        assert tx.req_capture is None  # summarised from mitmproxy's bytes when the record is made


def _two_gateways(a: int, b: int):
    from tests.test_steps import DOCS as STEP_DOCS

    def gw(name: str, port: int) -> dict:
        return _doc("EgressGateway", name, {"listeners": [
            {"name": "l", "port": port, "protocol": "TLS", "tls": {"mode": "Terminate"}}]})

    return compile_policy(gw("gw-a", a), gw("gw-b", b), STEP_DOCS[1], STEP_DOCS[2])


def test_a_tunnel_s_gateway_is_the_one_its_listener_has_under_each_policy(g: Gateway):
    g.rt.policy = first = _two_gateways(8080, 8081)
    c = connect(g, "allowed.test")
    c.client_conn.sockname = ("127.0.0.1", 8080)
    f = send(g, request(c))
    assert f.response is None and f.metadata[METADATA_KEY].gateway.name == "gw-a"
    g.rt.policy = _two_gateways(8081, 8080)  # the listener's port now belongs to the other gateway
    f = send(g, request(c))
    assert f.response is None and f.metadata[METADATA_KEY].gateway.name == "gw-b"
    g.rt.policy = _two_gateways(8082, 8081)  # no gateway listens there any more
    status, text = denied(send(g, request(c)))
    assert status == 403 and "no EgressGateway listens on this port" in text
    g.rt.policy = first
    f = send(g, request(c))
    assert f.response is None and f.metadata[METADATA_KEY].gateway.name == "gw-a"


def test_host_claims_remembered_give_the_same_answers_and_stay_bounded():
    from clrk import hostnames

    names = ["ok.com:8443", "ok.com:", "OK.COM", "ok.com:0", "", "ok.com@evil.com", "ok.com:\u0661", "x" * 600 + ":1"]
    first = [request_target("ok.com", 443, "", [n], "/x", "GET") for n in names]
    again = [request_target("ok.com", 443, "", [n], "/x", "GET") for n in names]
    assert first == again and first[0] == ("ok.com", 8443, None) and first[3][:2] == (None, None)
    assert ("x" * 600 + ":1", "ok.com", 443) not in hostnames._CLAIMS  # a long name is judged, never kept
    assert request_target("ok.com", 80, "", ["ok.com:8443"], "/x", "GET") == ("ok.com", 8443, None)
    assert request_target("ok.com", 80, "", ["OK.COM"], "/x", "GET") == ("ok.com", 80, None)  # the port is in the key
    for i in range(hostnames.LIMIT + 10):  # a flood of distinct names: the memory starts over, never grows past it
        request_target("ok.com", 443, "", [f"ok.com:{i % 65535 + 1}{'' if i < 65535 else 'x'}"], "/x", "GET")
        request_target("ok.com", 443, "", [f"h{i}.test"], "/x", "GET")
    assert len(hostnames._CLAIMS) <= hostnames.LIMIT
