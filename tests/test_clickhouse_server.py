"""Records on ClickHouse end to end: a real gateway whose `clrk_db` is a ClickHouse URL, a real
clickhouse-server (the Debian package, an old release) on loopback, the official OpenAI SDK as the agent.
Records land in the server and every reader (`clrk records`, `clrk spend`, `clrk status`, directly when no
gateway runs) sees them; hostile values are stored verbatim; the budget ledger is rebuilt from ClickHouse
at start; two gateways with their own recorders (native and HTTP) share one table; and the server killed
mid-run costs no proxied request and no record: rows wait in the spool (on disk too, so a gateway stopped
meanwhile keeps them), `clrk status` says so, and they are written once, in order, when it is back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from clrk import attributes as A
from clrk import storeref, wire
from clrk.recorder.clickhouse import ClickHouseStore
from clrk.recorder.store import Store, StoreError
from clrk.recorder.stores import ReadOnly
from tests.harness import fake_provider
from tests.harness.clickhouse import PASSWORD, ClickHouseServer, binary
from tests.harness.fleet_records import HOSTILE, assert_same_answers, record
from tests.harness.gateway import Gateway, agent_docs, exchange, free_port, gateway_doc, status_of

openai = pytest.importorskip("openai")
pytest.importorskip("clickhouse_driver", reason="scripts/setup-clickhouse installs the driver")
pytestmark = pytest.mark.skipif(binary() is None, reason="clickhouse-server is not installed (scripts/setup-clickhouse)")

CLRK = str(Path(sys.executable).parent / "clrk")
OPENAI = "https://api.openai.com"
TIGHT = 100  # tokens per day of the `tight-*` pool


def docs(pki, upstream) -> list[dict]:
    rules = [
        {"matches": [{"provider": "openai", "models": ["tight-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": TIGHT, "scope": "Route"}}]},
        {"matches": [{"provider": "openai", "models": ["*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 10**9}}]},
    ]
    return [gateway_doc(aliases={"api.openai.com": upstream.address}, ca_bundle=str(pki[0])), *agent_docs(),
            {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "AIProviderRoute",
             "metadata": {"name": "llm", "namespace": "team-a"}, "spec": {"rules": rules}}]


@pytest.fixture(scope="module", autouse=True)
def state_dir(tmp_path_factory):
    """The stores' local directories (recorder socket, spool, logs) in this module's temp dir, for the
    gateways (which inherit it) and the test alike."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLRK_STATE_DIR", str(tmp_path_factory.mktemp("ch-state")))
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory, state_dir):
    s = ClickHouseServer(tmp_path_factory.mktemp("clickhouse")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream, server):
    fake_provider.install(upstream)
    g = Gateway(tmp_path_factory.mktemp("ch-gw"), docs(pki, upstream), db=server.url()).start()
    yield g
    g.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def chat(gw: Gateway, model: str, inv: str, max_tokens: int = 5, **kw):
    with gw.client() as http:
        client = openai.OpenAI(base_url=f"{OPENAI}/v1", api_key="sk-agent-side-unused", http_client=http, max_retries=0)
        return client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens,
            extra_headers={"clrk-invocation-id": inv}, **kw)


def clrk(*args: str, env: dict | None = None) -> str:
    return subprocess.run([CLRK, *args], capture_output=True, text=True, check=True, timeout=60,
                          env={**os.environ, **(env or {})}).stdout


def status(gw: Gateway) -> dict:
    with wire.BlockingClient(wire.socket_path(str(gw.db)), timeout=10) as c:
        return c.request({"t": "status"})


def wait_status(gw: Gateway, check, timeout: float = 30.0) -> dict:
    """The recorder's status once `check` holds for it (the recorder's own word that the event happened)."""
    deadline, st = time.monotonic() + timeout, None
    while True:
        try:
            st = status(gw)
            if check(st):
                return st
        except (OSError, wire.WireError):  # a recorder being restarted
            pass
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def in_clickhouse(server: ClickHouseServer, inv: str) -> list[tuple]:
    return server.query(f"SELECT `span_id`, `_seq`, `time`, `gen_ai.request.model` FROM clrk.records "
                        f"WHERE `invocation.id` = '{inv}' ORDER BY `_seq`")


