"""The metrics the recorder computes from records (`clrk.recorder.metrics`), in-process with the SDK's in-memory
reader: names, units, advisory buckets, attributes and exact values for known rows; bounded attributes."""

from __future__ import annotations

import logging
import socket
import time

import httpx
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.resources import Resource

from clrk import attributes as A
from clrk.recorder.export import Exporter
from clrk.recorder.metrics import (
    COST_BUCKETS,
    GEN_AI_DURATION_BUCKETS,
    HTTP_DURATION_BUCKETS,
    TOKEN_BUCKETS,
    GatewayMetrics,
)
from tests.harness.gateway import free_port

NOW = time.time()


def collect(reader: InMemoryMetricReader) -> dict[str, tuple[str, list]]:
    """{metric name: (unit, data points)}"""
    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = (m.unit, list(m.data.data_points))
    return out


def chat(**kw) -> dict:
    return {A.TIME: NOW, A.CLRK_DECISION: "allow", A.CLRK_DECISION_RULE: "AIProviderRoute/team-a/openai#rules[0]",
            A.AGENT_NAMESPACE: "team-a", A.AGENT_NAME: "researcher", A.HTTP_REQUEST_METHOD: "POST",
            A.HTTP_RESPONSE_STATUS_CODE: 200, A.URL_FULL: "https://api.openai.com/v1/chat/completions?x=1",
            A.INVOCATION_ID: "inv-1", A.SERVER_ADDRESS: "api.openai.com",
            A.GEN_AI_PROVIDER_NAME: "openai", A.GEN_AI_OPERATION_NAME: "chat", A.GEN_AI_REQUEST_MODEL: "gpt-4o",
            A.GEN_AI_RESPONSE_MODEL: "gpt-4o-2024", A.GEN_AI_USAGE_INPUT_TOKENS: 12, A.GEN_AI_USAGE_OUTPUT_TOKENS: 5,
            A.CLRK_DURATION_MS: 250.0, A.CLRK_REQ_BYTES: 100, A.CLRK_RESP_BYTES: 400, **kw}


def test_instruments_units_buckets_and_values_of_known_rows():
    reader = InMemoryMetricReader()
    m = GatewayMetrics(Resource.create({}), [reader], lambda: (3, 7), lambda: (40, 2))
    rows = [
        chat(**{A.GEN_AI_USAGE_COST: 0.0125}),
        chat(**{A.GEN_AI_USAGE_COST: 0.5, A.GEN_AI_RESPONSE_STREAM: True, A.CLRK_RESP_FIRST_CHUNK_MS: 30.0, A.GEN_AI_USAGE_INPUT_TOKENS: 20,
                A.GEN_AI_USAGE_OUTPUT_TOKENS: 3, A.CLRK_DURATION_MS: 900.0}),
        chat(**{A.ERROR_TYPE: "rate_limit_exceeded", A.HTTP_RESPONSE_STATUS_CODE: 429,
                A.GEN_AI_USAGE_INPUT_TOKENS: None, A.GEN_AI_USAGE_OUTPUT_TOKENS: None}),
        {A.TIME: NOW, A.CLRK_DECISION: "deny", A.CLRK_DECISION_RULE: "EgressGateway/gw/defaultPolicy",
         A.AGENT_NAMESPACE: "team-a", A.AGENT_NAME: "researcher", A.HTTP_REQUEST_METHOD: "BREW",
         A.HTTP_RESPONSE_STATUS_CODE: 403, A.CLRK_DURATION_MS: 1.0, A.CLRK_RESP_BYTES: 50,
         A.URL_FULL: "https://evil.test/secret-path", A.GEN_AI_OPERATION_NAME: "chat", A.GEN_AI_REQUEST_MODEL: "x" * 80},
        {A.TIME: NOW, A.CLRK_DECISION: "allow", A.CLRK_DECISION_RULE: "EgressRoute/default/plain",
         A.HTTP_REQUEST_METHOD: "BREW", A.HTTP_RESPONSE_STATUS_CODE: 200, A.CLRK_DURATION_MS: 20.0},
        chat(**{A.CLRK_DECISION: "deny", A.CLRK_BUDGET_DENIED: True, A.HTTP_RESPONSE_STATUS_CODE: 429,
                A.CLRK_BUDGET_POOL: "team-a/openai#rules[0]", A.CLRK_BUDGET_DAILY_USED: 990,
                A.CLRK_BUDGET_DAILY_MAX: 1000, A.GEN_AI_USAGE_INPUT_TOKENS: None, A.GEN_AI_USAGE_OUTPUT_TOKENS: None}),
    ]
    for i, r in enumerate(rows):
        m.record(r, exported=i % 2 == 0)
    m.commit()  # counters are summed per batch, then handed to the SDK
    got = collect(reader)

    unit, points = got["gen_ai.client.token.usage"]
    assert unit == "{token}"
    assert all(isinstance(p, HistogramDataPoint) and tuple(p.explicit_bounds) == TOKEN_BUCKETS for p in points)
    by_type = {p.attributes["gen_ai.token.type"]: p for p in points}
    assert (by_type["input"].sum, by_type["input"].count, by_type["output"].sum, by_type["output"].count) == (32, 2, 8, 2)
    assert dict(by_type["input"].attributes) == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                                 "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024",
                                                 "gen_ai.token.type": "input"}

    unit, points = got["gen_ai.client.operation.duration"]
    assert unit == "s" and all(tuple(p.explicit_bounds) == GEN_AI_DURATION_BUCKETS for p in points)
    assert sorted((p.attributes.get("error.type", ""), p.count, round(p.sum, 6)) for p in points) == [
        ("", 2, 1.15), ("rate_limit_exceeded", 1, 0.25)]  # allowed operations only: the denials are not

    unit, points = got["gen_ai.client.cost"]  # priced calls only; an unpriced one adds no zero
    assert unit == "USD" and all(tuple(p.explicit_bounds) == COST_BUCKETS for p in points)
    assert [(p.count, round(p.sum, 6), p.attributes["gen_ai.request.model"]) for p in points] == [(2, 0.5125, "gpt-4o")]

    unit, points = got["gen_ai.client.operation.time_to_first_chunk"]
    assert unit == "s" and [(p.count, p.sum) for p in points] == [(1, 0.03)]

    unit, points = got["http.client.request.duration"]
    assert unit == "s" and all(tuple(p.explicit_bounds) == HTTP_DURATION_BUCKETS for p in points)
    assert sorted((p.attributes["http.request.method"], p.attributes["http.response.status_code"], p.count) for p in points) == [
        ("POST", 200, 2), ("POST", 429, 1), ("_OTHER", 200, 1)]

    unit, points = got["clrk.egress.requests"]
    assert unit == "{request}" and sum(p.value for p in points) == len(rows)
    counts = {(p.attributes["clrk.decision"], p.attributes["clrk.decision.rule"], p.attributes["http.response.status_code"]): p.value
              for p in points}
    assert counts[("allow", "AIProviderRoute/team-a/openai#rules[0]", 200)] == 2
    assert counts[("deny", "EgressGateway/gw/defaultPolicy", 403)] == 1
    assert counts[("deny", "AIProviderRoute/team-a/openai#rules[0]", 429)] == 1
    assert sum(p.value for p in got["clrk.egress.request.body.size"][1]) == 100 * 4
    assert sum(p.value for p in got["clrk.egress.response.body.size"][1]) == 400 * 4 + 50
    assert got["clrk.egress.request.body.size"][0] == "By"

    exported = {p.attributes["clrk.export.sampled"]: p.value for p in got["clrk.export.records"][1]}
    assert exported == {True: 3, False: 3}
    used, limit = got["clrk.budget.tokens.used"][1], got["clrk.budget.tokens.limit"][1]
    assert [(dict(p.attributes), p.value) for p in used] == [({"clrk.budget.pool": "team-a/openai#rules[0]"}, 990)]
    assert [p.value for p in limit] == [1000]
    assert [p.value for p in got["clrk.export.queue.size"][1]] == [3]
    assert [p.value for p in got["clrk.export.dropped"][1]] == [7]
    assert [p.value for p in got["clrk.records.stored"][1]] == [40]
    assert [p.value for p in got["clrk.records.dropped"][1]] == [2]

    # Bounded: no URL, path, host, invocation id anywhere; invented methods are _OTHER.
    for _, points in got.values():
        for p in points:
            assert isinstance(p, HistogramDataPoint | NumberDataPoint)
            for k, v in p.attributes.items():
                assert k not in (A.URL_FULL, A.INVOCATION_ID, A.SERVER_ADDRESS), k
                assert "evil.test" not in str(v) and "inv-1" not in str(v)
    m.shutdown()


