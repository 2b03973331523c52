"""Best-effort OTLP/HTTP export: one span and one log record per transaction, and metrics, per EgressGateway.

Each gateway gets its own OTel SDK TracerProvider and LoggerProvider (resource `service.name=clrk-egress`)
with batch processors and OTLP/HTTP protobuf exporters at `endpoint`/v1/traces and /v1/logs, and a
MeterProvider (`clrk.recorder.metrics`) exporting to `endpoint`/v1/metrics and, if asked, a Prometheus
endpoint. The dev fallback endpoint, when set, is one more set of processors on every gateway: a tee, not a
replacement. Which spans and logs are exported is `spec.otlp.sampling` (`clrk.recorder.sampling`), decided
before the rows are stored so each row says it (`clrk.export.sampled`); metrics count every row.

This runs in the recorder process, never in the proxy: building an SDK span costs ~190 µs of Python, and a
slow or dead endpoint only ever fills (bounded, dropping) SDK queues here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from opentelemetry import trace as trace_api
from opentelemetry._logs import SeverityNumber
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from clrk import attributes as A
from clrk.recorder.metrics import DEV_INTERVAL_S, GatewayMetrics, PrometheusEndpoint, otlp_reader
from clrk.recorder.sampling import Sampler

log = logging.getLogger("clrk.export")

SERVICE_NAME = "clrk-egress"
# Spans (and log records) waiting per endpoint while it is slow or down; past this the oldest go first.
QUEUE_SIZE = int(os.environ.get("CLRK_OTLP_QUEUE_SIZE", "8192"))
SCHEDULE_DELAY_MS = 500
EXPORT_TIMEOUT_S = 10.0


class PresetIds(IdGenerator):
    """Hands the SDK the ids the proxy already chose, so the span, the log record and the stored row agree."""

    def __init__(self) -> None:
        self.span_id = 0
        self.trace_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


def span_name(row: Mapping) -> str:
    if A.is_mcp_child(row):  # an MCP message's child record: "{mcp.method.name} {target}"
        method = row.get(A.MCP_METHOD_NAME) or "response"  # an answer to a request no record of it carried
        target = row.get(A.GEN_AI_TOOL_NAME) or row.get(A.GEN_AI_PROMPT_NAME) or row.get(A.MCP_RESOURCE_URI)
        return f"{method} {target}" if target else method
    op = row.get(A.GEN_AI_OPERATION_NAME)
    if op:
        return f"{op} {row.get(A.GEN_AI_REQUEST_MODEL) or 'unknown'}"
    return f"{row.get(A.HTTP_REQUEST_METHOD) or 'UNKNOWN'} {row.get(A.SERVER_ADDRESS) or ''}".strip()


def log_body(row: Mapping) -> dict:
    """The captured transaction as the log record's body."""
    body: dict = {}
    for side, hk, bk in (("request", A.REQUEST_HEADERS, A.REQUEST_BODY), ("response", A.RESPONSE_HEADERS, A.RESPONSE_BODY)):
        part = {}
        if row.get(hk):
            part["headers"] = dict(row[hk])
        if row.get(bk) is not None:
            part["body"] = row[bk]
        body[side] = part
    return body


