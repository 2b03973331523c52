"""Every transaction is recorded, whatever bytes the agent or the upstream sends: undecodable bytes and lone
surrogates are escaped losslessly (`clrk.escape`), a value no column can hold costs neither the rest of its
record nor any other record, the budget charge survives a restart, what truly cannot be stored is counted and
logged with its ids, and nothing a record holds reaches a terminal as a control character.

Hostile input is written by hand: raw sockets, raw TLS inside CONNECT tunnels, raw JSON escapes."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from textual.widgets import DataTable, Static

from clrk import attributes as A
from clrk import escape, wire
from clrk.cli.dev.tui import DetailScreen, DevApp, record_row, transaction_text
from clrk.cli.feed import RecordFeed
from tests.harness import fake_provider
from tests.harness.gateway import AGENT_TOKEN, Gateway, agent_docs, basic, gateway_doc, proxy_connect, route
from tests.harness.util import new_invocation

CLRK = str(Path(sys.executable).parent / "clrk")
AUTH = basic("team-a.researcher", AGENT_TOKEN)
# What a terminal must never receive from a record: C0 (but the newline ending each line), DEL, C1, the
# Unicode line/paragraph separators and the bidi overrides and isolates.
UNSAFE = {*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\u061c", "\u200e", "\u200f", "\u2028",
          "\u2029", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))} - {"\n"}




# ------------------------------------------------------------------------------------------ fixtures


def hostile_provider(h, seen):
    """An OpenAI-compatible upstream whose answers no record column expects; other models: the fake provider."""
    model = json.loads(seen.body or b"{}").get("model", "")
    if model.startswith("hostile-surrogates"):
        return h._send(200, b'{"id":"x\\ud800","model":"m\\udfff\\u001b[2J","choices":[{"index":0,"finish_reason":"\\ud800"}],'
                            b'"usage":{"prompt_tokens":3,"completion_tokens":4}}')
    if model.startswith("hostile-huge"):  # a charge past 64 bits
        return h._send(200, b'{"id":"x","model":"m","usage":{"prompt_tokens":%d,"completion_tokens":%d}}' % (2**62, 2**62))
    if model.startswith("hostile-refund"):
        return h._send(200, b'{"id":"x","model":"m","usage":{"prompt_tokens":-100000,"completion_tokens":1}}')
    return fake_provider.openai(h, seen)


def status_line(h, seen):
    """Answers with the status code the path names, as an upstream may: a number no column holds."""
    h.wfile.write(b"HTTP/1.1 " + seen.path.rsplit("/", 1)[1].encode() + b" Odd\r\ncontent-type: application/json\r\n"
                  b"content-length: 2\r\nconnection: close\r\n\r\n{}")
    h.close_connection = True


@pytest.fixture(scope="module")
def hostile_upstream(upstream):
    fake_provider.install(upstream)
    mine = [("/v1/chat/completions", hostile_provider), ("/hostile-status/", status_line)]
    upstream.routes[:0] = mine
    yield upstream
    for r in mine:
        upstream.routes.remove(r)


def provider_route(rules: list[dict]) -> dict:
    return {"kind": "AIProviderRoute", "metadata": {"name": "llm", "namespace": "team-a"}, "spec": {"rules": rules}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, hostile_upstream):
    docs = [gateway_doc(aliases={h: hostile_upstream.address for h in ("allowed.test", "api.openai.com")}, ca_bundle=str(pki[0])),
            *agent_docs(), route("ok", ["allowed.test"]),
            provider_route([{"matches": [{"provider": "openai", "models": ["*"]}],
                             "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 10**12}}]}])]
    g = Gateway(tmp_path_factory.mktemp("recording"), docs).start()
    yield g
    g.stop()


def tunnel(gw: Gateway, host: str, raw: bytes) -> bytes:
    """One request written byte by byte inside a CONNECT tunnel and TLS; the whole answer."""
    s, head = proxy_connect(gw.port, f"{host}:443", AUTH)
    assert head.startswith(b"HTTP/1.1 200"), head
    t = gw.ssl_context().wrap_socket(s, server_hostname=host)
    t.sendall(raw)
    return _read_all(t)


def plain(gw: Gateway, raw: bytes) -> bytes:
    """One request written byte by byte to the proxy port (plain-HTTP proxying, absolute form)."""
    return _read_all(socket.create_connection(("127.0.0.1", gw.port), timeout=10), raw)


def _read_all(s: socket.socket, send: bytes = b"") -> bytes:
    s.settimeout(10)
    if send:
        s.sendall(send)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionError, OSError):
        pass
    s.close()
    return out


def wait_records(gw: Gateway, i: str, n: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while len(rows := gw.records(invocation=i)) < n:
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
    assert len(rows) == n
    return rows


def status(gw: Gateway) -> dict:
    return json.loads(subprocess.run([CLRK, "status", "--db", str(gw.db), "--json"], capture_output=True, text=True, check=True).stdout)


# ------------------------------------------------------------------------------------------ what the agent sends


def test_undecodable_bytes_and_controls_in_a_tunnelled_request_are_recorded_losslessly(gw):
    i = new_invocation()
    path = b"/json/a\x80\xff\\x41\x1b[2J?q=\x00\x7f"  # a literal backslash-x too: the escape must stay unambiguous
    value = b"v\x80\xfe\\ \x1b[31m\x7f\x00end"  # no CR: a line break in a value is refused (test_adversary)
    sent_inv = i.encode() + b"\xff\x1b[2J"
    tunnel(gw, "allowed.test", b"GET " + path + b" HTTP/1.1\r\nHost: allowed.test\r\nx-v: " + value + b"\r\n"
           b"clrk-invocation-id: " + sent_inv + b"\r\nConnection: close\r\n\r\n")
    rec = gw.wait_record(invocation=i + "\\xff\x1b[2J")
    assert rec[A.URL_FULL] == "https://allowed.test/json/a\\x80\\xff\\\\x41\x1b[2J?q=\x00\x7f"
    assert rec[A.REQUEST_HEADERS]["x-v"] == "v\\x80\\xfe\\\\ \x1b[31m\x7f\x00end"
    assert rec[A.REQUEST_HEADERS]["host"] == "allowed.test"
    assert sorted(rec[A.CLRK_RECORD_ESCAPED]) == sorted([A.URL_FULL, A.INVOCATION_ID, A.REQUEST_HEADERS])
    assert (rec[A.CLRK_DECISION], rec[A.HTTP_REQUEST_METHOD], rec[A.AGENT_NAME]) == ("allow", "GET", "researcher")
    # Lossless: undoing the escape gives back the bytes the agent sent.
    assert escape.unescape(rec[A.URL_FULL]) == b"https://allowed.test" + path
    assert escape.unescape(rec[A.REQUEST_HEADERS]["x-v"]) == value
    assert escape.unescape(rec[A.INVOCATION_ID]) == sent_inv


def test_undecodable_bytes_and_controls_in_a_plain_proxy_request_are_recorded_losslessly(gw):
    """Plain-HTTP proxying (denied here: port 80). Header values were kept one character per byte, so an
    invalid byte 0x9b became U+009B, a terminal's CSI."""
    i = new_invocation()
    value = b"a\x9b31m\xc3\xa9\xff"
    plain(gw, b"GET http://allowed.test/p\x1b[2J?q=\x00 HTTP/1.1\r\nHost: allowed.test\r\nProxy-Authorization: "
          + AUTH.encode() + b"\r\nx-v: " + value + b"\r\nclrk-invocation-id: " + i.encode() + b"\r\nConnection: close\r\n\r\n")
    rec = gw.wait_record(invocation=i)
    assert rec[A.REQUEST_HEADERS]["x-v"] == "a\\x9b31mé\\xff"
    assert escape.unescape(rec[A.REQUEST_HEADERS]["x-v"]) == value
    assert rec[A.URL_FULL] == "http://allowed.test/p\x1b[2J?q=\x00"
    assert rec[A.CLRK_RECORD_ESCAPED] == [A.REQUEST_HEADERS]
    assert rec[A.CLRK_DECISION] == "deny" and rec[A.AGENT_NAME] == "researcher"


