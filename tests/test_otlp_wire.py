"""The recorder's hand-written OTLP protobuf (`clrk.recorder.otlp`) against what the OTel SDK sends for the
same rows: both decoded with opentelemetry-proto and compared whole, message by message; and the bytes a
real pipeline POSTs to a real receiver."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace as trace_api
from opentelemetry._logs import SeverityNumber
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from clrk import attributes as A
from clrk.recorder import otlp
from clrk.recorder.expand import expand, mcp_rows
from clrk.recorder.export import SERVICE_NAME, Pipeline
from clrk.redact import Redactor
from tests.harness.otlp import OtlpReceiver

OBSERVED = 1_765_000_000_123_456_789


class _Ids(IdGenerator):
    def __init__(self) -> None:
        self.span_id = self.trace_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


def sdk_requests(rows: list[dict], gateway: str) -> tuple[ExportTraceServiceRequest, ExportLogsServiceRequest]:
    """What the recorder sent through the OTel SDK before: a span and a log record per row, made by the SDK's
    tracer and logger, encoded by the SDK's OTLP encoders."""
    resource = Resource.create({"service.name": SERVICE_NAME, A.CLRK_GATEWAY_NAME: gateway})
    ids = _Ids()
    spans_out, logs_out = InMemorySpanExporter(), InMemoryLogRecordExporter()
    tp = TracerProvider(resource=resource, id_generator=ids, sampler=ALWAYS_ON, shutdown_on_exit=False)
    tp.add_span_processor(SimpleSpanProcessor(spans_out))
    lp = LoggerProvider(resource=resource, shutdown_on_exit=False)
    lp.add_log_record_processor(SimpleLogRecordProcessor(logs_out))
    tracer, logger = tp.get_tracer("clrk"), lp.get_logger("clrk")
    for row in rows:
        attrs = {k: row[k] for k in A.ATTRIBUTE_KEYS if row.get(k) is not None}
        trace_id = int(row[A.TRACE_ID], 16)
        parent = row.get(A.PARENT_SPAN_ID)
        ctx = Context()
        if parent:
            ctx = trace_api.set_span_in_context(
                NonRecordingSpan(SpanContext(trace_id, int(parent, 16), is_remote=True, trace_flags=TraceFlags(1))))
        ids.trace_id, ids.span_id = trace_id, int(row[A.SPAN_ID], 16)
        end_ns = int((row.get(A.END_TIME) or row[A.TIME]) * 1e9)
        span = tracer.start_span(otlp.span_name(row), context=ctx, kind=SpanKind.CLIENT, attributes=attrs,
                                 start_time=int(row[A.TIME] * 1e9))
        failed = row.get(A.ERROR_TYPE) is not None
        if failed:
            span.set_status(Status(StatusCode.ERROR, str(row[A.ERROR_TYPE])))
        span.end(end_time=end_ns)
        warn = failed or row.get(A.CLRK_DECISION) == "deny"
        logger.emit(timestamp=end_ns, observed_timestamp=OBSERVED, context=trace_api.set_span_in_context(span),
                    severity_number=SeverityNumber.WARN if warn else SeverityNumber.INFO,
                    severity_text="WARN" if warn else "INFO", body=otlp.log_body(row), attributes=attrs,
                    event_name="clrk.transaction")
    return encode_spans(spans_out.get_finished_spans()), encode_logs(logs_out.get_finished_logs())


def hand_requests(rows: list[dict], gateway: str) -> tuple[bytes, bytes]:
    resource = Resource.create({"service.name": SERVICE_NAME, A.CLRK_GATEWAY_NAME: gateway})
    head = otlp.resource_field(resource.attributes), otlp.scope_field("clrk")
    encoded = [otlp.encode(r, OBSERVED) for r in rows]
    return (otlp.request(head[0], "", head[1], [s for s, _ in encoded]),
            otlp.request(head[0], "", head[1], [lr for _, lr in encoded]))


def raw(**kw) -> dict:
    t0 = 1_765_000_000.25
    r = {
        "t0": t0, "t1": t0 + 0.0421, "ids": ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", None),
        "method": b"GET", "scheme": "https", "host": "api.github.com", "port": 443, "path": b"/repos?per_page=10&token=s3cret",
        "status": 200, "gateway": "gw-a", "dst": "api.github.com", "inv": "inv-1",
        "decision": ("allow", "EgressRoute/default/github", "allowed by EgressRoute default/github"),
        "agent": ("TaskAgent", "team-a", "writer", "uid-1", "3"), "rewritten": False,
        "req_headers": [(b"host", b"api.github.com"), (b"authorization", b"Bearer ghp_secret"), (b"x-\xc3\xa9", b"\xff\xfe")],
        "resp_headers": [(b"content-type", b"application/json")],
        "req_body": (0, None, False), "resp_body": (14, '{"ok": "été"}'.encode(), False),
        "error": None, "error_type": None, "upstream": True,
    }
    r.update(kw)
    return r


