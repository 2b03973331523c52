"""How the DuckDB store keeps the recorder's memory in bounds (clrk/recorder/store.py): row groups of
ROW_GROUP_SIZE rows, and the store closed and opened again once a row group is complete, the process has grown
by REOPEN_AFTER, and the write-ahead log is empty — never under a running read, never at the cost of a row.
What it is worth in memory is measured by bench/bench.py (docs/PERFORMANCE.md), not asserted here."""

from __future__ import annotations

import threading
import time

import duckdb
import pytest

from clrk import attributes as A
from clrk.recorder import store as S


def rows(start: int, n: int) -> list[dict]:
    now = time.time()
    return [{A.TIME: now + i * 1e-3, A.END_TIME: now + i * 1e-3 + 0.1, A.TRACE_ID: f"{i:032x}", A.SPAN_ID: f"{i:016x}",
             A.HTTP_REQUEST_METHOD: "POST", A.URL_FULL: f"https://api.example.com/v1/{i}", A.SERVER_ADDRESS: "api.example.com",
             A.HTTP_RESPONSE_STATUS_CODE: 200, A.AGENT_NAMESPACE: "team-a", A.AGENT_NAME: "researcher",
             A.CLRK_DECISION: "allow", A.GEN_AI_USAGE_INPUT_TOKENS: i % 100, A.RESPONSE_BODY: f'{{"n": {i}}}'}
            for i in range(start, start + n)]


def stored(path) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(f"SELECT {S.q(S.SEQ)}, {S.q(A.SPAN_ID)} FROM {S.TABLE} ORDER BY {S.q(S.SEQ)}").fetchall()
    finally:
        con.close()


def every_row_once(path, n: int) -> None:
    assert stored(path) == [(i + 1, f"{i:016x}") for i in range(n)]


@pytest.fixture
def eager(monkeypatch):
    """Small row groups, a checkpoint at every write (these rows are small), and a reopen as soon as a row group
    is complete, whatever the process's growth."""
    monkeypatch.setattr(S, "ROW_GROUP_SIZE", 2048)  # DuckDB's smallest: a multiple of its vector size
    monkeypatch.setattr(S, "CHECKPOINT_THRESHOLD", "1KB")
    monkeypatch.setattr(S, "REOPEN_AFTER", 0)


