"""Secrets never reach a record, end to end: a real gateway, real TLS upstreams answering what OAuth servers
and cloud APIs answer, and every output searched — the stored record, the OTLP export (decoded and on the
wire) and the gateway's log. Also: the 407 tells nothing about which agent names exist and never echoes the
user name, and repeated failed proxy authentication from one address is slowed down for that address only."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid

import pytest

from clrk import attributes as A
from tests.harness.gateway import AGENT_TOKEN, Gateway, agent_docs, basic, gateway_doc, route
from tests.harness.util import new_invocation

R = A.REDACTED
JSON = "application/json"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, otlp):
    aliases = {h: upstream.address for h in ("allowed.test", "api.github.com")}
    g = gateway_doc(endpoint=otlp.endpoint, aliases=aliases, ca_bundle=str(pki[0]), max_bytes=4096)
    g["spec"]["otlp"]["captureBody"].update({
        "includeContentTypes": [JSON, "application/x-www-form-urlencoded", "text/event-stream"],
        "redact": {"headers": ["X-Wallet-Id"], "queryParams": ["otp"], "jsonPaths": ["$.vault.*", "$.items[*].pin"]},
    })
    injection = {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "CredentialInjectionPolicy", "metadata": {"name": "gh-app"},
                 "spec": {"targetRefs": [{"kind": "EgressRoute", "name": "github"}],
                          "target": {"type": "QueryParam", "name": "appid"}, "secretRef": {"env": "CLRK_TEST_APPID"}}}
    docs = [g, *agent_docs(), route("allowed", ["allowed.test"]), route("github", ["api.github.com"]), injection]
    gateway = Gateway(tmp_path_factory.mktemp("redaction"), docs, env={"CLRK_TEST_APPID": "APPID-INJECTED-SECRET"}).start()
    yield gateway
    gateway.stop()




def secret(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def assert_nowhere(gw, otlp, rec: dict, secrets: list[str]) -> None:
    """None of `secrets` is in the stored record, the OTLP span or log record (decoded, or on the wire), or
    the gateway's log."""
    outputs = {
        "record": json.dumps(rec),
        "otlp span": json.dumps(otlp.span(rec[A.SPAN_ID])),
        "otlp log": json.dumps(otlp.log(rec[A.SPAN_ID])),
        "otlp wire": b"".join(otlp.got.raw).decode("latin-1"),
        "gateway log": gw.log(),
    }
    for where, text in outputs.items():
        for s in secrets:
            assert s not in text, f"{s!r} leaked into the {where}"


def test_an_oauth_code_exchange_keeps_no_credential(gw, upstream, otlp):
    at, rt, idt = secret("AT"), secret("RT"), secret("IDT")
    code, cs = secret("CODE"), secret("CS")

    def token_endpoint(h, seen):
        h._send(200, json.dumps({"access_token": at, "refresh_token": rt, "id_token": idt, "token_type": "Bearer",
                                 "expires_in": 3600, "scope": "repo read"}).encode())

    upstream.handlers["oauth"] = token_endpoint
    i = new_invocation()
    form = f"grant_type=authorization_code&code={code}&client_id=app-123&client_secret={cs}&redirect_uri=https%3A%2F%2Fa.test%2Fcb"
    with gw.client() as c:
        r = c.post("https://allowed.test/handler/oauth/token", content=form,
                   headers={"content-type": "application/x-www-form-urlencoded", "clrk-invocation-id": i})
    assert r.json()["access_token"] == at  # the agent gets the real answer
    assert upstream.requests_to("/handler/oauth/token")[-1].body == form.encode()  # and so does the upstream
    rec = gw.wait_record(invocation=i)
    assert rec[A.REQUEST_BODY] == ("grant_type=authorization_code&code=%5BREDACTED%5D&client_id=app-123"
                                   "&client_secret=%5BREDACTED%5D&redirect_uri=https%3A%2F%2Fa.test%2Fcb")
    assert json.loads(rec[A.RESPONSE_BODY]) == {"access_token": R, "refresh_token": R, "id_token": R, "token_type": R,
                                                "expires_in": 3600, "scope": "repo read"}
    assert_nowhere(gw, otlp, rec, [at, rt, idt, code, cs])