def rows_of_every_kind() -> list[dict]:
    red = Redactor()
    rows = [
        expand(raw(), red),
        # a model call, streamed, budgeted, child of the agent's span
        expand(raw(ids=("1af7651916cd43dd8448eb211c80319c", "c7ad6b7169203331", "00f067aa0ba902b7"), method=b"POST",
                   host="api.openai.com", path=b"/v1/chat/completions", first_chunk=1_765_000_000.26,
                   req_body=(30, b'{"model": "gpt-4o-mini"}', False),
                   genai={"gen_ai.system": "openai", "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                          "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 0, "gen_ai.response.stream": True,
                          "gen_ai.response.finish_reasons": ["stop", "length"], "gen_ai.request.temperature": 0.0,
                          "gen_ai.usage.cost": 1.5e-05},
                   apr=("llm", "team-a"), budget=("AIProviderRoute/team-a/llm#rules[0]", False, 2**62, 0, 17),
                   budget_reserved=30), red),
        # a denial, an empty body in both directions
        expand(raw(ids=("2af7651916cd43dd8448eb211c80319c", "d7ad6b7169203331", None), status=403, upstream=False,
                   decision=("deny", "EgressGateway/gw-a/defaultPolicy", "no route allows it"),
                   resp_body=(0, b"", False), req_body=(0, b"", False), resp_headers=[]), red),
        # an upstream error, a body that is not UTF-8 (base64), escaped non-UTF-8 fields
        expand(raw(ids=("3af7651916cd43dd8448eb211c80319c", "e7ad6b7169203331", None), status=None,
                   error="[Errno 111] Connect call failed", resp_headers=None, agent=("TaskAgent", "t", b"\xffname", "u", "1"),
                   resp_body=(3, b"\x00\xff\x10", True)), red),
        # a 5xx from the upstream, a non-ASCII path and a huge status code
        expand(raw(ids=("4af7651916cd43dd8448eb211c80319c", "f7ad6b7169203331", None), status=503,
                   path="/p/\u00e9\U0001f600".encode(), inv=None), red),
    ]
    mcp_parent = expand(raw(ids=("5af7651916cd43dd8448eb211c80319c", "a7ad6b7169203331", None), method=b"POST",
                            host="mcp.example.com", path=b"/mcp"), red)
    rows.append(mcp_parent)
    mcp = raw(mcp=[{"t0": 1_765_000_000.3, "t1": 1_765_000_000.31, "span": "0123456789abcdef", "method": "tools/call",
                    "id": "7", "kind": "tool", "target": "search", "req": b'{"q": 1}', "resp": None},
                   {"t0": 1_765_000_000.3, "t1": 1_765_000_000.3, "span": "1123456789abcdef", "method": None, "id": "8",
                    "error": "-32601", "req": None, "resp": b'{"error": {}}'}], mcp_session=("sess-1", "2025-06-18"))
    rows += mcp_rows(mcp, mcp_parent)
    # values the SDK encodes its own way or leaves out: negative and 64-bit ints, an empty string, an empty list
    rows.append({**rows[0], A.SPAN_ID: "0000000000000001", A.SERVER_PORT: -1, A.CLRK_BUDGET_TOKENS: 2**63 - 1,
                 A.CLRK_DECISION_REASON: "", A.CLRK_RECORD_ESCAPED: [], A.CLRK_DURATION_MS: float("inf"),
                 A.END_TIME: None})
    return rows


def test_every_kind_of_row_encodes_as_the_sdk_did():
    rows = rows_of_every_kind()
    assert len(rows) == 9
    sdk_spans, sdk_logs = sdk_requests(rows, "gw-a")
    spans_bytes, logs_bytes = hand_requests(rows, "gw-a")
    spans, logs = ExportTraceServiceRequest.FromString(spans_bytes), ExportLogsServiceRequest.FromString(logs_bytes)
    assert len(sdk_spans.resource_spans[0].scope_spans[0].spans) == 9
    # span by span first, so a difference names its row
    for mine, theirs in zip(spans.resource_spans[0].scope_spans[0].spans, sdk_spans.resource_spans[0].scope_spans[0].spans,
                            strict=True):
        assert mine == theirs
    for mine, theirs in zip(logs.resource_logs[0].scope_logs[0].log_records,
                            sdk_logs.resource_logs[0].scope_logs[0].log_records, strict=True):
        assert mine == theirs
    assert spans == sdk_spans
    assert logs == sdk_logs
    # and what a collector reads
    assert spans.resource_spans[0].scope_spans[0].spans[3].status.message == "connection_refused"
    assert logs.resource_logs[0].scope_logs[0].log_records[2].severity_text == "WARN"
    assert b"ghp_secret" not in spans_bytes + logs_bytes and b"s3cret" not in spans_bytes + logs_bytes


