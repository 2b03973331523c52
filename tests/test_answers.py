"""The gateway's own answers, end to end: an upstream that fails (connection refused, bad certificate, closed
before its headers, silent past the timeout) is answered with clrk's JSON 502/504 — never mitmproxy's HTML page
— over HTTP/1 and HTTP/2, by polite clients and by hand-written bytes; on a model provider's API every answer
the gateway makes (deny, budget 429, 502) takes that provider's error shape, so the official openai, anthropic
and google-genai SDKs raise their usual exception with the `clrk: ...` text, and a budget 429 is not retried.
(Names that do not resolve: `tests/test_faults.py`, with a DNS server of its own.)"""

from __future__ import annotations

import json
import socket
import threading
import time

import anthropic
import h2.config
import h2.connection
import h2.events
import httpx
import openai
import pytest

from clrk import attributes as A
from clrk.errors import seconds_until_utc_midnight
from tests.harness import fake_provider
from tests.harness.certs import make_upstream_pki
from tests.harness.gateway import (
    Gateway,
    agent_docs,
    agent_env,
    free_port,
    gateway_doc,
    read_all,
    route,
    tunnel,
)
from tests.harness.upstream import FakeUpstream
from tests.harness.util import new_invocation

PROVIDERS = ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"]
LLM = ("openai", "anthropic", "google_genai")
IDLE = 2  # idleTimeoutSeconds: how long an upstream may stay silent
RELEASE_SILENT = threading.Event()


def doc(kind: str, name: str, spec: dict, ns: str | None = None) -> dict:
    return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, **({"namespace": ns} if ns else {})}, "spec": spec}