def test_an_invocation_id_in_baggage_is_recorded_from_its_bytes(gw):
    """Percent-escapes are bytes: %C3%A9 is é, a lone %E9 is no UTF-8 (it was U+FFFD, its byte lost)."""
    i = new_invocation()
    tunnel(gw, "allowed.test", b"GET /json/bag HTTP/1.1\r\nHost: allowed.test\r\nbaggage: k=v, invocation.id=" + i.encode()
           + b"%C3%A9%E9%1b;p=1\r\ntraceparent: 00-\xff\x1b-zz\r\nConnection: close\r\n\r\n")
    rec = gw.wait_record(invocation=i + "é\\xe9\x1b")
    assert escape.unescape(rec[A.INVOCATION_ID]) == i.encode() + b"\xc3\xa9\xe9\x1b"
    assert A.PARENT_SPAN_ID not in rec  # the junk traceparent started a trace of the gateway's own


@pytest.mark.parametrize("via", ["tunnel", "plain"])
def test_a_request_mitmproxy_refuses_on_its_headers_is_recorded_with_its_agent(gw, hostile_upstream, via):
    """A header name no HTTP token has: mitmproxy answers 400 before any step sees the request. It used to
    leave no record at all."""
    i = new_invocation()
    path = f"/json/malformed-{i}".encode()
    head = b"Host: allowed.test\r\nx-\x80\xff: v\r\nclrk-invocation-id: " + i.encode() + b"\r\nConnection: close\r\n\r\n"
    if via == "tunnel":
        out = tunnel(gw, "allowed.test", b"GET " + path + b" HTTP/1.1\r\n" + head)
    else:
        out = plain(gw, b"GET http://allowed.test" + path + b" HTTP/1.1\r\nProxy-Authorization: " + AUTH.encode() + b"\r\n" + head)
    assert out.startswith(b"HTTP/1.1 400")
    rec = gw.wait_record(invocation=i)
    assert (rec[A.CLRK_DECISION], rec[A.CLRK_DECISION_RULE], rec[A.ERROR_TYPE]) == ("deny", "malformed-request", "invalid_request")
    assert rec[A.AGENT_NAME] == "researcher" and "invalid header name" in rec[A.CLRK_DECISION_REASON]
    assert rec[A.URL_FULL] == ("https" if via == "tunnel" else "http") + "://allowed.test" + path.decode()
    assert rec[A.REQUEST_HEADERS]["x-\\x80\\xff"] == "v" and "proxy-authorization" not in rec[A.REQUEST_HEADERS]
    assert not hostile_upstream.requests_to(path.decode())