class Pipeline:
    """The SDK providers of one EgressGateway: spans and logs to its `targets` (if any), metrics to them and to
    its Prometheus endpoint (if any). `telemetry` is the gateway's `GatewayConfig.telemetry` as the proxy sent
    it: {"metrics": interval seconds or None, "sampling": {...}, "prometheus": [address, port] or None}."""

    def __init__(self, gateway: str, targets: list[tuple[str, Mapping[str, str]]], telemetry: Mapping | None = None,
                 dev_endpoint: str = "", store_stats=None, budgets: list[dict] | None = None):
        telemetry = telemetry or {}
        self.targets = targets
        self.key = (targets, repr(sorted(telemetry.items())))
        self.sampler = Sampler(telemetry.get("sampling"))
        self.tracing = bool(targets)
        resource = Resource.create({"service.name": SERVICE_NAME, A.CLRK_GATEWAY_NAME: gateway})
        self.ids = PresetIds()
        # shutdown_on_exit=False: the SDK's atexit flush would retry a dead endpoint for its full timeout;
        # Exporter.shutdown bounds that instead.
        self.tracer_provider = TracerProvider(
            resource=resource, id_generator=self.ids, sampler=ALWAYS_ON, shutdown_on_exit=False
        )
        self.logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self.processors: list = []
        self.dropped = 0
        for endpoint, headers in targets:
            spans = BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", headers=dict(headers), timeout=EXPORT_TIMEOUT_S),
                max_queue_size=QUEUE_SIZE,
                max_export_batch_size=min(512, QUEUE_SIZE),
                schedule_delay_millis=SCHEDULE_DELAY_MS,
            )
            logs = BatchLogRecordProcessor(
                OTLPLogExporter(endpoint=f"{endpoint}/v1/logs", headers=dict(headers), timeout=EXPORT_TIMEOUT_S),
                max_queue_size=QUEUE_SIZE,
                max_export_batch_size=min(512, QUEUE_SIZE),
                schedule_delay_millis=SCHEDULE_DELAY_MS,
            )
            self.tracer_provider.add_span_processor(spans)
            self.logger_provider.add_log_record_processor(logs)
            self.processors += [spans, logs]
        self.tracer = self.tracer_provider.get_tracer("clrk")
        self.logger = self.logger_provider.get_logger("clrk")

        readers = []
        interval = telemetry.get("metrics", 60.0)
        if interval:
            for endpoint, headers in targets:
                readers.append(otlp_reader(endpoint, headers, DEV_INTERVAL_S if endpoint == dev_endpoint else interval))
        self.prometheus: PrometheusEndpoint | None = None
        prom = telemetry.get("prometheus")
        if prom:
            try:
                self.prometheus = PrometheusEndpoint(str(prom[0]), int(prom[1]))
                readers.append(self.prometheus.reader)
            except RuntimeError as e:  # the rest of the export works without it
                log.error("gateway %s: %s", gateway, e)
        self.metrics = GatewayMetrics(resource, readers, self.export_stats, store_stats) if readers else None
        if self.metrics is not None and budgets:
            self.metrics.seed_budgets(budgets)
        if self.prometheus is not None:
            try:
                self.prometheus.serve()  # last: the first scrape sees the gauges filled in
            except RuntimeError as e:
                log.error("gateway %s: %s", gateway, e)

    def export_stats(self) -> tuple[int, int]:
        """(spans and log records waiting in the export queues, dropped by them so far)."""
        waiting = 0
        for proc in self.processors:
            q = getattr(getattr(proc, "_batch_processor", None), "_queue", None)
            if q is not None:
                waiting += len(q)
        return waiting, self.dropped

    def _count_drops(self) -> None:
        """The SDK's queues drop their oldest item when full (and only log it): count what this emit pushes out.
        (Reads the SDK's queue; without it nothing is counted, nothing breaks.)"""
        for proc in self.processors:
            q = getattr(getattr(proc, "_batch_processor", None), "_queue", None)
            if q is not None and q.maxlen is not None and len(q) >= q.maxlen:
                self.dropped += 1

    def emit(self, row: Mapping) -> None:
        self._count_drops()
        attrs = {k: row[k] for k in A.ATTRIBUTE_KEYS if row.get(k) is not None}
        trace_id = int(row[A.TRACE_ID], 16)
        parent = row.get(A.PARENT_SPAN_ID)
        if parent:
            parent_ctx = trace_api.set_span_in_context(
                NonRecordingSpan(SpanContext(trace_id, int(parent, 16), is_remote=True, trace_flags=TraceFlags(1)))
            )
        else:
            parent_ctx = Context()
        self.ids.trace_id = trace_id
        self.ids.span_id = int(row[A.SPAN_ID], 16)
        start_ns = int(row[A.TIME] * 1e9)
        end_ns = int((row.get(A.END_TIME) or row[A.TIME]) * 1e9)
        span = self.tracer.start_span(
            span_name(row), context=parent_ctx, kind=SpanKind.CLIENT, attributes=attrs, start_time=start_ns
        )
        failed = row.get(A.ERROR_TYPE) is not None
        if failed:
            span.set_status(Status(StatusCode.ERROR, str(row[A.ERROR_TYPE])))
        span.end(end_time=end_ns)
        self.logger.emit(
            timestamp=end_ns,
            observed_timestamp=time.time_ns(),
            context=trace_api.set_span_in_context(span),
            severity_number=SeverityNumber.WARN if failed or row.get(A.CLRK_DECISION) == "deny" else SeverityNumber.INFO,
            severity_text="WARN" if failed or row.get(A.CLRK_DECISION) == "deny" else "INFO",
            body=log_body(row),
            attributes=attrs,
            event_name="clrk.transaction",
        )

    def close_listeners(self) -> None:
        """Frees the Prometheus port at once (its successor may need it); the rest winds down in `shutdown`."""
        if self.prometheus is not None:
            self.prometheus.close()
            self.prometheus = None

    def shutdown(self) -> None:
        self.close_listeners()
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()
        if self.metrics is not None:
            self.metrics.shutdown()  # a last export: counts up to the end reach the backend


