"""Metrics of one EgressGateway, computed in the recorder from the records it stores (never in the proxy).

One OTel SDK MeterProvider per gateway, beside its TracerProvider and LoggerProvider, with a reader per
target: OTLP/HTTP `/v1/metrics` at the gateway's endpoint (every `spec.otlp.metrics.intervalSeconds`), the
dev tee (every DEV_INTERVAL_S), and an optional Prometheus scrape endpoint (`spec.metrics.prometheus`). The
same instruments feed all of them. Every stored transaction is counted, whatever the export sampling kept.

Attributes are bounded: names the policy defines (agents, rules, budget pools), fixed sets (decisions,
methods, status codes, error types) and provider model names — never URLs, paths, hosts an agent chose or
invocation ids. The SDK's per-instrument cardinality limit (2000 sets) caps the rest.
docs/METRICS.md lists every instrument.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import GEN_AI_TOKEN_TYPE
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_CLIENT_OPERATION_DURATION,
    GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
    GEN_AI_CLIENT_TOKEN_USAGE,
)
from opentelemetry.semconv.metrics.http_metrics import HTTP_CLIENT_REQUEST_DURATION

from clrk import attributes as A
from clrk.recorder.histograms import HistogramFeed, plain

log = logging.getLogger("clrk.export")

DEV_INTERVAL_S = 5.0  # the dev tee is a live view: it gets metrics more often than a backend
EXPORT_TIMEOUT_S = 10.0

# Advisory bucket boundaries of the semantic conventions.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# USD per call: a cent's fraction up to a large batch of long-context calls.
COST_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 50)
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)

# No semantic-convention name exists for cost yet; this is the name the contract and the peer gateways use.
GEN_AI_CLIENT_COST = "gen_ai.client.cost"
EGRESS_REQUESTS = "clrk.egress.requests"
EGRESS_REQUEST_BYTES = "clrk.egress.request.body.size"
EGRESS_RESPONSE_BYTES = "clrk.egress.response.body.size"
BUDGET_USED = "clrk.budget.tokens.used"
BUDGET_LIMIT = "clrk.budget.tokens.limit"
EXPORT_RECORDS = "clrk.export.records"
EXPORT_QUEUE = "clrk.export.queue.size"
EXPORT_DROPPED = "clrk.export.dropped"
RECORDS_STORED = "clrk.records.stored"
RECORDS_DROPPED = "clrk.records.dropped"

# HTTP semconv: a method outside the known set is `_OTHER` (an agent's invented method is not a new series).
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"})
_SAMPLED = {True: {A.CLRK_EXPORT_SAMPLED: True}, False: {A.CLRK_EXPORT_SAMPLED: False}}
_INPUT, _OUTPUT = "input", "output"
# The attribute names of each histogram, in the order its attribute sets are written; a group's key holds their
# values (None: the attribute is absent).
_HTTP_NAMES = (A.HTTP_REQUEST_METHOD, A.HTTP_RESPONSE_STATUS_CODE, A.ERROR_TYPE)
_GEN_AI_NAMES = (A.GEN_AI_OPERATION_NAME, A.GEN_AI_PROVIDER_NAME, A.GEN_AI_REQUEST_MODEL, A.GEN_AI_RESPONSE_MODEL)
_TOKEN_NAMES = (*_GEN_AI_NAMES, GEN_AI_TOKEN_TYPE)
_ERROR_NAMES = (*_GEN_AI_NAMES, A.ERROR_TYPE)
_MAX = sys.float_info.max


def _attributes(names: tuple, key: tuple) -> dict:
    return {n: v for n, v in zip(names, key, strict=True) if v is not None}


class _Own:
    """The key of one observation for the SDK's own path: unique, so it keeps its place among the groups."""

    __slots__ = ("key", "names")

    def __init__(self, names: tuple, key: tuple):
        self.names, self.key = names, key

    def attributes(self) -> dict:
        return _attributes(self.names, self.key)


