"""Records on ClickHouse, in-process: the table's DDL, inserts and every read of `clrk records`, `clrk spend`
and the budget ledger run on today's ClickHouse (chdb, embedded), and give what the DuckDB store gives for
the same records. Hostile values (quotes, backslashes, NUL, newlines in agent names, models, URLs) are
stored and matched verbatim. The URL's password never shows. The end-to-end path (a real server, a
gateway, an outage) is tests/test_clickhouse_server.py."""

from __future__ import annotations

import os
import random
import time

import pytest

from clrk import attributes as A
from clrk import storeref, wire
from clrk.recorder.spool import Spool
from clrk.recorder.store import Store
from tests.harness.fleet_records import HOSTILE, assert_same_answers, record

chdb = pytest.importorskip("chdb", reason="scripts/setup-clickhouse installs chdb")
from clrk.recorder.clickhouse import Chdb, ClickHouseStore, ddl, lit  # noqa: E402

URL = "clickhouse://clrk:s3cr%27et%40pw@127.0.0.1:9000/clrk_test"
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    conn = Chdb(str(tmp_path_factory.mktemp("chdb")))
    yield conn
    conn.close()


@pytest.fixture
def stores(engine, tmp_path):
    db = f"t{random.getrandbits(40):x}"  # one database per test in the shared engine
    ch = ClickHouseStore(URL.replace("clrk_test", db), conn=engine)
    duck = Store(tmp_path / "clrk.duckdb")
    yield ch, duck
    duck.close()
    engine.command(f"DROP DATABASE IF EXISTS {db}")


def test_the_table_is_a_mergetree_partitioned_by_day_and_ordered_for_agent_and_time(stores, engine):
    ch, _ = stores
    db = ch.target.database
    _, rows = engine.query(f"SELECT engine, partition_key, sorting_key FROM system.tables WHERE database = {lit(db)} "
                           "AND name = 'records'")
    assert rows == [("MergeTree", "intDiv(time, 86400000000)", "_agent, time")]
    _, cols = engine.query(f"SELECT name, type FROM system.columns WHERE database = {lit(db)} AND table = 'records'")
    types = dict(cols)
    assert types["time"] == "Int64" and types["gen_ai.usage.input_tokens"] == "Nullable(Int64)"
    assert types["gen_ai.response.finish_reasons"] == "Array(String)" and types["_seq"] == "Int64"
    assert set(A.COLUMNS) <= set(types)


def test_a_new_attribute_becomes_a_column_on_the_next_start(stores, engine):
    ch, _ = stores
    ch.insert([record(1, time.time())])
    engine.command(f"ALTER TABLE {ch.table} DROP COLUMN `{A.CLRK_WS_CLOSE_REASON}`")  # as if clrk were older
    again = ClickHouseStore(ch.url, conn=engine)
    again.insert([record(2, time.time(), **{A.CLRK_WS_CLOSE_REASON: "bye"})])
    got = {r[A.SPAN_ID]: r for r in again.records({"limit": 0})}
    assert got[f"{2:016x}"][A.CLRK_WS_CLOSE_REASON] == "bye" and A.CLRK_WS_CLOSE_REASON not in got[f"{1:016x}"]


def test_a_ttl_is_set_when_asked(engine):
    db = f"t{random.getrandbits(40):x}"
    ch = ClickHouseStore(URL.replace("clrk_test", db) + "?ttl_days=30", conn=engine)
    _, rows = engine.query(f"SELECT create_table_query FROM system.tables WHERE database = {lit(db)} AND name = 'records'")
    assert "TTL toDateTime(intDiv(time, 1000000)) + toIntervalDay(30)" in rows[0][0]
    ch.insert([record(1, time.time())])
    ClickHouseStore(URL.replace("clrk_test", db) + "?ttl_days=7", conn=engine)  # a changed TTL is applied
    _, rows = engine.query(f"SELECT create_table_query FROM system.tables WHERE database = {lit(db)} AND name = 'records'")
    assert "toIntervalDay(7)" in rows[0][0] and "toIntervalDay(30)" not in rows[0][0]
    engine.command(f"DROP DATABASE {db}")


def test_records_spend_and_budgets_equal_duckdbs_for_the_same_records(stores):
    assert_same_answers(*stores)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_stored_and_matched_verbatim(stores, value):
    ch, _ = stores
    t = time.time()
    row = record(7, t, **{A.AGENT_NAMESPACE: "ns", A.AGENT_NAME: value, A.GEN_AI_SYSTEM: "openai",
                           A.GEN_AI_REQUEST_MODEL: value, A.URL_FULL: f"https://x.test/{value}",
                           A.SERVER_ADDRESS: value.lower(), A.INVOCATION_ID: value, A.CLRK_DECISION: value,
                           A.REQUEST_HEADERS: {value: value}, A.GEN_AI_RESPONSE_FINISH_REASONS: [value]})
    other = record(8, t, **{A.AGENT_NAMESPACE: "ns", A.AGENT_NAME: "plain", A.SERVER_ADDRESS: "plain.test"})
    ch.insert([row, other])
    for query in ({"agent": f"ns/{value}"}, {"invocation": value}, {"decision": value}, {"host": value}):
        got = ch.records(query)
        assert [r[A.SPAN_ID] for r in got] == [row[A.SPAN_ID]], query
        assert got[0][A.AGENT_NAME] == value and got[0][A.GEN_AI_REQUEST_MODEL] == value
        assert got[0][A.URL_FULL] == f"https://x.test/{value}" and got[0][A.REQUEST_HEADERS] == {value: value}
        assert got[0][A.GEN_AI_RESPONSE_FINISH_REASONS] == [value]
    spend = ch.spend({"model": value, "agent": f"ns/{value}"})
    assert [(s["agent"], s["model"], s["requests"]) for s in spend] == [(f"ns/{value}", value, 1)]
    assert len(ch.records({"limit": 0})) == 2  # and the table is still there