@pytest.mark.parametrize("value,kept", [
    (2**63, False), (-(2**63) - 1, False), ([1, 2**64], False), ("\ud800", False),
    ({"a": 1, "b": [None, "x"]}, True), ([1, "a", 2.5, True], True), ([[1], []], True), (b"\x00\xff", True),
    (("a", None), True), (True, True), (-(2**63), True),
])
def test_values_no_record_has_are_encoded_or_left_out_as_the_sdk_does(value, kept):
    row = {**rows_of_every_kind()[0], A.SERVER_PORT: value}
    sdk_spans, sdk_logs = sdk_requests([row], "gw-a")
    spans_bytes, logs_bytes = hand_requests([row], "gw-a")
    spans = ExportTraceServiceRequest.FromString(spans_bytes)
    assert spans == sdk_spans
    assert ExportLogsServiceRequest.FromString(logs_bytes) == sdk_logs
    assert (A.SERVER_PORT in {kv.key for kv in spans.resource_spans[0].scope_spans[0].spans[0].attributes}) == kept


@pytest.mark.parametrize("trace_id,span_id,parent", [
    ("0af7651916cd43dd", "b7ad6b7169203331", None),  # a salvaged record's 16-digit trace id
    ("0" * 32, "0" * 16, "0" * 16),  # ids of zeros
    ("0af7651916cd43dd8448eb211c80319c", "00000000000000ab", "00000000000000cd"),
])
def test_ids_a_salvaged_or_odd_record_carries_encode_as_the_sdk_did(trace_id, span_id, parent):
    row = {**rows_of_every_kind()[0], A.TRACE_ID: trace_id, A.SPAN_ID: span_id, A.PARENT_SPAN_ID: parent}
    sdk_spans, sdk_logs = sdk_requests([row], "gw-a")
    spans_bytes, logs_bytes = hand_requests([row], "gw-a")
    assert ExportTraceServiceRequest.FromString(spans_bytes) == sdk_spans
    assert ExportLogsServiceRequest.FromString(logs_bytes) == sdk_logs


def test_long_values_and_a_hostile_upstreams_bytes_encode_as_the_sdk_did():
    """Lengths past one and two varint bytes (a 200 KiB body, a 20 KB header, a 17 KB URL), controls, NULs
    and characters outside the BMP, as an upstream or agent can send them."""
    red = Redactor()
    row = expand(raw(path=b"/" + b"a" * 17000 + "/\u00e9\U0001f600\x00\x1b[31m".encode(),
                     req_headers=[(b"x-long", b"v" * 20000), (b"x-ctl", b"\x00\x1b\x7f\xc3\xa9")],
                     resp_body=(200 * 1024, ("\U0001f600" * 51200).encode(), True)), red)
    assert len(row[A.RESPONSE_BODY]) == 51200 and len(row[A.URL_FULL]) > 16384
    sdk_spans, sdk_logs = sdk_requests([row], "gw-\u00e9")
    spans_bytes, logs_bytes = hand_requests([row], "gw-\u00e9")
    assert ExportTraceServiceRequest.FromString(spans_bytes) == sdk_spans
    assert ExportLogsServiceRequest.FromString(logs_bytes) == sdk_logs


def test_a_pipeline_posts_the_same_to_a_real_receiver_with_its_headers():
    rx = OtlpReceiver()
    try:
        rows = rows_of_every_kind()
        p = Pipeline("gw-a", [(rx.endpoint, {"x-tenant": "t1"})], {"metrics": None})
        before = time.time_ns()
        for row in rows:
            p.emit(row)
        p.shutdown()  # flushes
        after = time.time_ns()
        with rx.lock:
            raw_bodies, headers = list(rx.got.raw), list(rx.got.headers)
        assert len(raw_bodies) == 2 and all(h["x-tenant"] == "t1" for h in headers)
        assert {h["content-type"] for h in headers} == {"application/x-protobuf"}
        sdk_spans, sdk_logs = sdk_requests(rows, "gw-a")
        got = {len(b): b for b in raw_bodies}
        spans = next(ExportTraceServiceRequest.FromString(b) for b in got.values() if b"clrk.transaction" not in b)
        logs = next(ExportLogsServiceRequest.FromString(b) for b in got.values() if b"clrk.transaction" in b)
        assert spans == sdk_spans  # in the order emitted
        for rec in logs.resource_logs[0].scope_logs[0].log_records:
            assert before <= rec.observed_time_unix_nano <= after
            rec.observed_time_unix_nano = OBSERVED
        assert logs == sdk_logs
        assert {s["span_id"] for s in rx.got.spans} == {r[A.SPAN_ID] for r in rows}
    finally:
        rx.close()