@pytest.fixture(scope="module")
def rogue(tmp_path_factory):
    up = FakeUpstream(make_upstream_pki(tmp_path_factory.mktemp("rogue"), ["badcert.test"])[1])  # a CA nobody trusts
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, rogue):
    fake_provider.install(upstream)

    def silent(h, seen):
        RELEASE_SILENT.wait(30)  # takes the request and says nothing until the test is over

    def hang_up(h, seen):
        h.connection.shutdown(socket.SHUT_RDWR)  # reads the request, closes before any header
        h.close_connection = True

    def short(h, seen):
        h.send_response(200)  # promises 1000 bytes of JSON, sends 10, hangs up
        h.send_header("content-type", "application/json")
        h.send_header("content-length", "1000")
        h.end_headers()
        h.wfile.write(b'{"partial"')
        h.cut()

    upstream.handlers["silent"] = silent
    upstream.handlers["hangup"] = hang_up
    def garbage(h, seen):
        h.wfile.write(b"SSH-2.0-OpenSSH_9.6 not http\r\n\r\n")  # an answer that is no HTTP at all
        h.cut()

    upstream.handlers["short"] = short
    upstream.handlers["garbage"] = garbage
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    aliases = {h: upstream.address for h in ["allowed.test", *PROVIDERS]}
    aliases.update({"refused.test": closed, "dead.test": closed, "badcert.test": rogue.address})
    gwdoc = gateway_doc(aliases=aliases, ca_bundle=str(pki[0]))
    gwdoc["spec"]["idleTimeoutSeconds"] = IDLE
    one_token = {"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1}}
    docs = [
        gwdoc, *agent_docs(),
        route("plain", ["allowed.test", "refused.test", "badcert.test"]),
        doc("Backend", "dead", {"schema": {"name": "openai"}, "upstream": {"host": "dead.test", "port": 443}}),
        doc("AIProviderRoute", "llm", {"rules": [
            {"matches": [{"provider": "openai", "models": ["down-*"]}], "backendRefs": [{"name": "dead"}]},
            *({"matches": [{"provider": p, "models": ["tiny-*"]}], "filters": [one_token]} for p in LLM),
            *({"matches": [{"provider": p, "models": ["ok-*"]}]} for p in LLM),
        ]}),
    ]
    g = Gateway(tmp_path_factory.mktemp("answers-gw"), docs).start()
    yield g
    RELEASE_SILENT.set()
    g.stop()


def assert_clrk_json(raw: bytes, status: int, error: str) -> bytes:
    """`raw` is one HTTP/1 answer of the gateway's own: that status, JSON `{"error": error}`, nothing of
    mitmproxy's page. Returns what follows it on the connection."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), raw[:300]
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert headers["content-type"] == "application/json" and "server" not in headers, headers
    body, rest = rest[: int(headers["content-length"])], rest[int(headers["content-length"]):]
    assert json.loads(body) == {"error": error}
    assert b"mitmproxy" not in raw.lower() and b"<html" not in raw.lower()
    return rest


def get(host: str, path: str, inv: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nclrk-invocation-id: {inv}\r\n\r\n".encode()


def read_answers(s, n: int, timeout: float = 10) -> bytes:
    """Reads until `n` complete HTTP/1 answers with Content-Length bodies have arrived (the connection stays open)."""
    s.settimeout(timeout)
    out = b""
    while out.count(b"HTTP/1.1 ") < n or not _complete(out, n):
        chunk = s.recv(65536)
        assert chunk, f"the gateway closed the connection after {out!r}"
        out += chunk
    return out


def _complete(out: bytes, n: int) -> bool:
    rest = out
    for _ in range(n):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        if len(rest) < length:
            return False
        rest = rest[length:]
    return True


# ----------------------------------------------------------------------------------------- upstream failures


def test_a_refused_connection_is_clrk_json_and_the_agents_connection_stays_usable(gw):
    """Hand-written HTTP/1 on one tunnel: two requests to a port nobody listens on, each answered with clrk's
    502 JSON; the connection is kept alive, as after any answer."""
    i = new_invocation()
    t = tunnel(gw, "refused.test:443", "refused.test")
    t.sendall(get("refused.test", "/a", i))
    first = read_answers(t, 1)
    assert assert_clrk_json(first, 502, "clrk: upstream refused.test:443: connection_refused") == b""
    t.sendall(get("refused.test", "/b", i))
    assert_clrk_json(read_answers(t, 1), 502, "clrk: upstream refused.test:443: connection_refused")
    t.close()
    recs = gw.wait_records(2, invocation=i)
    for rec in recs:
        assert (rec[A.HTTP_RESPONSE_STATUS_CODE], rec[A.ERROR_TYPE], rec[A.CLRK_DECISION]) == (502, "connection_refused", "allow")
        assert json.loads(rec[A.RESPONSE_BODY]) == {"error": "clrk: upstream refused.test:443: connection_refused"}


def test_head_requests_get_answers_without_a_body_and_the_connection_stays_in_step(gw):
    """A body after a HEAD answer would be read as the start of the next response: there is none, for a
    failed upstream and for a denial alike."""
    i = new_invocation()
    t = tunnel(gw, "refused.test:443", "refused.test")
    t.sendall(f"HEAD /a HTTP/1.1\r\nHost: refused.test\r\nclrk-invocation-id: {i}\r\n\r\n".encode()
              + get("refused.test", "/b", i))
    both = read_answers(t, 2)
    head, _, rest = both.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"content-length: 0" in head.lower() and rest.startswith(b"HTTP/1.1 502 ")
    assert_clrk_json(rest, 502, "clrk: upstream refused.test:443: connection_refused")
    t.close()
    t = tunnel(gw, "api.openai.com:443", "api.openai.com")  # no rule allows HEAD here: a denial
    t.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n" + get("api.openai.com", "/v1/models", i))
    both = read_answers(t, 2)
    head, _, rest = both.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ") and b"content-length: 0" in head.lower() and rest.startswith(b"HTTP/1.1 403 ")
    t.close()


def test_a_body_still_arriving_when_the_upstream_fails_gets_the_answer_then_the_connection_ends(gw):
    """A chunked upload is streamed (its upstream dialled at once); the upstream cannot be reached while the
    agent is still sending: the agent reads the 502 JSON, and the HTTP/1 connection is closed since the rest of
    its body will never be read."""
    i = new_invocation()
    t = tunnel(gw, "refused.test:443", "refused.test")
    t.sendall(f"POST /upload HTTP/1.1\r\nHost: refused.test\r\nclrk-invocation-id: {i}\r\n"
              "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
    out = read_all(t)
    assert assert_clrk_json(out, 502, "clrk: upstream refused.test:443: connection_refused") == b""
    rec = gw.wait_record(invocation=i)
    assert (rec[A.HTTP_RESPONSE_STATUS_CODE], rec[A.ERROR_TYPE]) == (502, "connection_refused")


def test_an_upstream_certificate_nobody_trusts_is_a_502_tls_error(gw, rogue):
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://badcert.test/json/x", headers={"clrk-invocation-id": i})
    assert (r.status_code, r.headers["content-type"], r.json()) == (502, "application/json", {"error": "clrk: upstream badcert.test:443: tls_error"})
    assert "server" not in r.headers
    rec = gw.wait_record(invocation=i)
    assert (rec[A.HTTP_RESPONSE_STATUS_CODE], rec[A.ERROR_TYPE]) == (502, "tls_error")
    assert not rogue.requests  # the handshake failed: nothing was sent to it


def test_an_upstream_closing_before_its_headers_is_a_502_upstream_reset(gw, upstream):
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://allowed.test/handler/hangup", headers={"clrk-invocation-id": i})
        assert r.status_code == 502 and r.json() == {"error": "clrk: upstream allowed.test:443: upstream_reset"}
        assert c.get("https://allowed.test/json/after").status_code == 200  # the same agent connection, served on
    rec = gw.wait_record(invocation=i)
    assert (rec[A.HTTP_RESPONSE_STATUS_CODE], rec[A.ERROR_TYPE]) == (502, "upstream_reset")


def test_an_upstream_answering_something_that_is_not_http_is_a_502(gw):
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://allowed.test/handler/garbage", headers={"clrk-invocation-id": i})
    assert r.status_code == 502 and r.json() == {"error": "clrk: upstream allowed.test:443: upstream_error"}
    assert gw.wait_record(invocation=i)[A.ERROR_TYPE] == "upstream_error"


def test_a_response_cut_before_any_of_it_was_passed_on_is_replaced_by_the_502(gw, upstream):
    """A small fixed-length response is held whole before it is passed on: cut mid-way, the agent gets clrk's
    502 rather than half a body or mitmproxy's page."""
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://allowed.test/handler/short", headers={"clrk-invocation-id": i})
    assert r.status_code == 502 and r.json() == {"error": "clrk: upstream allowed.test:443: upstream_reset"}
    rec = gw.wait_record(invocation=i)
    assert (rec[A.HTTP_RESPONSE_STATUS_CODE], rec[A.ERROR_TYPE]) == (502, "upstream_reset")


def test_an_upstream_silent_past_the_idle_timeout_is_a_504_and_the_agent_keeps_its_connection(gw):
    i = new_invocation()
    with gw.client() as c:
        t0 = time.monotonic()
        r = c.get("https://allowed.test/handler/silent", headers={"clrk-invocation-id": i})
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json() == {"error": "clrk: upstream allowed.test:443: timeout"}
        assert IDLE * 0.9 <= took < IDLE + 4
        assert c.get("https://allowed.test/json/after").status_code == 200  # the agent's connection was kept
    rec = gw.wait_record(invocation=i)
    assert (rec[A.HTTP_RESPONSE_STATUS_CODE], rec[A.ERROR_TYPE]) == (504, "timeout")


def test_http2_gets_the_same_json_answer(gw):
    i = new_invocation()
    t = tunnel(gw, "refused.test:443", "refused.test", alpn=["h2"])
    assert t.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "refused.test"), (":path", "/h2"),
                          ("clrk-invocation-id", i)], end_stream=True)
    t.sendall(conn.data_to_send())
    t.settimeout(10)
    headers, body, ended = {}, b"", False
    while not ended:
        data = t.recv(65536)
        assert data, "the gateway closed the connection"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
            elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                raise AssertionError(f"the stream was reset instead of answered: {ev}")
        t.sendall(conn.data_to_send())
    t.close()
    assert headers[":status"] == "502" and headers["content-type"] == "application/json" and "server" not in headers
    assert json.loads(body) == {"error": "clrk: upstream refused.test:443: connection_refused"}
    assert gw.wait_record(invocation=i)[A.HTTP_RESPONSE_STATUS_CODE] == 502


