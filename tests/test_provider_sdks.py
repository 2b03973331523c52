"""The official openai, anthropic and google-genai SDKs, configured as a user would (HTTPS_PROXY, a CA bundle,
the normal base URLs), through the gateway to a fake provider reached via hostAliases. Every record's
gen_ai.* values are checked in `clrk records --json` and in the OTLP span, which must agree."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from clrk import attributes as A
from tests.harness import fake_provider
from tests.harness.gateway import Gateway, agent_docs, agent_env, gateway_doc, route
from tests.harness.util import new_invocation

CLRK = str(Path(sys.executable).parent / "clrk")
PROVIDER_HOSTS = ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"]
# What the SDKs raise when the provider's connection dies mid-stream.
CUT_ERRORS = (openai.APIConnectionError, anthropic.APIConnectionError, httpx2.TransportError)
GENAI_KEYS = [k for k in A.ATTRIBUTE_KEYS if k.startswith("gen_ai.")] + [A.CLRK_BODY_USAGE_VISIBLE, A.CLRK_COST_SOURCE]


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, otlp):
    fake_provider.install(upstream)
    docs = [gateway_doc(endpoint=otlp.endpoint, aliases={h: upstream.address for h in PROVIDER_HOSTS}, ca_bundle=str(pki[0])),
            *agent_docs(), route("providers", PROVIDER_HOSTS)]
    g = Gateway(tmp_path_factory.mktemp("sdk-gw"), docs).start()
    yield g
    g.stop()


@pytest.fixture
def env(gw, monkeypatch):
    agent_env(gw, monkeypatch)
    return new_invocation()


def genai_record(gw, otlp, inv: str, count: int = 1) -> dict:
    """The record of invocation `inv` from `clrk records --json`, checked against its OTLP span."""
    deadline = time.monotonic() + 15
    while True:
        out = subprocess.run([CLRK, "records", "--db", str(gw.db), "--json", "--invocation", inv], capture_output=True, text=True, check=True)
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        if len(rows) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(rows) == count, rows
    rec = rows[0]
    span, log = otlp.span(rec[A.SPAN_ID]), otlp.log(rec[A.SPAN_ID])
    for k in GENAI_KEYS:
        assert span["attributes"].get(k) == rec.get(k), k
        assert log["attributes"].get(k) == rec.get(k), k
    if rec.get(A.GEN_AI_OPERATION_NAME):
        assert span["name"] == f"{rec[A.GEN_AI_OPERATION_NAME]} {rec[A.GEN_AI_REQUEST_MODEL]}"
    return rec


def cost(rec: dict) -> tuple:
    """(gen_ai.usage.cost, clrk.cost.source): the bundled prices are genai-prices' (pinned)."""
    source = rec.get(A.CLRK_COST_SOURCE)
    assert source is None or source in ("unknown", "policy") or source.startswith("genai-prices "), source
    return rec.get(A.GEN_AI_USAGE_COST), (source.split()[0] if source else None)


def usd(per_mtok_sum: float):
    return pytest.approx(per_mtok_sum / 1e6, rel=1e-9)


def usage(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in (A.GEN_AI_USAGE_INPUT_TOKENS, A.GEN_AI_USAGE_OUTPUT_TOKENS,
                                     A.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, A.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
                                     A.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS))


# ------------------------------------------------------------------------------------------------ OpenAI


@pytest.fixture
def oai(env):
    return openai.OpenAI(api_key="sk-test-not-a-real-key", max_retries=0, default_headers={"clrk-invocation-id": env}), env


def test_openai_chat_json(gw, otlp, oai):
    client, inv = oai
    out = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "Hello!"
    rec = genai_record(gw, otlp, inv)
    assert (rec["gen_ai.system"], rec["gen_ai.provider.name"], rec["gen_ai.operation.name"]) == ("openai", "openai", "chat")
    assert (rec["gen_ai.request.model"], rec["gen_ai.response.model"], rec["gen_ai.response.id"]) == ("gpt-4o-mini", "gpt-4o-mini-2024", "chatcmpl-abc123")
    assert rec["gen_ai.response.finish_reasons"] == ["stop"] and rec["gen_ai.response.stream"] is False
    assert usage(rec) == (12, 5, 4, None, 2) and rec["clrk.body.usage_visible"] is True
    assert cost(rec) == (usd(8 * 0.15 + 4 * 0.075 + 5 * 0.6), "genai-prices")
    assert rec[A.REQUEST_HEADERS]["authorization"] == A.REDACTED


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_chat_stream(gw, otlp, oai, include_usage):
    client, inv = oai
    kw = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    rec = genai_record(gw, otlp, inv)
    assert rec["gen_ai.response.stream"] is True and rec["gen_ai.response.finish_reasons"] == ["length"]
    assert rec["clrk.body.usage_visible"] is include_usage
    assert usage(rec)[:2] == ((12, 3) if include_usage else (None, None))
    # no usage seen: nothing to price, so no cost and no source (not a zero)
    assert cost(rec) == ((usd(12 * 0.15 + 3 * 0.6), "genai-prices") if include_usage else (None, None))


