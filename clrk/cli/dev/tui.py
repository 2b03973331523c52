"""The `clrk dev` terminal UI: records, otel-traces, otel-logs, spend and otel-metrics, live.

Records come from the gateway's store (polled in a worker thread through the recorder's socket); traces
and logs from the in-process OTLP receiver the gateway tees to. Every pane keeps the newest MAX_ROWS rows
and is updated on a timer in batches, so a burst of 500 transactions a second costs a few table inserts
per tick, not a redraw per transaction. Nothing here sees a secret: records are redacted before they are
stored or exported.

Every value shown comes from an agent or an upstream: cells are `Text` (a str cell would be read as Rich
markup: "[/]" in a model name would stop the UI) with control characters escaped (`clrk.escape.printable`),
so no record can break a row, fake one, or send escape sequences to the terminal.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Static, TabbedContent, TabPane

from clrk import attributes as A
from clrk.cli.feed import RecordFeed, mcp_summary
from clrk.cost import format_usd
from clrk.escape import printable, printable_block
from clrk.providers.sse import SseParser

MAX_ROWS = 500
TICK = 0.25
SPEND_EVERY = 2.0

RECORD_COLUMNS = ("time", "agent", "decision", "method", "host", "model", "status", "tokens in/out", "ms")
TRACE_COLUMNS = ("time", "span", "kind", "status", "ms", "trace", "span id")
LOG_COLUMNS = ("time", "severity", "event", "agent", "decision", "host", "status", "span id")
SPEND_COLUMNS = ("agent", "route", "model", "requests", "input", "output", "total", "usd", "unpriced")
BUDGET_COLUMNS = ("budget pool", "used today", "max", "left", "usd today", "max usd")
METRIC_COLUMNS = ("metric", "unit", "attributes", "value")
KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
HELP = """\
clrk dev — keys

  1 2 3 4 5   records, otel-traces, otel-logs, spend, otel-metrics
  enter       the whole transaction (attributes, redacted headers, bodies, SSE as events)
  /           filter by agent or invocation id; "mcp" for MCP messages, or a tool or method name (enter applies, empty clears)
  escape      close a view / the filter
  ?           this help
  q           quit (the gateway stops with it)
