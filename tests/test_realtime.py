"""Realtime model events (clrk/providers/realtime.py), the WebSocket message capture and the handshake decision
for a model named later — in process, no gateway."""

from __future__ import annotations

import base64
import json

import pytest
from mitmproxy.proxy.layers import websocket as mitm_ws

import clrk.proxy.gateway  # noqa: F401 - installs the session layer
from clrk.decision import AuthResult, RequestFacts, decide
from clrk.policy.compiled import CaptureConfig
from clrk.providers.realtime import GeminiLiveParser, OpenAIRealtimeParser, realtime_parser
from clrk.proxy.steps.websocket import MessageCapture, SessionLayer, close_reason
from clrk.redact import DEFAULT
from tests.harness.gateway import agent_docs
from tests.harness.util import compile_policy


def j(doc) -> bytes:
    return json.dumps(doc).encode()


def done(rid: str, inp, out, cached=None, status="completed") -> bytes:
    usage = {"input_tokens": inp, "output_tokens": out}
    if cached is not None:
        usage["input_token_details"] = {"cached_tokens": cached}
    return j({"type": "response.done", "response": {"id": rid, "status": status, "usage": usage}})


def test_endpoints_are_recognised_by_schema_and_path():
    assert isinstance(realtime_parser("openai", "/v1/realtime?model=gpt-realtime"), OpenAIRealtimeParser)
    assert isinstance(realtime_parser("openai", "/openai/realtime?api-version=2025-04-01&deployment=rt-dep"), OpenAIRealtimeParser)
    live = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key=x"
    assert isinstance(realtime_parser("google_genai", live), GeminiLiveParser)
    assert realtime_parser("openai", "/v1/chat/completions") is None
    assert realtime_parser("google_genai", "/v1/realtime") is None
    assert realtime_parser("anthropic", "/v1/realtime") is None
    assert realtime_parser("openai", "/openai/realtime?deployment=rt-dep").result.request_model == "rt-dep"
    assert realtime_parser("openai", "/v1/realtime?model=gpt-realtime").result.operation == "realtime"