class Exporter:
    """All pipelines, rebuilt when the proxy sends a new configuration (policy reload). `store_stats` gives the
    recorder's (records stored, records dropped) for the metrics of that name."""

    def __init__(self, store_stats=None) -> None:
        self.pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self._retired_dropped = 0
        self.store_stats = store_stats

    def configure(self, gateways: Mapping[str, Mapping], fallback: str, budgets: list[dict] | None = None) -> None:
        """(Re)builds the pipelines whose settings changed. `budgets` is today's usage per pool from the store
        (`fetch_budgets`), for the gauges of new pipelines."""
        fallback = fallback.rstrip("/") if fallback else ""
        wanted: dict[str, tuple[list, Mapping]] = {}
        for name, cfg in gateways.items():
            targets: list[tuple[str, Mapping[str, str]]] = []
            if cfg.get("endpoint"):
                targets.append((cfg["endpoint"], cfg.get("headers") or {}))
            if fallback:
                targets.append((fallback, {}))
            telemetry = {k: cfg[k] for k in ("metrics", "sampling", "prometheus") if k in cfg}
            if targets or telemetry.get("prometheus"):
                wanted[name] = (targets, telemetry)
        with self._lock:
            keep = {n: p for n, p in self.pipelines.items()
                    if n in wanted and p.key == (wanted[n][0], repr(sorted(wanted[n][1].items())))}
            retired = [p for p in self.pipelines.values() if p not in keep.values()]
            for p in retired:
                p.close_listeners()
            new = dict(keep)
            for name, (targets, telemetry) in wanted.items():
                if name not in new:
                    new[name] = Pipeline(name, targets, telemetry, fallback, self.store_stats, budgets)
            self._retired_dropped += sum(p.dropped for p in retired)
            self.pipelines = new
        for p in retired:
            threading.Thread(target=p.shutdown, name="clrk-otlp-retire", daemon=True).start()
        for name, p in new.items():
            if p.targets:
                log.info("OTLP export for gateway %s -> %s", name, ", ".join(t[0] for t in p.targets))

    def sample(self, rows: list[dict]) -> None:
        """Decides which rows' spans and logs are exported (`clrk.export.sampled`), before they are stored.
        Rows of a gateway that exports no spans get no decision."""
        with self._lock:
            pipelines = self.pipelines
            if not pipelines:
                return
            groups: dict[str, list[dict]] = {}
            for row in rows:
                groups.setdefault(row.get(A.CLRK_GATEWAY_NAME) or "", []).append(row)
            for name, group in groups.items():
                p = pipelines.get(name)
                if p is not None and p.tracing:
                    p.sampler.decide(group)

    def dropped(self) -> int:
        """Spans and log records dropped by full export queues (slow or dead endpoints) since start."""
        with self._lock:
            return self._retired_dropped + sum(p.dropped for p in self.pipelines.values())

    def export(self, rows: list[Mapping]) -> int:
        n = 0
        with self._lock:
            counted: set[str] = set()
            for row in rows:
                p = self.pipelines.get(row.get(A.CLRK_GATEWAY_NAME) or "")
                if p is None:
                    continue
                sampled = row.get(A.CLRK_EXPORT_SAMPLED)
                if p.metrics is not None and not A.is_mcp_child(row):  # metrics count transactions, not their children
                    counted.add(row.get(A.CLRK_GATEWAY_NAME) or "")
                    try:
                        p.metrics.record(row, sampled if p.tracing else None)
                    except Exception:  # one bad row must not stop the metrics of the others
                        log.exception("could not count a record in the metrics")
                if not p.tracing or sampled is False:
                    continue
                try:
                    p.emit(row)
                    n += 1
                except Exception:  # one bad row must not stop the export of the others
                    log.exception("could not build OTLP span for a record")
            for name in counted:
                try:
                    self.pipelines[name].metrics.commit()  # type: ignore[union-attr]
                except Exception:
                    log.exception("could not count a batch of records in the metrics")
        return n

    def shutdown(self, timeout: float) -> None:
        """Flushes what the endpoints accept within `timeout` seconds; a dead endpoint does not hold us."""
        with self._lock:
            pipelines, self.pipelines = list(self.pipelines.values()), {}
        threads = [threading.Thread(target=p.shutdown, daemon=True) for p in pipelines]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