class GatewayMetrics:
    """The instruments of one EgressGateway and the MeterProvider that exports them to `readers`."""

    def __init__(self, resource: Resource, readers: list[MetricReader],
                 export_stats: Callable[[], tuple[int, int, int]] | None = None,
                 store_stats: Callable[[], tuple[int, int]] | None = None):
        # No exemplars: the recorder has no active span when it counts, and sampling them costs ~1 µs a call.
        self.provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False,
                                      exemplar_filter=AlwaysOffExemplarFilter())
        m = self.provider.get_meter("clrk")
        self.token_usage = m.create_histogram(
            GEN_AI_CLIENT_TOKEN_USAGE, unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.operation_duration = m.create_histogram(
            GEN_AI_CLIENT_OPERATION_DURATION, unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=GEN_AI_DURATION_BUCKETS)
        self.cost = m.create_histogram(
            GEN_AI_CLIENT_COST, unit="USD", description="What a model call cost, priced from its usage.",
            explicit_bucket_boundaries_advisory=COST_BUCKETS)
        self.time_to_first_chunk = m.create_histogram(
            GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK, unit="s",
            description="Time from the request's first byte to the first chunk of the response stream.",
            explicit_bucket_boundaries_advisory=GEN_AI_DURATION_BUCKETS)
        self.http_duration = m.create_histogram(
            HTTP_CLIENT_REQUEST_DURATION, unit="s", description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=HTTP_DURATION_BUCKETS)
        self.requests = m.create_counter(EGRESS_REQUESTS, unit="{request}",
                                         description="Transactions through the gateway, allowed and denied.")
        self.request_bytes = m.create_counter(EGRESS_REQUEST_BYTES, unit="By",
                                              description="Request body bytes on the wire, agent to upstream.")
        self.response_bytes = m.create_counter(EGRESS_RESPONSE_BYTES, unit="By",
                                               description="Response body bytes on the wire, upstream to agent.")
        self.export_records = m.create_counter(
            EXPORT_RECORDS, unit="{record}", description="Records whose span and log were exported, or not (sampling).")
        self._counts: dict[tuple, list[int]] = {}  # counter attributes -> [requests, bytes up, bytes down]
        self._exported = {True: 0, False: 0}
        self._http: dict[tuple, list] = {}
        self._duration: dict[tuple, list] = {}
        self._tokens: dict[tuple, list] = {}
        self._cost: dict[tuple, list] = {}
        self._first_chunk: dict[tuple, list] = {}
        self._pending = ((HistogramFeed(self.http_duration), _HTTP_NAMES, self._http),
                         (HistogramFeed(self.token_usage), _TOKEN_NAMES, self._tokens),
                         (HistogramFeed(self.cost), _GEN_AI_NAMES, self._cost),
                         (HistogramFeed(self.time_to_first_chunk), _ERROR_NAMES, self._first_chunk),
                         (HistogramFeed(self.operation_duration), _ERROR_NAMES, self._duration))
        self._feeds = {id(pending): feed for feed, _, pending in self._pending}
        self._lock = threading.Lock()
        self.budgets: dict[str, tuple[int, int, int | None]] = {}  # pool -> (UTC day number, used, max)
        m.create_observable_gauge(BUDGET_USED, [self._observe_used], unit="{token}",
                                  description="Tokens a budget pool has used today (UTC).")
        m.create_observable_gauge(BUDGET_LIMIT, [self._observe_limit], unit="{token}",
                                  description="A budget pool's maxTokensPerDay.")
        if export_stats is not None:
            self._export_stats = export_stats
            m.create_observable_gauge(EXPORT_QUEUE, [self._observe_queue], unit="{record}",
                                      description="Spans and log records waiting for the OTLP endpoints.")
            m.create_observable_counter(EXPORT_DROPPED, [self._observe_export_dropped], unit="{record}",
                                        description="Spans and log records dropped by full export queues.")
        if store_stats is not None:
            self._store_stats = store_stats
            m.create_observable_counter(RECORDS_STORED, [self._observe_stored], unit="{record}",
                                        description="Records written to the store by this recorder.")
            m.create_observable_counter(RECORDS_DROPPED, [self._observe_store_dropped], unit="{record}",
                                        description="Records that could not be stored.")

    def record(self, row: Mapping, exported: bool | None) -> None:
        """Counts one stored transaction; `exported` is its sampling decision (None: the gateway exports no spans).
        Counters are summed here per attribute set, histogram observations grouped per attribute set, and both
        handed to the SDK by `commit` (once per batch: an SDK call costs microseconds, a dict update a fraction
        of one)."""
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
            key = (method if method in KNOWN_METHODS else "_OTHER", status, error)
            if status is not None and status.__class__ is not int:  # 200.0 == 200: its own series, as the SDK keeps it
                self._first(self._http, _HTTP_NAMES, key, seconds)
            else:
                self._observe(self._http, _HTTP_NAMES, key, seconds)
            op = row.get(A.GEN_AI_OPERATION_NAME)
            if op is not None:
                self._gen_ai(row, op, error, seconds)
        pool = row.get(A.CLRK_BUDGET_POOL)
        if pool is not None and row.get(A.CLRK_BUDGET_DAILY_USED) is not None:
            day = int((row.get(A.TIME) or 0) // 86400)  # the UTC day
            with self._lock:
                seen = self.budgets.get(pool)
                if seen is None or seen[0] <= day:
                    self.budgets[pool] = (day, row[A.CLRK_BUDGET_DAILY_USED], row.get(A.CLRK_BUDGET_DAILY_MAX))

    def seed_budgets(self, pools: list[dict]) -> None:
        """Today's usage per pool as the store has it (`clrk.recorder.store.fetch_budgets` since the start of
        the UTC day), for pools no record has shown yet: the gauges are right from the recorder's start."""
        today = int(time.time() // 86400)
        with self._lock:
            for p in pools:
                if p.get("pool") is not None and p["pool"] not in self.budgets:
                    self.budgets[p["pool"]] = (today, int(p.get("used_tokens") or 0), p.get("max_tokens"))

    def commit(self) -> None:
        """Hands the counts summed by `record` since the last commit to the SDK."""
        counts, self._counts = self._counts, {}
        for (decision, rule, namespace, agent, status), (n, up, down) in counts.items():
            attrs = {A.CLRK_DECISION: decision or "none"}
            if rule:
                attrs[A.CLRK_DECISION_RULE] = rule
            if agent is not None:
                attrs[A.AGENT_NAMESPACE] = namespace
                attrs[A.AGENT_NAME] = agent
            if status is not None:
                attrs[A.HTTP_RESPONSE_STATUS_CODE] = status
            self.requests.add(n, attrs)
            if up:
                self.request_bytes.add(up, attrs)
            if down:
                self.response_bytes.add(down, attrs)
        for feed, names, pending in self._pending:
            if pending:
                self._hand(feed, names, pending)
        for sampled in (True, False):
            if self._exported[sampled]:
                self.export_records.add(self._exported[sampled], _SAMPLED[sampled])
                self._exported[sampled] = 0

    @staticmethod
    def _hand(feed: HistogramFeed, names: tuple, pending: dict) -> None:
        """One batch's groups of one histogram to the SDK, in the order they were first seen (the order in which
        the SDK meets new attribute sets decides which ones its cardinality limit keeps)."""
        groups = list(pending.items())
        pending.clear()
        for key, values in groups:
            try:
                if key.__class__ is _Own:
                    feed.instrument.record(values[0], key.attributes())
                else:
                    feed.add(key, _attributes(names, key), values)
            except Exception:  # one bad group must not stop the others
                log.exception("could not count a batch of records in the metrics")

    def _gen_ai(self, row: Mapping, op: str, error: str | None, seconds: float) -> None:
        base = (op, row.get(A.GEN_AI_PROVIDER_NAME), row.get(A.GEN_AI_REQUEST_MODEL), row.get(A.GEN_AI_RESPONSE_MODEL))
        tokens_in, tokens_out = row.get(A.GEN_AI_USAGE_INPUT_TOKENS), row.get(A.GEN_AI_USAGE_OUTPUT_TOKENS)
        if tokens_in is not None:
            self._observe(self._tokens, _TOKEN_NAMES, (*base, _INPUT), tokens_in)
        if tokens_out is not None:
            self._observe(self._tokens, _TOKEN_NAMES, (*base, _OUTPUT), tokens_out)
        cost = row.get(A.GEN_AI_USAGE_COST)
        if cost is not None:
            self._observe(self._cost, _GEN_AI_NAMES, base, cost)
        first = row.get(A.CLRK_RESP_FIRST_CHUNK_MS)
        with_error = (*base, error)
        if first is not None and row.get(A.GEN_AI_RESPONSE_STREAM):
            self._observe(self._first_chunk, _ERROR_NAMES, with_error, first / 1000.0)
        self._observe(self._duration, _ERROR_NAMES, with_error, seconds)

    # Histogram observations wait in `pending` (key: attribute values -> values in arrival order) until `commit`
    # hands each group to the SDK at once (clrk.recorder.histograms). Values and attributes the SDK would not
    # take as they are keep its own path, one `Histogram.record` each at `commit`, in arrival order.

    def _observe(self, pending: dict, names: tuple, key: tuple, value) -> None:
        try:
            values = pending.get(key)
        except TypeError:  # an unhashable attribute value (a list): the SDK's path, which cleans it
            values = None
        if values is not None and (value.__class__ is float or value.__class__ is int) and 0 <= value <= _MAX:
            values.append(value)
        else:
            self._first(pending, names, key, value)

    def _first(self, pending: dict, names: tuple, key: tuple, value) -> None:
        """A new group, or a value or attribute set for the SDK's own path (`_Own`, replayed by `commit`): a
        value whose check raises in the SDK raises here, where it did (the row is then reported, its later
        observations not made); one the SDK drops with a warning (negative, NaN, infinite) is handed to it to do
        so; attribute values other than text (and an int status code) are left to the SDK to clean and key by
        type (200.0 and True are not 200 to it)."""
        feed = self._feeds[id(pending)]
        if not plain(value):
            if math.isfinite(value) and not value < 0:
                feed.seen()
            pending[_Own(names, key)] = [value]
            return
        feed.seen()
        if not all(v is None or v.__class__ is str or (v.__class__ is int and n == A.HTTP_RESPONSE_STATUS_CODE)
                             for n, v in zip(names, key, strict=True)):
            pending[_Own(names, key)] = [value]  # not plain text: the SDK cleans and keys it by type
        else:
            pending[key] = [value]

    def _observe_used(self, options: CallbackOptions):
        today = int(time.time() // 86400)
        with self._lock:
            pools = list(self.budgets.items())
        return [Observation(used if day == today else 0, {A.CLRK_BUDGET_POOL: pool}) for pool, (day, used, _) in pools]

    def _observe_limit(self, options: CallbackOptions):
        with self._lock:
            pools = list(self.budgets.items())
        return [Observation(mx, {A.CLRK_BUDGET_POOL: pool}) for pool, (_, _, mx) in pools if mx is not None]

    def _observe_queue(self, options: CallbackOptions):
        return [Observation(self._export_stats()[0])]

    def _observe_export_dropped(self, options: CallbackOptions):
        return [Observation(self._export_stats()[1])]

    def _observe_stored(self, options: CallbackOptions):
        return [Observation(self._store_stats()[0])]

    def _observe_store_dropped(self, options: CallbackOptions):
        return [Observation(self._store_stats()[1])]

    def shutdown(self) -> None:
        self.provider.shutdown(timeout_millis=EXPORT_TIMEOUT_S * 1000)


def otlp_reader(endpoint: str, headers: Mapping[str, str], interval_s: float) -> MetricReader:
    """A reader pushing to `endpoint`/v1/metrics (cumulative, protobuf) every `interval_s` seconds."""
    return PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics", headers=dict(headers), timeout=EXPORT_TIMEOUT_S),
        export_interval_millis=interval_s * 1000.0,
        export_timeout_millis=EXPORT_TIMEOUT_S * 1000.0,
    )


class PrometheusEndpoint:
    """`http://address:port/metrics` in the recorder process, with a registry of its own (one per gateway).
    Its reader is made first (the MeterProvider needs it); `serve` opens the port once the metrics are ready.

    Built on opentelemetry-exporter-prometheus (the `prometheus` extra): the same SDK instruments as OTLP,
    translated to Prometheus names by the OTel project's own rules (units as suffixes, `_total`)."""

    def __init__(self, address: str, port: int):
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry
        except ImportError as e:
            raise RuntimeError("spec.metrics.prometheus needs opentelemetry-exporter-prometheus: "
                               "pip install 'clrk[prometheus]'") from e
        self.registry = CollectorRegistry(auto_describe=False)
        self.reader = PrometheusMetricReader(registry=self.registry)
        self.address, self.port = address, port
        self.server = None

    def serve(self) -> None:
        from prometheus_client import start_http_server

        try:
            self.server, self.thread = start_http_server(self.port, addr=self.address, registry=self.registry)
        except OSError as e:
            raise RuntimeError(f"cannot serve Prometheus metrics on {self.address}:{self.port} ({e.strerror}): "
                               "is the port in use? Change spec.metrics.prometheus.port") from e
        log.info("Prometheus metrics on http://%s:%d/metrics", self.address, self.port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