def test_headers_and_query_parameters_are_redacted_by_name(gw, upstream, otlp):
    values = {name: secret(name.upper()) for name in
              ("x-auth-token", "private-token", "x-amz-security-token", "x-wallet-id", "x-csrf-token", "cookie")}
    sig, cred, sts, code, otp = secret("SIG"), secret("CRED"), secret("STS"), secret("QCODE"), secret("OTP")
    resp_token = secret("RESPTOKEN")

    def presigned(h, seen):
        h._send(200, b'{"ok": true}', headers={"x-refresh-token": resp_token, "x-request-id": "req-kept-1"})

    upstream.handlers["s3"] = presigned
    i = new_invocation()
    with gw.client() as c:
        r = c.get(f"https://allowed.test/handler/s3/obj?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={cred}"
                  f"&X-Amz-Security-Token={sts}&X-Amz-Signature={sig}&code={code}&otp={otp}&page=2",
                  headers={**values, "x-request-id": "agent-kept-2", "clrk-invocation-id": i})
    assert r.status_code == 200
    rec = gw.wait_record(invocation=i)
    assert rec[A.URL_FULL] == ("https://allowed.test/handler/s3/obj?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=%5BREDACTED%5D"
                               "&X-Amz-Security-Token=%5BREDACTED%5D&X-Amz-Signature=%5BREDACTED%5D&code=%5BREDACTED%5D"
                               "&otp=%5BREDACTED%5D&page=2")
    for name in values:
        assert rec[A.REQUEST_HEADERS][name] == R, name
    assert rec[A.REQUEST_HEADERS]["x-request-id"] == "agent-kept-2"
    assert rec[A.RESPONSE_HEADERS]["x-refresh-token"] == R and rec[A.RESPONSE_HEADERS]["x-request-id"] == "req-kept-1"
    assert_nowhere(gw, otlp, rec, [*values.values(), sig, cred, sts, code, otp, resp_token])

    # An injected credential is redacted whatever its name (`appid` has no sensitive word).
    i = new_invocation()
    with gw.client() as c:
        assert c.get("https://api.github.com/json/app", headers={"clrk-invocation-id": i}).status_code == 200
    assert "appid=APPID-INJECTED-SECRET" in upstream.requests_to("/json/app")[-1].path
    rec = gw.wait_record(invocation=i)
    assert rec[A.URL_FULL] == "https://api.github.com/json/app?appid=%5BREDACTED%5D"
    assert_nowhere(gw, otlp, rec, ["APPID-INJECTED-SECRET"])


def test_json_bodies_lose_their_secrets_and_keep_their_counts(gw, upstream, otlp):
    pw, pin, vault, ak, nested, arr = (secret(x) for x in ("PW", "PIN", "VAULT", "AK", "NESTED", "ARR"))

    def api(h, seen):
        h._send(200, json.dumps({
            "data": [{"name": "k1", "api_key": ak, "tokens": 7, "enabled": True, "expires": None}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}},
            "usageMetadata": {"promptTokenCount": 9, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}]},
        }).encode())

    upstream.handlers["api"] = api
    i = new_invocation()
    body = {"model": "m", "max_tokens": 100, "config": {"db": {"Password": pw}}, "items": [{"pin": pin, "label": "a"}],
            "vault": {"anything": vault, "n": 1}, "credentials": [[{"x": nested}], arr, 5], "note": "token rotation"}
    with gw.client() as c:
        c.post("https://allowed.test/handler/api", json=body, headers={"clrk-invocation-id": i})
    rec = gw.wait_record(invocation=i)
    assert json.loads(rec[A.REQUEST_BODY]) == {
        "model": "m", "max_tokens": 100, "config": {"db": {"Password": R}}, "items": [{"pin": R, "label": "a"}],
        "vault": {"anything": R, "n": 1}, "credentials": [[{"x": R}], R, 5], "note": "token rotation"}
    assert json.loads(rec[A.RESPONSE_BODY]) == {
        "data": [{"name": "k1", "api_key": R, "tokens": 7, "enabled": True, "expires": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}},
        "usageMetadata": {"promptTokenCount": 9, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}]},
    }
    assert_nowhere(gw, otlp, rec, [pw, pin, vault, ak, nested, arr])