def test_a_value_that_fits_no_column_is_left_out_not_the_batch(stores):
    ch, _ = stores
    t = time.time()
    bad = record(1, t, **{A.HTTP_RESPONSE_STATUS_CODE: 99_999_999_999, A.CLRK_BUDGET_TOKENS: 2**70,
                           A.CLRK_BUDGET_POOL: "p"})
    stored = ch.insert([bad, record(2, t)])
    assert len(stored) == 2
    got = {r[A.SPAN_ID]: r for r in ch.records({"limit": 0})}
    assert A.HTTP_RESPONSE_STATUS_CODE not in got[f"{1:016x}"] and got[f"{2:016x}"][A.HTTP_RESPONSE_STATUS_CODE] == 200
    assert "did not fit" in got[f"{1:016x}"][A.CLRK_RECORD_INCOMPLETE]
    assert ch.totals(0)[0] == {"p": 2**63 - 1}  # the pool stays spent


def test_seq_orders_what_tail_follows_even_when_a_batch_is_retried(stores):
    ch, _ = stores
    t = time.time()
    first = [record(i, t - i) for i in range(3)]  # start times out of order: tail follows ingestion
    ch.insert(first)
    seqs = [r["_seq"] for r in first]
    ch.insert(first)  # a retried batch keeps its _seq (the recorder retries after a failure)
    assert [r["_seq"] for r in first] == seqs
    ch.insert([record(9, t - 100)])
    after = ch.records({"after_seq": seqs[0]})
    assert [r["_seq"] for r in after] == sorted(r["_seq"] for r in after) and after[-1][A.SPAN_ID] == f"{9:016x}"


def test_the_url_password_never_shows():
    assert storeref.display(URL) == "clickhouse://clrk:***@127.0.0.1:9000/clrk_test"
    t = storeref.ClickHouseTarget(URL)
    assert (t.user, t.password, t.host, t.port, t.database, t.protocol) == ("clrk", "s3cr'et@pw", "127.0.0.1", 9000,
                                                                          "clrk_test", "native")
    h = storeref.ClickHouseTarget("clickhouse+http://u@h/db?ttl_days=7")
    assert (h.protocol, h.port, h.password, h.ttl_days) == ("http", 8123, "", 7)
    assert storeref.scrub("auth failed for s3cr'et@pw and s3cr%27et%40pw", URL) == "auth failed for *** and ***"
    for name in (wire.socket_path(URL), str(storeref.local_dir(URL))):
        assert "s3cr" not in name and "%27" not in name
    assert wire.socket_path(URL) == wire.socket_path(URL.replace("s3cr%27et%40pw", "other"))  # one recorder per store
    for bad in ("clickhouse://h/db?ttl_days=0", "clickhouse://h/db;drop", "clickhouse://h:x/db", "clickhouse://h/db?x=1"):
        with pytest.raises(ValueError) as e:
            storeref.ClickHouseTarget(bad)
        assert "***" not in str(e.value) or "s3cr" not in str(e.value)


def test_an_unreachable_server_fails_reads_without_the_password(tmp_path):
    port = _closed_port()
    ch = ClickHouseStore(f"clickhouse://clrk:hunter2-secret@127.0.0.1:{port}/x?timeout=1")
    with pytest.raises(Exception) as e:
        ch.insert([record(1, time.time())])
    assert "hunter2" not in ch.error_text(e.value)
    from clrk.recorder.store import StoreError
    with pytest.raises(StoreError) as e:
        ch.records({})
    assert "hunter2" not in str(e.value) and "127.0.0.1" in str(e.value)


def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_the_spool_keeps_order_and_survives_a_torn_tail(tmp_path):
    sp = Spool(tmp_path / "spool.msgpack")
    assert sp.load() == []
    sp.append([{"n": 1, "s": "a'b"}, {"n": 2}])
    sp.append([{"n": 3, "h": {"k": [1, 2]}}])
    with open(sp.path, "ab") as f:
        f.write(b"\x82\xa1n")  # a record cut off by a crash mid-write
    assert [r["n"] for r in sp.load()] == [1, 2, 3]
    assert oct(os.stat(sp.path).st_mode & 0o777) == "0o600"
    sp.clear()
    assert not sp.exists() and sp.load() == []