def test_openai_stream_first_chunk_arrives_before_the_provider_finishes(gw, otlp, oai, upstream):
    client, inv = oai
    upstream.sse_done.clear()
    t0 = time.monotonic()
    stream = client.chat.completions.create(model="gpt-4o-mini-slow", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    first = next(iter(stream))
    took = time.monotonic() - t0
    assert not upstream.sse_done.is_set(), "the SDK got its first chunk only after the provider finished"
    assert first.id == "chatcmpl-stream1" and took < fake_provider.PACE
    rest = list(stream)
    assert rest and upstream.sse_done.wait(5)  # set by the provider thread just after it sends the last bytes
    assert usage(genai_record(gw, otlp, inv))[:2] == (12, 3)


def test_openai_embeddings_and_responses(gw, otlp, oai):
    client, inv = oai
    client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    rec = genai_record(gw, otlp, inv)
    assert (rec["gen_ai.operation.name"], rec["gen_ai.request.model"]) == ("embeddings", "text-embedding-3-small")
    assert usage(rec)[:2] == (9, None)

    c2 = openai.OpenAI(api_key="sk-x", max_retries=0, default_headers={"clrk-invocation-id": inv + "-r"})
    out = c2.responses.create(model="gpt-4o", input="hi")
    assert out.output_text == "Hi"
    rec = genai_record(gw, otlp, inv + "-r")
    assert (rec["gen_ai.operation.name"], rec["gen_ai.response.id"], rec["gen_ai.response.finish_reasons"]) == ("chat", "resp_123", ["completed"])
    assert usage(rec) == (30, 8, 10, None, 3)
    c3 = openai.OpenAI(api_key="sk-x", max_retries=0, default_headers={"clrk-invocation-id": inv + "-rs"})
    events = list(c3.responses.create(model="gpt-4o", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    rec = genai_record(gw, otlp, inv + "-rs")
    assert rec["gen_ai.response.stream"] is True and usage(rec)[:2] == (21, 7)


def test_openai_text_completion(gw, otlp, oai):
    client, inv = oai
    assert client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi").choices[0].text == "Hello!"
    rec = genai_record(gw, otlp, inv)
    assert (rec["gen_ai.operation.name"], rec["gen_ai.response.id"], rec["gen_ai.response.finish_reasons"]) == ("text_completion", "cmpl-1", ["stop"])
    assert usage(rec)[:2] == (12, 5)


def test_openai_error_response(gw, otlp, oai):
    client, inv = oai
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-error", messages=[{"role": "user", "content": "hi"}])
    rec = genai_record(gw, otlp, inv)
    assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 429 and rec[A.ERROR_TYPE] == "rate_limit_exceeded"
    assert rec["clrk.body.usage_visible"] is False
    assert otlp.span(rec[A.SPAN_ID])["status"] == 2  # STATUS_CODE_ERROR


def test_openai_stream_cut_midway(gw, otlp, oai):
    client, inv = oai
    got = []
    with pytest.raises(CUT_ERRORS):
        for c in client.chat.completions.create(model="gpt-4o-mini-cut", messages=[{"role": "user", "content": "hi"}], stream=True):
            got.append(c)
    assert got, "the chunks before the cut reached the SDK"
    rec = genai_record(gw, otlp, inv)
    assert rec[A.ERROR_TYPE] == "upstream_reset"
    assert rec["gen_ai.response.id"] == "chatcmpl-stream1" and rec["clrk.body.usage_visible"] is False
    assert cost(rec) == (None, None)


def test_a_model_without_a_known_price_has_no_cost(gw, otlp, oai):
    client, inv = oai
    client.chat.completions.create(model="my-own-llama", messages=[{"role": "user", "content": "hi"}])
    rec = genai_record(gw, otlp, inv)
    assert usage(rec) == (12, 5, 4, None, 2) and cost(rec) == (None, "unknown")


def test_usage_is_read_from_a_response_larger_than_max_bytes(gw, otlp, oai):
    client, inv = oai
    out = client.chat.completions.create(model="gpt-4o-mini-big", messages=[{"role": "user", "content": "hi"}])
    assert len(out.choices[0].message.content) == 3_000_000
    rec = genai_record(gw, otlp, inv)
    assert rec[A.CLRK_RESP_BYTES] > 3_000_000 and rec[A.CLRK_RESP_TRUNCATED] is True
    assert len(rec[A.RESPONSE_BODY]) == 4096
    assert usage(rec) == (12, 5, 4, None, 2)


# ------------------------------------------------------------------------------------------------ Anthropic


@pytest.fixture
def claude(env):
    return anthropic.Anthropic(api_key="sk-ant-test-not-real", max_retries=0, default_headers={"clrk-invocation-id": env}), env


def test_anthropic_messages_json(gw, otlp, claude):
    client, inv = claude
    msg = client.messages.create(model="claude-3-5-sonnet", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "Hello!"
    rec = genai_record(gw, otlp, inv)
    assert (rec["gen_ai.system"], rec["gen_ai.provider.name"], rec["gen_ai.operation.name"]) == ("anthropic", "anthropic", "chat")
    assert (rec["gen_ai.request.model"], rec["gen_ai.response.model"]) == ("claude-3-5-sonnet", "claude-3-5-sonnet-20241022")
    assert rec["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert usage(rec) == (60, 6, 30, 20, None)
    # $3 in, $0.30 cache read, $3.75 cache write, $15 out; input counts include the cache
    assert cost(rec) == (usd(10 * 3 + 30 * 0.3 + 20 * 3.75 + 6 * 15), "genai-prices")
    # The SDK sends its key as x-api-key or Authorization, depending on its version: redacted either way.
    key_headers = {k: v for k, v in rec[A.REQUEST_HEADERS].items() if k in ("x-api-key", "authorization")}
    assert key_headers and set(key_headers.values()) == {A.REDACTED}
    assert "sk-ant-test-not-real" not in json.dumps(rec)


def test_anthropic_messages_stream(gw, otlp, claude):
    client, inv = claude
    with client.messages.stream(model="claude-3-5-sonnet", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream) == "Hello"
    rec = genai_record(gw, otlp, inv)
    assert rec["gen_ai.response.stream"] is True and rec["gen_ai.response.finish_reasons"] == ["max_tokens"]
    assert usage(rec) == (125, 15, 100, 0, None)
    assert cost(rec) == (usd(25 * 3 + 100 * 0.3 + 15 * 15), "genai-prices")


def test_anthropic_error_and_cut_stream(gw, otlp, claude):
    client, inv = claude
    with pytest.raises(anthropic.APIStatusError):
        client.messages.create(model="claude-error", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    rec = genai_record(gw, otlp, inv)
    assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 529 and rec[A.ERROR_TYPE] == "overloaded_error"

    c2 = anthropic.Anthropic(api_key="sk-ant-x", max_retries=0, default_headers={"clrk-invocation-id": inv + "-cut"})
    with pytest.raises(CUT_ERRORS):
        with c2.messages.stream(model="claude-cut", max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as s:
            list(s.text_stream)
    rec = genai_record(gw, otlp, inv + "-cut")
    assert rec[A.ERROR_TYPE] == "upstream_reset"
    assert usage(rec)[:2] == (125, 1) and rec["clrk.body.usage_visible"] is True  # as far as the stream got
    assert rec[A.GEN_AI_RESPONSE_MODEL] == "claude-cut-20241022" and cost(rec) == (None, "unknown")


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_legacy_text_completion(gw, otlp, env, stream):
    # The SDK no longer ships this API; clients that still use it speak plain HTTP.
    with gw.client() as c:
        r = c.post("https://api.anthropic.com/v1/complete", headers={"clrk-invocation-id": env, "x-api-key": "sk-ant-x"},
                   json={"model": "claude-2.1", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 8, "stream": stream})
    assert r.status_code == 200
    rec = genai_record(gw, otlp, env)
    assert (rec["gen_ai.operation.name"], rec["gen_ai.request.model"], rec["gen_ai.response.id"]) == ("text_completion", "claude-2.1", "compl_01")
    assert rec["gen_ai.response.finish_reasons"] == ["stop_sequence"] and rec["gen_ai.response.stream"] is stream
    assert rec["clrk.body.usage_visible"] is False


# ------------------------------------------------------------------------------------------------ Gemini


@pytest.fixture
def gemini(env):
    from google import genai
    from google.genai import types

    client = genai.Client(api_key="AIza-test-not-a-real-key",
                          http_options=types.HttpOptions(headers={"clrk-invocation-id": env}, retry_options=types.HttpRetryOptions(attempts=1)))
    return client, env


def test_gemini_generate_content(gw, otlp, gemini):
    client, inv = gemini
    out = client.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert out.text == "Hello!"
    rec = genai_record(gw, otlp, inv)
    assert (rec["gen_ai.system"], rec["gen_ai.provider.name"], rec["gen_ai.operation.name"]) == ("google_genai", "gcp.gemini", "chat")
    assert (rec["gen_ai.request.model"], rec["gen_ai.response.model"], rec["gen_ai.response.id"]) == ("gemini-2.0-flash", "gemini-2.0-flash-001", "resp-gem-1")
    assert usage(rec) == (11, 11, 5, None, 7) and rec["gen_ai.response.finish_reasons"] == ["STOP"]
    # $0.10 in, $0.025 cached, $0.40 out (thoughts within it)
    assert cost(rec) == (usd(6 * 0.1 + 5 * 0.025 + 11 * 0.4), "genai-prices")
    assert rec[A.REQUEST_HEADERS]["x-goog-api-key"] == A.REDACTED


def test_gemini_stream(gw, otlp, gemini):
    client, inv = gemini
    text = "".join(c.text or "" for c in client.models.generate_content_stream(model="gemini-2.0-flash", contents="hi"))
    assert text == "Hello!"
    rec = genai_record(gw, otlp, inv)
    assert rec["gen_ai.response.stream"] is True and usage(rec) == (8, 7, None, None, 4)
    assert cost(rec) == (usd(8 * 0.1 + 7 * 0.4), "genai-prices")
    assert rec["gen_ai.response.finish_reasons"] == ["MAX_TOKENS"]


def test_gemini_stream_cut_midway(gw, otlp, gemini):
    client, inv = gemini
    got = []
    with pytest.raises(CUT_ERRORS):
        for c in client.models.generate_content_stream(model="gemini-2.0-flash-cut", contents="hi"):
            got.append(c.text)
    assert got == ["Hel"]
    rec = genai_record(gw, otlp, inv)
    assert rec[A.ERROR_TYPE] == "upstream_reset"
    assert usage(rec)[:2] == (8, 1) and rec["clrk.body.usage_visible"] is True  # the running total so far
    assert cost(rec) == (usd(8 * 0.1 + 1 * 0.4), "genai-prices")  # priced as far as the stream got


def test_gemini_embeddings_and_error(gw, otlp, gemini):
    from google.genai import errors

    client, inv = gemini
    client.models.embed_content(model="text-embedding-004", contents="hi")
    rec = genai_record(gw, otlp, inv)
    assert (rec["gen_ai.operation.name"], rec["gen_ai.request.model"]) == ("embeddings", "text-embedding-004")
    with gw.client() as c:  # both embedding endpoints, whichever the SDK version picks
        for ep in ("embedContent", "batchEmbedContents"):
            c.post(f"https://generativelanguage.googleapis.com/v1beta/models/text-embedding-004:{ep}",
                   json={"requests": [{"content": {"parts": [{"text": "a"}]}}]}, headers={"clrk-invocation-id": inv + ep, "x-goog-api-key": "k"})
            assert genai_record(gw, otlp, inv + ep)["gen_ai.operation.name"] == "embeddings"
    with pytest.raises(errors.ClientError):
        client.models.generate_content(model="gemini-error", contents="hi")
    err = genai_record(gw, otlp, inv, count=2)  # newest first
    assert err[A.GEN_AI_REQUEST_MODEL] == "gemini-error"
    assert err[A.ERROR_TYPE] == "INVALID_ARGUMENT" and err[A.HTTP_RESPONSE_STATUS_CODE] == 400


def test_gemini_json_array_stream_without_alt_sse(gw, otlp, env):
    with gw.client() as c:
        r = c.post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                   json={"contents": [{"parts": [{"text": "hi"}]}]}, headers={"clrk-invocation-id": env, "x-goog-api-key": "AIza-x"})
    assert r.status_code == 200 and len(r.json()) == 3
    rec = genai_record(gw, otlp, env)
    assert rec["gen_ai.response.stream"] is True and usage(rec) == (8, 7, None, None, 4)
    assert cost(rec) == (usd(8 * 0.1 + 7 * 0.4), "genai-prices")