def test_a_secret_cut_by_max_bytes_is_not_kept_in_part(gw, upstream, otlp):
    tok = "CUTSECRET" + uuid.uuid4().hex * 8
    body = b'{"pad": "' + b"x" * 4060 + b'", "session_token": "' + tok.encode() + b'"}'
    cut_at = 4096 - (body.index(tok.encode()))
    assert 0 < cut_at < len(tok)  # maxBytes falls inside the secret

    upstream.handlers["cut"] = lambda h, seen: h._send(200, body)
    i = new_invocation()
    with gw.client() as c:
        assert c.get("https://allowed.test/handler/cut", headers={"clrk-invocation-id": i}).content == body
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_RESP_TRUNCATED] is True
    assert rec[A.RESPONSE_BODY].endswith('"session_token": "[REDACTED]"')
    assert_nowhere(gw, otlp, rec, [tok[:cut_at]])


def test_event_streams_are_redacted_event_by_event(gw, upstream, otlp):
    s1, s2 = secret("SSE1"), secret("SSE2")

    def stream(h, seen):
        h.start_chunked(200, "text/event-stream")
        h._chunk(f'data: {{"type": "session.created", "session": {{"client_secret": {{"value": "{s1}"}}}}}}\n\n'.encode())
        h._chunk(b'data: {"delta": "hello"}\n\n')
        h._chunk(f'data: {{"refresh_token": "{s2}", "usage": {{"output_tokens": 4}}}}\n\n'.encode())
        h.end_chunked()

    upstream.handlers["sse"] = stream
    i = new_invocation()
    with gw.client() as c, c.stream("GET", "https://allowed.test/handler/sse", headers={"clrk-invocation-id": i}) as r:
        got = b"".join(r.iter_raw())
    assert s1.encode() in got and s2.encode() in got
    rec = gw.wait_record(invocation=i)
    assert rec[A.RESPONSE_BODY] == ('data: {"type": "session.created", "session": {"client_secret": {"value": "[REDACTED]"}}}\n\n'
                                    'data: {"delta": "hello"}\n\n'
                                    'data: {"refresh_token": "[REDACTED]", "usage": {"output_tokens": 4}}\n\n')
    assert_nowhere(gw, otlp, rec, [s1, s2])


# --------------------------------------------------------------------------- proxy authentication