def test_openai_usage_is_summed_over_every_response_done():
    p = realtime_parser("openai", "/v1/realtime?model=gpt-realtime")
    assert p.server_message(j({"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}})) == 0
    assert p.client_message(j({"type": "input_audio_buffer.append", "audio": "A" * 10000})) == 0
    assert p.server_message(done("r1", 100, 40, cached=30)) == 140
    assert p.server_message(j({"type": "response.output_audio.delta", "delta": "response.done"})) == 0
    assert p.server_message(done("r2", 10, 5, status="cancelled")) == 15
    r = p.result
    assert (r.input_tokens, r.output_tokens, r.cache_read_tokens) == (110, 45, 30)
    assert (r.response_id, r.finish_reasons, r.usage_visible) == ("r2", ["completed", "cancelled"], True)
    assert (r.request_model, r.response_model) == ("gpt-realtime", "gpt-realtime-2025-08-28")
    attrs = r.attributes()
    assert attrs["gen_ai.operation.name"] == "realtime" and attrs["gen_ai.usage.input_tokens"] == 110


def test_openai_session_update_names_the_model():
    p = realtime_parser("openai", "/v1/realtime")
    assert p.result.request_model is None
    p.client_message(j({"type": "session.update", "session": {"type": "realtime", "model": "gpt-realtime-mini"}}))
    assert p.result.request_model == "gpt-realtime-mini"


def test_gemini_live_model_from_setup_and_usage_per_turn():
    p = realtime_parser("google_genai", "/ws/x.GenerativeService.BidiGenerateContent")
    p.client_message(j({"setup": {"model": "models/gemini-live-2.5-flash", "generationConfig": {}}}))
    assert p.result.request_model == "gemini-live-2.5-flash"
    p.client_message(j({"setup": {"model": "models/other"}}))  # only the first setup names it
    assert p.result.request_model == "gemini-live-2.5-flash"
    turn = {"promptTokenCount": 20, "responseTokenCount": 7, "thoughtsTokenCount": 3, "cachedContentTokenCount": 4,
            "toolUsePromptTokenCount": 2}
    assert p.server_message(j({"serverContent": {"turnComplete": True}, "usageMetadata": turn})) == 32
    assert p.server_message(j({"usageMetadata": turn})) == 32
    r = p.result
    assert (r.input_tokens, r.output_tokens, r.cache_read_tokens, r.reasoning_tokens) == (44, 20, 8, 6)


@pytest.mark.parametrize("data", [
    b'{"type": "response.done", "response": {"usage": {"input_tokens": true, "output_tokens": "9"}}}',
    b'{"type": "response.done", "response": [1, 2]}',
    b'{"type": "response.done"',  # cut off
    b'[' * 100000 + b'"response.done"',  # nested past any parser's depth
    b'\xff\xfe"response.done"',
    b'{"type": "response.done", "response": {"usage": {"input_tokens": 99999999999999999999999}}}',
])
def test_hostile_events_never_raise_nor_charge(data):
    p = realtime_parser("openai", "/v1/realtime?model=m")
    assert p.server_message(data) == 0
    assert p.result.input_tokens in (None, 0)


def test_negative_counts_do_not_refund_the_budget():
    p = realtime_parser("openai", "/v1/realtime?model=m")
    assert p.server_message(done("r", -1000, 5)) == 5


def test_session_totals_stay_within_what_a_record_holds():
    """Every report is a valid int64, but a session's sum of them need not be: the totals stop at the bound."""
    p = realtime_parser("openai", "/v1/realtime?model=m")
    for i in range(3):
        p.server_message(done(f"r{i}", 2**63 - 10, 2**63 - 10, cached=2**63 - 10))
    r = p.result
    assert r.input_tokens == r.output_tokens == r.cache_read_tokens == 2**63 - 1


class _Gateway:
    """What MessageCapture reads of a gateway: its capture settings and redactor."""

    def __init__(self, types=("application/json",)):
        self.capture = CaptureConfig(4096, frozenset(types), ())
        self.redactor = DEFAULT


def test_capture_keeps_json_messages_redacted_one_per_line_and_stops_at_the_limit():
    gw = _Gateway()
    cap = MessageCapture(80)
    cap.add(b'{"type":"session.update","api_key":"sk-SECRET"}', True, gw)
    cap.add(b"not json", True, gw)  # text/plain: not wanted by default
    cap.add(b'{"type":"x"}', False, gw)  # binary JSON (Gemini): base64 of the redacted bytes
    cap.add(b'{"type":"' + b"y" * 200 + b'"}', True, gw)
    out = cap.captured()
    assert len(out) <= 80 and cap.truncated
    lines = out.split(b"\n")
    assert lines[0] == b'{"type":"session.update","api_key":"[REDACTED]"}'
    assert lines[1] == b"base64:" + base64.b64encode(b'{"type":"x"}')
    assert b"sk-SECRET" not in out
    out.decode()  # always text


def test_capture_never_cuts_a_character_and_wants_its_media_type():
    gw = _Gateway(types=("text/plain",))
    cap = MessageCapture(10)
    cap.add("ééééééé".encode(), True, gw)  # 14 bytes
    assert cap.captured() == "ééééé".encode() and cap.truncated
    cap2 = MessageCapture(100)
    cap2.add(b'{"a":1}', True, gw)
    assert cap2.captured() is None and not cap2.truncated


def test_close_reasons_fit_a_close_frame():
    assert close_reason("short") == "short"
    long = "clrk: " + "é" * 200
    assert len(close_reason(long).encode()) <= 123
    close_reason(long).encode().decode()


def test_the_session_layer_is_what_mitmproxy_creates():
    # mitmproxy's HTTP layer creates `websocket.WebsocketLayer(...)` by module attribute; if an upgrade changes
    # that, the gateway would keep every message again.
    assert mitm_ws.WebsocketLayer is SessionLayer
    import inspect

    from mitmproxy.proxy.layers import http as mitm_http

    assert "websocket.WebsocketLayer(self.context, self.flow)" in inspect.getsource(mitm_http)


def test_a_rule_with_models_allows_a_handshake_whose_model_comes_later_and_judges_it_then():
    def doc(kind, name, spec, ns=None):
        return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind,
                "metadata": {"name": name, **({"namespace": ns} if ns else {})}, "spec": spec}

    gateway = {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "EgressGateway", "metadata": {"name": "gw"},
               "spec": {"defaultPolicy": "deny-all"}}
    policy = compile_policy(gateway, agent_docs()[0],
                            doc("AIProviderRoute", "live", {"rules": [{"matches": [{"provider": "google_genai",
                                                                                    "models": ["gemini-live-*"]}]}]},
                                ns="team-a"))
    gw = policy.gateways[0]
    agent = policy.agents["team-a.researcher"][0]
    host = "generativelanguage.googleapis.com"
    path = "/ws/x.GenerativeService.BidiGenerateContent"

    def facts(model, later):
        return RequestFacts(host, 443, "GET", path, provider="google_genai", provider_names=("google_genai",),
                            model=model, model_later=later)

    assert not decide(policy, gw, AuthResult(agent), facts(None, False)).allow  # no model, judged now: no
    d = decide(policy, gw, AuthResult(agent), facts(None, True))
    assert d.allow and "judged when the session names it" in d.reason
    assert decide(policy, gw, AuthResult(agent), facts("gemini-live-2.5", False)).allow
    assert not decide(policy, gw, AuthResult(agent), facts("gemini-ultra", False)).allow
