"""The metrics the recorder computes from records (`clrk.recorder.metrics`), in-process with the SDK's in-memory
reader: names, units, advisory buckets, attributes and exact values for known rows; bounded attributes."""

from __future__ import annotations

import logging
import random
import socket
import time

import httpx
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, AlwaysOnExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics import Histogram as SDKHistogram
from opentelemetry.sdk.metrics._internal.aggregation import _ExplicitBucketHistogramAggregation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import generate_latest

from clrk import attributes as A
from clrk.recorder.export import Exporter
from clrk.recorder.histograms import MAX_CACHED, HistogramFeed
from clrk.recorder.metrics import (
    COST_BUCKETS,
    GEN_AI_DURATION_BUCKETS,
    HTTP_DURATION_BUCKETS,
    KNOWN_METHODS,
    TOKEN_BUCKETS,
    GatewayMetrics,
    PrometheusEndpoint,
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



# --- The grouped histograms against the SDK's own path, point by point ---------------------------------------

class SDKPath(GatewayMetrics):
    """The oracle: `record` as it was before histograms were grouped (verbatim), one SDK `Histogram.record` per
    observation, at once."""

    def record(self, row, exported):
        status = row.get(A.HTTP_RESPONSE_STATUS_CODE)
        error = row.get(A.ERROR_TYPE)
        decision = row.get(A.CLRK_DECISION)
        key = (decision, row.get(A.CLRK_DECISION_RULE), row.get(A.AGENT_NAMESPACE), row.get(A.AGENT_NAME), status)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0, 0, 0]
        counts[0] += 1
        counts[1] += row.get(A.CLRK_REQ_BYTES) or 0
        counts[2] += row.get(A.CLRK_RESP_BYTES) or 0
        if exported is not None:
            self._exported[exported] += 1
        seconds = (row.get(A.CLRK_DURATION_MS) or 0.0) / 1000.0
        if decision == "allow":
            method = row.get(A.HTTP_REQUEST_METHOD)
            http = {A.HTTP_REQUEST_METHOD: method if method in KNOWN_METHODS else "_OTHER"}
            if status is not None:
                http[A.HTTP_RESPONSE_STATUS_CODE] = status
            if error is not None:
                http[A.ERROR_TYPE] = error
            self.http_duration.record(seconds, http)
            op = row.get(A.GEN_AI_OPERATION_NAME)
            if op is not None:
                self._gen_ai(row, op, error, seconds)

    def _gen_ai(self, row, op, error, seconds):
        attrs = {A.GEN_AI_OPERATION_NAME: op}
        for key in (A.GEN_AI_PROVIDER_NAME, A.GEN_AI_REQUEST_MODEL, A.GEN_AI_RESPONSE_MODEL):
            v = row.get(key)
            if v is not None:
                attrs[key] = v
        tokens_in, tokens_out = row.get(A.GEN_AI_USAGE_INPUT_TOKENS), row.get(A.GEN_AI_USAGE_OUTPUT_TOKENS)
        if tokens_in is not None:
            self.token_usage.record(tokens_in, {**attrs, "gen_ai.token.type": "input"})
        if tokens_out is not None:
            self.token_usage.record(tokens_out, {**attrs, "gen_ai.token.type": "output"})
        cost = row.get(A.GEN_AI_USAGE_COST)
        if cost is not None:
            self.cost.record(cost, attrs)
        first = row.get(A.CLRK_RESP_FIRST_CHUNK_MS)
        if first is not None and row.get(A.GEN_AI_RESPONSE_STREAM):
            self.time_to_first_chunk.record(first / 1000.0, attrs if error is None else {**attrs, A.ERROR_TYPE: error})
        if error is not None:
            attrs[A.ERROR_TYPE] = error
        self.operation_duration.record(seconds, attrs)