def test_a_dead_endpoint_fills_the_bounded_queue_and_counts_what_it_drops(monkeypatch):
    import clrk.recorder.export as export

    monkeypatch.setattr(export, "QUEUE_SIZE", 4)
    p = Pipeline("gw-a", [("http://127.0.0.1:9", {})], {"metrics": None})  # port 9: nothing listens
    try:
        row = rows_of_every_kind()[0]
        for _ in range(50):
            p.emit(row)
        waiting, dropped = p.export_stats()
        # 4 spans + 4 log records may wait (or be in the exporter's hands); the rest were dropped and counted
        assert waiting <= 8 and dropped >= 2 * 50 - 8 - 2 * 4
        assert waiting + dropped <= 100
    finally:
        for proc in p.processors:
            proc._batch_processor._exporter.shutdown()  # do not wait out the retries at a dead port
        p.shutdown()


def test_values_encoded_from_memory_are_what_the_sdk_sent_and_the_memory_stays_bounded():
    """Repeated values (gateway, agent, host, decision, headers) are encoded once and then taken from memory:
    a hit must give the bytes a miss gave, 1 and True on one key must not share an entry, a row whose keys come
    in another order or with a None must encode as the SDK did; an agent spraying distinct hosts and header
    values cannot grow the memory past its bound, and a long value is never kept."""
    rows = rows_of_every_kind()
    first = rows[0]
    odd = [
        {**first, A.SPAN_ID: "00000000000000a1", A.SERVER_PORT: True, A.HTTP_RESPONSE_STATUS_CODE: 1},
        {**first, A.SPAN_ID: "00000000000000a2", A.SERVER_PORT: 1, A.HTTP_RESPONSE_STATUS_CODE: True,
         A.CLRK_DECISION: None, A.AGENT_NAME: first[A.SERVER_ADDRESS]},
        {**first, A.SPAN_ID: "00000000000000a3", A.AGENT_NAME: "\ud800", A.CLRK_DECISION_RULE: 7,
         A.REQUEST_HEADERS: {"x-a": "1", "x-b": "\x7f\u00e9"}},
        dict(reversed(list({**first, A.SPAN_ID: "00000000000000a4"}.items()))),
    ]
    batch = rows + odd + rows + odd  # the second half from memory
    sdk_spans, sdk_logs = sdk_requests(batch, "gw-a")
    spans_bytes, logs_bytes = hand_requests(batch, "gw-a")
    assert ExportTraceServiceRequest.FromString(spans_bytes) == sdk_spans
    assert ExportLogsServiceRequest.FromString(logs_bytes) == sdk_logs
    half = len(batch) // 2
    encoded = [otlp.encode(r, OBSERVED) for r in batch]
    assert encoded[:half] == encoded[half:]

    from clrk import memo
    long_reason = "r" * (memo.LONGEST + 1)
    flood = [{**first, A.SPAN_ID: f"{i + 1:016x}", A.SERVER_ADDRESS: f"h{i}.example", A.CLRK_DECISION_REASON: long_reason,
              A.RESPONSE_HEADERS: {"x-request-id": f"req-{i}"}} for i in range(memo.LIMIT + 50)]
    for r in flood:
        otlp.encode(r, OBSERVED)
    assert len(otlp._STR_SEEN) <= memo.LIMIT and len(otlp._HEADERS_SEEN) <= memo.LIMIT
    assert (A.CLRK_DECISION_REASON, long_reason) not in otlp._STR_SEEN
    sample = flood[-3:] + [flood[0]]  # kept, and long forgotten
    sdk_spans, sdk_logs = sdk_requests(sample, "gw-a")
    spans_bytes, logs_bytes = hand_requests(sample, "gw-a")
    assert ExportTraceServiceRequest.FromString(spans_bytes) == sdk_spans
    assert ExportLogsServiceRequest.FromString(logs_bytes) == sdk_logs
