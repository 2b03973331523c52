"""The recorder writes a burst a chunk at a time (rows and body bytes bounded), so what it and DuckDB hold at
once stays bounded; the order, the counts and a store that fails mid-burst lose nothing."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from clrk import attributes as A
from clrk.recorder import service
from tests.test_otlp_wire import raw


def burst(n: int, body: bytes = b'{"ok": true}') -> list[dict]:
    return [raw(ids=(uuid.uuid4().hex, f"{i + 1:016x}", None), resp_body=(len(body), body, False)) for i in range(n)]


def recorder(tmp_path, db: str | None = None) -> service.Recorder:
    return service.Recorder(db or str(tmp_path / "c.duckdb"), str(tmp_path / "r.sock"), None)


@pytest.fixture
def rec(tmp_path):
    """A recorder on a DuckDB file in tmp_path (not listening: its flush is driven by the test)."""
    r = recorder(tmp_path)
    yield r
    r.store.close()


def spy_batches(rec: service.Recorder) -> list[int]:
    """The size of each batch the real store is handed."""
    sizes: list[int] = []
    insert = rec.store.insert

    def counted(rows):
        sizes.append(len(rows))
        return insert(rows)

    rec.store.insert = counted
    return sizes


def test_a_burst_is_stored_in_chunks_in_the_order_received(rec):
    sizes = spy_batches(rec)
    rows = burst(1300)
    rec.buffer.extend(rows)
    asyncio.run(rec.flush())
    assert sizes == [512, 512, 276] and rec.written == 1300 and not rec.buffer
    stored = rec.store.con.execute(f'SELECT "{A.SPAN_ID}" FROM records ORDER BY _seq').fetchall()
    assert [s for (s,) in stored] == [r["ids"][1] for r in rows]


def test_big_bodies_make_smaller_chunks_and_one_body_past_the_bound_goes_alone(rec):
    sizes = spy_batches(rec)
    six = burst(5, b"x" * (6 * 1024 * 1024))
    huge = burst(1, b"y" * (20 * 1024 * 1024))
    rec.buffer.extend(six[:3] + huge + six[3:])
    asyncio.run(rec.flush())
    assert sizes == [2, 1, 1, 2] and rec.written == 6  # 16 MiB of bodies a chunk, at least one row


def test_a_flush_ends_on_the_rows_it_found_while_more_keep_coming(rec):
    sizes = spy_batches(rec)
    more = burst(2000)
    rec.buffer.extend(burst(600))
    expand = rec._expand

    def arriving(raws):  # a proxy keeps sending while each chunk is written
        rec.buffer.extend(more[:300])
        del more[:300]
        return expand(raws)

    rec._expand = arriving
    asyncio.run(rec.flush())
    assert sizes == [512, 88] and len(rec.buffer) == 600  # the 600 that came meanwhile: the next flush


def test_a_store_that_fails_mid_burst_keeps_every_row_waiting_and_spooled(tmp_path, monkeypatch):
    """ClickHouse away (a closed port): the first chunk fails; the rest of the burst waits with it (in memory
    and in the spool file) rather than in the buffer, with one attempt per flush."""
    monkeypatch.setenv("CLRK_STATE_DIR", str(tmp_path))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rec = recorder(tmp_path, f"clickhouse://clrk:pw@127.0.0.1:{port}/x?timeout=1")
    sizes = spy_batches(rec)
    rows = burst(1300)
    rec.buffer.extend(rows)
    asyncio.run(rec.flush())
    assert sizes == [512] and rec.store_error and not rec.buffer
    assert len(rec.unwritten) == rec.spooled == 1300 and rec.dropped == 0
    assert [r[A.SPAN_ID] for r in rec.spool.load()] == [r["ids"][1] for r in rows]
    seqs = [r["_seq"] for r in rec.unwritten]
    assert seqs == sorted(seqs) and len(set(seqs)) == 1300