def hostile_rows(rng: random.Random) -> list[dict]:
    """Several attribute sets, values on bucket boundaries, and what the SDK drops, keeps or refuses."""
    rows = []
    for i in range(300):
        model = rng.choice(["gpt-4o", "gpt-4o-mini", "claude-x", None])
        rows.append(chat(**{
            A.GEN_AI_REQUEST_MODEL: model, A.GEN_AI_RESPONSE_MODEL: model and model + "-2024",
            A.GEN_AI_PROVIDER_NAME: rng.choice(["openai", "anthropic"]),
            A.HTTP_REQUEST_METHOD: rng.choice(["POST", "GET", "BREW"]),
            A.HTTP_RESPONSE_STATUS_CODE: rng.choice([200, 200, 429, 500, None]),
            A.ERROR_TYPE: rng.choice([None, None, "rate_limit_exceeded", "500"]),
            A.CLRK_DURATION_MS: rng.choice([250.0, 5.0, 10240.0, rng.random() * 3000, rng.random() * 10]),
            A.GEN_AI_USAGE_INPUT_TOKENS: rng.choice([16, 1024, 0, rng.randrange(1, 10**6), None]),
            A.GEN_AI_USAGE_OUTPUT_TOKENS: rng.choice([4, 67108864, rng.randrange(1, 5000), None]),
            A.GEN_AI_USAGE_COST: rng.choice([None, 0.01, 50, rng.random() / 7]),
            A.GEN_AI_RESPONSE_STREAM: i % 3 == 0, A.CLRK_RESP_FIRST_CHUNK_MS: rng.choice([40.0, rng.random() * 900]),
            A.GEN_AI_OPERATION_NAME: rng.choice(["chat", "chat", "embeddings", None])}))
    rows[7][A.CLRK_DURATION_MS] = -5.0  # clock skew: the SDK warns and drops it
    rows[8][A.GEN_AI_USAGE_COST] = float("nan")
    rows[9][A.GEN_AI_USAGE_COST] = float("inf")
    rows[10][A.GEN_AI_USAGE_INPUT_TOKENS] = -1
    rows[11][A.GEN_AI_USAGE_INPUT_TOKENS] = 10**20  # huge but finite: kept
    rows[12][A.GEN_AI_USAGE_OUTPUT_TOKENS] = 1e300
    rows[13][A.GEN_AI_USAGE_OUTPUT_TOKENS] = True  # a bool is an int to the SDK
    for i, status in ((6, 200), (14, 200.0), (22, True), (23, 1)):  # equal values, their own series to the SDK
        rows[i].update({A.HTTP_REQUEST_METHOD: "POST", A.HTTP_RESPONSE_STATUS_CODE: status, A.ERROR_TYPE: None})
    rows[15][A.GEN_AI_REQUEST_MODEL] = ["gpt-4o", "x"]  # unhashable: the SDK makes a tuple of it
    rows[16][A.GEN_AI_RESPONSE_MODEL] = 5
    rows[17][A.GEN_AI_USAGE_INPUT_TOKENS] = "12"  # the SDK raises: the row is reported, the others go on
    rows[18][A.GEN_AI_USAGE_OUTPUT_TOKENS] = 10**400  # overflows math.isfinite: raises too
    rows[19][A.GEN_AI_USAGE_COST] = -0.0
    rows[20][A.CLRK_DURATION_MS] = float("nan")
    rows[21][A.GEN_AI_USAGE_INPUT_TOKENS] = 1.0  # equal to an int value: min/max keep their type
    rows.append({A.TIME: NOW, A.CLRK_DECISION: "deny", A.CLRK_DURATION_MS: 1.0})
    return rows


def points_of(data) -> list:
    """Everything a reader exports but the timestamps, in the SDK's order, with value types (1, 1.0, True)."""
    out = []
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                d = m.data
                out.append((m.name, m.unit, m.description, type(d).__name__,
                            repr(getattr(d, "aggregation_temporality", None)), getattr(d, "is_monotonic", None)))
                for p in d.data_points:
                    attrs = [(k, repr(v)) for k, v in p.attributes.items()]
                    if isinstance(p, HistogramDataPoint):
                        out.append((attrs, p.count, repr(p.sum), p.bucket_counts, p.explicit_bounds, repr(p.min),
                                    repr(p.max), len(p.exemplars)))
                    else:
                        out.append((attrs, repr(p.value)))
    return out


def otlp_bytes(data) -> bytes:
    """The OTLP /v1/metrics body the exporter would post, timestamps zeroed."""
    request = encode_metrics(data)
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for kind in ("sum", "gauge", "histogram"):
                    if m.HasField(kind):
                        for p in getattr(m, kind).data_points:
                            p.start_time_unix_nano = p.time_unix_nano = 0
    return request.SerializeToString(deterministic=True)


def test_grouped_histograms_export_what_one_sdk_call_per_observation_did():
    def build(cls):
        readers = [InMemoryMetricReader(),
                   InMemoryMetricReader(preferred_temporality={SDKHistogram: AggregationTemporality.DELTA})]
        prom = PrometheusEndpoint("127.0.0.1", 0)
        return cls(Resource.create({"service.name": "t"}), [*readers, prom.reader], lambda: (1, 2), lambda: (3, 4)), \
            readers, prom

    rng = random.Random(7)
    rows = hostile_rows(rng)
    old, old_readers, old_prom = build(SDKPath)
    new, new_readers, new_prom = build(GatewayMetrics)
    starts: dict = {}
    try:
        for batch in (rows[:1], rows[1:40], rows[40:41], rows[41:200], [], rows[200:]):
            for m in (old, new):
                raised = []
                for i, row in enumerate(batch):
                    try:
                        m.record(row, exported=i % 2 == 0)
                    except Exception as e:  # as export.py does: the row is reported, the batch goes on
                        raised.append(type(e).__name__)
                m.commit()
                m.raised = raised
            assert new.raised == old.raised
            for o, n in zip(old_readers, new_readers, strict=True):
                od, nd = o.get_metrics_data(), n.get_metrics_data()
                assert points_of(nd) == points_of(od)
                assert otlp_bytes(nd) == otlp_bytes(od)
                for rm in nd.resource_metrics:  # cumulative: a series keeps its start time
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            for p in metric.data.data_points:
                                if getattr(metric.data, "aggregation_temporality", None) == AggregationTemporality.CUMULATIVE:
                                    key = (id(n), metric.name, tuple(sorted(map(repr, p.attributes.items()))))
                                    assert starts.setdefault(key, p.start_time_unix_nano) == p.start_time_unix_nano
                                    assert p.start_time_unix_nano <= p.time_unix_nano
            assert generate_latest(new_prom.registry) == generate_latest(old_prom.registry)
        assert set(old.raised) <= {"TypeError", "OverflowError"}
        text = generate_latest(new_prom.registry).decode()
        assert 'gen_ai_client_token_usage_bucket{' in text and 'le="16"' in text and 'le="0.25"' in text
        names = {m.name for rm in new_readers[0].get_metrics_data().resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics}
        assert {"http.client.request.duration", "gen_ai.client.operation.duration", "gen_ai.client.token.usage",
                "gen_ai.client.cost", "gen_ai.client.operation.time_to_first_chunk"} <= names
    finally:
        old.shutdown()
        new.shutdown()