def test_records_are_kept_in_row_groups_of_ROW_GROUP_SIZE_rows(tmp_path):
    store = S.Store(tmp_path / "clrk.duckdb")
    for start in range(0, 10_000, 500):
        store.insert(rows(start, 500))
    store.con.execute("CHECKPOINT")
    groups = store.con.execute(f"SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('{S.TABLE}')").fetchone()[0]
    assert groups == -(-10_000 // S.ROW_GROUP_SIZE)  # DuckDB's default (122,880 rows) would make it one
    assert store.con.execute("SELECT current_setting('temp_directory')").fetchone()[0] == f"{tmp_path / 'clrk.duckdb'}.tmp"
    store.close()
    every_row_once(tmp_path / "clrk.duckdb", 10_000)


def test_the_store_is_reopened_once_a_row_group_is_complete_and_loses_no_row(tmp_path, eager):
    store = S.Store(tmp_path / "clrk.duckdb")
    for start in range(0, 9_000, 300):
        store.insert(rows(start, 300))
    assert store.reopens >= 2, "every complete row group (2048 rows) should have led to a reopen"
    assert store.reopens <= 9_000 // 2048
    assert store.next_seq == 9_001 and store.rows == 9_000
    store.close()
    every_row_once(tmp_path / "clrk.duckdb", 9_000)


def test_no_reopen_while_the_write_ahead_log_holds_rows(tmp_path, eager, monkeypatch):
    """Closing a store whose log holds rows checkpoints them on the spot: with larger bodies, seconds. The
    reopen waits for the log to be empty."""
    monkeypatch.setattr(S, "CHECKPOINT_THRESHOLD", "1GB")  # DuckDB never checkpoints by itself here
    store = S.Store(tmp_path / "clrk.duckdb")
    for start in range(0, 3_000, 500):
        store.insert(rows(start, 500))
    assert store.reopen_due and store.wal.stat().st_size > 0
    assert store.reopens == 0
    store.con.execute("CHECKPOINT")
    store.insert(rows(3_000, 500))
    assert store.reopens == 1 and not store.reopen_due
    store.close()
    every_row_once(tmp_path / "clrk.duckdb", 3_500)


def test_no_reopen_under_a_running_read(tmp_path, eager, monkeypatch):
    monkeypatch.setattr(S, "REOPEN_WAIT", 0.2)
    store = S.Store(tmp_path / "clrk.duckdb")
    store.insert(rows(0, 2_500))
    assert store.reopen_due
    store._readers = 1  # a read, begun and not yet done
    t0 = time.monotonic()
    store.insert(rows(2_500, 100))
    assert store.reopens == 0 and store.reopen_due
    assert time.monotonic() - t0 >= 0.2  # it waited for the read that long, then wrote
    assert not store._reopening
    store._readers = 0
    store.insert(rows(2_600, 100))
    assert store.reopens == 1
    store.close()
    every_row_once(tmp_path / "clrk.duckdb", 2_700)


def test_reads_alongside_the_writes_and_their_reopens_all_succeed(tmp_path, eager):
    """Reads that keep coming neither fail nor hold the reopens off: while one waits, no read starts."""
    store = S.Store(tmp_path / "clrk.duckdb")
    stop, failures, reads = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            try:
                store.records({"limit": 5})
                store.totals(0)
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                failures.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for start in range(0, 12_000, 400):
            store.insert(rows(start, 400))
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not failures, failures[:3]
    assert reads[0] > 0 and store.reopens >= 12_000 // 2048 - 1, store.reopens
    store.close()
    every_row_once(tmp_path / "clrk.duckdb", 12_000)


def test_a_reopen_that_fails_fails_its_write_before_anything_is_written(tmp_path, eager, monkeypatch):
    """The recorder keeps the rows of a failed write and writes them again once the store is back
    (`Recorder.flush`): they must not have been written by the failed attempt."""
    store = S.Store(tmp_path / "clrk.duckdb")
    store.insert(rows(0, 2_100))
    assert store.reopen_due
    opener = store._open

    def fail():
        raise S.StoreError("cannot open it for writing: disk on fire")

    monkeypatch.setattr(store, "_open", fail)
    batch = rows(2_100, 100)
    with pytest.raises(S.StoreError):
        store.insert(batch)
    monkeypatch.setattr(store, "_open", opener)
    every_row_once(tmp_path / "clrk.duckdb", 2_100)  # the store is closed: readable by another process
    store.reopen()  # what the recorder does before its next attempt
    store.insert(batch)
    store.close()
    every_row_once(tmp_path / "clrk.duckdb", 2_200)


def test_a_read_that_comes_while_a_reopen_waits_waits_for_it(tmp_path, eager):
    """A reopen waits for the reads running; one that arrives meanwhile waits for the reopen, or reads that
    keep coming would put it off for good."""
    store = S.Store(tmp_path / "clrk.duckdb")
    store.insert(rows(0, 2_100))
    assert store.reopen_due and store._checkpointed()
    with store._gate:
        store._readers += 1  # a read running
    writer = threading.Thread(target=store.insert, args=(rows(2_100, 100),))
    writer.start()
    deadline = time.monotonic() + 5
    while not store._reopening:
        assert time.monotonic() < deadline, "the write did not start its reopen"
        time.sleep(0.01)
    got: list = []
    late = threading.Thread(target=lambda: got.append(store.records({"limit": 1})))
    late.start()
    late.join(0.3)
    assert late.is_alive() and not got, "a read started while the reopen waited"
    with store._gate:
        store._readers -= 1  # the running read ends
        store._gate.notify_all()
    writer.join(5)
    late.join(5)
    assert store.reopens == 1 and len(got) == 1
    store.close()
    every_row_once(tmp_path / "clrk.duckdb", 2_200)