def test_lone_surrogates_from_the_agent_and_the_upstream_are_recorded_escaped(gw):
    """A JSON "\\ud800" parses to a str UTF-8 cannot encode: its record used to be dropped whole."""
    i = new_invocation()
    body = b'{"model":"hostile-surrogates\\ud800","messages":[{"role":"user","content":"\\udfff"}],"max_tokens":5}'
    with gw.client() as c:
        r = c.post("https://api.openai.com/v1/chat/completions", content=body,
                   headers={"content-type": "application/json", "clrk-invocation-id": i})
    assert r.status_code == 200
    rec = gw.wait_record(invocation=i)
    assert rec[A.GEN_AI_REQUEST_MODEL] == "hostile-surrogates\\xed\\xa0\\x80"
    assert escape.unescape(rec[A.GEN_AI_REQUEST_MODEL]) == "hostile-surrogates\ud800".encode("utf-8", "surrogatepass")
    assert (rec[A.GEN_AI_RESPONSE_MODEL], rec[A.GEN_AI_RESPONSE_ID]) == ("m\\xed\\xbf\\xbf\x1b[2J", "x\\xed\\xa0\\x80")
    assert rec[A.GEN_AI_RESPONSE_FINISH_REASONS] == ["\\xed\\xa0\\x80"]
    assert "hostile-surrogates\\xed\\xa0\\x80" in rec[A.CLRK_DECISION_REASON]
    assert {A.GEN_AI_REQUEST_MODEL, A.GEN_AI_RESPONSE_MODEL, A.GEN_AI_RESPONSE_ID, A.GEN_AI_RESPONSE_FINISH_REASONS,
            A.CLRK_DECISION_REASON} <= set(rec[A.CLRK_RECORD_ESCAPED])
    assert rec[A.REQUEST_BODY] == body.decode()  # valid UTF-8 as sent: the body is kept as it is
    assert rec[A.CLRK_BUDGET_TOKENS] == 7 and A.CLRK_RECORD_INCOMPLETE not in rec


