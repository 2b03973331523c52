"""Providers as translators: what each says to change in a request (a Backend's model rewrite, usage in a
stream) comes back as values, the request as parsed stays untouched, and the body edit re-encodes only the
members that change. Adding a provider is one module plus one registry line."""

from __future__ import annotations

import json

import pytest

from clrk.providers import DEFAULT_HOSTS, NO_CHANGES, REGISTRY, ProviderParser, RequestChanges, parser_for
from clrk.providers.base import JSON_PARSE_LIMIT
from clrk.providers.shallow import MAX_TOKENS, Elided, members

OPENAI, ANTHROPIC, GEMINI = "api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"


def parsed(host: str, path: str, body: bytes | dict) -> ProviderParser:
    p = parser_for(DEFAULT_HOSTS, host, path)
    assert p is not None
    p.request_body(body if isinstance(body, bytes) else json.dumps(body).encode())
    return p


# An agent's own spelling: spaces, escapes, key order. Only what changes may differ in the rewritten body.
CHAT_STREAM = (b'{ "model" : "gpt-4o",\n  "messages": [{"role": "user", "content": "caf\\u00e9 \\"q\\""}],\n'
               b'  "stream": true, "temperature": 0.70 }')


def test_openai_stream_usage_is_a_change_returned_not_made():
    p = parsed(OPENAI, "/v1/chat/completions", CHAT_STREAM)
    before = json.loads(CHAT_STREAM)
    changes = p.request_changes(stream_usage=True)
    assert changes == RequestChanges(None, {"stream_options": {"include_usage": True}})
    assert p.request_doc == before  # the parsed request is as the agent sent it
    body = p.changed_body(changes.members)
    assert json.loads(body) == {**before, "stream_options": {"include_usage": True}}
    # Every member the change does not name is byte for byte the agent's (the escapes, the 0.70).
    for key, (a, b, _) in members(CHAT_STREAM).items():
        assert CHAT_STREAM[a:b] in body, key


@pytest.mark.parametrize("path,body,why", [
    ("/v1/chat/completions", {"model": "m", "stream": True, "stream_options": {"include_usage": True}}, "asked already"),
    ("/v1/chat/completions", {"model": "m"}, "not a stream"),
    ("/v1/chat/completions", {"model": "m", "stream": "true"}, "not a stream to the API either"),
    ("/v1/responses", {"model": "m", "stream": True}, "the Responses API always reports usage"),
    ("/v1/embeddings", {"model": "m", "stream": True}, "not a call that streams usage"),
])
def test_openai_asks_for_nothing_it_does_not_need(path, body, why):
    assert parsed(OPENAI, path, body).request_changes(stream_usage=True) is NO_CHANGES, why


def test_openai_stream_options_the_agent_set_are_kept():
    p = parsed(OPENAI, "/v1/completions", {"model": "m", "stream": True, "stream_options": {"x": 1, "include_usage": False}})
    assert p.request_changes(stream_usage=True).members == {"stream_options": {"x": 1, "include_usage": True}}


def test_model_rewrite_and_stream_usage_together():
    p = parsed(OPENAI, "/v1/chat/completions", CHAT_STREAM)
    changes = p.request_changes("gpt-4o-mini", stream_usage=True)
    assert changes.path is None
    assert changes.members == {"model": "gpt-4o-mini", "stream_options": {"include_usage": True}}
    assert p.result.request_model == "gpt-4o"  # the record keeps what the agent asked for
    out = json.loads(p.changed_body(changes.members))
    assert out["model"] == "gpt-4o-mini" and out["stream_options"] == {"include_usage": True}


def test_a_body_without_a_model_member_gets_none():
    assert parsed(OPENAI, "/v1/chat/completions", {"messages": []}).request_changes("other") is NO_CHANGES
    assert parsed(ANTHROPIC, "/v1/messages", b"not json").request_changes("other", stream_usage=True) is NO_CHANGES


def test_anthropic_rewrites_the_model_and_needs_no_asking_for_usage():
    p = parsed(ANTHROPIC, "/v1/messages", {"model": "claude-x", "stream": True, "max_tokens": 5})
    assert p.request_changes(stream_usage=True) is NO_CHANGES
    assert p.request_changes("claude-y", stream_usage=True) == RequestChanges(None, {"model": "claude-y"})


@pytest.mark.parametrize("path,expected", [
    ("/v1beta/models/gemini-a:generateContent", "/v1beta/models/gemini-b:generateContent"),
    # The path only: the query is the request's to keep (routing applies the path before it).
    ("/v1beta/models/gemini-a:streamGenerateContent?alt=sse&x=/models/q:z", "/v1beta/models/gemini-b:streamGenerateContent"),
    ("/v1beta/tunedModels/gemini-a:generateContent?", "/v1beta/tunedModels/gemini-b:generateContent"),
])
def test_gemini_names_the_model_in_the_path_and_leaves_the_body(path, expected):
    p = parsed(GEMINI, path, {"model": "in-the-body", "contents": []})
    assert p.request_changes("gemini-b", stream_usage=True) == RequestChanges(expected, {})


def test_a_large_body_is_spliced_around_members_too_large_to_parse():
    messages = json.dumps([{"role": "user", "content": "x" * 1000}] * (JSON_PARSE_LIMIT // 1000 + 10))
    body = ('{"stream":true,"messages":' + messages + ',"model":"gpt-4o"}').encode()
    p = parsed(OPENAI, "/v1/chat/completions", body)
    assert p.request_spans is not None and isinstance(p.request_doc["messages"], Elided)
    changes = p.request_changes("gpt-4o-mini", stream_usage=True)
    out = p.changed_body(changes.members)
    assert messages.encode() in out
    assert len(out) - len(body) == len('"stream_options":{"include_usage":true},') + len("-mini")


def test_a_body_json_reads_but_the_member_walk_does_not_is_written_out_whole():
    """Past the walk's bounds (here: more brackets than it walks) the edit falls back to encoding the document."""
    body = b'{"model":"gpt-4o","stream":true,"messages":[' + b",".join([b"[]"] * (MAX_TOKENS // 2 + 10)) + b"]}"
    assert len(body) <= JSON_PARSE_LIMIT and members(body) is None
    p = parsed(OPENAI, "/v1/chat/completions", body)
    out = json.loads(p.changed_body(p.request_changes(stream_usage=True).members))
    assert out == {**json.loads(body), "stream_options": {"include_usage": True}}


def test_adding_a_provider_is_one_module_and_one_registry_line(monkeypatch):
    class Echo(ProviderParser):
        name = system = provider_name = "echo"
        hosts = ("api.echo.test",)

        @classmethod
        def operation(cls, path):
            return ("chat", None) if path.endswith("/talk") else None

    monkeypatch.setitem(REGISTRY, Echo.name, Echo)  # the one line
    p = parser_for({"api.echo.test": "echo"}, "api.echo.test", "/v1/talk?x=1")
    assert isinstance(p, Echo) and p.result.operation == "chat" and p.query == "x=1"
    p.request_body(b'{"model": "e1"}')
    assert p.request_changes("e2").members == {"model": "e2"}  # the defaults hold for a body's `model`
    p.response_headers(200, "application/json")
    p.feed(b"{}")
    assert p.end().provider_name == "echo"


def test_every_registered_provider_is_keyed_by_its_name_and_serves_its_hosts():
    for name, cls in REGISTRY.items():
        assert issubclass(cls, ProviderParser) and cls.name == name
        assert all(DEFAULT_HOSTS[h] == name for h in cls.hosts)