def test_the_adapter_finds_the_sdk_internals_it_merges_into():
    """Fails loudly when an SDK upgrade moves what clrk.recorder.histograms writes to: the grouped path would
    otherwise fall back to the SDK's slow path without a word (or write fields nobody reads)."""
    reader = InMemoryMetricReader()
    m = GatewayMetrics(Resource.create({}), [reader])
    m.record(chat(), exported=None)
    m.commit()
    feed = m._pending[0][0]
    assert feed.instrument is m.http_duration and feed.bounds == HTTP_DURATION_BUCKETS
    assert isinstance(feed._consumer._sdk_config.exemplar_filter, AlwaysOffExemplarFilter)
    (storage,) = feed._consumer._reader_storages.values()
    (match,) = storage._get_or_init_view_instrument_match(m.http_duration)
    (aggregation,) = match._attributes_aggregation.values()
    assert type(aggregation) is _ExplicitBucketHistogramAggregation and aggregation._boundaries == feed.bounds
    assert (aggregation._value, aggregation._sum, aggregation._min, aggregation._max) == (
        [0] * 6 + [1] + [0] * 8, 0.25, 0.25, 0.25)
    assert list(feed._cache.values()) == [[aggregation]]  # looked up once, merged into from then on
    m.shutdown()


def test_a_feed_matches_the_sdk_under_views_delta_exemplars_and_the_cardinality_limit():
    """What GatewayMetrics does not configure still comes out as the SDK's own path makes it: a View's attribute
    filter, other buckets, its cardinality limit (overflow in first-seen order), delta temporality, exemplars."""
    def provider(exemplars):
        reader = InMemoryMetricReader(preferred_temporality={SDKHistogram: AggregationTemporality.DELTA}) \
            if exemplars else InMemoryMetricReader()
        views = [View(instrument_name="h.keys", attribute_keys={"a"}),
                 View(instrument_name="h.buckets", aggregation=ExplicitBucketHistogramAggregation((1.0, 10.0))),
                 View(instrument_name="h.limited", aggregation_cardinality_limit=3)]
        p = MeterProvider(metric_readers=[reader], views=views, shutdown_on_exit=False,
                          exemplar_filter=AlwaysOnExemplarFilter() if exemplars else AlwaysOffExemplarFilter())
        meter = p.get_meter("t")
        return p, reader, [meter.create_histogram(n, explicit_bucket_boundaries_advisory=(0.5, 2.0, 50.0))
                           for n in ("h.keys", "h.buckets", "h.limited")]

    for exemplars in (False, True):
        (p_old, r_old, h_old), (p_new, r_new, h_new) = provider(exemplars), provider(exemplars)
        feeds = [HistogramFeed(h) for h in h_new]
        for round_ in range(3):
            groups = {}
            for i in range(40):
                key = (f"a{i % 7}", f"b{i % 2}")
                groups.setdefault(key, []).append(float((i * 37 + round_) % 60) / 3)
            for h, feed in zip(h_old, feeds, strict=True):
                for key, values in groups.items():
                    for v in values:
                        h.record(v, {"a": key[0], "b": key[1]})
                    feed.add(key, {"a": key[0], "b": key[1]}, values)
            old, new = points_of(r_old.get_metrics_data()), points_of(r_new.get_metrics_data())
            assert new == old
            assert any("otel.metric.overflow" in str(p) for p in new)  # the limit was reached
            assert exemplars == any(isinstance(p, tuple) and len(p) == 8 and p[7] for p in new)
        p_old.shutdown()
        p_new.shutdown()


def test_the_lookup_memory_is_bounded_against_a_stream_of_new_model_names():
    reader = InMemoryMetricReader()
    m = GatewayMetrics(Resource.create({}), [reader])
    for i in range(MAX_CACHED + 50):
        m.record(chat(**{A.GEN_AI_REQUEST_MODEL: f"m{i}"}), exported=None)
    m.commit()
    (token_feed,) = [feed for feed, _, _ in m._pending if feed.instrument is m.token_usage]
    assert len(token_feed._cache) == MAX_CACHED
    points = collect(reader)["gen_ai.client.token.usage"][1]
    assert len(points) == 2001  # the SDK's limit and its overflow point, as before
    assert sum(p.count for p in points) == 2 * (MAX_CACHED + 50)
    m.shutdown()