# ------------------------------------------------------------------------------------------ what the upstream sends


@pytest.mark.parametrize("code", ["99999999999", "1" + "0" * 30])
def test_a_status_code_no_record_holds_costs_neither_this_record_nor_the_next(gw, code):
    """99999999999 fits msgpack but not the INTEGER column: its batch, and every record after it, used to wait
    forever; 10**30 fits neither: its record was dropped at the proxy."""
    i, after = new_invocation(), new_invocation()
    tunnel(gw, "allowed.test", f"GET /hostile-status/{code} HTTP/1.1\r\nHost: allowed.test\r\nclrk-invocation-id: {i}\r\n"
           "Connection: close\r\n\r\n".encode())
    with gw.client() as c:
        assert c.get("https://allowed.test/json/after", headers={"clrk-invocation-id": after}).status_code == 200
    rec = gw.wait_record(invocation=i)
    assert A.HTTP_RESPONSE_STATUS_CODE not in rec and "status" in rec[A.CLRK_RECORD_INCOMPLETE]
    assert rec[A.URL_FULL] == f"https://allowed.test/hostile-status/{code}" and rec[A.CLRK_DECISION] == "allow"
    assert A.CLRK_RECORD_INCOMPLETE not in gw.wait_record(invocation=after)
    assert status(gw)["incomplete"] >= 1