def test_the_ddl_is_what_an_old_server_accepts_too():
    """No type or clause newer than ClickHouse 18.16 (the Debian package) unless asked for (TTL)."""
    sql = " ".join(ddl("db", "records", None))
    for newer in ("DateTime64", "LowCardinality", "Bool", "JSON", "TTL", "allow_nullable_key", "Map("):
        assert newer not in sql.replace("Nullable(String)", ""), newer


def test_text_that_is_not_utf8_is_left_out_of_its_row_not_the_batch(stores):
    ch, _ = stores
    t = time.time()
    stored = ch.insert([record(1, t, **{A.AGENT_NAME: "bad\udcff"}), record(2, t, **{A.AGENT_NAME: "good"})])
    assert len(stored) == 2
    got = {r[A.SPAN_ID]: r for r in ch.records({"limit": 0})}
    assert A.AGENT_NAME not in got[f"{1:016x}"] and "agent.name" in got[f"{1:016x}"][A.CLRK_RECORD_INCOMPLETE]
    assert got[f"{2:016x}"][A.AGENT_NAME] == "good"


def test_the_spool_file_is_bounded(tmp_path):
    sp = Spool(tmp_path / "spool.msgpack", max_bytes=200)
    assert sp.append([{"n": 1, "pad": "x" * 50}])
    assert not sp.append([{"n": 2, "pad": "x" * 200}])  # would pass the bound: kept out (it waits in memory)
    assert [r["n"] for r in sp.load()] == [1]


def test_the_recorder_spools_each_row_once_and_the_next_recorder_loads_it(tmp_path, monkeypatch):
    """ClickHouse away (a closed port): each flush appends only its new rows to the spool; past the memory
    bound the oldest go (counted as dropped) and the spool's count follows; a new recorder for the same URL
    starts from the spool."""
    import asyncio

    from clrk.recorder import service

    monkeypatch.setenv("CLRK_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(service, "MAX_BUFFERED_ROWS", 4)
    url = f"clickhouse://clrk:pw@127.0.0.1:{_closed_port()}/x?timeout=1"
    rec = service.Recorder(url, str(tmp_path / "r.sock"), None)
    batches = [[record(1, 1.0), record(2, 2.0), record(3, 3.0)], [record(4, 4.0), record(5, 5.0)]]
    monkeypatch.setattr(rec, "_expand", lambda raws: batches.pop(0) if batches else [])
    rec.buffer.append({})
    asyncio.run(rec.flush())
    assert rec.store_error and "pw" not in rec.store_error and (rec.spooled, len(rec.unwritten)) == (3, 3)
    rec.buffer.append({})
    asyncio.run(rec.flush())
    assert (rec.spooled, len(rec.unwritten), rec.dropped) == (4, 4, 1)
    asyncio.run(rec.flush())  # nothing new: nothing appended again
    assert [r[A.SPAN_ID] for r in rec.spool.load()] == [f"{i:016x}" for i in range(1, 6)]
    seqs = [r["_seq"] for r in rec.spool.load()]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    again = service.Recorder(url, str(tmp_path / "r2.sock"), None)
    assert [r[A.SPAN_ID] for r in again.unwritten] == [f"{i:016x}" for i in range(2, 6)] and again.dropped == 1
    assert again.spooled == 4


class _AnswerLost:
    """An engine whose next INSERT is written and then its answer lost, as when a connection is cut the
    moment the server has the rows."""

    def __init__(self, engine):
        self.engine, self.cut_next = engine, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def insert(self, table, rows):
        self.engine.insert(table, rows)
        if self.cut_next:
            self.cut_next = False
            raise ConnectionResetError("connection reset by peer")


def test_a_batch_whose_answer_was_lost_is_not_written_twice(engine):
    db = f"t{random.getrandbits(40):x}"
    conn = _AnswerLost(engine)
    ch = ClickHouseStore(URL.replace("clrk_test", db), conn=conn)
    t = time.time()
    first = [record(i, t) for i in range(5)]
    conn.cut_next = True
    with pytest.raises(ConnectionResetError):
        ch.insert(first)
    later = [record(i, t) for i in range(5, 8)]
    stored = ch.insert(first + later)  # the recorder's retry: the batch again, and what came since
    assert [r[A.SPAN_ID] for r in stored] == [f"{i:016x}" for i in range(5, 8)]
    got = sorted(r[A.SPAN_ID] for r in ch.records({"limit": 0}))
    assert got == [f"{i:016x}" for i in range(8)]  # each once
    ch.insert([record(9, t)])  # and after a success, no more checking
    assert len(ch.records({"limit": 0})) == 9
    engine.command(f"DROP DATABASE {db}")


def test_a_state_directory_someone_else_could_reach_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CLRK_STATE_DIR", str(tmp_path))
    d = storeref.local_dir(URL)
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    d.chmod(0o777)  # as if another user had made it first, open to all
    with pytest.raises(PermissionError) as e:
        storeref.local_dir(URL)
    assert "s3cr" not in str(e.value) and "CLRK_STATE_DIR" in str(e.value)
    d.rmdir()
    d.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(PermissionError):
        storeref.local_dir(URL)