def raw_request(gw, source: str, head: bytes) -> bytes:
    """Sends `head` from the source address `source` (any 127.x address is loopback) and returns the whole
    answer: status line, headers and body."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=15, source_address=(source, 0))
    try:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
        head_part, _, body = data.partition(b"\r\n\r\n")
        lengths = [line.split(b":", 1)[1] for line in head_part.split(b"\r\n") if line.lower().startswith(b"content-length")]
        length = int(lengths[0]) if lengths else 0  # a 200 to CONNECT has no body
        while len(body) < length and (chunk := s.recv(65536)):
            body += chunk
        return head_part + b"\r\n\r\n" + body
    finally:
        s.close()


def connect_head(user: str, token: str) -> bytes:
    return (f"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n"
            f"Proxy-Authorization: {basic(user, token)}\r\n\r\n").encode()


def get_head(user: str, token: str) -> bytes:
    return (f"GET http://allowed.test/json/plain HTTP/1.1\r\nHost: allowed.test\r\n"
            f"Proxy-Authorization: {basic(user, token)}\r\nConnection: close\r\n\r\n").encode()


def auth_denials(gw) -> list[dict]:
    return [r for r in gw.records(decision="deny") if r.get(A.CLRK_DECISION_RULE) == "authentication"]


def test_the_407_is_the_same_whoever_asks_and_never_echoes_the_user_name(gw):
    name_secret = secret("sk-live-IN-USER-NAME")  # an agent that put its API key where its name goes
    token_secret = secret("TOKEN")
    before = len(auth_denials(gw))
    answers = {}
    for n, (user, token) in enumerate([("team-a.researcher", token_secret),  # a registered agent, wrong token
                                       ("team-a.nobody", token_secret),  # no such agent
                                       (name_secret, AGENT_TOKEN),  # a secret for a name, a valid token
                                       (name_secret, token_secret)]):
        for kind, head in (("CONNECT", connect_head(user, token)), ("GET", get_head(user, token))):
            # A source per attempt: the throttle (tested below) must not change what is compared here.
            answers[(user, token, kind)] = raw_request(gw, f"127.0.1.{10 * n + len(answers)}", head)
    connects = {a for k, a in answers.items() if k[2] == "CONNECT"}
    gets = {a for k, a in answers.items() if k[2] == "GET"}
    assert len(connects) == 1 and len(gets) == 1, answers  # byte for byte, status line, headers and body
    (answer,) = connects
    assert answer.startswith(b"HTTP/1.1 407") and b'proxy-authenticate: Basic realm="clrk"' in answer
    assert b"proxy authentication failed: check the agent name and token" in answer
    assert gets == connects  # a CONNECT and a plain-HTTP request get the same bytes too
    for a in answers.values():
        assert b"nobody" not in a and b"researcher" not in a and name_secret.encode() not in a

    deadline = time.monotonic() + 10
    while len(rows := auth_denials(gw)) < before + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rows) >= before + 8
    reasons = {r[A.CLRK_DECISION_REASON] for r in rows}
    assert "wrong token for a registered agent (the name given is not recorded)" in reasons
    assert "unknown agent name (the name given is not recorded)" in reasons
    text = json.dumps(rows) + gw.log()
    for s in (name_secret, token_secret, "team-a.nobody", "team-a/nobody", "team-a.researcher", AGENT_TOKEN):
        assert s not in text


def test_repeated_failures_from_one_address_are_slowed_for_that_address_only(gw):
    attacker, bystander = "127.0.2.1", "127.0.2.2"
    wrong = connect_head("team-a.researcher", "guess")
    times = []
    for _ in range(8):
        t0 = time.monotonic()
        assert raw_request(gw, attacker, wrong).startswith(b"HTTP/1.1 407")
        times.append(time.monotonic() - t0)
    # 5 free failures, then 0.25 s, 0.5 s, 1 s held back (exponential; capped at 2 s).
    assert times[7] >= 0.5 and sum(times[5:]) >= 1.0, times

    # The next wrong guess is held back ~2 s. Meanwhile everyone else is served at once: the same agent's
    # valid requests, another address's wrong guess, and the attacker's own address with valid credentials.
    held = socket.create_connection(("127.0.0.1", gw.port), timeout=15, source_address=(attacker, 0))
    held.sendall(wrong)
    done = threading.Event()
    results: dict = {}

    def others():
        with gw.client() as c:
            results["valid"] = [c.get("https://allowed.test/json/while-held").status_code for _ in range(3)]
        results["bystander"] = raw_request(gw, bystander, wrong)[:12]
        results["attacker-valid"] = raw_request(gw, attacker, connect_head("team-a.researcher", AGENT_TOKEN))[:12]
        done.set()

    threading.Thread(target=others, daemon=True).start()
    assert done.wait(15)
    assert results == {"valid": [200, 200, 200], "bystander": b"HTTP/1.1 407", "attacker-valid": b"HTTP/1.1 200"}
    readable, _, _ = select.select([held], [], [], 0)
    assert not readable, "the attacker's answer came before the others were served: it was not held back"
    assert held.recv(4096).startswith(b"HTTP/1.1 407")  # and it does come
    held.close()