# ------------------------------------------------------------------ the store alone, against the old server


@pytest.fixture(params=["clickhouse", "clickhouse+http"])
def on_server(request, server, tmp_path):
    """A ClickHouseStore on a fresh database of the real server, over each protocol, and a DuckDB store."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    ch = ClickHouseStore(server.url(database=db, scheme=request.param))
    duck = Store(tmp_path / "clrk.duckdb")
    yield ch, duck
    ch.close()
    duck.close()
    server.query(f"DROP DATABASE IF EXISTS {db}")


def test_the_old_server_answers_as_duckdb_does(on_server):
    assert_same_answers(*on_server)


def test_hostile_values_are_stored_verbatim_on_the_old_server(on_server):
    ch, _ = on_server
    t = time.time()
    rows = [record(k, t, **{A.AGENT_NAMESPACE: "ns", A.AGENT_NAME: v, A.GEN_AI_SYSTEM: "openai", A.GEN_AI_REQUEST_MODEL: v,
                            A.URL_FULL: f"https://x.test/{v}", A.INVOCATION_ID: v, A.REQUEST_HEADERS: {v: v}})
            for k, v in enumerate(HOSTILE)]
    ch.insert(rows)
    for v in HOSTILE:
        got = ch.records({"agent": f"ns/{v}", "invocation": v})
        assert len(got) == 1 and (got[0][A.AGENT_NAME], got[0][A.GEN_AI_REQUEST_MODEL], got[0][A.REQUEST_HEADERS]) == \
            (v, v, {v: v}) and got[0][A.URL_FULL] == f"https://x.test/{v}"
        assert [s["requests"] for s in ch.spend({"model": v, "by": ["model"]})] == [1]
    assert len(ch.records({"limit": 0})) == len(HOSTILE)


def test_the_old_server_takes_new_columns_and_refuses_a_ttl_in_words(on_server, server):
    ch, _ = on_server
    ch.insert([record(1, time.time())])
    server.query(f"ALTER TABLE {ch.table} DROP COLUMN `{A.CLRK_WS_CLOSE_REASON}`")  # a table an older clrk made
    again = ClickHouseStore(ch.url)
    again.insert([record(2, time.time(), **{A.CLRK_WS_CLOSE_REASON: "bye"})])
    assert {r.get(A.CLRK_WS_CLOSE_REASON) for r in again.records({"limit": 0})} == {None, "bye"}
    again.close()
    ttl = ClickHouseStore(ch.url.replace(ch.target.database, ch.target.database + "_ttl") + "?ttl_days=30")
    with pytest.raises(StoreError) as e:
        ttl.insert([record(3, time.time())])
    assert "ttl_days needs ClickHouse 19.6 or later" in str(e.value) and PASSWORD not in str(e.value)
    server.query(f"DROP DATABASE IF EXISTS {ch.target.database}_ttl")


def test_reading_an_unreachable_clickhouse_fails_in_words(tmp_path):
    url = f"clickhouse://clrk:{PASSWORD.replace('%', '%25').replace('@', '%40').replace('/', '%2F').replace(':', '%3A')}" \
          f"@127.0.0.1:{free_port()}/clrk?timeout=2"
    r = subprocess.run([CLRK, "records"], capture_output=True, text=True, timeout=60, env={**os.environ, "CLRK_DB": url})
    assert r.returncode == 1 and "clickhouse://clrk:***@127.0.0.1" in r.stderr, r.stderr
    assert "p'w" not in r.stderr + r.stdout and "Traceback" not in r.stderr


# ------------------------------------------------------------------ a gateway


def test_records_land_in_clickhouse_and_every_reader_sees_them(gw, server):
    i = tag()
    r = chat(gw, f"fleet-cost40-{i}", i)
    assert r.http_response.status_code == 200
    rec = gw.wait_record(invocation=i)  # through the recorder
    assert (rec[A.GEN_AI_USAGE_INPUT_TOKENS], rec[A.GEN_AI_USAGE_OUTPUT_TOKENS], rec[A.AGENT_NAME]) == (40, 5, "researcher")
    assert len(in_clickhouse(server, i)) == 1  # in the server's table itself
    url = server.url()
    lines = clrk("records", "--json", "--invocation", i, env={"CLRK_DB": url}).splitlines()
    assert [json.loads(x)[A.SPAN_ID] for x in lines] == [rec[A.SPAN_ID]]
    spend = [json.loads(x) for x in clrk("spend", "--db", url, "--json", "--by", "model").splitlines()]
    assert {"model": f"fleet-cost40-{i}", "input_tokens": 40, "output_tokens": 5}.items() <= \
        next(s for s in spend if s["model"] == f"fleet-cost40-{i}").items()
    st = json.loads(clrk("status", "--json", env={"CLRK_DB": url}))
    assert st["store"] == storeref.display(url) and st["store_error"] is None and st["written"] >= 1
    text = clrk("status", env={"CLRK_DB": url})
    assert "clickhouse://clrk:***@127.0.0.1" in text
    # The password is nowhere a local user or a log reader could see it.
    secret = PASSWORD.encode()
    for pid in (st["pid"], gw.proc.pid):
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert PASSWORD not in gw.log() and PASSWORD not in text and PASSWORD not in json.dumps(st)


def test_clrk_tail_follows_the_clickhouse_store(gw, server):
    i = tag()
    tail = subprocess.Popen([CLRK, "tail", "--json", "--invocation", i], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "CLRK_DB": server.url()})
    try:
        assert "clrk tail: following the gateway writing clickhouse://clrk:***@" in tail.stderr.readline()
        models = [f"fleet-cost{k + 2}-{i}" for k in range(3)]
        for m in models:
            assert chat(gw, m, i).http_response.status_code == 200
        lines = [json.loads(tail.stdout.readline()) for _ in models]
    finally:
        tail.terminate()
        tail.wait(10)
    assert [r[A.GEN_AI_REQUEST_MODEL] for r in lines] == models  # in the order they were stored


def test_clrk_dev_runs_on_the_clickhouse_store(gw, server, monkeypatch):
    """`clrk dev`'s session: its gateway shares this host's recorder for the URL, its spend view reads it."""
    from clrk.cli.dev.session import DevSession
    from tests.harness.gateway import AGENT_TOKEN, OTHER_TOKEN

    monkeypatch.setenv("CLRK_TEST_REVIEWER_TOKEN", OTHER_TOKEN)  # the test policy's token from the environment
    port = free_port()
    session = DevSession(str(gw.policies), server.url(), str(gw.certs), [port], otlp_port=free_port()).start()
    try:
        assert PASSWORD not in str(session.log_path) and "%" not in str(session.log_path)
        wait_status(gw, lambda st: st["proxies"] == 2)  # one recorder for the store on this host
        deadline = time.monotonic() + 30
        while True:  # start() returned on the recorder being up (it was): wait for the dev gateway's port too
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, session.log_path.read_text()
                time.sleep(0.05)
        i = tag()
        with httpx.Client(proxy=f"http://team-a.researcher:{AGENT_TOKEN}@127.0.0.1:{port}", verify=gw.ssl_context(),
                          trust_env=False, timeout=30) as http:
            client = openai.OpenAI(base_url=f"{OPENAI}/v1", api_key="unused", http_client=http, max_retries=0)
            client.chat.completions.create(model=f"dev-cost3-{i}", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"clrk-invocation-id": i})
        assert gw.wait_record(invocation=i)[A.GEN_AI_USAGE_INPUT_TOKENS] == 3
        spend, budgets = session.read_spend()
        assert any(s["model"] == f"dev-cost3-{i}" for s in spend) and budgets
    finally:
        session.stop()
    wait_status(gw, lambda st: st["proxies"] == 1)
    assert PASSWORD not in session.log_path.read_text()


def test_clrk_run_hands_the_url_to_the_gateway_in_its_environment(gw, server, monkeypatch):
    from tests.harness.gateway import OTHER_TOKEN

    monkeypatch.setenv("CLRK_TEST_REVIEWER_TOKEN", OTHER_TOKEN)
    port = free_port()
    run = subprocess.Popen([CLRK, "run", "--policies", str(gw.policies), "--certs", str(gw.certs), "--port", str(port)],
                           env={**os.environ, "CLRK_DB": server.url()}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert "records in clickhouse://clrk:***@127.0.0.1" in run.stderr.readline()
        wait_status(gw, lambda st: st["proxies"] == 2)  # it joined this host's recorder for the URL
        cmdline = Path(f"/proc/{run.pid}/cmdline").read_bytes()  # clrk run became the gateway (execve)
        assert b"clrk.proxy" in cmdline and PASSWORD.encode() not in cmdline and b"clickhouse" not in cmdline
    finally:
        run.terminate()
        run.wait(60)
    wait_status(gw, lambda st: st["proxies"] == 1)


HOSTILE_MODELS = ["o'brien\\\"; DROP TABLE clrk.records; --", "m`x`\\'\\\\", "' OR '1'='1", "{model:String}%_?"]


def test_hostile_values_from_the_wire_are_stored_verbatim(gw, server):
    i = tag()
    for m in HOSTILE_MODELS:
        assert chat(gw, m, i).http_response.status_code == 200
    # a request line no polite client sends: quotes and backslashes raw in the path
    path = "/v1/models/x'\\\"?q=');DROP/**/TABLE/**/clrk.records;--"
    raw = (f"GET {path} HTTP/1.1\r\nHost: api.openai.com\r\nclrk-invocation-id: {i}\r\nConnection: close\r\n\r\n").encode()
    assert status_of(exchange(gw, raw, target="api.openai.com:443", sni="api.openai.com")) < 500
    rows = gw.wait_records(len(HOSTILE_MODELS) + 1, invocation=i)
    assert sorted(r.get(A.GEN_AI_REQUEST_MODEL, "") for r in rows)[1:] == sorted(HOSTILE_MODELS)
    assert OPENAI + path in [r[A.URL_FULL] for r in rows]
    for m in HOSTILE_MODELS:  # and found again by the same value, through ClickHouse's literals
        spend = [json.loads(x) for x in clrk("spend", "--db", server.url(), "--json", "--by", "model", "--model", m).splitlines()]
        assert [(s["model"], s["requests"]) for s in spend] == [(m, 1)]
    assert server.query("EXISTS TABLE clrk.records") == [(1,)]


def test_two_gateways_with_their_own_recorders_share_one_table(gw, server, tmp_path, pki, upstream):
    """The second speaks HTTP to the same server: its own recorder, one `clrk records` shows both."""
    http_url = server.url(scheme="clickhouse+http")
    assert wire.socket_path(http_url) != wire.socket_path(str(gw.db))
    other = Gateway(tmp_path / "gw2", docs(pki, upstream), db=http_url).start()
    try:
        i = tag()
        assert chat(gw, f"fleet-cost7-{i}", i).http_response.status_code == 200
        assert chat(other, f"fleet-cost9-{i}", i).http_response.status_code == 200
        other.wait_record(invocation=i, limit=0)
        rows = gw.wait_records(2, invocation=i)  # gw's recorder reads what other's wrote
        assert sorted(r[A.GEN_AI_USAGE_INPUT_TOKENS] for r in rows) == [7, 9]
        assert status(other)["pid"] != status(gw)["pid"]
        native = clrk("spend", "--db", server.url(), "--json", "--by", "day,agent,model")
        over_http = clrk("spend", "--db", http_url, "--json", "--by", "day,agent,model")
        assert native == over_http and f"fleet-cost9-{i}" in native
    finally:
        other.stop()


def test_the_budget_ledger_is_rebuilt_from_clickhouse_at_start(gw):
    i = tag()
    assert chat(gw, f"tight-cost60-{i}", i).http_response.status_code == 200  # 65 of the day's 100 tokens
    gw.wait_record(invocation=i)
    gw.stop()
    gw.start()
    j = tag()
    # 30 output tokens + the body's estimate fit a fresh day (100), not the 35 left of this one
    with pytest.raises(openai.RateLimitError) as e:
        chat(gw, f"tight-cost1-{j}", j, max_tokens=30)
    assert "token budget exceeded" in str(e.value)
    assert gw.wait_record(invocation=j)[A.CLRK_BUDGET_DENIED] is True


def calls_while_away(gw, server, i: str, n: int) -> list[str]:
    """ClickHouse killed, then `n` provider calls through the gateway, each served (200) while the store is
    away; their models, in the order made."""
    server.kill()
    models = [f"fleet-cost{k + 1}-{i}" for k in range(n)]
    for m in models:
        assert chat(gw, m, i).http_response.status_code == 200
    return models


def test_clickhouse_killed_mid_run_costs_no_request_and_no_record(gw, server):
    i = tag()
    models = calls_while_away(gw, server, i, 6)
    st = wait_status(gw, lambda s: s["store_error"] and s["unwritten"] >= len(models) and s["spooled"] >= len(models))
    assert PASSWORD not in st["store_error"]
    spool = storeref.local_dir(str(gw.db)) / "spool.msgpack"
    assert spool.exists()
    text = clrk("status", "--db", str(gw.db))
    assert "the store cannot be written" in text and f"{st['unwritten']} records wait for it" in text
    assert PASSWORD not in text
    server.start()
    wait_status(gw, lambda s: s["store_error"] is None and s["unwritten"] == 0)
    rows = in_clickhouse(server, i)
    assert [r[3] for r in rows] == models  # each once, in the order they were made
    assert not spool.exists()


def test_a_recorder_killed_while_clickhouse_is_away_loses_nothing(gw, server):
    """kill -9 of the recorder once its rows are in the spool: the proxy starts another, which sends them."""
    i = tag()
    models = calls_while_away(gw, server, i, 4)
    st = wait_status(gw, lambda s: s["spooled"] == len(models) and s["unwritten"] == len(models))
    os.kill(st["pid"], signal.SIGKILL)
    wait_status(gw, lambda s: s["pid"] != st["pid"] and s["unwritten"] == len(models))  # loaded from the spool
    assert chat(gw, f"fleet-cost9-late-{i}", i).http_response.status_code == 200
    server.start()
    wait_status(gw, lambda s: s["store_error"] is None and s["unwritten"] == 0 and s["written"] >= len(models) + 1)
    assert [r[3] for r in in_clickhouse(server, i)] == [*models, f"fleet-cost9-late-{i}"]


def test_a_gateway_stopped_while_clickhouse_is_away_keeps_its_records_on_disk(gw, server):
    i = tag()
    models = calls_while_away(gw, server, i, 4)
    wait_status(gw, lambda s: s["spooled"] >= len(models))
    gw.stop()  # graceful: what it could not write stays in the spool
    spool = storeref.local_dir(str(gw.db)) / "spool.msgpack"
    assert spool.exists()
    assert "wait in" in gw.log() and PASSWORD not in gw.log()
    gw.start()  # while ClickHouse is still away: the gateway starts, its recorder loads the spool
    wait_status(gw, lambda s: s["store_error"] and s["unwritten"] == len(models))
    with pytest.raises(openai.APIStatusError) as e:  # today's usage cannot be read: budgeted routes wait (503)
        chat(gw, f"fleet-cost1-late-{i}", i)
    assert e.value.status_code == 503
    server.start()
    gw.wait_log("budgeted routes serve again", timeout=30)
    assert chat(gw, f"fleet-cost2-after-{i}", i).http_response.status_code == 200
    gw.wait_records(len(models) + 2, invocation=i, timeout=30)  # a query is answered after a flush
    wait_status(gw, lambda s: s["unwritten"] == 0 and s["store_error"] is None)
    got = [r[3] for r in in_clickhouse(server, i)]
    assert got[:len(models)] == models  # the spool first, in order, once
    assert sorted(got[len(models):]) == [f"fleet-cost1-late-{i}", f"fleet-cost2-after-{i}"]
    assert not spool.exists()
    gw.stop()
    reader = ReadOnly(str(gw.db))  # no gateway runs: straight from ClickHouse
    try:
        assert len(reader.read("query", {"invocation": i, "limit": 0})) == len(models) + 2
    finally:
        reader.close()
    lines = clrk("records", "--db", str(gw.db), "--json", "--invocation", i).splitlines()
    assert len(lines) == len(models) + 2
    gw.start()
