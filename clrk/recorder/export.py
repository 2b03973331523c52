"""Best-effort OTLP/HTTP export: one span and one log record per transaction, and metrics, per EgressGateway.

Each gateway gets its own span and log record queues (the OTel SDK's batch processors: bounded, the oldest
dropped first, exported every 500 ms or 512 at a time) feeding the SDK's OTLP/HTTP protobuf exporters at
`endpoint`/v1/traces and /v1/logs (resource `service.name=clrk-egress`), and a MeterProvider (`clrk.recorder.metrics`) exporting to `endpoint`/v1/metrics and, if asked, a Prometheus
endpoint. The dev fallback endpoint, when set, is one more set of processors on every gateway: a tee, not a
replacement. Which spans and logs are exported is `spec.otlp.sampling` (`clrk.recorder.sampling`), decided
before the rows are stored so each row says it (`clrk.export.sampled`); metrics count every row.

A row's span and log record are protobuf written by `clrk.recorder.otlp` straight from the stored row (the
same bytes the SDK's span and log record objects gave, at a fraction of the CPU); the SDK exporters only
send them. This runs in the recorder process, never in the proxy, and a slow or dead endpoint only ever
fills (bounded, dropping) queues here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

from clrk import attributes as A
from clrk.recorder import otlp
from clrk.recorder.metrics import DEV_INTERVAL_S, GatewayMetrics, PrometheusEndpoint, otlp_reader
from clrk.recorder.sampling import Sampler

log = logging.getLogger("clrk.export")

SERVICE_NAME = "clrk-egress"
# Spans (and log records) waiting per endpoint while it is slow or down; past this the oldest go first.
QUEUE_SIZE = int(os.environ.get("CLRK_OTLP_QUEUE_SIZE", "8192"))
SCHEDULE_DELAY_MS = 500
EXPORT_TIMEOUT_S = 10.0


class RowSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter (endpoint, headers, timeout, compression, retries with backoff, the
    OTEL_EXPORTER_OTLP_* settings) sending batches of spans already encoded by `clrk.recorder.otlp`."""

    def __init__(self, resource: bytes, scope: bytes, **kw) -> None:
        super().__init__(**kw)
        self._head = (resource, scope)

    def export(self, items) -> SpanExportResult:  # type: ignore[override]
        return SpanExportResult.SUCCESS if _send(self, items, self._head, "span") else SpanExportResult.FAILURE


class RowLogExporter(OTLPLogExporter):
    """As `RowSpanExporter`, for log records."""

    def __init__(self, resource: bytes, scope: bytes, **kw) -> None:
        super().__init__(**kw)
        self._head = (resource, scope)

    def export(self, items) -> LogRecordExportResult:  # type: ignore[override]
        return LogRecordExportResult.SUCCESS if _send(self, items, self._head, "log") else LogRecordExportResult.FAILURE


def _send(exporter, items: list[bytes], head: tuple[bytes, bytes], kind: str) -> bool:
    if exporter._shutdown:
        return False
    data = otlp.request(head[0], "", head[1], items)  # oldest first, as the batch processor hands them
    limit = exporter._max_request_size
    if limit and limit > 0 and len(data) > limit:
        log.warning("dropping a %s batch of %d bytes: more than the %d an export request may have", kind, len(data), limit)
        return False
    return exporter._client.export(data).success


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
        head = (otlp.resource_field(resource.attributes), otlp.scope_field("clrk"))
        self.processors: list = []
        self.queues: list = []  # the processors' bounded queues of encoded spans and log records
        self.dropped = 0
        for endpoint, headers in targets:
            spans = BatchSpanProcessor(
                RowSpanExporter(*head, endpoint=f"{endpoint}/v1/traces", headers=dict(headers), timeout=EXPORT_TIMEOUT_S),
                max_queue_size=QUEUE_SIZE,
                max_export_batch_size=min(512, QUEUE_SIZE),
                schedule_delay_millis=SCHEDULE_DELAY_MS,
            )
            logs = BatchLogRecordProcessor(
                RowLogExporter(*head, endpoint=f"{endpoint}/v1/logs", headers=dict(headers), timeout=EXPORT_TIMEOUT_S),
                max_queue_size=QUEUE_SIZE,
                max_export_batch_size=min(512, QUEUE_SIZE),
                schedule_delay_millis=SCHEDULE_DELAY_MS,
            )
            self.processors += [spans, logs]
            self.queues.append((spans._batch_processor, logs._batch_processor))

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
        return sum(len(sq._queue) + len(lq._queue) for sq, lq in self.queues), self.dropped

    def emit(self, row: Mapping) -> None:
        """Queues the row's span and log record (encoded once, whatever the number of targets). A full queue
        drops its oldest item for the new one: counted here (the SDK's processor only logs it)."""
        span, record = otlp.encode(row)
        for sq, lq in self.queues:
            for q, item in ((sq, span), (lq, record)):
                if len(q._queue) >= q._max_queue_size:
                    self.dropped += 1
                q.emit(item)

    def close_listeners(self) -> None:
        """Frees the Prometheus port at once (its successor may need it); the rest winds down in `shutdown`."""
        if self.prometheus is not None:
            self.prometheus.close()
            self.prometheus = None

    def shutdown(self) -> None:
        self.close_listeners()
        for proc in self.processors:
            proc.shutdown()
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