# ------------------------------------------------------------------- provider error shapes, through the SDKs


@pytest.fixture
def env(gw, monkeypatch):
    agent_env(gw, monkeypatch)
    return new_invocation()


def assert_budget_headers(resp) -> None:
    """retry-after: until the UTC day ends (when the budget has room again); x-should-retry: false."""
    wait = int(resp.headers["retry-after"])
    assert abs(wait - seconds_until_utc_midnight(time.time())) <= 5
    assert resp.headers["x-should-retry"] == "false" and resp.headers["content-type"] == "application/json"


def test_openai_sdk_reads_clrk_answers_and_does_not_retry_a_budget_429(gw, env, upstream):
    # Default retries on (2): the budget 429 must still be one attempt.
    client = openai.OpenAI(api_key="sk-agent-key", default_headers={"clrk-invocation-id": env})
    t0 = time.time()
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="tiny-1", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    # The SDK's message is its own prefix and the body's message, clrk's text.
    assert e.value.body["message"].startswith("clrk: token budget exceeded for route llm: ")
    assert e.value.message == f"Error code: 429 - {e.value.body['message']}"
    assert e.value.code == "clrk_budget_exceeded" and e.value.type == "insufficient_quota"
    assert_budget_headers(e.value.response)
    rec = gw.wait_records(1, invocation=env)[0]  # one attempt only
    assert rec[A.CLRK_BUDGET_DENIED] is True and rec[A.HTTP_RESPONSE_STATUS_CODE] == 429
    assert not [r for r in upstream.requests_since(t0) if r.path.startswith("/v1/chat")]

    # A deny on a provider's API: no rule allows this model (deny-all).
    with pytest.raises(openai.PermissionDeniedError) as e:
        openai.OpenAI(api_key="k", max_retries=0).chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["message"].startswith("clrk: no AIProviderRoute rule matches openai model gpt-5")
    assert (e.value.code, e.value.type) == ("clrk_denied", "permission_error")

    # An upstream that cannot be reached behind a Backend: the provider's shape, naming the upstream that failed.
    inv = new_invocation()
    with pytest.raises(openai.InternalServerError) as e:
        openai.OpenAI(api_key="k", max_retries=0, default_headers={"clrk-invocation-id": inv}).chat.completions.create(
            model="down-1", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and e.value.body["message"] == "clrk: upstream dead.test:443: connection_refused"
    assert (e.value.code, e.value.type) == ("clrk_upstream_connection_refused", "server_error")
    rec = gw.wait_record(invocation=inv)
    assert (rec[A.HTTP_RESPONSE_STATUS_CODE], rec[A.ERROR_TYPE]) == (502, "connection_refused")


def test_anthropic_sdk_reads_clrk_answers_and_does_not_retry_a_budget_429(gw, env):
    client = anthropic.Anthropic(api_key="sk-ant-agent", default_headers={"clrk-invocation-id": env})  # retries on (2)
    with pytest.raises(anthropic.RateLimitError) as e:
        client.messages.create(model="tiny-1", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": e.value.body["error"]["message"]}}
    assert e.value.body["error"]["message"].startswith("clrk: token budget exceeded for route llm: ")
    assert "clrk: token budget exceeded" in str(e.value)
    assert_budget_headers(e.value.response)
    assert gw.wait_records(1, invocation=env)[0][A.CLRK_BUDGET_DENIED] is True
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        anthropic.Anthropic(api_key="k", max_retries=0).messages.create(
            model="claude-9", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "permission_error"
    assert e.value.body["error"]["message"].startswith("clrk: no AIProviderRoute rule matches anthropic model claude-9")
    out = anthropic.Anthropic(api_key="k", max_retries=0).messages.create(
        model="ok-1", max_tokens=10, messages=[{"role": "user", "content": "hi"}])  # allowed calls are untouched
    assert out.content[0].text == "Hello!"


def test_gemini_sdk_reads_clrk_answers_and_makes_one_attempt_at_a_budget_429(gw, env):
    from google import genai
    from google.genai import errors, types

    client = genai.Client(api_key="AIza-agent", http_options=types.HttpOptions(headers={"clrk-invocation-id": env}))
    with pytest.raises(errors.ClientError) as e:
        client.models.generate_content(model="tiny-1", contents="hi", config=types.GenerateContentConfig(max_output_tokens=10))
    assert (e.value.code, e.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert e.value.message.startswith("clrk: token budget exceeded for route llm: ")
    assert_budget_headers(e.value.response)
    assert gw.wait_records(1, invocation=env)[0][A.CLRK_BUDGET_DENIED] is True
    with pytest.raises(errors.ClientError) as e:
        client.models.generate_content(model="gemini-9", contents="hi")
    assert (e.value.code, e.value.status) == (403, "PERMISSION_DENIED")
    assert e.value.message.startswith("clrk: no AIProviderRoute rule matches google_genai model gemini-9")


def test_answers_off_provider_apis_stay_clrk_json(gw):
    with gw.client() as c:
        r = c.get("https://denied-by-default.test/x")
    assert r.status_code == 403 and set(r.json()) == {"error"} and r.json()["error"].startswith("clrk: ")


def test_budget_429_over_raw_http_carries_the_retry_headers_too(gw):
    """Not only SDKs: any client reads when the budget has room again."""
    with httpx.Client(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False, timeout=30) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", json={"model": "tiny-2", "max_tokens": 5, "messages": []})
    assert r.status_code == 429
    assert_budget_headers(r)
    assert r.json()["error"]["code"] == "clrk_budget_exceeded"