"""


def _clock(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).strftime("%H:%M:%S.%f")[:-3]


def _agent(attrs: dict) -> str:
    return f"{attrs.get(A.AGENT_NAMESPACE)}/{attrs.get(A.AGENT_NAME)}" if attrs.get(A.AGENT_NAME) else "-"


def cell(value: Any, style: str = "") -> Text:
    """A table cell showing `value` as plain text, terminal-safe: never markup, never a control character."""
    return Text(printable(str(value)), style=style, no_wrap=True)


def record_row(r: dict) -> tuple:
    t = dt.datetime.fromisoformat(r[A.TIME].replace("Z", "+00:00")).timestamp() if r.get(A.TIME) else 0
    tokens = ""
    if r.get(A.GEN_AI_USAGE_INPUT_TOKENS) is not None or r.get(A.GEN_AI_USAGE_OUTPUT_TOKENS) is not None:
        tokens = f"{r.get(A.GEN_AI_USAGE_INPUT_TOKENS, '-')}/{r.get(A.GEN_AI_USAGE_OUTPUT_TOKENS, '-')}"
    decision = r.get(A.CLRK_DECISION, "-")
    mcp = A.is_mcp_child(r)
    return (
        cell(_clock(t)), cell(_agent(r)),
        cell(decision, style="bold red" if decision == "deny" else "green"),
        cell("MCP" if mcp else r.get(A.HTTP_REQUEST_METHOD, "")), cell(r.get(A.SERVER_ADDRESS, "")),
        cell(mcp_summary(r) if mcp else r.get(A.GEN_AI_REQUEST_MODEL, ""), style="red" if mcp and r.get(A.ERROR_TYPE) else ""),
        cell(r.get(A.HTTP_RESPONSE_STATUS_CODE, "-")), cell(tokens), cell(f"{r.get(A.CLRK_DURATION_MS, 0):.1f}"),
    )


def matches(filter_text: str, attrs: dict) -> bool:
    if not filter_text:
        return True
    f = filter_text.lower()
    if A.is_mcp_child(attrs) and (f == "mcp" or f in mcp_summary(attrs).lower()):
        return True  # "mcp": every MCP message; a tool, prompt or method name: those messages
    return f in _agent(attrs).lower() or f in str(attrs.get(A.INVOCATION_ID, "")).lower()


def transaction_text(r: dict) -> Text:
    """The whole record, readable: attributes, redacted headers, bodies (JSON pretty, SSE as events)."""
    out = Text()

    def section(title: str) -> None:
        out.append(f"\n{title}\n", style="bold underline")

    section("attributes")
    for k in sorted(r):
        if k in (A.REQUEST_HEADERS, A.RESPONSE_HEADERS, A.REQUEST_BODY, A.RESPONSE_BODY):
            continue
        out.append(f"  {printable(str(k))}", style="cyan")
        out.append(f" = {printable(str(r[k]))}\n")
    for title, hk, bk in (("request", A.REQUEST_HEADERS, A.REQUEST_BODY), ("response", A.RESPONSE_HEADERS, A.RESPONSE_BODY)):
        headers = r.get(hk) or {}
        section(f"{title} headers")
        for k, v in headers.items():
            out.append(f"  {printable(str(k))}: ", style="cyan")
            out.append(f"{printable(str(v))}\n", style="bold yellow" if v == A.REDACTED else "")
        section(f"{title} body")
        body = r.get(bk)
        if body is None:
            out.append("  (not captured: content type not in captureBody.includeContentTypes)\n", style="dim")
            continue
        body = str(body)
        if r.get(A.CLRK_BODY_B64):
            out.append("  (base64: not UTF-8)\n  ", style="dim")
            out.append(printable(body) + "\n")
            continue
        ctype = str(headers.get("content-type", ""))
        if ctype.startswith("text/event-stream"):
            events = SseParser().feed(body.encode() + b"\n\n")
            out.append(f"  {len(events)} events\n", style="dim")
            for name, data in events:
                out.append(f"  event: {printable(name or 'message')}  ", style="magenta")
                out.append(printable(data) + "\n")
        else:
            try:
                out.append(json.dumps(json.loads(body), indent=2) + "\n")  # ensure_ascii: escapes every control
            except ValueError:
                out.append(printable_block(body) + "\n")  # a text body keeps its lines; nothing else gets through
        truncated = r.get(A.CLRK_REQ_TRUNCATED if title == "request" else A.CLRK_RESP_TRUNCATED)
        if truncated:
            out.append("  … truncated at captureBody.maxBytes\n", style="dim")
    return out


class DetailScreen(ModalScreen):
    BINDINGS = [Binding("escape,q", "app.pop_screen", "close")]

    def __init__(self, record: dict):
        super().__init__()
        self.record = record

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static(transaction_text(self.record), id="detail-body")


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close")]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class DevApp(App):
    TITLE = "clrk dev"
    CSS = """
    #filter { dock: top; display: none; }
    #filter.shown { display: block; }
    DetailScreen, HelpScreen { align: center middle; }
    #detail { width: 95%; height: 90%; border: round $accent; background: $surface; }
    #help { width: 70; height: auto; border: round $accent; background: $surface; padding: 1 2; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("slash", "filter", "filter"),
        Binding("escape", "hide_filter", show=False),
        Binding("1", "tab('records')", "records"),
        Binding("2", "tab('traces')", "otel-traces"),
        Binding("3", "tab('logs')", "otel-logs"),
        Binding("4", "tab('spend')", "spend"),
        Binding("5", "tab('metrics')", "otel-metrics"),
    ]

    def __init__(
        self,
        feed: RecordFeed,
        spans: deque | None = None,
        logs: deque | None = None,
        read_spend: Callable[[], tuple[list[dict], list[dict]]] | None = None,
        max_rows: int = MAX_ROWS,
        status: Callable[[], str] | None = None,
        metrics: dict | None = None,
    ):
        super().__init__()
        self.feed = feed
        self.span_source = spans if spans is not None else deque()
        self.log_source = logs if logs is not None else deque()
        self.read_spend = read_spend
        self.max_rows = max_rows
        self.status = status
        self.records: OrderedDict[str, dict] = OrderedDict()
        self.spans: OrderedDict[str, dict] = OrderedDict()
        self.logs: OrderedDict[str, dict] = OrderedDict()
        self.filter_text = ""
        self._incoming: deque[dict] = deque()
        self._spend: tuple[list[dict], list[dict]] | None = None
        self._stop = threading.Event()
        self.counts = {"records": 0, "spans": 0, "logs": 0}
        self.metric_source = metrics if metrics is not None else {}  # the receiver's latest point per series
        self._metrics_shown = -1.0

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter: agent (namespace/name) or invocation id; enter applies, empty clears", id="filter")
        with TabbedContent(id="tabs"):
            with TabPane("records", id="records"):
                yield DataTable(id="records-table", cursor_type="row", zebra_stripes=True)
            with TabPane("otel-traces", id="traces"):
                yield DataTable(id="traces-table", cursor_type="row", zebra_stripes=True)
            with TabPane("otel-logs", id="logs"):
                yield DataTable(id="logs-table", cursor_type="row", zebra_stripes=True)
            with TabPane("spend", id="spend"):
                yield DataTable(id="spend-table", zebra_stripes=True)
                yield DataTable(id="budget-table", zebra_stripes=True)
            with TabPane("otel-metrics", id="metrics"):
                yield DataTable(id="metrics-table", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        for table_id, cols in (("records-table", RECORD_COLUMNS), ("traces-table", TRACE_COLUMNS), ("logs-table", LOG_COLUMNS),
                               ("spend-table", SPEND_COLUMNS), ("budget-table", BUDGET_COLUMNS),
                               ("metrics-table", METRIC_COLUMNS)):
            self.query_one(f"#{table_id}", DataTable).add_columns(*cols)
        self.query_one("#records-table", DataTable).focus()
        self.set_interval(TICK, self.tick)
        self._poller = threading.Thread(target=self._poll, name="clrk-dev-poll", daemon=True)
        self._poller.start()

    def on_unmount(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ data

    def _poll(self) -> None:
        """Worker thread: blocking reads of the store, handed to the UI through deques."""
        last_spend = 0.0
        while not self._stop.is_set():
            self._incoming.extend(self.feed.poll())
            if self.read_spend is not None and time.monotonic() - last_spend > SPEND_EVERY:
                last_spend = time.monotonic()
                try:
                    self._spend = self.read_spend()
                except Exception:
                    pass
            self._stop.wait(TICK)

    def tick(self) -> None:
        new_records = self._drain(self._incoming)
        new_spans = self._drain(self.span_source)
        new_logs = self._drain(self.log_source)
        self.counts["records"] += len(new_records)
        self.counts["spans"] += len(new_spans)
        self.counts["logs"] += len(new_logs)
        self._add(self.records, "records-table", [(r.get(A.SPAN_ID) or str(id(r)), r, r) for r in new_records], record_row)
        self._add(self.spans, "traces-table", [(s["span_id"], s, s["attributes"]) for s in new_spans], self._span_row)
        self._add(self.logs, "logs-table", [(lg["span_id"] + ":log", lg, lg["attributes"]) for lg in new_logs], self._log_row)
        if self._spend is not None:
            self._show_spend(*self._spend)
            self._spend = None
        if time.monotonic() - self._metrics_shown >= SPEND_EVERY:
            self._metrics_shown = time.monotonic()
            self._show_metrics()
        conn = "connected" if self.feed.connected else "waiting for the gateway"
        extra = f" | {self.status()}" if self.status else ""
        flt = f" | filter: {self.filter_text}" if self.filter_text else ""
        self.sub_title = (f"gateway {conn} | records {self.counts['records']} | spans {self.counts['spans']} | "
                          f"logs {self.counts['logs']}{flt}{extra}")

    @staticmethod
    def _drain(source: deque) -> list:
        out = []
        while source:
            try:
                out.append(source.popleft())
            except IndexError:
                break
        return out

    def _add(self, store: OrderedDict, table_id: str, items: list[tuple[str, dict, dict]], row: Callable[[dict], tuple]) -> None:
        if not items:
            return
        table = self.query_one(f"#{table_id}", DataTable)
        items = items[-self.max_rows:]  # a burst larger than the pane: only the newest can be shown
        for key, item, attrs in items:
            if key in store:
                continue
            store[key] = item
            if matches(self.filter_text, attrs):
                table.add_row(*row(item), key=key)
        while len(store) > self.max_rows:
            old, _ = store.popitem(last=False)
            if old in table.rows:
                table.remove_row(old)
        if table.row_count and table.cursor_row >= table.row_count - len(items) - 1:
            table.move_cursor(row=table.row_count - 1)  # follow the newest unless the user scrolled up

    @staticmethod
    def _span_row(s: dict) -> tuple:
        ms = (s["end_ns"] - s["start_ns"]) / 1e6
        status = {0: "unset", 1: "ok", 2: "error"}.get(s["status"], str(s["status"]))
        return (cell(_clock(s["start_ns"] / 1e9)), cell(s["name"]), cell(KINDS.get(s["kind"], s["kind"])),
                cell(status, style="red" if status == "error" else ""), cell(f"{ms:.1f}"), cell(s["trace_id"][:16]),
                cell(s["span_id"]))

    @staticmethod
    def _log_row(lg: dict) -> tuple:
        a = lg["attributes"]
        return (cell(_clock(lg["time_ns"] / 1e9)), cell(lg["severity"]), cell(lg["event_name"]), cell(_agent(a)),
                cell(a.get(A.CLRK_DECISION, "-")), cell(a.get(A.SERVER_ADDRESS, "")),
                cell(a.get(A.HTTP_RESPONSE_STATUS_CODE, "-")), cell(lg["span_id"]))

    def _show_spend(self, spend: list[dict], budgets: list[dict]) -> None:
        t = self.query_one("#spend-table", DataTable)
        t.clear()
        for r in spend:
            t.add_row(cell(r.get("agent") or "-"), cell(r.get("route") or "-"), cell(r.get("model") or "-"), cell(r["requests"]),
                      cell(r["input_tokens"]), cell(r["output_tokens"]), cell(r["total_tokens"]),
                      cell(format_usd(r.get("cost_usd"))), cell(r.get("unpriced") or 0))
        b = self.query_one("#budget-table", DataTable)
        b.clear()
        for r in budgets:
            b.add_row(cell(r["pool"]), cell(r["used_tokens"]), cell(r["max_tokens"] if r["max_tokens"] is not None else "?"),
                      cell(r["left_tokens"] if r["left_tokens"] is not None else "?"),
                      cell(format_usd(r.get("used_usd"))), cell(format_usd(r.get("max_usd"))))

    def _show_metrics(self) -> None:
        """Every series the tee has sent, its latest value (cumulative: the totals since the gateway started)."""
        points = list(self.metric_source.values())  # one C-level copy: the receiver's threads may add meanwhile
        if not points:
            return
        points.sort(key=lambda p: (p["name"], sorted(p["attributes"].items())))
        t = self.query_one("#metrics-table", DataTable)
        t.clear()
        for p in points[: self.max_rows]:
            attrs = ", ".join(f"{k}={v}" for k, v in sorted(p["attributes"].items()))
            if p["kind"] == "histogram":
                mean = p["sum"] / p["count"] if p["count"] else 0
                value = f"count {p['count']}, sum {p['sum']:g}, mean {mean:.4g}"
            else:
                value = f"{p['value']:g}"
            t.add_row(cell(p["name"]), cell(p["unit"]), cell(attrs or "-"), cell(value))

    def _refilter(self) -> None:
        for store, table_id, attrs_of, row in (
            (self.records, "records-table", lambda r: r, record_row),
            (self.spans, "traces-table", lambda s: s["attributes"], self._span_row),
            (self.logs, "logs-table", lambda lg: lg["attributes"], self._log_row),
        ):
            table = self.query_one(f"#{table_id}", DataTable)
            table.clear()
            for key, item in store.items():
                if matches(self.filter_text, attrs_of(item)):
                    table.add_row(*row(item), key=key)

    # ------------------------------------------------------------------ actions

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""  # the current filter is in the title bar; submitting empty clears it
        box.add_class("shown")
        box.focus()

    def action_hide_filter(self) -> None:
        self.query_one("#filter", Input).remove_class("shown")
        self.query_one("#records-table", DataTable).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.filter_text = event.value.strip()
        self.action_hide_filter()
        self._refilter()
        self.query_one("#records-table", DataTable).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if event.data_table.id == "records-table" and key in self.records:
            self.push_screen(DetailScreen(self.records[key]))
        elif event.data_table.id == "traces-table" and key in self.spans:
            self.push_screen(DetailScreen(_otel_as_record(self.spans[key])))
        elif event.data_table.id == "logs-table" and key in self.logs:
            self.push_screen(DetailScreen(_otel_as_record(self.logs[key])))


def _otel_as_record(item: dict) -> dict[str, Any]:
    """A span or log record from the receiver, shown with the same detail view as a stored record."""
    rec: dict[str, Any] = dict(item.get("attributes") or {})
    rec["trace_id"], rec["span_id"] = item.get("trace_id"), item.get("span_id")
    if item.get("parent_span_id"):
        rec["parent_span_id"] = item["parent_span_id"]
    if item.get("name"):
        rec["(span name)"] = item["name"]
    body = item.get("body")
    if isinstance(body, dict):
        for side, hk, bk in (("request", A.REQUEST_HEADERS, A.REQUEST_BODY), ("response", A.RESPONSE_HEADERS, A.RESPONSE_BODY)):
            part = body.get(side) or {}
            rec[hk] = part.get("headers") or {}
            if part.get("body") is not None:
                rec[bk] = part["body"]
    rec.update({f"(resource) {k}": v for k, v in (item.get("resource") or {}).items()})
    return rec
