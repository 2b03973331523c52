"""The in-process OTLP/HTTP receiver of `clrk dev` (127.0.0.1:14318): /v1/traces, /v1/logs and /v1/metrics,
protobuf or JSON encoded (optionally gzip), decoded with opentelemetry-proto into plain dicts kept in bounded
deques (metrics: the latest value of each series, which is what cumulative metrics need).

OTLP/JSON writes trace and span ids as hex, where proto3 JSON would expect base64; they are converted
before parsing.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

log = logging.getLogger("clrk.dev")

DEFAULT_PORT = 14318
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId"})


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return getattr(v, kind)


def attributes(kvs) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def _hex_ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in _ID_KEYS and isinstance(v, str) and v:
                try:
                    v = base64.b64encode(bytes.fromhex(v)).decode()
                except ValueError:
                    pass
            out[k] = _hex_ids_to_base64(v)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(x) for x in node]
    return node


def decode_spans(req: ExportTraceServiceRequest) -> list[dict]:
    out = []
    for rs in req.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({
                    "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "start_ns": s.start_time_unix_nano,
                    "end_ns": s.end_time_unix_nano, "status": s.status.code, "status_message": s.status.message,
                    "attributes": attributes(s.attributes), "resource": resource,
                })
    return out


def decode_logs(req: ExportLogsServiceRequest) -> list[dict]:
    out = []
    for rl in req.resource_logs:
        resource = attributes(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                out.append({
                    "time_ns": r.time_unix_nano, "trace_id": r.trace_id.hex(), "span_id": r.span_id.hex(),
                    "severity": r.severity_text, "severity_number": r.severity_number, "event_name": r.event_name,
                    "body": any_value(r.body), "attributes": attributes(r.attributes), "resource": resource,
                })
    return out


def decode_metrics(req: ExportMetricsServiceRequest) -> list[dict]:
    """One dict per data point: metric name, unit, kind (sum, gauge, histogram), attributes, resource, and the
    value (sum, gauge) or count, sum, bounds and bucket counts (histogram)."""
    out = []
    for rm in req.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                base = {"name": m.name, "unit": m.unit, "kind": kind, "resource": resource}
                if kind in ("sum", "gauge"):
                    data = getattr(m, kind)
                    for p in data.data_points:
                        value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        extra = {"monotonic": data.is_monotonic} if kind == "sum" else {}
                        out.append({**base, **extra, "attributes": attributes(p.attributes), "value": value,
                                    "time_ns": p.time_unix_nano})
                elif kind == "histogram":
                    for p in m.histogram.data_points:
                        out.append({**base, "attributes": attributes(p.attributes), "count": p.count, "sum": p.sum,
                                    "bounds": list(p.explicit_bounds), "buckets": list(p.bucket_counts),
                                    "time_ns": p.time_unix_nano})
    return out


def series_key(point: dict) -> tuple:
    """What identifies one series: gateway, metric, attributes."""
    return (point["resource"].get("clrk.gateway.name"), point["name"], tuple(sorted(point["attributes"].items())))


class OtlpReceiver:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        keep: int = 2000,
        on_spans: Callable[[list[dict]], None] | None = None,
        on_logs: Callable[[list[dict]], None] | None = None,
        on_metrics: Callable[[list[dict]], None] | None = None,
    ):
        self.spans: deque[dict] = deque(maxlen=keep)
        self.logs: deque[dict] = deque(maxlen=keep)
        self.metrics: dict[tuple, dict] = {}  # series_key -> its latest point (bounded by `keep` series)
        self.keep = keep
        self.on_spans, self.on_logs, self.on_metrics = on_spans, on_logs, on_metrics
        self.received = {"spans": 0, "logs": 0, "metrics": 0, "rejected": 0}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                receiver._handle(self)

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} for OTLP ({e.strerror}); is another clrk dev running?") from e
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="clrk-otlp-receiver", daemon=True)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("content-length") or 0))
        ctype = (h.headers.get("content-type") or "application/x-protobuf").split(";", 1)[0].strip().lower()
        as_json = ctype == "application/json"
        try:
            if h.headers.get("content-encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            if h.path == "/v1/traces":
                req = ExportTraceServiceRequest()
                self._parse(req, body, as_json)
                items = decode_spans(req)
                self.spans.extend(items)
                self.received["spans"] += len(items)
                if self.on_spans and items:
                    self.on_spans(items)
                reply = ExportTraceServiceResponse()
            elif h.path == "/v1/logs":
                req = ExportLogsServiceRequest()
                self._parse(req, body, as_json)
                items = decode_logs(req)
                self.logs.extend(items)
                self.received["logs"] += len(items)
                if self.on_logs and items:
                    self.on_logs(items)
                reply = ExportLogsServiceResponse()
            elif h.path == "/v1/metrics":
                req = ExportMetricsServiceRequest()
                self._parse(req, body, as_json)
                items = decode_metrics(req)
                for p in items:
                    key = series_key(p)
                    if key in self.metrics or len(self.metrics) < self.keep:
                        self.metrics[key] = p
                self.received["metrics"] += len(items)
                if self.on_metrics and items:
                    self.on_metrics(items)
                reply = ExportMetricsServiceResponse()
            else:
                return self._reply(h, 404, b"not an OTLP path: use /v1/traces, /v1/logs or /v1/metrics", "text/plain")
        except (DecodeError, json_format.ParseError, ValueError, OSError) as e:
            self.received["rejected"] += 1
            return self._reply(h, 400, f"undecodable OTLP payload: {e}".encode(), "text/plain")
        if as_json:
            self._reply(h, 200, json_format.MessageToJson(reply).encode(), "application/json")
        else:
            self._reply(h, 200, reply.SerializeToString(), "application/x-protobuf")

    @staticmethod
    def _parse(msg, body: bytes, as_json: bool) -> None:
        if as_json:
            json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), msg)
        else:
            msg.ParseFromString(body)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        h.send_response(status)
        h.send_header("content-type", ctype)
        h.send_header("content-length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
