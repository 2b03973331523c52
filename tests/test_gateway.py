"""The core gateway end to end: a real mitmdump with the addon, real TLS upstreams behind hostAliases,
real clients, the real DuckDB file (through the recorder), a real OTLP/HTTP receiver."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clrk import attributes as A
from tests.harness.gateway import (
    AGENT_TOKEN,
    OTHER_TOKEN,
    Gateway,
    agent_docs,
    basic,
    deny,
    exchange,
    gateway_doc,
    proxy_connect,
    route,
    status_of,
)
from tests.harness.util import new_invocation, wait_for

CLRK = str(Path(sys.executable).parent / "clrk")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, forbidden_upstream, otlp):
    aliases = {h: upstream.address for h in ("allowed.test", "api.github.com", "api.openai.com")}
    aliases.update({h: forbidden_upstream.address for h in ("pastebin.com", "denied.test", "other.test")})
    docs = [
        gateway_doc(endpoint=otlp.endpoint, aliases=aliases, ca_bundle=str(pki[0]), max_bytes=4096,
                    headers={"x-test-team": "${CLRK_TEST_OTLP_KEY}"}),
        *agent_docs(),
        route("allowed", ["allowed.test", "api.github.com", "api.openai.com"], sourceAgents={"namespaces": ["team-a"]}),
        deny("no-paste", ["pastebin.com"], denyResponse={"statusCode": 451, "message": "pastebin is off limits"}),
    ]
    g = Gateway(tmp_path_factory.mktemp("gw"), docs, env={"CLRK_TEST_OTLP_KEY": "otlp-header-secret-42"}).start()
    yield g
    g.stop()


def test_allowed_request_is_recorded_with_every_non_provider_attribute(gw, upstream, otlp):
    i = new_invocation()
    agent_span = "b7ad6b7169203331"
    agent_trace = "0af7651916cd43dd8448eb211c80319c"
    with gw.client() as c:
        r = c.post(
            "https://allowed.test/json/echo?key=QUERYSECRET&page=2",
            json={"hello": "world"},
            headers={"clrk-invocation-id": i, "traceparent": f"00-{agent_trace}-{agent_span}-01"},
        )
    assert r.status_code == 200
    rec = gw.wait_record(invocation=i)

    # Every attribute of the record contract that does not come from a provider or an AI policy.
    assert rec[A.HTTP_REQUEST_METHOD] == "POST"
    assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 200
    assert rec[A.URL_FULL] == "https://allowed.test/json/echo?key=%5BREDACTED%5D&page=2"
    assert rec[A.SERVER_ADDRESS] == "allowed.test" and rec[A.SERVER_PORT] == 443
    assert rec[A.CLRK_COMPONENT] == "egress-extproc"
    assert rec[A.CLRK_DST_NAME] == "allowed.test"
    assert rec[A.CLRK_REQ_BYTES] == len(b'{"hello":"world"}')
    assert rec[A.CLRK_RESP_BYTES] == len(r.content)
    assert rec[A.CLRK_REQ_TRUNCATED] is False and rec[A.CLRK_RESP_TRUNCATED] is False
    assert rec[A.CLRK_BODY_TRUNCATED] is False and rec[A.CLRK_BODY_B64] is False
    assert rec[A.CLRK_BODY_BYTES] == rec[A.CLRK_REQ_BYTES] + rec[A.CLRK_RESP_BYTES]
    assert rec[A.CLRK_DURATION_MS] > 0
    assert rec[A.CLRK_DECISION] == "allow"
    assert rec[A.CLRK_DECISION_RULE] == "EgressRoute/default/allowed"
    assert "allowed by EgressRoute/default/allowed" in rec[A.CLRK_DECISION_REASON]
    assert (rec[A.AGENT_KIND], rec[A.AGENT_NAMESPACE], rec[A.AGENT_NAME], rec[A.AGENT_UID], rec[A.AGENT_REVISION]) == (
        "TaskAgent", "team-a", "researcher", "uid-7d1c", "3")
    assert rec[A.INVOCATION_ID] == i
    assert A.ERROR_TYPE not in rec
    assert rec[A.REQUEST_BODY] == '{"hello":"world"}'
    assert json.loads(rec[A.RESPONSE_BODY]) == r.json()
    assert rec[A.REQUEST_HEADERS]["content-type"] == "application/json"
    assert rec[A.RESPONSE_HEADERS]["content-type"] == "application/json"
    assert rec["time"].endswith("Z")

    # The gateway's span is the agent span's child; upstream sees the gateway's span as its parent and
    # never the invocation header or the proxy credentials.
    assert rec[A.TRACE_ID] == agent_trace and rec[A.PARENT_SPAN_ID] == agent_span
    seen = upstream.requests_to("/json/echo")[-1]
    assert seen.headers["traceparent"] == f"00-{agent_trace}-{rec[A.SPAN_ID]}-01"
    assert "clrk-invocation-id" not in seen.headers and "proxy-authorization" not in seen.headers

    span = otlp.span(rec[A.SPAN_ID])
    assert span["name"] == "POST allowed.test" and span["kind"] == 3  # SPAN_KIND_CLIENT
    assert span["trace_id"] == agent_trace and span["parent_span_id"] == agent_span
    assert span["resource"]["service.name"] == "clrk-egress"
    for k in A.ATTRIBUTE_KEYS:
        if k in rec:
            assert span["attributes"][k] == rec[k], k
    log = otlp.log(rec[A.SPAN_ID])
    assert log["trace_id"] == agent_trace
    assert log["attributes"] == span["attributes"]
    assert log["body"]["request"]["body"] == '{"hello":"world"}'
    assert json.loads(log["body"]["response"]["body"]) == r.json()
    # ${VAR} in otlp.headers reached the endpoint.
    assert any(h.get("x-test-team") == "otlp-header-secret-42" for h in otlp.got.headers)


def test_invocation_id_from_baggage(gw):
    i = new_invocation()
    with gw.client() as c:
        assert c.get("https://allowed.test/json/bag", headers={"baggage": f"user=x,invocation.id={i};p=1"}).status_code == 200
    assert gw.wait_record(invocation=i)[A.INVOCATION_ID] == i


def test_deny_policy_answers_its_status_and_json_without_contacting_upstream(gw, forbidden_upstream):
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://pastebin.com/raw/abc", headers={"clrk-invocation-id": i})
    assert r.status_code == 451
    assert r.json() == {"error": "clrk: pastebin is off limits"}
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION] == "deny"
    assert rec[A.CLRK_DECISION_RULE] == "EgressDenyPolicy/default/no-paste"
    assert rec[A.CLRK_DECISION_REASON] == "pastebin is off limits"
    assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 451
    assert json.loads(rec[A.RESPONSE_BODY]) == r.json()
    assert forbidden_upstream.connections == 0


def test_default_deny_names_the_request_and_agent(gw, forbidden_upstream):
    i = new_invocation()
    with gw.client() as c:
        r = c.post("https://denied.test/upload?key=zzz", content=b"data", headers={"clrk-invocation-id": i})
    assert r.status_code == 403
    reason = "no route allows POST denied.test:443/upload for agent team-a/researcher (deny-all)"
    assert r.json() == {"error": f"clrk: {reason}"}
    rec = gw.wait_record(invocation=i)
    assert (rec[A.CLRK_DECISION], rec[A.CLRK_DECISION_RULE], rec[A.CLRK_DECISION_REASON]) == (
        "deny", "EgressGateway/test-gw/defaultPolicy", reason)
    assert forbidden_upstream.connections == 0


def test_source_agents_limit_a_route(gw):
    i = new_invocation()
    with gw.client("team-b.reviewer", OTHER_TOKEN) as c:
        r = c.get("https://allowed.test/json/b", headers={"clrk-invocation-id": i})
    assert r.status_code == 403
    rec = gw.wait_record(invocation=i)
    assert rec[A.AGENT_NAME] == "reviewer" and rec[A.AGENT_KIND] == "ReviewAgent"


@pytest.mark.parametrize(
    "auth,reason",
    [
        (None, "proxy credentials required"),
        (f"team-a.researcher:{AGENT_TOKEN}x", "wrong token for a registered agent"),
        (f"team-a.researcher:{OTHER_TOKEN}", "wrong token for a registered agent"),
        (f"team-a.nobody:{AGENT_TOKEN}", "unknown agent name"),
    ],
)
def test_missing_or_wrong_proxy_credentials_get_407(gw, auth, reason):
    before = {r[A.SPAN_ID] for r in gw.records(decision="deny")}
    s, head = proxy_connect(gw.port, "allowed.test:443", basic(*auth.split(":", 1)) if auth is not None else None)
    s.close()
    assert head.startswith(b"HTTP/1.1 407"), head
    assert b'proxy-authenticate: basic realm="clrk"' in head.lower()
    # This CONNECT's own record: the first denial stored since, not merely the newest one (another's may follow).
    rec = wait_for(lambda: next((r for r in reversed(gw.records(decision="deny")) if r[A.SPAN_ID] not in before), None),
                   "the record of the refused CONNECT")
    assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 407 and rec[A.CLRK_DECISION_RULE] == "authentication"
    assert reason in rec[A.CLRK_DECISION_REASON]
    assert AGENT_TOKEN not in json.dumps(rec) and OTHER_TOKEN not in json.dumps(rec)
    assert "nobody" not in rec[A.CLRK_DECISION_REASON]  # the user name given is never echoed


def test_plain_http_proxying_needs_credentials_too(gw):
    with httpx.Client(proxy=f"http://127.0.0.1:{gw.port}", trust_env=False) as c:
        r = c.get("http://allowed.test/json/plain")
    assert r.status_code == 407


def test_host_header_must_match_the_connect_target(gw, forbidden_upstream):
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://allowed.test/json/x", headers={"Host": "denied.test", "clrk-invocation-id": i})
    assert r.status_code == 403
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION_RULE] == "destination-check"
    assert "Host denied.test:443 does not match the connection's destination allowed.test:443" == rec[A.CLRK_DECISION_REASON]
    assert forbidden_upstream.connections == 0


def test_sni_must_match_the_connect_target(gw, forbidden_upstream):
    i = new_invocation()
    data = exchange(gw, f"GET /json/sni HTTP/1.1\r\nHost: allowed.test\r\nclrk-invocation-id: {i}\r\nConnection: close\r\n\r\n".encode(),
                    sni="denied.test")
    assert status_of(data) == 403, data[:200]
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_DECISION_REASON] == "TLS server name denied.test does not match the CONNECT target allowed.test"
    assert forbidden_upstream.connections == 0


def test_sse_reaches_the_client_chunk_by_chunk(gw, upstream):
    i = new_invocation()
    upstream.sse_done.clear()
    t0 = time.monotonic()
    events = []
    with gw.client() as c, c.stream("GET", "https://allowed.test/sse?n=3&delay=1.0", headers={"clrk-invocation-id": i}) as r:
        assert r.headers["content-type"] == "text/event-stream"
        for chunk in r.iter_raw():
            if not events:
                first_at = time.monotonic() - t0
                assert not upstream.sse_done.is_set(), "the first event arrived only after the upstream finished"
            events.append(chunk)
    assert first_at < 0.9, f"first SSE chunk after {first_at:.3f}s: the gateway buffered the stream"
    body = b"".join(events)
    assert body.count(b"event: tick") == 3 and body.endswith(b"data: [DONE]\n\n")
    rec = gw.wait_record(invocation=i)
    assert rec[A.RESPONSE_BODY] == body.decode()
    assert rec[A.CLRK_RESP_BYTES] == len(body)


def test_bodies_are_truncated_at_max_bytes_but_pass_whole(gw):
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://allowed.test/big?size=20000", headers={"clrk-invocation-id": i})
    assert len(r.content) == 20000
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_RESP_BYTES] == 20000
    assert rec[A.CLRK_RESP_TRUNCATED] is True and rec[A.CLRK_BODY_TRUNCATED] is True
    assert rec[A.CLRK_REQ_TRUNCATED] is False
    assert rec[A.RESPONSE_BODY] == r.content[:4096].decode()
    assert rec[A.CLRK_BODY_BYTES] == 4096


def test_gzip_is_captured_decoded_while_the_client_gets_the_original_bytes(gw, upstream):
    i = new_invocation()
    with gw.client() as c, c.stream("GET", "https://allowed.test/gzip", headers={"clrk-invocation-id": i, "accept-encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())
    assert r.headers["content-encoding"] == "gzip"
    assert raw == upstream.gzip_body
    rec = gw.wait_record(invocation=i)
    assert rec[A.RESPONSE_BODY] == upstream.gzip_plain.decode()
    assert rec[A.CLRK_RESP_BYTES] == len(upstream.gzip_body)


def test_binary_bodies_are_base64(gw, upstream):
    def handler(h, seen):
        h._send(200, b"\xff\xfe\x00binary", ctype="application/json")

    upstream.handlers["binary"] = handler
    i = new_invocation()
    with gw.client() as c:
        c.post("https://allowed.test/handler/binary", content=b'{"a":1}', headers={"clrk-invocation-id": i, "content-type": "application/json"})
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_BODY_B64] is True
    assert base64.b64decode(rec[A.RESPONSE_BODY]) == b"\xff\xfe\x00binary"
    assert base64.b64decode(rec[A.REQUEST_BODY]) == b'{"a":1}'


def test_content_types_outside_the_list_are_not_captured(gw):
    i = new_invocation()
    with gw.client() as c:
        c.post("https://allowed.test/json/form", content=b"a=1&b=2", headers={"clrk-invocation-id": i, "content-type": "application/x-www-form-urlencoded"})
    rec = gw.wait_record(invocation=i)
    assert A.REQUEST_BODY not in rec and rec[A.CLRK_REQ_BYTES] == 7


def test_every_listed_header_and_query_secret_is_redacted_everywhere(gw, upstream, otlp):
    secrets = {
        "authorization": "Bearer sk-live-authz-SECRET-1",
        "x-api-key": "xak-SECRET-2",
        "x-goog-api-key": "goog-SECRET-3",
        "cookie": "sid=cookie-SECRET-4",
    }
    i = new_invocation()
    with gw.client() as c:
        r1 = c.get("https://allowed.test/json/secret?key=query-SECRET-5", headers={**secrets, "clrk-invocation-id": i})
        r2 = c.get("https://allowed.test/cookie", headers={"clrk-invocation-id": i})
    assert r1.status_code == 200 and r2.headers["set-cookie"] == upstream.cookie_value
    # Upstream got them (the gateway forwards what the agent sends)...
    seen = upstream.requests_to("/json/secret")[-1]
    assert seen.headers["authorization"] == secrets["authorization"]
    rows = gw.wait_records(2, invocation=i)
    spans = [otlp.span(r[A.SPAN_ID]) for r in rows] + [otlp.log(r[A.SPAN_ID]) for r in rows]
    needles = [*secrets.values(), "query-SECRET-5", upstream.cookie_value, AGENT_TOKEN, "otlp-header-secret-42"]
    cli = subprocess.run([CLRK, "records", "--db", str(gw.db), "--json", "--invocation", i], capture_output=True, text=True, check=True).stdout
    outputs = {
        "duckdb": json.dumps(rows),
        "otlp-decoded": json.dumps(spans),
        "otlp-wire": b"".join(otlp.got.raw).decode("latin-1"),
        "gateway-log": gw.log(),
        "clrk records": cli,
    }
    for where, text in outputs.items():
        for n in needles:
            assert n not in text, f"{n!r} leaked into {where}"
    by_path = {r[A.URL_FULL].split("?")[0]: r for r in rows}
    req_h = by_path["https://allowed.test/json/secret"][A.REQUEST_HEADERS]
    for name in secrets:
        assert req_h[name] == A.REDACTED
    assert by_path["https://allowed.test/cookie"][A.RESPONSE_HEADERS]["set-cookie"] == A.REDACTED


def test_upstream_failures_carry_error_type(gw, upstream):
    i = new_invocation()
    with gw.client() as c:
        with pytest.raises(httpx.HTTPError):
            c.get("https://allowed.test/drop", headers={"clrk-invocation-id": i}).read()
    rec = gw.wait_record(invocation=i)
    assert rec[A.ERROR_TYPE] == "upstream_reset"
    i = new_invocation()
    with gw.client() as c:
        r = c.get("https://allowed.test/status/503", headers={"clrk-invocation-id": i})
    assert r.status_code == 503
    assert gw.wait_record(invocation=i)[A.ERROR_TYPE] == "503"


def test_clrk_records_reads_while_the_gateway_runs(gw):
    i = new_invocation()
    with gw.client() as c:
        for n in range(3):
            c.get(f"https://allowed.test/json/cli{n}", headers={"clrk-invocation-id": i})
    gw.wait_record(invocation=i)
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run([CLRK, "records", "--db", str(gw.db), "--json", "--invocation", i], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        if len(lines) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [x[A.URL_FULL].rsplit("/", 1)[1] for x in lines] == ["cli2", "cli1", "cli0"]  # newest first
    assert gw.proc.poll() is None
    out = subprocess.run([CLRK, "records", "--db", str(gw.db), "--agent", "team-a/researcher", "--since", "1h",
                          "--status", "200", "--host", "allowed.test", "--limit", "2"], capture_output=True, text=True, check=True)
    assert len(out.stdout.splitlines()) == 2 and "team-a/researcher" in out.stdout


def test_openai_sdk_through_the_gateway(gw, upstream, monkeypatch):
    openai = pytest.importorskip("openai")

    def chat(h, seen):
        body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
        h._send(200, json.dumps(body).encode())

    upstream.handlers["chat"] = chat
    i = new_invocation()
    # Configured the way a user would: proxy and CA bundle from the environment, the normal base URL.
    monkeypatch.setenv("HTTPS_PROXY", gw.proxy_url())
    monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = openai.OpenAI(api_key="sk-test-openai-key", base_url="https://api.openai.com/handler/chat",
                           default_headers={"clrk-invocation-id": i})
    out = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert out.choices[0].message.content == "hi"
    rec = gw.wait_record(invocation=i)
    assert rec[A.SERVER_ADDRESS] == "api.openai.com" and rec[A.HTTP_RESPONSE_STATUS_CODE] == 200
    assert rec[A.REQUEST_HEADERS]["authorization"] == A.REDACTED
    assert json.loads(rec[A.REQUEST_BODY])["model"] == "gpt-4o-mini"


def test_large_bodies_stream_through_with_bounded_capture(gw, upstream):
    """Past the buffering threshold both directions are streamed: whole on the wire, bounded in the record."""
    i = new_invocation()
    payload = b'{"blob":"' + b"y" * (1024 * 1024) + b'"}'
    with gw.client() as c:
        up = c.post("https://allowed.test/json/upload", content=payload,
                    headers={"clrk-invocation-id": i, "content-type": "application/json"})
        down = c.get("https://allowed.test/big?size=3000000", headers={"clrk-invocation-id": i})
    assert up.json()["body_bytes"] == len(payload)
    assert len(down.content) == 3_000_000
    rows = {r[A.URL_FULL]: r for r in gw.wait_records(2, invocation=i)}
    upload, big = rows["https://allowed.test/json/upload"], rows["https://allowed.test/big?size=3000000"]
    assert upload[A.CLRK_REQ_BYTES] == len(payload) and upload[A.CLRK_REQ_TRUNCATED] is True
    assert upload[A.REQUEST_BODY] == payload[:4096].decode()
    assert big[A.CLRK_RESP_BYTES] == 3_000_000 and big[A.CLRK_RESP_TRUNCATED] is True
    assert big[A.RESPONSE_BODY] == down.content[:4096].decode()


def test_clrk_status_reports_the_recorder(gw):
    out = subprocess.run([CLRK, "status", "--db", str(gw.db), "--json"], capture_output=True, text=True, check=True).stdout
    st = json.loads(out)
    assert st["written"] > 0 and st["dropped"] == 0 and st["proxies"] == 1
    # The footprint is both processes: the proxy, and the recorder it started.
    assert st["proxy_pid"] == gw.proc.pid and st["proxy_rss_mb"] > 10 and st["recorder_rss_mb"] > 10
    text = subprocess.run([CLRK, "status", "--db", str(gw.db)], capture_output=True, text=True, check=True).stdout
    assert f"memory (RSS): proxy (pid {gw.proc.pid}) " in text and " MB, recorder " in text
    missing = subprocess.run([CLRK, "status", "--db", str(gw.db) + ".nope"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no gateway is writing" in missing.stderr