def test_the_budget_counts_charges_whose_records_needed_mending_after_a_restart(tmp_path, pki, hostile_upstream):
    """Usage is rebuilt from the stored records at start: a charge whose record was dropped (a lone surrogate
    in the model name) or never stored (a charge past 64 bits held its whole batch back) was forgotten."""
    budget = {"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 100}}
    docs = [gateway_doc(aliases={"api.openai.com": hostile_upstream.address}, ca_bundle=str(pki[0])), *agent_docs(),
            provider_route([{"matches": [{"provider": "openai", "models": ["esc-*"]}], "filters": [budget]},
                            {"matches": [{"provider": "openai", "models": ["hostile-huge*"]}], "filters": [budget]}])]
    gw = Gateway(tmp_path, docs).start()

    def call(model_json: bytes) -> int:
        with gw.client() as c:
            return c.post("https://api.openai.com/v1/chat/completions", headers={"content-type": "application/json"},
                          content=b'{"model":"' + model_json + b'","messages":[],"max_tokens":5}').status_code

    try:
        assert call(b"esc-cost95\\ud800") == 200  # the fake provider reports 95 + 5 tokens: 100 of 100
        assert call(b"hostile-huge") == 200
        assert (call(b"esc-next"), call(b"hostile-huge-next")) == (429, 429)
        gw.stop()
        gw.start()
        assert (call(b"esc-next"), call(b"hostile-huge-next")) == (429, 429)
        used = {r[A.GEN_AI_REQUEST_MODEL]: r[A.CLRK_BUDGET_TOKENS] for r in gw.records() if r.get(A.CLRK_BUDGET_TOKENS)}
        assert used == {"esc-cost95\\xed\\xa0\\x80": 100, "hostile-huge": 2**63 - 1}
    finally:
        gw.stop()


def test_negative_usage_from_an_upstream_refunds_nothing(gw):
    i = new_invocation()
    with gw.client() as c:
        for model in ("hostile-refund", "gpt-4o-mini"):
            assert c.post("https://api.openai.com/v1/chat/completions", headers={"clrk-invocation-id": i},
                          json={"model": model, "messages": [], "max_tokens": 5}).status_code == 200
    refund, after = sorted(wait_records(gw, i, 2), key=lambda r: r[A.TIME])
    assert refund[A.CLRK_BUDGET_TOKENS] == 0 and refund[A.GEN_AI_USAGE_INPUT_TOKENS] == -100000
    assert after[A.CLRK_BUDGET_DAILY_USED] == refund[A.CLRK_BUDGET_DAILY_USED] + after[A.CLRK_BUDGET_TOKENS]


# ------------------------------------------------------------------------------------------ what cannot be stored


def test_a_record_that_cannot_be_stored_is_counted_and_logged_with_its_ids(gw):
    """Nothing a gateway records can be unstorable any more (the tests above): the recorder is handed, on its
    socket as a proxy would, the facts of a transaction without a usable start time."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with wire.BlockingClient(wire.socket_path(gw.db)) as c:
        before = c.request({"t": "status"})["dropped"]
        c.send({"t": "rows", "rows": [{"ids": [trace_id, span_id, None], "t0": "not a time", "t1": None}]})
        after = c.request({"t": "status"})["dropped"]
    assert after == before + 1 == status(gw)["dropped"]
    lines = [x for x in gw.log().splitlines() if trace_id in x]
    assert len(lines) == 1 and span_id in lines[0] and "cannot be stored" in lines[0]


def test_records_a_proxy_drops_are_counted_by_the_recorder(tmp_path, monkeypatch):
    """The proxy's queue is bounded while the recorder does not keep up; what it drops used to be only in the
    proxy's log: `clrk status` said 0 dropped."""
    from clrk.proxy import sink as sink_module

    now = time.time()
    raw = {"t0": now, "t1": now, "method": b"GET", "scheme": "https", "host": "x.test", "port": 443, "path": b"/",
           "status": 200, "gateway": None, "dst": "x.test", "inv": "q", "decision": None, "agent": None, "rewritten": False,
           "req_headers": [], "resp_headers": None, "req_body": (0, None, False), "resp_body": (0, None, False),
           "error": None, "upstream": True}

    async def run() -> tuple[dict, dict]:
        s = sink_module.RecordSink(str(tmp_path / "c.duckdb"))
        await s.start()
        try:
            monkeypatch.setattr(sink_module, "MAX_PENDING", 3)
            monkeypatch.setattr(sink_module, "HIGH_WATER", -1)  # the recorder's socket counts as full
            for n in range(5):
                s.submit({**raw, "ids": (uuid.uuid4().hex, f"{n + 1:016x}", None)})
            while s.dropped < 2:
                await asyncio.sleep(0.01)
            monkeypatch.setattr(sink_module, "HIGH_WATER", 16 * 1024 * 1024)
            flushed = await s.flush()
            return flushed, await s.request({"t": "status"}, 10)
        finally:
            await s.stop()

    flushed, st = asyncio.run(run())
    assert (flushed["written"], flushed["dropped"], st["dropped_at_proxy"]) == (3, 2, 2)


def test_a_request_the_recorder_does_not_answer_in_time_ends_at_its_deadline_and_its_late_answer_is_ignored(tmp_path):
    """RecordSink.request bounds itself (a budget admission held by the recorder relies on it): with the recorder
    stopped (SIGSTOP) a request fails at its deadline and leaves nothing waiting; once the recorder runs again
    its late answer to that request is dropped and the next request gets its own."""
    import signal

    from clrk.proxy import sink as sink_module

    async def run() -> None:
        s = sink_module.RecordSink(str(tmp_path / "c.duckdb"))
        await s.start()
        pid = (await s.request({"t": "status"}, 10))["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await s.request({"t": "status"}, 0.3)
            assert 0.3 <= time.monotonic() - t0 < 2 and not s._replies
        finally:
            os.kill(pid, signal.SIGCONT)
        reply = await s.request({"t": "flush"}, 10)
        assert reply["t"] == "ok" and "written" in reply and "pid" not in reply  # its own, not the late status answer
        await s.stop()

    asyncio.run(run())


def test_a_record_msgpack_refuses_is_shipped_without_the_value_it_cannot_carry(tmp_path):
    """It used to be dropped whole (and with it its transaction's budget charge)."""
    from clrk.proxy.sink import RecordSink

    sink = RecordSink(str(tmp_path / "c.duckdb"))

    async def submit() -> None:  # as on the proxy's event loop
        sink.submit({"ids": ("a" * 32, "b" * 16, None), "n": 2**70, "model": "m\ud800"})

    asyncio.run(submit())
    (data,) = sink.pending
    got = wire.unpack(wire.pack_rows([data])[wire.HEADER.size:])["rows"][0]
    assert got["n"] is None and got["model"] == b"m\xed\xa0\x80" and "n" in got["incomplete"]
    assert sink.dropped == 0


# ------------------------------------------------------------------------------------------ terminals


def hostile_records(gw: Gateway, i: str) -> None:
    """A provider call whose model name breaks lines and drives the terminal, and a denied request whose path
    (and so its decision reason) does."""
    model = "[/]m\\n\\r\\u001b[2J\\u001b]0;title\\u0007\\u009b31m\\u202e\\u2028x"
    with gw.client() as c:
        assert c.post("https://api.openai.com/v1/chat/completions", headers={"clrk-invocation-id": i},
                      content=('{"model":"' + model + '","messages":[],"max_tokens":5}').encode()).status_code == 200
    assert tunnel(gw, "other.test", b"GET /\x1b[2J\xc2\x9b31m\xe2\x80\xae\x7f HTTP/1.1\r\nHost: other.test\r\n"
                  b"x-v: \x1b]52;c;AAAA\x07\r\nclrk-invocation-id: " + i.encode() + b"\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 403")


def read_lines(proc: subprocess.Popen, n: int, timeout: float = 15.0) -> str:
    """The first `n` lines a process prints (bounded wait: a tail that prints nothing fails, never hangs)."""
    out = b""
    deadline = time.monotonic() + timeout
    while out.count(b"\n") < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {out!r} after {timeout}s"
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the process ended after {out!r}"
            out += chunk
    return out.decode()


def assert_terminal_safe(out: str, lines: int) -> None:
    assert not set(out) & UNSAFE, sorted(set(out) & UNSAFE)
    assert out.endswith("\n") and out.count("\n") == lines


def test_clrk_records_and_tail_print_no_control_character(gw):
    i = new_invocation()
    tails = {mode: subprocess.Popen([CLRK, "tail", "--db", str(gw.db), "--invocation", i, *flags], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
             for mode, flags in (("table", []), ("json", ["--json"]))}
    try:
        for p in tails.values():  # tail starts at what is stored when it connects, and says when it has
            assert b"clrk tail: following" in p.stderr.readline()
        hostile_records(gw, i)
        stored = wait_records(gw, i, 2)
        assert any("\x1b" in r.get(A.GEN_AI_REQUEST_MODEL, "") for r in stored)
        tailed = {mode: read_lines(p, 2) for mode, p in tails.items()}
    finally:
        for p in tails.values():
            p.terminate()
            p.wait(10)
    for flags in ([], ["--json"]):
        out = subprocess.run([CLRK, "records", "--db", str(gw.db), "--invocation", i, *flags], capture_output=True, check=True).stdout.decode()
        assert_terminal_safe(out, 2)
        if flags:  # the same values, only written safely
            assert sorted(map(json.loads, out.splitlines()), key=lambda r: r[A.SPAN_ID]) == sorted(stored, key=lambda r: r[A.SPAN_ID])
        else:
            assert "\\x1b[2J" in out and "\\u009b31m" in out and "\\u202e" in out
    for mode, out in tailed.items():
        assert_terminal_safe(out, 2)
        if mode == "json":
            assert {json.loads(x)[A.SPAN_ID] for x in out.splitlines()} == {r[A.SPAN_ID] for r in stored}


def test_the_tui_shows_hostile_records_as_plain_escaped_text(gw):
    """Cells used to be str, which Textual reads as markup: the "[/]" in a model name stopped the UI."""
    i = new_invocation()
    hostile_records(gw, i)
    wait_records(gw, i, 2)
    app = DevApp(RecordFeed(str(gw.db), query={"invocation": i}, from_start=True))
    shown: list[str] = []

    async def drive() -> None:
        async with app.run_test(size=(200, 50)) as pilot:
            table = app.query_one("#records-table", DataTable)
            deadline = time.monotonic() + 15
            while table.row_count < 2:
                assert time.monotonic() < deadline, "the TUI did not show the records"
                await pilot.pause(0.1)
            for row in range(2):
                shown.append(" ".join(str(c) for c in table.get_row_at(row)))
                table.focus()
                table.move_cursor(row=row)
                await pilot.press("enter")
                while not isinstance(app.screen, DetailScreen):
                    assert time.monotonic() < deadline
                    await pilot.pause(0.05)
                shown.append(str(app.screen.query_one("#detail-body", Static).content))
                await pilot.press("escape")

    asyncio.run(drive())
    cells, detail = shown[0::2], shown[1::2]
    assert not set("".join(cells)) & (UNSAFE | {"\n"})
    assert any("[/]m\\x0a\\x0d\\x1b[2J\\x1b]0;title\\x07\\u009b31m\\u202e\\u2028x" in c for c in cells)
    assert not set("".join(detail)) & UNSAFE  # a detail view has lines of its own, none from a record
    assert any("x-v: \\x1b]52;c;AAAA\\x07" in d for d in detail)


# ------------------------------------------------------------------------------------------ the escape itself


@given(st.binary(max_size=64))
def test_the_stored_escape_is_lossless_and_leaves_valid_utf8_alone(data):
    text, escaped = escape.text(data)
    text.encode("utf-8")  # always storable
    if escaped:
        assert escape.unescape(text) == data
    else:
        assert text.encode() == data
    assert escape.unescape(escape.text(data, force=True)[0]) == data


@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=32))  # lone surrogates included
def test_a_str_utf8_cannot_encode_becomes_bytes_that_escape_back(s):
    b = escape.to_bytes(s)
    assert escape.unescape(escape.text(b, force=True)[0]) == b
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        assert b == s.encode()


@given(st.text(max_size=64))
def test_printed_text_carries_no_control_and_json_lines_keep_their_values(s):
    assert not set(escape.printable(s)) & (UNSAFE | {"\n"})
    line = escape.json_line({"v": s, "k": [s]})
    assert "\n" not in line and not set(line) & UNSAFE
    assert json.loads(line) == {"v": s, "k": [s]}


def test_the_tui_rendering_functions_escape_every_field():
    rec = {A.TIME: "2026-11-30T12:00:00Z", A.CLRK_DECISION: "deny\x1b[5m", A.HTTP_REQUEST_METHOD: "G\u2028T",
           A.SERVER_ADDRESS: "[/]h\x9b", A.GEN_AI_REQUEST_MODEL: "[link=https://x.test]m[/link]\n",
           A.REQUEST_HEADERS: {"x\x1b": "v\r\x1b[2K"}, A.REQUEST_BODY: "line1\nline2\x1b[2J\r\u202e", A.RESPONSE_BODY: "x"}
    cells = [str(c) for c in record_row(rec)]
    assert "[link=https://x.test]m[/link]\\x0a" in cells and "[/]h\\u009b" in cells
    assert not set("".join(cells)) & (UNSAFE | {"\n"})
    detail = str(transaction_text(rec))
    assert "line1\nline2\\x1b[2J\\x0d\\u202e" in detail and "x\\x1b: v\\x0d\\x1b[2K" in detail
    assert not set(detail) & UNSAFE
