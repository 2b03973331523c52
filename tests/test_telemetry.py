"""Metrics and export sampling end to end: the official openai SDK and raw clients through a real gateway to the
fake provider, a real OTLP/HTTP receiver decoding /v1/traces, /v1/logs and /v1/metrics (protobuf), a scrape of
the Prometheus endpoint, and the DuckDB file. Metric values must equal what the stored records say."""

from __future__ import annotations

import random
import re
import socket

import httpx
import openai
import pytest

from clrk import attributes as A
from clrk.recorder.metrics import GEN_AI_DURATION_BUCKETS, HTTP_DURATION_BUCKETS, TOKEN_BUCKETS
from clrk.recorder.sampling import ratio_bound, trace_kept
from tests.harness import fake_provider
from tests.harness.gateway import Gateway, agent_docs, exchange, free_port, gateway_doc, route, status_of
from tests.harness.otlp import OtlpReceiver
from tests.harness.util import new_invocation, wait_for

OPENAI = "api.openai.com"
BUDGET_MAX = 200


def policy(pki, upstream, endpoint: str, prom_port: int, ratio: float, parent_based: bool = False) -> list[dict]:
    gw = gateway_doc(endpoint=endpoint, aliases={OPENAI: upstream.address, "allowed.test": upstream.address,
                                                 "denied.test": upstream.address}, ca_bundle=str(pki[0]))
    gw["spec"]["otlp"]["metrics"] = {"intervalSeconds": 1}
    gw["spec"]["otlp"]["sampling"] = {"ratio": ratio, "parentBased": parent_based}
    gw["spec"]["metrics"] = {"prometheus": {"port": prom_port}}
    apr = {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "AIProviderRoute",
           "metadata": {"name": "openai", "namespace": "team-a"},
           "spec": {"sourceAgents": {"namespaces": ["team-a"]}, "rules": [
               {"matches": [{"provider": "openai", "models": ["budget-*"]}],
                "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": BUDGET_MAX, "scope": "Route"}}]},
               {"matches": [{"provider": "openai"}]}]}}
    return [gw, *agent_docs(), apr, route("plain", ["allowed.test"])]


@pytest.fixture(scope="module")
def rx():
    r = OtlpReceiver()  # this module's own: its metrics are this gateway's alone
    yield r
    r.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pki, upstream, rx):
    fake_provider.install(upstream)
    prom = free_port()
    g = Gateway(tmp_path_factory.mktemp("telemetry-gw"), policy(pki, upstream, rx.endpoint, prom, 0.0)).start()
    g.wait_log(f"Prometheus metrics on http://127.0.0.1:{prom}/metrics")  # the recorder's word, once it serves
    yield g, prom
    g.stop()


@pytest.fixture
def gw(setup):
    return setup[0]


def sdk(gw: Gateway, inv: str, headers: dict | None = None) -> openai.OpenAI:
    http = httpx.Client(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False, timeout=30)
    return openai.OpenAI(api_key="sk-agent-key", max_retries=0, http_client=http,
                         default_headers={"clrk-invocation-id": inv, **(headers or {})})


def denial(gw: Gateway, inv: str, headers: dict | None = None) -> None:
    with gw.client() as c:
        assert c.get("https://denied.test/x?token=abc", headers={"clrk-invocation-id": inv, **(headers or {})}).status_code == 403


def scrape(port: int) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=10)
    assert r.status_code == 200
    return r.text


