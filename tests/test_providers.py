"""Provider parsers on recorded bodies: classification, usage mapping, split-anywhere streams, truncation."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from clrk.providers import DEFAULT_HOSTS, parser_for
from clrk.providers.sse import SseParser
from tests.harness import provider_bodies as B


def run(host: str, path: str, status: int, ctype: str, pieces: list[bytes], request: dict | None = None):
    p = parser_for(DEFAULT_HOSTS, host, path)
    assert p is not None
    if request is not None:
        p.request_body(json.dumps(request).encode())
    p.response_headers(status, ctype)
    for piece in pieces:
        p.feed(piece)
    return p.end()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, prev = [], 0
    for c in points + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


# ------------------------------------------------------------------------------------------ classification


@pytest.mark.parametrize(
    "host,path,op,model",
    [
        ("api.openai.com", "/v1/chat/completions", "chat", None),
        ("api.openai.com", "/v1/responses", "chat", None),
        ("api.openai.com", "/v1/completions", "text_completion", None),
        ("api.openai.com", "/v1/embeddings", "embeddings", None),
        ("api.anthropic.com", "/v1/messages", "chat", None),
        ("api.anthropic.com", "/v1/complete", "text_completion", None),
        ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:generateContent", "chat", "gemini-2.0-flash"),
        ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", "chat", "gemini-2.0-flash"),
        ("generativelanguage.googleapis.com", "/v1beta/models/text-embedding-004:embedContent", "embeddings", "text-embedding-004"),
        ("generativelanguage.googleapis.com", "/v1beta/models/text-embedding-004:batchEmbedContents", "embeddings", "text-embedding-004"),
        ("api.openai.com", "/v1/models", None, None),
    ],
)
def test_classification(host, path, op, model):
    p = parser_for(DEFAULT_HOSTS, host, path)
    assert p.result.operation == op and p.result.request_model == model


def test_non_provider_hosts_are_not_classified_and_backends_are():
    assert parser_for(DEFAULT_HOSTS, "api.github.com", "/v1/chat/completions") is None
    p = parser_for({**DEFAULT_HOSTS, "llm.internal": "openai"}, "llm.internal", "/openai/v1/chat/completions")
    assert p.result.system == "openai" and p.result.operation == "chat"


# ------------------------------------------------------------------------------------------ OpenAI


def test_usage_past_64_bits_is_not_taken_and_the_record_still_encodes():
    """A token count no record field can carry (DuckDB BIGINT, msgpack, OTLP int64) is left out, not
    allowed to break the record it is in."""
    from clrk import wire

    body = B.openai_chat_json(prompt=2**70, completion=5)
    r = run("api.openai.com", "/v1/chat/completions", 200, "application/json", [body], {"model": "gpt-4o-mini"})
    assert r.input_tokens is None and r.output_tokens == 5
    wire.pack_record({"genai": r.attributes()})


def test_openai_chat_json():
    r = run("api.openai.com", "/v1/chat/completions", 200, "application/json", [B.openai_chat_json()], {"model": "gpt-4o-mini", "messages": []})
    a = r.attributes()
    assert a == {
        "gen_ai.system": "openai", "gen_ai.provider.name": "openai", "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.response.id": "chatcmpl-abc123", "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 5,
        "gen_ai.usage.cache_read.input_tokens": 4, "gen_ai.usage.reasoning.output_tokens": 2,
        "gen_ai.response.stream": False, "clrk.body.usage_visible": True,
    }


def test_openai_chat_stream_with_and_without_include_usage():
    r = run("api.openai.com", "/v1/chat/completions", 200, "text/event-stream", B.openai_chat_stream(), {"model": "gpt-4o-mini", "stream": True})
    assert (r.stream, r.input_tokens, r.output_tokens, r.finish_reasons, r.response_id, r.usage_visible) == (
        True, 12, 3, ["length"], "chatcmpl-stream1", True)
    r = run("api.openai.com", "/v1/chat/completions", 200, "text/event-stream", B.openai_chat_stream(usage=False), {"model": "m", "stream": True})
    assert r.usage_visible is False and r.input_tokens is None and r.finish_reasons == ["length"]


def test_openai_responses_json_and_stream():
    r = run("api.openai.com", "/v1/responses", 200, "application/json", [B.openai_responses_json()], {"model": "gpt-4o"})
    assert (r.operation, r.input_tokens, r.output_tokens, r.cache_read_tokens, r.reasoning_tokens, r.finish_reasons) == (
        "chat", 30, 8, 10, 3, ["completed"])
    r = run("api.openai.com", "/v1/responses", 200, "text/event-stream", B.openai_responses_stream(), {"model": "gpt-4o", "stream": True})
    assert (r.response_id, r.input_tokens, r.output_tokens, r.finish_reasons, r.stream) == ("resp_456", 21, 7, ["completed"], True)


def test_openai_embeddings_and_error():
    r = run("api.openai.com", "/v1/embeddings", 200, "application/json", [B.openai_embeddings_json()], {"model": "text-embedding-3-small", "input": ["a"]})
    assert (r.operation, r.input_tokens, r.output_tokens, r.response_model) == ("embeddings", 9, None, "text-embedding-3-small")
    r = run("api.openai.com", "/v1/chat/completions", 429, "application/json", [B.openai_error_json()])
    assert r.error_type == "rate_limit_exceeded" and not r.usage_visible


# ------------------------------------------------------------------------------------------ Anthropic


def test_anthropic_json_counts_cache_in_input():
    r = run("api.anthropic.com", "/v1/messages", 200, "application/json", [B.anthropic_message_json()], {"model": "claude-3-5-sonnet-latest"})
    assert (r.request_model, r.response_model, r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_creation_tokens, r.finish_reasons) == (
        "claude-3-5-sonnet-latest", "claude-3-5-sonnet-20241022", 60, 6, 30, 20, ["end_turn"])


def test_anthropic_stream_message_delta_is_cumulative():
    r = run("api.anthropic.com", "/v1/messages", 200, "text/event-stream", B.anthropic_message_stream(), {"model": "claude", "stream": True})
    assert (r.response_id, r.input_tokens, r.output_tokens, r.cache_read_tokens, r.finish_reasons, r.stream) == (
        "msg_stream1", 125, 15, 100, ["max_tokens"], True)


def test_anthropic_errors_json_and_in_stream():
    r = run("api.anthropic.com", "/v1/messages", 529, "application/json", [B.anthropic_error_json()])
    assert r.error_type == "overloaded_error"
    stream = B.anthropic_message_stream()[:3] + [B.sse([("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}})])]
    r = run("api.anthropic.com", "/v1/messages", 200, "text/event-stream", stream)
    assert r.error_type == "overloaded_error" and r.input_tokens == 125


# ------------------------------------------------------------------------------------------ Gemini


def test_gemini_json_output_includes_thoughts():
    r = run("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:generateContent", 200, "application/json", [B.gemini_generate_json()])
    assert (r.request_model, r.response_model, r.response_id, r.input_tokens, r.output_tokens, r.reasoning_tokens, r.cache_read_tokens, r.finish_reasons) == (
        "gemini-2.0-flash", "gemini-2.0-flash-001", "resp-gem-1", 11, 11, 7, 5, ["STOP"])


@pytest.mark.parametrize("path,ctype,pieces", [
    ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", "text/event-stream", B.gemini_sse()),
    ("/v1beta/models/gemini-2.0-flash:streamGenerateContent", "application/json", B.gemini_json_array_stream()),
])
def test_gemini_streams_take_the_last_running_total(path, ctype, pieces):
    r = run("generativelanguage.googleapis.com", path, 200, ctype, pieces)
    assert (r.stream, r.input_tokens, r.output_tokens, r.reasoning_tokens, r.finish_reasons) == (True, 8, 7, 4, ["MAX_TOKENS"])


def test_gemini_embeddings_and_error():
    r = run("generativelanguage.googleapis.com", "/v1beta/models/text-embedding-004:embedContent", 200, "application/json", [B.gemini_embed_json()])
    assert r.operation == "embeddings" and r.usage_visible is False
    r = run("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:generateContent", 400, "application/json", [B.gemini_error_json()])
    assert r.error_type == "INVALID_ARGUMENT"


# ------------------------------------------------------------------------------------------ streams split anywhere

RECORDED = {
    "openai-chat": ("api.openai.com", "/v1/chat/completions", "text/event-stream", b"".join(B.openai_chat_stream(eol="\r\n"))),
    "openai-responses": ("api.openai.com", "/v1/responses", "text/event-stream", b"".join(B.openai_responses_stream())),
    "anthropic": ("api.anthropic.com", "/v1/messages", "text/event-stream", b"".join(B.anthropic_message_stream())),
    "gemini-sse": ("generativelanguage.googleapis.com", "/v1beta/models/g:streamGenerateContent", "text/event-stream", b"".join(B.gemini_sse())),
    "gemini-array": ("generativelanguage.googleapis.com", "/v1beta/models/g:streamGenerateContent", "application/json", b"".join(B.gemini_json_array_stream())),
}


@given(name=st.sampled_from(sorted(RECORDED)), cuts=st.lists(st.integers(0, 5000), max_size=40))
@settings(max_examples=400, deadline=None)
def test_usage_is_identical_however_the_stream_is_split(name, cuts):
    host, path, ctype, body = RECORDED[name]
    whole = run(host, path, 200, ctype, [body])
    pieces = run(host, path, 200, ctype, split(body, cuts))
    assert whole.usage_visible
    assert pieces.attributes() == whole.attributes()


def test_sse_parser_edge_cases():
    p = SseParser()
    events = p.feed(b": comment\r\nevent: a\r\ndata: 1\r\ndata:2\r\n\r\ndata: x\r")
    assert events == [("a", "1\n2")]
    assert p.feed(b"\n\r\n") == [("", "x")]  # the CR and LF of one CRLF arrived apart
    assert p.feed(b"event: empty\n\n") == []  # no data: nothing dispatched
    assert p.feed(b"data\n\n") == [("", "")]


def test_sse_parser_bounds_an_endless_line():
    from clrk.providers import sse

    p = SseParser()
    for _ in range(10):
        p.feed(b"x" * (sse.MAX_LINE // 4))
    assert p.dropped_lines >= 1 and len(p._buf) <= sse.MAX_LINE
    assert p.feed(b"\ndata: ok\n\n") == [("", "ok")]


# ------------------------------------------------------------------------------------------ bounded memory


def test_usage_is_read_from_a_json_body_far_larger_than_the_parse_limit():
    from clrk.providers.base import JSON_PARSE_LIMIT

    body = B.openai_chat_json(content="z" * (5 * 1024 * 1024))
    assert len(body) > 4 * JSON_PARSE_LIMIT
    p = parser_for(DEFAULT_HOSTS, "api.openai.com", "/v1/chat/completions")
    p.response_headers(200, "application/json")
    for i in range(0, len(body), 16384):
        p.feed(body[i:i + 16384])
        assert len(p._body) + len(p._tail) <= JSON_PARSE_LIMIT + 16384
    r = p.end()
    assert (r.input_tokens, r.output_tokens, r.cache_read_tokens, r.usage_visible) == (12, 5, 4, True)


def test_a_body_cut_mid_way_still_reports_what_it_saw():
    body = b"".join(B.anthropic_message_stream())
    cut = body[: body.index(b"event: message_delta")]
    r = run("api.anthropic.com", "/v1/messages", 200, "text/event-stream", [cut])
    assert r.input_tokens == 125 and r.output_tokens == 1 and r.usage_visible


@given(st.binary(max_size=3000), st.sampled_from(sorted(RECORDED)))
@settings(max_examples=300, deadline=None)
def test_garbage_never_raises(data, name):
    host, path, ctype, _ = RECORDED[name]
    p = parser_for(DEFAULT_HOSTS, host, path)
    p.request_body(data)
    p.response_headers(200, ctype)
    p.feed(data)
    p.end()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _outcome(fn, data):
    try:
        return "ok", repr(fn(data))
    except Exception as e:  # noqa: BLE001 — which error it is, is what is compared
        return "error", type(e).__name__


@settings(max_examples=400, deadline=None)
@example(b'{"a": 1, "a": 2}')
@example(b'[1E400, -0, -0.0, 1e-400]')
@example(b'\xef\xbb\xbf{"bom": 1}')
@example(b'"\\ud800"')
@example(b'[' * 5000 + b']' * 5000)
@given(st.one_of(
    _json_values.map(lambda v: json.dumps(v).encode()),  # valid JSON, NaN and Infinity included
    _json_values.map(lambda v: json.dumps(v).encode("utf-16")),
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.integers(min_value=2**63, max_value=2**80).map(lambda n: b'{"n": %d}' % n),
))
def test_provider_json_parsing_is_exactly_json_loads(data):
    """Bodies are parsed with orjson for speed; whatever it refuses goes to json.loads. The outcome — the value,
    or the kind of error — must be json.loads's for any input."""
    from clrk.providers.base import loads

    assert _outcome(loads, data) == _outcome(json.loads, data)
    assert _outcome(loads, data.decode("latin-1")) == _outcome(json.loads, data.decode("latin-1"))
