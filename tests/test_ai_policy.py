"""AIProviderRoute, Backend, CredentialInjectionPolicy and TokenBudget through a real gateway, with the
official SDKs as agents and a fake provider that shows what actually reached it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from clrk import attributes as A
from tests.harness import fake_provider
from tests.harness.gateway import Gateway, agent_docs, gateway_doc, sha, tunnel
from tests.harness.util import new_invocation

CLRK = str(Path(sys.executable).parent / "clrk")
OPENAI_KEY = "sk-injected-SECRET-5f2a9c1e7b"
GEMINI_KEY = "AIza-injected-FILE-SECRET-8d3b"
WRITER_TOKEN = "tok-writer-4242424242"
HOSTS = ["api.openai.com", "llm-b.test", "generativelanguage.googleapis.com", "api.anthropic.com", "allowed.test"]
CATCHALL_KEY = "sk-ant-catchall-SECRET-0042"


def docs(pki, upstream, otlp_endpoint: str, secret_file: Path, restart_budget: int = 100, reverse_rules: bool = False) -> list[dict]:
    def doc(kind, name, spec, ns=None):
        return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind, "metadata": {"name": name, **({"namespace": ns} if ns else {})}, "spec": spec}

    out = [
        gateway_doc(endpoint=otlp_endpoint, aliases={h: upstream.address for h in HOSTS}, ca_bundle=str(pki[0])),
        *agent_docs(),
        doc("Agent", "writer", {"kind": "TaskAgent", "credentials": {"tokenSha256": sha(WRITER_TOKEN)}}, ns="team-a"),
        doc("Backend", "openai-main", {"schema": {"name": "openai"}, "upstream": {"host": "api.openai.com", "port": 443},
                                       "modelRewrites": [{"from": "gpt-4o", "to": "gpt-4o-mini"}], "bodyMutation": {"ensureStreamUsage": True}}),
        doc("Backend", "openai-b", {"schema": {"name": "openai"}, "upstream": {"host": "llm-b.test", "port": 443}}),
        doc("AIProviderRoute", "openai-chat", {
            "sourceAgents": {"namespaces": ["team-a"]},
            "rules": [
                {"matches": [{"provider": "openai", "models": ["gpt-4o*"], "endpoints": ["/v1/chat/completions"]}], "backendRefs": [{"name": "openai-main"}]},
                {"matches": [{"provider": "openai", "models": ["balanced-*"]}], "backendRefs": [{"name": "openai-main", "weight": 1}, {"name": "openai-b", "weight": 1}]},
                {"matches": [{"provider": "openai", "models": ["budget-*"]}],
                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1000, "scope": "Route"}}]},
                {"matches": [{"provider": "openai", "models": ["crowd-*"]}],
                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1000, "scope": "Route"}}]},
                {"matches": [{"provider": "openai", "models": ["restart-*"]}],
                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": restart_budget}}]},
                {"matches": [{"provider": "openai", "models": ["clamp-*"]}],
                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1000}}]},
                {"matches": [{"provider": "openai", "endpoints": ["/v1/completions"]}],
                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1000}}]},
                {"matches": [{"provider": "openai", "models": ["mine-*"]}],
                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 40, "scope": "Agent"}}]},
            ]}, ns="team-a"),
        doc("AIProviderRoute", "gemini", {"rules": [{"matches": [{"provider": "google_genai"}]}]}, ns="team-a"),
        doc("AIProviderRoute", "claude", {"rules": [{"matches": [{"provider": "anthropic"}]}]}, ns="team-a"),
        doc("EgressRoute", "plain", {"hostnames": ["allowed.test"]}),
        doc("CredentialInjectionPolicy", "catch-all", {
            "targetRefs": [{"kind": "EgressGateway", "name": "test-gw"}],
            "target": {"type": "Header", "name": "x-api-key"}, "secretRef": {"env": "CLRK_TEST_CATCHALL_KEY"}}),
        doc("CredentialInjectionPolicy", "openai-key", {
            "targetRefs": [{"kind": "AIProviderRoute", "name": "openai-chat"}],
            "target": {"type": "Header", "name": "Authorization", "prefix": "Bearer "}, "secretRef": {"env": "CLRK_TEST_OPENAI_KEY"}}),
        doc("CredentialInjectionPolicy", "gemini-key", {
            "targetRefs": [{"kind": "AIProviderRoute", "name": "gemini"}],
            "target": {"type": "QueryParam", "name": "key"}, "secretRef": {"file": str(secret_file)}}),
    ]
    if reverse_rules:
        chat = next(d for d in out if d["kind"] == "AIProviderRoute" and d["metadata"]["name"] == "openai-chat")
        chat["spec"]["rules"].reverse()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pki, upstream, otlp):
    fake_provider.install(upstream)
    d = tmp_path_factory.mktemp("ai-gw")
    secret_file = d / "gemini.key"
    secret_file.write_text(GEMINI_KEY + "\n")
    gw = Gateway(d, docs(pki, upstream, otlp.endpoint, secret_file), env={"CLRK_TEST_OPENAI_KEY": OPENAI_KEY, "CLRK_TEST_CATCHALL_KEY": CATCHALL_KEY}).start()
    yield gw, secret_file
    gw.stop()


@pytest.fixture
def gw(setup):
    return setup[0]


@pytest.fixture
def agent_env(gw, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", gw.proxy_url())
    monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca))
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def client(inv: str, **kw) -> openai.OpenAI:
    # The agent holds no real key: the gateway injects it.
    return openai.OpenAI(api_key="sk-agent-has-no-real-key", max_retries=0, default_headers={"clrk-invocation-id": inv}, **kw)


def test_model_rewrite_reaches_the_provider_and_the_record_keeps_both_models(gw, upstream, otlp, agent_env):
    i, t0 = new_invocation(), time.time()
    out = client(i).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert out.model == "gpt-4o-mini-2024"
    sent = [json.loads(r.body) for r in upstream.requests_since(t0) if r.path == "/v1/chat/completions"]
    assert [b["model"] for b in sent] == ["gpt-4o-mini"]
    rec = gw.wait_record(invocation=i)
    assert (rec[A.GEN_AI_REQUEST_MODEL], rec[A.GEN_AI_RESPONSE_MODEL]) == ("gpt-4o", "gpt-4o-mini-2024")
    assert rec[A.CLRK_BODY_REQUEST_REWRITTEN] is True
    assert (rec[A.CLRK_APR_NAME], rec[A.CLRK_APR_NAMESPACE], rec[A.CLRK_APR_MATCHED]) == ("openai-chat", "team-a", True)
    assert rec[A.CLRK_DECISION_RULE] == "AIProviderRoute/team-a/openai-chat#rules[0]"
    span = otlp.span(rec[A.SPAN_ID])
    assert span["attributes"][A.CLRK_APR_NAME] == "openai-chat" and span["name"] == "chat gpt-4o"


def test_streaming_request_gets_include_usage_and_its_usage_appears(gw, upstream, agent_env):
    i, t0 = new_invocation(), time.time()
    chunks = list(client(i).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 12  # the agent sees it too
    sent = [json.loads(r.body) for r in upstream.requests_since(t0) if r.path == "/v1/chat/completions"]
    assert sent[-1]["stream_options"] == {"include_usage": True}
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_BODY_REQUEST_REWRITTEN] is True and rec[A.CLRK_BODY_USAGE_VISIBLE] is True
    assert (rec[A.GEN_AI_USAGE_INPUT_TOKENS], rec[A.GEN_AI_USAGE_OUTPUT_TOKENS]) == (12, 3)


def test_injected_keys_reach_the_provider_and_nothing_else(gw, upstream, otlp, agent_env, setup):
    from google import genai
    from google.genai import types

    i, t0 = new_invocation(), time.time()
    client(i).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    g = genai.Client(api_key="agent-gemini-key-not-real", http_options=types.HttpOptions(headers={"clrk-invocation-id": i}))
    assert g.models.generate_content(model="gemini-2.0-flash", contents="hi").text == "Hello!"
    seen = upstream.requests_since(t0)
    chat = next(r for r in seen if r.path == "/v1/chat/completions")
    assert chat.headers["authorization"] == f"Bearer {OPENAI_KEY}"  # overwrote what the agent sent
    gem = next(r for r in seen if ":generateContent" in r.path)
    assert f"key={GEMINI_KEY}" in gem.path
    rows = gw.wait_records(2, invocation=i)
    cli = subprocess.run([CLRK, "records", "--db", str(gw.db), "--json", "--invocation", i], capture_output=True, text=True, check=True).stdout
    tail = subprocess.run([CLRK, "records", "--db", str(gw.db), "--limit", "0"], capture_output=True, text=True, check=True).stdout
    decoded = json.dumps([otlp.span(r[A.SPAN_ID]) for r in rows] + [otlp.log(r[A.SPAN_ID]) for r in rows])
    outputs = {"duckdb": json.dumps(rows), "clrk records --json": cli, "clrk records": tail, "otlp-decoded": decoded,
               "otlp-wire": b"".join(otlp.got.raw).decode("latin-1"), "gateway log": gw.log()}
    for where, text in outputs.items():
        for secret in (OPENAI_KEY, GEMINI_KEY, OPENAI_KEY.encode().hex()):
            assert secret not in text, f"an injected credential leaked into {where}"
    gem_rec = next(r for r in rows if r.get(A.GEN_AI_SYSTEM) == "google_genai")
    assert "key=%5BREDACTED%5D" in gem_rec[A.URL_FULL]


def test_a_changed_secret_file_is_read_again_on_reload(gw, upstream, setup, pki, otlp):
    _, secret_file = setup
    secret_file.write_text("AIza-rotated-FILE-SECRET-77\n")
    # Only the secret file changed: touch the policy so the watcher reloads (secrets are read on reload).
    policy = gw.policies / "policy.yaml"
    policy.write_text(policy.read_text())
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            t0 = time.time()
            with gw.client() as c:
                c.post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent", json={"contents": []})
            gem = [r for r in upstream.requests_since(t0) if ":generateContent" in r.path]
            if gem and "key=AIza-rotated-FILE-SECRET-77" in gem[-1].path:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the rotated secret was not picked up")
    finally:
        secret_file.write_text(GEMINI_KEY + "\n")
        policy.write_text(policy.read_text())


def test_credentials_go_only_where_their_route_goes(gw, upstream, agent_env):
    """The gateway-wide key rides with provider calls only; a route's key is not carried to another vendor's
    host just because that host speaks the same schema."""
    i, t0 = new_invocation(), time.time()
    with gw.client() as c:
        assert c.get("https://allowed.test/json/plain", headers={"clrk-invocation-id": i}).status_code == 200
        assert c.post("https://api.anthropic.com/v1/messages", json={"model": "claude-3-5-sonnet", "max_tokens": 5, "messages": []},
                      headers={"clrk-invocation-id": i}).status_code == 200
        r = c.post("https://llm-b.test/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers={"clrk-invocation-id": i})
    assert r.status_code == 403
    seen = upstream.requests_since(t0)
    plain = next(x for x in seen if x.path == "/json/plain")
    claude = next(x for x in seen if x.path == "/v1/messages")
    assert "x-api-key" not in plain.headers and claude.headers["x-api-key"] == CATCHALL_KEY
    assert not [x for x in seen if x.headers.get("host") == "llm-b.test"]
    assert CATCHALL_KEY not in json.dumps(gw.wait_records(3, invocation=i))


def test_provider_call_no_rule_matches_is_denied_with_a_reason_naming_that(gw, upstream, agent_env):
    i, t0 = new_invocation(), time.time()
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(i).chat.completions.create(model="o1-preview", messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.json()["error"]["message"].startswith("clrk: no AIProviderRoute rule matches openai model o1-preview")
    assert not [r for r in upstream.requests_since(t0) if r.path == "/v1/chat/completions"]
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_APR_MATCHED] is False and rec[A.CLRK_DECISION] == "deny"
    assert rec[A.GEN_AI_REQUEST_MODEL] == "o1-preview"
    # sourceAgents: team-b is not served by openai-chat
    with openai.OpenAI(api_key="x", max_retries=0, http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url("team-b.reviewer", "tok-reviewer-9876543210"))) as other:
        with pytest.raises(openai.PermissionDeniedError):
            other.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_weighted_backends_share_the_traffic(gw, upstream, agent_env):
    i, t0 = new_invocation(), time.time()
    c = client(i)
    for _ in range(30):
        c.chat.completions.create(model="balanced-model", messages=[{"role": "user", "content": "hi"}])
    hosts = [r.headers["host"] for r in upstream.requests_since(t0) if r.path == "/v1/chat/completions"]
    assert len(hosts) == 30
    assert {"api.openai.com", "llm-b.test"} == set(hosts)  # 2**-29 odds of a false failure


def test_budget_exhausted_is_a_429_before_the_provider_is_contacted(gw, upstream, agent_env):
    i = new_invocation()
    c = client(i)
    c.chat.completions.create(model="budget-cost990", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    # 995 of 1000 used: a request that may cost more than the 5 left is refused, not clamped to them.
    t0 = time.time()
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="budget-y", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    assert not [r for r in upstream.requests_since(t0) if r.path == "/v1/chat/completions"]
    denied, first = gw.wait_records(2, invocation=i)
    estimate = denied[A.CLRK_BUDGET_RESERVED]
    assert estimate == 10 + len(json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "budget-y", "max_tokens": 10},
                                           separators=(",", ":"))) // 4
    assert e.value.response.json()["error"] == {  # OpenAI's error shape, clrk's text (docs/POLICY.md)
        "message": f"clrk: token budget exceeded for route openai-chat: this request may cost up to {estimate} tokens, "
                   "and 5 of the day's 1000 are left", "type": "insufficient_quota", "code": "clrk_budget_exceeded"}
    assert (first[A.CLRK_BUDGET_DAILY_USED], first[A.CLRK_BUDGET_DAILY_MAX], first[A.CLRK_BUDGET_DENIED]) == (995, 1000, False)
    assert denied[A.CLRK_BUDGET_DENIED] is True and denied[A.HTTP_RESPONSE_STATUS_CODE] == 429
    assert (denied[A.CLRK_BUDGET_DAILY_USED], denied[A.CLRK_BUDGET_DAILY_MAX], denied.get(A.CLRK_BUDGET_TOKENS)) == (995, 1000, None)


def test_agent_scope_gives_each_agent_its_own_pool(gw, agent_env):
    i = new_invocation()
    researcher = client(i)
    # ~29 reserved (10 output + body / 4) of 40, 17 used; then 17 + 29 no longer fits
    researcher.chat.completions.create(model="mine-a", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    with pytest.raises(openai.RateLimitError):
        researcher.chat.completions.create(model="mine-a", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    writer = openai.OpenAI(api_key="x", max_retries=0, default_headers={"clrk-invocation-id": i},
                           http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url("team-a.writer", WRITER_TOKEN)))
    writer.chat.completions.create(model="mine-a", messages=[{"role": "user", "content": "hi"}], max_tokens=10)


def test_fifty_concurrent_requests_stay_within_the_budget(gw, agent_env):
    i = new_invocation()
    client(i).chat.completions.create(model="crowd-cost900", messages=[{"role": "user", "content": "hi"}], max_tokens=20)

    def one(_):
        try:
            client(i).chat.completions.create(model="crowd-wait", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
            return 200
        except openai.RateLimitError:
            return 429

    with ThreadPoolExecutor(50) as ex:
        results = list(ex.map(one, range(50)))
    admitted = results.count(200)
    assert admitted >= 1 and results.count(429) == 50 - admitted
    rows = gw.wait_records(51, invocation=i)
    used = max(r[A.CLRK_BUDGET_DAILY_USED] for r in rows)
    # The bound (clrk/budget.py): max + what admitted requests used beyond their reservations. Each reserves
    # 50 output tokens + its body / 4 (about 71) and used 17: nothing beyond, so the max holds exactly.
    assert used <= 1000
    assert used == 905 + 17 * admitted
    assert admitted <= 2, f"{admitted} of 50 admitted with 95 tokens left: reservations did not hold"


def test_the_agent_cannot_steer_its_reservation(gw, upstream, agent_env):
    """A negative max tokens is refused (no refill), an absurd one too (no lock of the pool); neither is sent."""
    i, t0 = new_invocation(), time.time()
    with pytest.raises(openai.BadRequestError) as e:
        client(i).chat.completions.create(model="clamp-a", messages=[{"role": "user", "content": "hi"}], max_tokens=-1_000_000)
    assert e.value.response.json()["error"]["message"] == ("clrk: a budgeted route cannot estimate this request: max_tokens "
                                                           "must be a positive integer, not -1000000")
    with pytest.raises(openai.RateLimitError) as e:
        client(i).chat.completions.create(model="clamp-b", messages=[{"role": "user", "content": "hi"}], max_tokens=10**12)
    assert "more than the whole day's 1000" in e.value.response.json()["error"]["message"]
    client(i).chat.completions.create(model="clamp-ok", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    assert [json.loads(r.body)["model"] for r in upstream.requests_since(t0) if r.path == "/v1/chat/completions"] == ["clamp-ok"]
    ok, absurd, negative = gw.wait_records(3, invocation=i)
    assert (negative[A.HTTP_RESPONSE_STATUS_CODE], negative.get(A.CLRK_BUDGET_RESERVED), negative.get(A.CLRK_BUDGET_TOKENS)) == (400, None, None)
    assert absurd[A.CLRK_BUDGET_RESERVED] > 10**12 and absurd.get(A.CLRK_BUDGET_TOKENS) is None
    assert ok[A.CLRK_BUDGET_TOKENS] == ok[A.CLRK_BUDGET_DAILY_USED] == 17 and ok[A.CLRK_BUDGET_DENIED] is False


@pytest.mark.parametrize("whole", [False, True], ids=["body-still-coming", "whole-body-sent"])
def test_a_budgeted_route_refuses_a_body_it_cannot_read(gw, upstream, whole):
    """A chunked body (no Content-Length) cannot be estimated. It is refused on its headers, and since
    answering would mean reading a body of unknown length first, the refusal is a cut connection (never a 413
    the agent reads), whether or not the rest of the body is on its way: nothing is answered, the provider
    sees nothing, and the record says why."""
    i, t0 = new_invocation(), time.time()
    t = tunnel(gw, "api.openai.com:443", sni="api.openai.com")
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b'{"model": "gpt-3.5-turbo-instruct", ',
                                                               b'"prompt": "hi", "max_tokens": 5}'))
    t.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: api.openai.com\r\ncontent-type: application/json\r\n"
              b"transfer-encoding: chunked\r\nclrk-invocation-id: " + i.encode() + b"\r\n\r\n"
              + (body + b"0\r\n\r\n" if whole else body))
    t.settimeout(10)  # a gateway waiting on the body instead would fail this read with TimeoutError
    with contextlib.suppress(ConnectionResetError):  # cut with a reset, or:
        assert t.recv(65536) == b"", "the gateway answered instead of cutting the connection"
    t.close()
    rec = gw.wait_record(invocation=i)
    assert (rec[A.CLRK_DECISION], rec[A.ERROR_TYPE], rec.get(A.HTTP_RESPONSE_STATUS_CODE)) == ("deny", "killed", None)
    assert rec[A.CLRK_DECISION_REASON] == "requests to a budgeted route need a Content-Length body of at most 32 MiB"
    assert not [r for r in upstream.requests_since(t0) if r.path == "/v1/completions"]


def test_clrk_spend_while_running(gw, agent_env):
    i = new_invocation()
    client(i).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    gw.wait_record(invocation=i)
    out = subprocess.run([CLRK, "spend", "--db", str(gw.db), "--json", "--by", "agent,route,model", "--budgets"],
                         capture_output=True, text=True, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    spend = [x for x in lines if "budget" not in x]
    row = next(x for x in spend if x["model"] == "gpt-4o-mini" and x["agent"] == "team-a/researcher")
    assert row["route"] == "team-a/openai-chat" and row["input_tokens"] >= 12 and row["total_tokens"] == row["input_tokens"] + row["output_tokens"]
    budgets = {x["budget"]["pool"]: x["budget"] for x in lines if "budget" in x}
    assert budgets["AIProviderRoute/team-a/openai-chat#openai:budget-*"]["max_tokens"] == 1000
    text = subprocess.run([CLRK, "spend", "--db", str(gw.db), "--since", "1h", "--budgets"], capture_output=True, text=True, check=True).stdout
    assert text.splitlines()[0].split() == ["day", "agent", "route", "model", "requests", "input", "output", "total"]
    assert "budgets today (UTC)" in text


def test_restart_keeps_the_days_usage_and_a_reload_changes_the_budget(gw, setup, pki, upstream, otlp, agent_env):
    """Runs last in this module: it restarts the gateway."""
    i = new_invocation()
    client(i).chat.completions.create(model="restart-cost95", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    with pytest.raises(openai.RateLimitError):  # 100 of 100 used
        client(i).chat.completions.create(model="restart-z", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    gw.stop()
    gw.start()
    with pytest.raises(openai.RateLimitError):
        client(i).chat.completions.create(model="restart-z", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    rows = gw.wait_records(3, invocation=i)
    assert [(r[A.CLRK_BUDGET_DAILY_USED], r[A.CLRK_BUDGET_DENIED]) for r in rows] == [(100, True), (100, True), (100, False)]

    gw.write_policy(docs(pki, upstream, otlp.endpoint, setup[1], restart_budget=5000))
    deadline = time.monotonic() + 5
    while True:
        try:
            client(i).chat.completions.create(model="restart-z", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the raised budget never applied"
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while not (ok := [r for r in gw.records(invocation=i) if r[A.CLRK_BUDGET_DAILY_MAX] == 5000 and not r[A.CLRK_BUDGET_DENIED]]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ok[0][A.CLRK_BUDGET_DAILY_USED] == 117

    # Reordering the rules moves no usage: pools are named by what a rule matches, not by its position.
    gw.write_policy(docs(pki, upstream, otlp.endpoint, setup[1], restart_budget=5000, reverse_rules=True))
    deadline = time.monotonic() + 10
    while True:
        client(i).chat.completions.create(model="restart-z", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        moved = [r for r in gw.records(invocation=i) if r[A.CLRK_DECISION_RULE] == "AIProviderRoute/team-a/openai-chat#rules[3]"]
        if moved:
            break
        assert time.monotonic() < deadline, "the reordered rules never applied"
        time.sleep(0.1)
    assert moved[0][A.CLRK_BUDGET_POOL] == ok[0][A.CLRK_BUDGET_POOL] == "AIProviderRoute/team-a/openai-chat#openai:restart-*"
    assert moved[0][A.CLRK_BUDGET_DAILY_USED] > 117


def test_a_large_body_is_read_for_its_model_without_building_it_and_rewritten_in_place(gw, upstream, agent_env):
    """A 24 MiB chat body (20k messages, a 24 MiB string, the model named last as the OpenAI SDK writes it):
    the gateway finds the model without building the document, and the Backend's rewrite changes that member
    only — every other byte, spacing included, reaches the provider as the agent sent it."""
    i, t0 = new_invocation(), time.time()
    messages = b",".join(b'{"role":"user","content":"m%d"}' % n for n in range(20_000))
    filler = b'"' + b"x" * (24 << 20) + b'"'
    body = b'{"messages":[' + messages + b'],"metadata_blob":' + filler + b', "stream" : false,"model":"gpt-4o"}'
    r = httpx.post("https://api.openai.com/v1/chat/completions", content=body, proxy=gw.proxy_url(), verify=gw.ssl_context(),
                   trust_env=False, timeout=60, headers={"content-type": "application/json", "clrk-invocation-id": i})
    assert r.status_code == 200, r.text
    sent = [x.body for x in upstream.requests_since(t0) if x.path == "/v1/chat/completions"]
    assert sent == [body.replace(b'"model":"gpt-4o"}', b'"model":"gpt-4o-mini"}')]
    rec = gw.wait_record(invocation=i)
    assert rec[A.GEN_AI_REQUEST_MODEL] == "gpt-4o" and rec[A.CLRK_BODY_REQUEST_REWRITTEN] is True
    assert rec[A.CLRK_APR_NAME] == "openai-chat" and "gpt-4o" in rec[A.CLRK_DECISION_REASON]
