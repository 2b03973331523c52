"""A real OTLP/HTTP receiver on 127.0.0.1 that decodes protobuf with opentelemetry-proto (traces, logs and
metrics), for the tests of the gateway's exporter; it also keeps the raw payloads, so tests can search the
wire for secrets."""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

from clrk.cli.dev.receiver import any_value, decode_metrics, series_key
from clrk.cli.dev.receiver import attributes as attrs


@dataclass
class Received:
    spans: list[dict] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)  # every data point of every export, in arrival order
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)


class OtlpReceiver:
    def __init__(self) -> None:
        self.got = Received()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver.lock:
                    receiver.got.raw.append(body)
                    receiver.got.headers.append({k.lower(): v for k, v in self.headers.items()})
                try:
                    self._decode(body)
                except DecodeError:  # a body cut short (an exporter stopped mid-send): what a collector answers
                    self.send_response(400)
                    self.send_header("content-length", "0")
                    self.end_headers()

            def _decode(self, body: bytes) -> None:
                if self.path == "/v1/traces":
                    req = ExportTraceServiceRequest.FromString(body)
                    for rs in req.resource_spans:
                        res = attrs(rs.resource.attributes)
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                with receiver.lock:
                                    receiver.got.spans.append({
                                        "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(),
                                        "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex(),
                                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                                        "status": s.status.code, "attributes": attrs(s.attributes), "resource": res,
                                    })
                    out = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/logs":
                    req = ExportLogsServiceRequest.FromString(body)
                    for rl in req.resource_logs:
                        res = attrs(rl.resource.attributes)
                        for sl in rl.scope_logs:
                            for r in sl.log_records:
                                with receiver.lock:
                                    receiver.got.logs.append({
                                        "trace_id": r.trace_id.hex(), "span_id": r.span_id.hex(),
                                        "body": any_value(r.body), "attributes": attrs(r.attributes),
                                        "severity": r.severity_text, "event_name": r.event_name, "resource": res,
                                    })
                    out = ExportLogsServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    points = decode_metrics(ExportMetricsServiceRequest.FromString(body))
                    with receiver.lock:
                        receiver.got.metrics.extend(points)
                    out = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def span(self, span_id: str, timeout: float = 15.0) -> dict:
        return self._wait(lambda: next((s for s in self.got.spans if s["span_id"] == span_id), None), timeout, f"span {span_id}")

    def log(self, span_id: str, timeout: float = 15.0) -> dict:
        return self._wait(lambda: next((r for r in self.got.logs if r["span_id"] == span_id), None), timeout, f"log of span {span_id}")

    def latest(self, gateway: str | None = None) -> dict[str, list[dict]]:
        """{metric name: the latest point of each of its series} (cumulative metrics: the totals so far), of
        the gateway's resource when named."""
        with self.lock:
            points = list(self.got.metrics)
        last: dict[tuple, dict] = {}
        for p in points:
            if gateway is None or p["resource"].get("clrk.gateway.name") == gateway:
                last[series_key(p)] = p
        out: dict[str, list[dict]] = {}
        for p in last.values():
            out.setdefault(p["name"], []).append(p)
        return out

    def wait_metrics(self, check, timeout: float = 15.0, gateway: str | None = None) -> dict[str, list[dict]]:
        """`latest(gateway)` once `check` of it is true (exports arrive every few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.latest(gateway)
            if check(got):
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"the OTLP receiver never got the metrics expected; it has {sorted(got)}")
            time.sleep(0.1)

    def _wait(self, fn, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                v = fn()
            if v is not None:
                return v
            time.sleep(0.05)
        raise AssertionError(f"the OTLP receiver never got {what}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
