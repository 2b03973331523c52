"""`clrk dev`: the OTLP receiver on its own (the OTel SDK's exporter as client), the TUI driven by Textual's
Pilot while real requests go through a real gateway teeing to that receiver, `clrk tail` and `clrk ca`."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from textual.widgets import DataTable, Static

from clrk import attributes as A
from clrk.cli.dev.receiver import OtlpReceiver
from clrk.cli.dev.session import DevSession
from clrk.cli.dev.tui import DetailScreen, DevApp, HelpScreen
from clrk.cli.feed import RecordFeed
from tests.harness import fake_provider
from tests.harness.gateway import AGENT_TOKEN, agent_docs, free_port, gateway_doc, route
from tests.harness.util import new_invocation

CLRK = str(Path(sys.executable).parent / "clrk")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the receiver


def test_receiver_decodes_what_the_otel_sdk_exports():
    r = OtlpReceiver(port=0).start()
    try:
        res = Resource.create({"service.name": "sdk-client"})
        tp = TracerProvider(resource=res)
        tp.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{r.endpoint}/v1/traces")))
        with tp.get_tracer("t").start_as_current_span("parent", attributes={"a": 1}):
            with tp.get_tracer("t").start_as_current_span("child", kind=trace.SpanKind.CLIENT, attributes={"b": ["x", "y"]}):
                pass
        lp = LoggerProvider(resource=res)
        lp.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{r.endpoint}/v1/logs")))
        lp.get_logger("t").emit(body={"k": "v"}, attributes={"n": 3}, severity_number=SeverityNumber.WARN, severity_text="WARN")
        tp.shutdown()
        lp.shutdown()
        names = {s["name"]: s for s in r.spans}
        assert set(names) == {"parent", "child"}
        assert names["child"]["parent_span_id"] == names["parent"]["span_id"]
        assert names["child"]["kind"] == 3 and names["child"]["attributes"] == {"b": ["x", "y"]}
        assert names["parent"]["resource"]["service.name"] == "sdk-client"
        (lg,) = r.logs
        assert lg["body"] == {"k": "v"} and lg["attributes"] == {"n": 3} and lg["severity"] == "WARN"
    finally:
        r.stop()


def test_receiver_takes_otlp_json_and_gzip_and_rejects_garbage():
    r = OtlpReceiver(port=0).start()
    try:
        trace_id, span_id = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
        payload = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-client"}}]},
                   "scopeSpans": [{"spans": [{"traceId": trace_id, "spanId": span_id, "name": "GET example.com", "kind": 3,
                                              "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000100000000",
                                              "attributes": [{"key": "http.response.status_code", "value": {"intValue": "200"}}]}]}]}]}
        resp = httpx.post(f"{r.endpoint}/v1/traces", json=payload)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        (s,) = r.spans
        assert (s["trace_id"], s["span_id"], s["attributes"]) == (trace_id, span_id, {"http.response.status_code": 200})
        logs = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": trace_id, "spanId": span_id, "body": {"stringValue": "hi"}}]}]}]}
        resp = httpx.post(f"{r.endpoint}/v1/logs", content=gzip.compress(json.dumps(logs).encode()),
                          headers={"content-type": "application/json", "content-encoding": "gzip"})
        assert resp.status_code == 200 and r.logs[0]["body"] == "hi" and r.logs[0]["span_id"] == span_id
        assert httpx.post(f"{r.endpoint}/v1/traces", content=b"\xff\x00garbage", headers={"content-type": "application/x-protobuf"}).status_code == 400
        assert httpx.post(f"{r.endpoint}/v1/profiles", content=b"").status_code == 404
        assert httpx.post(f"{r.endpoint}/v1/metrics", content=b"\xff\x00garbage").status_code == 400
        assert r.received["rejected"] == 2
    finally:
        r.stop()


def test_receiver_keeps_the_latest_value_of_each_metric_series_the_sdk_exports():
    r = OtlpReceiver(port=0).start()
    try:
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{r.endpoint}/v1/metrics"),
                                               export_interval_millis=3_600_000)
        mp = MeterProvider(metric_readers=[reader], resource=Resource.create({"clrk.gateway.name": "g"}))
        meter = mp.get_meter("t")
        c = meter.create_counter("clrk.egress.requests", unit="{request}")
        h = meter.create_histogram("http.client.request.duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 1])
        c.add(2, {"clrk.decision": "allow"})
        c.add(1, {"clrk.decision": "deny"})
        h.record(0.5, {"http.request.method": "GET"})
        mp.force_flush()
        c.add(3, {"clrk.decision": "allow"})
        mp.shutdown()  # exports once more: cumulative, so the latest point is the total
        got = {(p["name"], tuple(p["attributes"].items())): p for p in r.metrics.values()}
        assert got[("clrk.egress.requests", (("clrk.decision", "allow"),))]["value"] == 5
        assert got[("clrk.egress.requests", (("clrk.decision", "deny"),))]["value"] == 1
        hist = got[("http.client.request.duration", (("http.request.method", "GET"),))]
        assert (hist["count"], hist["sum"], hist["bounds"], hist["buckets"], hist["unit"]) == (1, 0.5, [0.1, 1.0], [0, 1, 0], "s")
        assert r.received["metrics"] == 6 and r.received["rejected"] == 0
    finally:
        r.stop()


def test_receiver_says_clearly_when_its_port_is_taken():
    r = OtlpReceiver(port=0).start()
    try:
        with pytest.raises(OSError, match="is another clrk dev running"):
            OtlpReceiver(port=r.port)
    finally:
        r.stop()


# ------------------------------------------------------------------------------------------ a live session


@pytest.fixture(scope="module")
def session(tmp_path_factory, pki, upstream):
    fake_provider.install(upstream)
    d = tmp_path_factory.mktemp("dev")
    hosts = ["allowed.test", "api.openai.com"]
    docs = [gateway_doc(aliases={h: upstream.address for h in hosts}, ca_bundle=str(pki[0])), *agent_docs(),
            route("ok", hosts, sourceAgents={"namespaces": ["team-a"]}),
            {"kind": "AIProviderRoute", "metadata": {"name": "llm", "namespace": "team-a"},
             "spec": {"rules": [{"matches": [{"provider": "openai"}],
                                 "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 100000}}]}]}},
            {"kind": "CredentialInjectionPolicy", "metadata": {"name": "llm-key", "namespace": "team-a"},
             "spec": {"targetRefs": [{"kind": "AIProviderRoute", "name": "llm"}],
                      "target": {"type": "Header", "name": "Authorization", "prefix": "Bearer "},
                      "secretRef": {"env": "CLRK_TEST_TUI_INJECTED_KEY"}}}]
    import yaml

    (d / "policies").mkdir()
    (d / "policies" / "p.yaml").write_text(yaml.safe_dump_all(docs))
    os.environ.setdefault("CLRK_TEST_REVIEWER_TOKEN", "tok-reviewer-9876543210")
    os.environ["CLRK_TEST_TUI_INJECTED_KEY"] = INJECTED_KEY
    s = DevSession(str(d / "policies"), str(d / "data" / "clrk.duckdb"), str(d / "certs"), [free_port()], otlp_port=free_port()).start()
    yield s
    s.stop()


INJECTED_KEY = "sk-injected-TUI-SECRET-7"


def _client(s: DevSession) -> httpx.Client:
    import ssl

    ctx = ssl.create_default_context(cafile=str(Path(s.certs) / "mitmproxy-ca-cert.pem"))
    return httpx.Client(proxy=f"http://team-a.researcher:{AGENT_TOKEN}@127.0.0.1:{s.ports[0]}", verify=ctx, trust_env=False, timeout=30)


def _traffic(s: DevSession, inv: str) -> None:
    with _client(s) as c:
        c.get("https://allowed.test/json/tui", headers={"clrk-invocation-id": inv, "authorization": "Bearer sk-tui-SECRET-1"})
        c.get("https://denied.test/nope", headers={"clrk-invocation-id": inv})
        c.post("https://api.openai.com/v1/chat/completions", headers={"clrk-invocation-id": inv},
               json={"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True}, "messages": []})


async def _until(pilot, cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the TUI did not show it in time"
        await pilot.pause(0.1)


def test_tui_shows_records_traces_logs_and_spend_live(session, tmp_path):
    inv = new_invocation()
    assert session.receiver is not None
    app = DevApp(RecordFeed(session.db), session.receiver.spans, session.receiver.logs, session.read_spend, status=session.status,
                 metrics=session.receiver.metrics)

    async def drive():
        async with app.run_test(size=(200, 50)) as pilot:
            await asyncio.to_thread(_traffic, session, inv)
            records = app.query_one("#records-table", DataTable)
            await _until(pilot, lambda: records.row_count >= 3)
            rows = [records.get_row_at(i) for i in range(records.row_count)]
            hosts = [str(r[4]) for r in rows]
            assert {"allowed.test", "denied.test", "api.openai.com"} <= set(hosts)
            # The header says where agents point.
            assert f"proxy 127.0.0.1:{session.ports[0]}" in app.sub_title
            assert f"HTTPS_PROXY=http://<namespace>.<agent>:<token>@127.0.0.1:{session.ports[0]}" in app.sub_title
            chat = rows[hosts.index("api.openai.com")]
            assert str(chat[5]) == "gpt-4o-mini" and str(chat[7]) == "12/3"
            assert str(rows[hosts.index("denied.test")][2]) == "deny"

            # The whole transaction, redacted, with the SSE body as events.
            records.focus()
            records.move_cursor(row=hosts.index("allowed.test"))
            await pilot.press("enter")
            await _until(pilot, lambda: isinstance(app.screen, DetailScreen))
            text = str(app.screen.query_one("#detail-body", Static).content)
            assert "authorization: [REDACTED]" in text and "sk-tui-SECRET-1" not in text and f"invocation.id = {inv}" in text
            await pilot.press("escape")
            records.move_cursor(row=hosts.index("api.openai.com"))
            await pilot.press("enter")
            await _until(pilot, lambda: isinstance(app.screen, DetailScreen))
            text = str(app.screen.query_one("#detail-body", Static).content)
            assert "events" in text and "event: message" in text and "[DONE]" in text
            await pilot.press("escape")

            await pilot.press("2")
            traces = app.query_one("#traces-table", DataTable)
            await _until(pilot, lambda: traces.row_count >= 3)
            names = {str(traces.get_row_at(i)[1]) for i in range(traces.row_count)}
            assert {"GET allowed.test", "GET denied.test", "chat gpt-4o-mini"} <= names
            await pilot.press("3")
            logs = app.query_one("#logs-table", DataTable)
            await _until(pilot, lambda: logs.row_count >= 3)
            await pilot.press("4")
            spend = app.query_one("#spend-table", DataTable)
            await _until(pilot, lambda: spend.row_count >= 1)
            srow = spend.get_row_at(0)
            assert [str(c) for c in srow[:3]] == ["team-a/researcher", "team-a/llm", "gpt-4o-mini"]
            assert str(srow[7]).startswith("$") and float(str(srow[7])[1:]) > 0  # priced: gpt-4o-mini's list price
            budgets = app.query_one("#budget-table", DataTable)
            await _until(pilot, lambda: budgets.row_count >= 1)
            assert str(budgets.get_row_at(0)[2]) == "100000"

            # The tee's metrics (every 5 s), the latest value of each series.
            await pilot.press("5")
            metrics = app.query_one("#metrics-table", DataTable)

            def shown() -> dict[str, list[str]]:
                out: dict[str, list[str]] = {}
                for i in range(metrics.row_count):
                    row = [str(c) for c in metrics.get_row_at(i)]
                    out.setdefault(row[0], []).append(f"{row[2]} | {row[3]}")
                return out

            await _until(pilot, lambda: "gen_ai.client.token.usage" in shown(), timeout=20)
            m = shown()
            assert any("gen_ai.token.type=output" in r and "sum 3," in r for r in m["gen_ai.client.token.usage"])
            assert any("clrk.decision=deny" in r for r in m["clrk.egress.requests"])
            assert not any(inv in r or "sk-tui-SECRET" in r for rows in m.values() for r in rows)

            # Filter by invocation; then by an agent with no traffic: nothing shows.
            await pilot.press("1", "slash")
            for ch in inv:
                await pilot.press(ch)
            await pilot.press("enter")
            assert records.row_count == 3
            await pilot.press("slash", *"team-b", "enter")
            assert records.row_count == 0
            await pilot.press("slash", "enter")
            assert records.row_count >= 3

            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            if os.environ.get("CLRK_TUI_SNAPSHOT"):
                await pilot.press("1")
                await pilot.pause(0.3)
                app.save_screenshot(path=str(Path(os.environ["CLRK_TUI_SNAPSHOT"]).parent), filename=Path(os.environ["CLRK_TUI_SNAPSHOT"]).name)

    asyncio.run(drive())


def test_tui_stays_bounded_and_responsive_under_a_burst(session):
    """500 records arriving at once (as at 500 transactions a second): one tick shows the newest, bounded."""

    class Burst:
        connected = True

        def __init__(self):
            self.sent = False

        def poll(self):
            if self.sent:
                return []
            self.sent = True
            base = {A.TIME: "2026-11-30T12:00:00Z", A.CLRK_DECISION: "allow", A.HTTP_REQUEST_METHOD: "GET", A.SERVER_ADDRESS: "x.test"}
            return [{**base, A.SPAN_ID: f"{i:016x}", A.INVOCATION_ID: f"burst-{i}"} for i in range(1200)]

    app = DevApp(Burst(), max_rows=500)  # type: ignore[arg-type]

    async def drive():
        async with app.run_test(size=(160, 40)) as pilot:
            table = app.query_one("#records-table", DataTable)
            t0 = time.monotonic()
            await _until(pilot, lambda: table.row_count == 500, timeout=10)
            took = time.monotonic() - t0
            assert len(app.records) == 500 and "00000000000004af" in app.records  # the newest kept
            await pilot.press("question_mark")  # and the UI still answers keys
            assert isinstance(app.screen, HelpScreen)
            return took

    took = asyncio.run(drive())
    assert took < 5


# ------------------------------------------------------------------------------------------ tail and ca


def test_clrk_tail_prints_records_as_they_are_stored(session):
    inv = new_invocation()
    proc = subprocess.Popen([CLRK, "tail", "--db", session.db, "--json", "--invocation", inv], stdout=subprocess.PIPE, text=True)
    printed: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [printed.put(line) for line in proc.stdout], daemon=True).start()
    paths: list[str] = []
    try:
        with _client(session) as c:
            # tail starts at what is stored when it first asks, and says nothing when it has: a probe sent until
            # one is printed shows that it is following.
            deadline = time.monotonic() + 15
            while True:
                c.get("https://allowed.test/json/tail-probe", headers={"clrk-invocation-id": inv})
                try:
                    paths.append(json.loads(printed.get(timeout=0.5))[A.URL_FULL].rsplit("/", 1)[1])
                    break
                except queue.Empty:
                    assert time.monotonic() < deadline, "clrk tail printed none of the probes"
            for n in range(3):
                c.get(f"https://allowed.test/json/tail{n}", headers={"clrk-invocation-id": inv})
        while len([p for p in paths if p != "tail-probe"]) < 3:
            x = json.loads(printed.get(timeout=10))
            assert x[A.INVOCATION_ID] == inv
            paths.append(x[A.URL_FULL].rsplit("/", 1)[1])
    finally:
        proc.terminate()
        proc.wait(10)
    # In the order stored: the probes (a late one may follow the first), then the three requests.
    probes = paths.count("tail-probe")
    assert paths == ["tail-probe"] * probes + ["tail0", "tail1", "tail2"], paths


def test_clrk_tail_says_what_it_waits_for(session, tmp_path):
    """On stderr (stdout is the records'): waiting for a gateway, then following one."""
    for db, said in ((str(tmp_path / "none.duckdb"), f"clrk tail: waiting for a gateway writing {tmp_path / 'none.duckdb'}"),
                     (session.db, f"clrk tail: following the gateway writing {session.db}; waiting for its next records")):
        proc = subprocess.Popen([CLRK, "tail", "--db", db], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr.readline().startswith(said)
        finally:
            proc.terminate()
            proc.wait(10)


def test_clrk_ca_says_how_to_trust_and_proxy(tmp_path):
    out = subprocess.run([CLRK, "ca", "--certs", str(tmp_path / "certs"), "--policies", str(REPO / "policies")],
                         capture_output=True, text=True, check=True).stdout
    cert = str((tmp_path / "certs" / "mitmproxy-ca-cert.pem").resolve())
    for line in (f"CA={cert}", "export SSL_CERT_FILE=$CA REQUESTS_CA_BUNDLE=$CA CURL_CA_BUNDLE=$CA NODE_EXTRA_CA_CERTS=$CA",
                 "curl --cacert $CA", "export HTTPS_PROXY=http://team-a.researcher:<token>@localhost:8080",
                 "export NODE_USE_ENV_PROXY=1", "new EnvHttpProxyAgent()", "fetchOptions: {dispatcher: new ProxyAgent("):
        assert line in out
    key = tmp_path / "certs" / "mitmproxy-ca.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert base64.b64encode(key.read_bytes()[:40]).decode()[:20] not in out


def test_the_tui_never_shows_a_secret(session, upstream):
    """Every secret an agent sends or the gateway injects, searched for in everything the TUI can show: each
    pane's table, the detail view of every record, span and log record, and the rendered screen."""
    inv = new_invocation()
    sent = {
        "authorization": "Bearer sk-agent-TUI-SECRET-1",
        "x-api-key": "xak-TUI-SECRET-2",
        "x-goog-api-key": "goog-TUI-SECRET-3",
        "cookie": "sid=cookie-TUI-SECRET-4",
    }
    needles = [*sent.values(), "query-TUI-SECRET-5", INJECTED_KEY, AGENT_TOKEN]

    def traffic() -> None:
        with _client(session) as c:
            c.get("https://allowed.test/json/tui-secret?key=query-TUI-SECRET-5&x=1", headers={**sent, "clrk-invocation-id": inv})
            c.post("https://api.openai.com/v1/chat/completions", headers={"clrk-invocation-id": inv, **sent},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        # The injected key reached the provider: it is a real secret in this session, not an absent one.
        assert any(r.headers.get("authorization") == f"Bearer {INJECTED_KEY}"
                   for r in upstream.requests_to("/v1/chat/completions"))

    app = DevApp(RecordFeed(session.db), session.receiver.spans, session.receiver.logs, session.read_spend, status=session.status)
    seen: list[str] = []

    def table_text(table: DataTable) -> str:
        return "\n".join(" ".join(str(c) for c in table.get_row_at(i)) for i in range(table.row_count))

    async def drive():
        async with app.run_test(size=(220, 60)) as pilot:
            await asyncio.to_thread(traffic)
            await pilot.press("slash", *inv, "enter")
            for tab, table_id in (("1", "#records-table"), ("2", "#traces-table"), ("3", "#logs-table")):
                await pilot.press(tab)
                table = app.query_one(table_id, DataTable)
                await _until(pilot, lambda t=table: t.row_count >= 2)  # this invocation's two transactions
                seen.append(table_text(table))
                seen.append(app.export_screenshot())
                for row in range(table.row_count):
                    table.focus()
                    table.move_cursor(row=row)
                    await pilot.press("enter")
                    await _until(pilot, lambda: isinstance(app.screen, DetailScreen))
                    seen.append(str(app.screen.query_one("#detail-body", Static).content))
                    seen.append(app.export_screenshot())
                    await pilot.press("escape")
            await pilot.press("4")
            spend = app.query_one("#spend-table", DataTable)
            await _until(pilot, lambda: spend.row_count >= 1)  # the provider call's spend is shown
            seen.append(table_text(spend))
            seen.append(app.export_screenshot())

    asyncio.run(drive())
    everything = "\n".join(seen)
    assert "[REDACTED]" in everything and "tui-secret" in everything  # it did show these transactions
    for n in needles:
        assert n not in everything, f"{n!r} shown by the TUI"