def test_a_pool_seen_yesterday_reports_nothing_used_today():
    reader = InMemoryMetricReader()
    m = GatewayMetrics(Resource.create({}), [reader])
    m.record(chat(**{A.TIME: NOW - 86400 * 2, A.CLRK_BUDGET_POOL: "p", A.CLRK_BUDGET_DAILY_USED: 500,
                     A.CLRK_BUDGET_DAILY_MAX: 1000}), exported=None)
    m.commit()
    got = collect(reader)
    assert [p.value for p in got["clrk.budget.tokens.used"][1]] == [0]
    assert "clrk.export.records" not in got  # no span export, no sampling decision to count
    m.record(chat(**{A.CLRK_BUDGET_POOL: "p", A.CLRK_BUDGET_DAILY_USED: 7, A.CLRK_BUDGET_DAILY_MAX: 1000}), None)
    m.record(chat(**{A.TIME: NOW - 86400, A.CLRK_BUDGET_POOL: "p", A.CLRK_BUDGET_DAILY_USED: 900}), None)  # late, older
    assert [p.value for p in collect(reader)["clrk.budget.tokens.used"][1]] == [7]
    m.shutdown()


def test_a_prometheus_port_in_use_is_said_and_the_rest_goes_on(caplog):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    exporter = Exporter()
    try:
        with caplog.at_level(logging.ERROR, logger="clrk.export"):
            exporter.configure({"g": {"endpoint": "", "prometheus": ["127.0.0.1", port]},
                                "h": {"endpoint": "", "prometheus": ["127.0.0.1", free_port()]}}, "")
        assert f"cannot serve Prometheus metrics on 127.0.0.1:{port}" in caplog.text
        assert "is the port in use" in caplog.text
        row = {A.TIME: NOW, A.CLRK_GATEWAY_NAME: "h", A.CLRK_DECISION: "deny", A.CLRK_DURATION_MS: 1.0}
        exporter.sample([row])
        assert A.CLRK_EXPORT_SAMPLED not in row  # h exports no spans: no sampling decision
        assert exporter.export([row, {**row, A.CLRK_GATEWAY_NAME: "g"}]) == 0
        h = exporter.pipelines["h"].prometheus
        text = httpx.get(f"http://127.0.0.1:{h.port}/metrics", trust_env=False, timeout=10).text
        assert 'clrk_egress_requests_total{clrk_decision="deny"' in text
    finally:
        exporter.shutdown(5.0)
        taken.close()