def prom_sum(text: str, name: str, **labels) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{(.*?)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
            found = True
    assert found, f"no {name} {labels} in the scrape"
    return total


def test_metrics_and_ratio_zero_sampling_against_the_stored_records(gw, setup, rx):
    inv = new_invocation("tel")
    client = sdk(gw, inv)
    msgs = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True,
                                        stream_options={"include_usage": True}))
    client.chat.completions.create(model="budget-ok", messages=msgs, max_tokens=10)
    with pytest.raises(openai.RateLimitError):  # the provider's own error
        client.chat.completions.create(model="gpt-4o-error", messages=msgs)
    with pytest.raises(openai.RateLimitError):  # the gateway's budget refusal: 5000 tokens do not fit in 200
        client.chat.completions.create(model="budget-big", messages=msgs, max_tokens=5000)
    denial(gw, inv)
    denial(gw, inv + "-last")  # exported after all the others: once its span is in, theirs would be too
    rows = gw.wait_records(6, invocation=inv)
    last = gw.wait_record(invocation=inv + "-last")

    # Every row is stored, with its sampling decision: ratio 0 keeps the denials, the error and the budget 429.
    assert all(r.get(A.CLRK_EXPORT_SAMPLED) is not None for r in rows)
    kept = {r[A.SPAN_ID] for r in rows if r[A.CLRK_EXPORT_SAMPLED]}
    classes = sorted((r[A.CLRK_DECISION], r.get(A.CLRK_BUDGET_DENIED) is True, r.get(A.ERROR_TYPE) is not None)
                     for r in rows if r[A.CLRK_EXPORT_SAMPLED])
    assert classes == [("allow", False, True), ("deny", False, False), ("deny", True, False)]
    rx.span(last[A.SPAN_ID])
    rx.log(last[A.SPAN_ID])
    for r in rows:
        with rx.lock:
            spans = [s for s in rx.got.spans if s["span_id"] == r[A.SPAN_ID]]
            logs = [x for x in rx.got.logs if x["span_id"] == r[A.SPAN_ID]]
        assert len(spans) == len(logs) == (1 if r[A.SPAN_ID] in kept else 0), r
    assert all(A.CLRK_EXPORT_SAMPLED not in s["attributes"] for s in rx.got.spans)

    allowed = [r for r in rows if r[A.CLRK_DECISION] == "allow"]
    tokens_in = sum(r.get(A.GEN_AI_USAGE_INPUT_TOKENS) or 0 for r in allowed)
    tokens_out = sum(r.get(A.GEN_AI_USAGE_OUTPUT_TOKENS) or 0 for r in allowed)
    assert tokens_in > 0 and tokens_out > 0
    stream = next(r for r in rows if r.get(A.GEN_AI_RESPONSE_STREAM))
    assert 0 < stream[A.CLRK_RESP_FIRST_CHUNK_MS] <= stream[A.CLRK_DURATION_MS]
    ok_budget = next(r for r in rows if r.get(A.GEN_AI_REQUEST_MODEL) == "budget-ok")
    total = len(rows) + 1

    # OTLP /v1/metrics: cumulative, so the latest export holds the totals.
    def requests(got) -> int:
        return sum(p["value"] for p in got.get("clrk.egress.requests", []))

    got = rx.wait_metrics(lambda g: requests(g) == total and "gen_ai.client.token.usage" in g, gateway="test-gw")
    by_name = {n: pts[0]["unit"] for n, pts in got.items()}
    assert by_name["gen_ai.client.token.usage"] == "{token}" and by_name["gen_ai.client.operation.duration"] == "s"
    assert by_name["http.client.request.duration"] == "s" and by_name["clrk.egress.requests"] == "{request}"
    usage = got["gen_ai.client.token.usage"]
    assert all(p["kind"] == "histogram" and tuple(p["bounds"]) == TOKEN_BUCKETS for p in usage)
    assert sum(p["sum"] for p in usage if p["attributes"]["gen_ai.token.type"] == "input") == tokens_in
    assert sum(p["sum"] for p in usage if p["attributes"]["gen_ai.token.type"] == "output") == tokens_out
    assert {p["attributes"]["gen_ai.request.model"] for p in usage} == {"gpt-4o-mini", "budget-ok"}
    duration = got["gen_ai.client.operation.duration"]
    assert all(tuple(p["bounds"]) == GEN_AI_DURATION_BUCKETS for p in duration)
    assert sum(p["count"] for p in duration) == len(allowed) == 4
    assert [p["count"] for p in duration if p["attributes"].get("error.type") == "rate_limit_exceeded"] == [1]
    assert abs(sum(p["sum"] for p in duration) - sum(r[A.CLRK_DURATION_MS] for r in allowed) / 1000) < 1e-6
    ttfc = got["gen_ai.client.operation.time_to_first_chunk"]
    assert [(p["count"], round(p["sum"], 6)) for p in ttfc] == [(1, round(stream[A.CLRK_RESP_FIRST_CHUNK_MS] / 1000, 6))]
    http = got["http.client.request.duration"]
    assert all(tuple(p["bounds"]) == HTTP_DURATION_BUCKETS for p in http) and sum(p["count"] for p in http) == 4
    by_decision = {}
    for p in got["clrk.egress.requests"]:
        key = (p["attributes"]["clrk.decision"], p["attributes"].get("http.response.status_code"))
        by_decision[key] = by_decision.get(key, 0) + p["value"]
    assert by_decision == {("allow", 200): 3, ("allow", 429): 1, ("deny", 429): 1, ("deny", 403): 2}
    assert {p["attributes"]["agent.name"] for p in got["clrk.egress.requests"]} == {"researcher"}
    assert [p["value"] for p in got["clrk.budget.tokens.limit"]] == [BUDGET_MAX]
    assert [p["value"] for p in got["clrk.budget.tokens.used"]] == [ok_budget[A.CLRK_BUDGET_DAILY_USED]]
    exported = {p["attributes"]["clrk.export.sampled"]: p["value"] for p in got["clrk.export.records"]}
    assert exported == {True: 4, False: 3}
    for pts in got.values():  # bounded attributes: nothing an agent chose freely, no secrets
        for p in pts:
            text = repr(p["attributes"])
            assert inv not in text and "denied.test" not in text and "token=abc" not in text and "/x" not in text

    # The same instruments on the Prometheus endpoint, scraped now (no waiting: a scrape collects).
    text = scrape(setup[1])
    assert prom_sum(text, "clrk_egress_requests_total") == total
    assert prom_sum(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == tokens_in
    assert prom_sum(text, "gen_ai_client_token_usage_count", gen_ai_token_type="output") == 3
    assert prom_sum(text, "http_client_request_duration_seconds_count") == 4
    assert prom_sum(text, "http_client_request_duration_seconds_bucket", le="+Inf") == 4
    assert prom_sum(text, "gen_ai_client_operation_duration_seconds_bucket", le="81.92") == 4
    assert prom_sum(text, "clrk_budget_tokens_limit", clrk_budget_pool=ok_budget[A.CLRK_BUDGET_POOL]) == BUDGET_MAX
    assert "sk-agent-key" not in text and inv not in text


def test_ratio_half_keeps_whole_traces_by_trace_id_after_a_reload(gw, setup, rx, pki, upstream):
    gw.write_policy(policy(pki, upstream, rx.endpoint, setup[1], 0.5))
    gw.wait_log("policy reloaded")
    inv = new_invocation("half")
    rng = random.Random(7)
    traces = [f"{rng.getrandbits(128):032x}" for _ in range(16)]
    with gw.client() as c:
        for t in traces:
            for _ in range(2):  # two transactions of one agent trace: kept or dropped together
                tp = f"00-{t}-{rng.getrandbits(64):016x}-01"
                r = c.get("https://allowed.test/ok", headers={"clrk-invocation-id": inv, "traceparent": tp})
                assert r.status_code == 200
    denial(gw, inv + "-last")
    rows = gw.wait_records(32, invocation=inv)
    last = gw.wait_record(invocation=inv + "-last")
    bound = ratio_bound(0.5)
    expect = {t: trace_kept(t, bound) for t in traces}
    assert 0 < sum(expect.values()) < len(traces)  # this seed keeps some and drops some
    for r in rows:
        assert r[A.CLRK_EXPORT_SAMPLED] is expect[r[A.TRACE_ID]], r[A.TRACE_ID]
    rx.span(last[A.SPAN_ID])
    with rx.lock:
        exported = {s["trace_id"] for s in rx.got.spans if s["span_id"] in {r[A.SPAN_ID] for r in rows}}
        n_spans = sum(1 for s in rx.got.spans if s["span_id"] in {r[A.SPAN_ID] for r in rows})
    assert exported == {t for t, k in expect.items() if k} and n_spans == 2 * len(exported)
    # The Prometheus endpoint came back on its port with the rebuilt export, and counts from there.
    assert prom_sum(scrape(setup[1]), "clrk_egress_requests_total") == len(rows) + 1


def test_parent_based_follows_the_agents_sampled_flag_through_the_gateway(gw, setup, rx, pki, upstream):
    reloads = gw.log().count("policy reloaded")
    gw.write_policy(policy(pki, upstream, rx.endpoint, setup[1], 0.0, parent_based=True))
    wait_for(lambda: gw.log().count("policy reloaded") > reloads, "the reload")
    inv = new_invocation("parent")
    t_on, t_off = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"
    with gw.client() as c:
        for t, flags in ((t_on, "01"), (t_off, "00")):
            r = c.get("https://allowed.test/ok", headers={"clrk-invocation-id": inv, "traceparent": f"00-{t}-00f067aa0ba902b7-{flags}"})
            assert r.status_code == 200
        assert c.get("https://allowed.test/ok", headers={"clrk-invocation-id": inv}).status_code == 200  # no traceparent
    rows = {r[A.TRACE_ID]: r for r in gw.wait_records(3, invocation=inv)}
    assert rows[t_on][A.CLRK_EXPORT_SAMPLED] is True and rows[t_off][A.CLRK_EXPORT_SAMPLED] is False
    (own,) = [r for t, r in rows.items() if t not in (t_on, t_off)]
    assert own[A.CLRK_EXPORT_SAMPLED] is False  # no agent flag: the ratio (0) decides
    assert rows[t_on][A.REQUEST_HEADERS]["traceparent"].endswith("-01")


def test_hostile_scrapes_do_not_stop_the_prometheus_endpoint(gw, setup):
    port = setup[1]
    with httpx.Client(trust_env=False, timeout=10) as c:
        r = c.get(f"http://127.0.0.1:{port}/metrics", headers={"accept": "application/openmetrics-text"})
        assert r.status_code == 200 and r.text.rstrip().endswith("# EOF")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a 70 KB request line
        s.sendall(b"GET /metrics?x=" + b"A" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(12).startswith(b"HTTP/1.")
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # a client that sends nothing and stays
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # half a request, then gone
            s.sendall(b"GET /metr")
        assert "clrk_records_stored_total" in scrape(port)
    finally:
        idle.close()


def test_an_agent_spraying_methods_paths_and_ids_adds_no_series(gw, setup):
    """Raw requests with invented methods, random paths, queries and invocation ids: none becomes a label."""
    port = setup[1]
    before = scrape(port)
    series = {line.split(" ")[0] for line in before.splitlines() if line.startswith("http_client_request_duration_seconds_count")}
    rng = random.Random(3)
    marks = []
    for i in range(12):
        method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(6)) if i % 2 else "GET"
        mark = f"spray{rng.getrandbits(40):x}"
        marks.append(mark)
        raw = (f"{method} /ok/{mark}?q={mark} HTTP/1.1\r\nHost: allowed.test\r\nclrk-invocation-id: {mark}\r\n"
               f"Connection: close\r\n\r\n").encode()
        assert status_of(exchange(gw, raw)) in (200, 501)  # the upstream's answer: it was let through
    gw.wait_record(invocation=marks[-1])
    text = scrape(port)
    methods = set(re.findall(r'http_request_method="([^"]*)"', text))
    assert methods <= {"GET", "POST", "_OTHER"} and "_OTHER" in methods
    assert not any(m in text for m in marks)
    after = {line.split(" ")[0] for line in text.splitlines() if line.startswith("http_client_request_duration_seconds_count")}
    assert len(after - series) <= 2  # GET 200 and _OTHER 501 at most, not one per method or path


def test_after_a_restart_the_budget_gauges_start_from_the_store(gw, setup):
    """Last: it restarts the module's gateway. The pool charged by the first test shows at once, no traffic."""
    port = setup[1]
    before = prom_sum(scrape(port), "clrk_budget_tokens_used")
    assert before > 0
    line = f"Prometheus metrics on http://127.0.0.1:{port}/metrics"
    served = gw.log().count(line)
    gw.stop()
    gw.start()
    wait_for(lambda: gw.log().count(line) > served, "the restarted recorder's Prometheus endpoint")
    text = scrape(port)
    assert prom_sum(text, "clrk_budget_tokens_used") == before
    assert prom_sum(text, "clrk_budget_tokens_limit") == BUDGET_MAX
    assert "clrk_egress_requests_total" not in text  # nothing counted since the restart
