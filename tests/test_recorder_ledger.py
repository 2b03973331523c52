"""The budget ledger held by the recorder (`clrk_budget_store=recorder`): SharedLedger's recorder backend in
process, speaking to a real recorder process (started by a real RecordSink, as a proxy starts it) over its
socket; two ledgers are two proxies of one store. Arithmetic, exactly-once settlements, the bound across
proxies, what a dead proxy held released (and a live one's kept), a recorder killed and restarted (what
proxies hold is held again, nothing freed twice), the day's usage read from the store first, and hostile
frames on the socket."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess

import pytest

from clrk import wire
from clrk.proxy.budget import utc_day
from clrk.proxy.budget_store import Refusal, SharedLedger, StoreUnavailable, pool_key
from clrk.proxy.sink import RecordSink
from clrk.recorder import ledger as recorder_ledger
from clrk.recorder.ledger import RecorderLedger, Unavailable


def run(coro):
    return asyncio.run(coro)


async def proxy(db: str) -> tuple[RecordSink, SharedLedger]:
    sink = RecordSink(db)
    ledger = SharedLedger("recorder")
    ledger.attach(sink)
    await sink.start()
    return sink, ledger


async def pools(sink: RecordSink) -> dict:
    return (await sink.request({"t": "budget_pools"}, 10))["days"]


async def stop(*pairs) -> None:
    for sink, ledger in pairs:
        await ledger.close()
        await sink.stop()


def key(ledger: SharedLedger, pool: str) -> str:
    return pool_key(utc_day(ledger.clock()), pool)


def test_admission_and_settlement_arithmetic(tmp_path):
    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        assert a.display == "recorder"
        r1 = await a.admit("p", 100, 60, None, 0.0)
        assert r1.shared and r1.tokens == 60 and r1.epoch
        assert await a.admit("p", 100, 41, None, 0.0) == Refusal(0, 60, 0.0, 0.0)
        r2 = await a.admit("p", 100, 40, None, 0.0)
        assert isinstance(await a.admit("p", 100, 0, None, 0.0), Refusal)
        a.settle(r1, 10)
        a.settle(r2, None)
        assert await a._drain() is None
        assert (await pools(sink))[key(a, "p")] == {"u": "50"}
        assert a.used_today("p") == 50
        d = await a.admit("d", None, 100, 1.0, 0.75)
        assert isinstance(await a.admit("d", None, 100, 1.0, 0.3), Refusal)
        a.settle(d, 80, 0.125)
        await a._drain()
        assert (await pools(sink))[key(a, "d")] == {"u": "80", "uc": "0.125"}
        await stop((sink, a))
    run(go())


def test_a_batch_resent_after_its_answer_was_lost_is_applied_once(tmp_path):
    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        r1 = await a.admit("p", 1000, 60, None, 0.0)
        r2 = await a.admit("p", 1000, 40, None, 0.0)
        a.settle(r1, 10)
        a.settle(r2, 20)
        batch = list(a.queue)
        assert await a._drain() is None
        await a._send_batch(batch)
        await a._send_batch(batch[1:])
        assert (await pools(sink))[key(a, "p")] == {"u": "30"}
        await stop((sink, a))
    run(go())


@pytest.mark.parametrize("seed", range(3))
def test_two_proxies_keep_the_bound(tmp_path, seed):
    rnd = random.Random(seed)
    mx = rnd.randint(1, 5000)
    asks = [(rnd.randint(1, 400), rnd.randint(0, 800)) for _ in range(80)]

    async def go():
        db = str(tmp_path / "c.duckdb")
        (sa, a), (sb, b) = await proxy(db), await proxy(db)
        got = await asyncio.gather(*[(a if k % 2 else b).admit("race", mx, t, None, 0.0) for k, (t, _) in enumerate(asks)])
        admitted = [(k, res, actual) for k, (res, (_, actual)) in enumerate(zip(got, asks, strict=True))
                    if not isinstance(res, Refusal)]
        held = sum(r.tokens for _, r, _ in admitted)
        assert held <= mx
        assert all(mx - held < t for res, (t, _) in zip(got, asks, strict=True) if isinstance(res, Refusal))
        for k, res, actual in admitted:
            (a if k % 2 else b).settle(res, actual)
        await a._drain()
        await b._drain()
        day = (await pools(sa))[key(a, "race")]
        assert int(day.get("u", 0)) == sum(actual for *_, actual in admitted) and "r" not in day
        await stop((sa, a), (sb, b))
    run(go())


async def raw_proxy(db: str, pid: int, ledger: str = "clrk:budget:applied:raw"):
    r, w = await asyncio.open_unix_connection(wire.socket_path(db))
    w.write(wire.pack({"t": "hello", "role": "proxy", "pid": pid}))
    w.write(wire.pack({"t": "budget_adopt", "ledger": ledger, "tag": "t1", "held": []}))
    n = 0

    async def ask(msg: dict) -> dict:
        nonlocal n
        n += 1
        w.write(wire.pack({**msg, "id": n, "ledger": msg.get("ledger", ledger)}))
        await w.drain()
        return await wire.read_message(r)

    return r, w, ask


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


async def wait_until(fn, what: str, timeout: float = 15.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not (v := await fn()):
        assert loop.time() < end, what
        await asyncio.sleep(0.05)
    return v


def test_what_a_dead_proxy_held_is_released_and_a_live_ones_kept(tmp_path):
    async def go():
        db = str(tmp_path / "c.duckdb")
        sink, a = await proxy(db)
        expiry = str(int(a.today()[2]))
        k = key(a, "held")
        _, w, ask = await raw_proxy(db, dead_pid(), "clrk:budget:applied:dead")
        assert (await ask({"t": "budget_admit", "key": k, "args": ["100", "70", "", "0.0", expiry]}))["reply"][0] == 1
        _, w2, ask2 = await raw_proxy(db, os.getpid(), "clrk:budget:applied:alive")
        assert (await ask2({"t": "budget_admit", "key": k, "args": ["100", "20", "", "0.0", expiry]}))["reply"][0] == 1
        assert isinstance(await a.admit("held", 100, 11, None, 0.0), Refusal)
        w.close()
        w2.close()
        await wait_until(lambda: _released(sink, k), "the dead proxy's reservation released")
        assert (await pools(sink))[k] == {"r": "20"}  # the live process's is kept (it may reconnect)
        res = await a.admit("held", 100, 80, None, 0.0)
        assert not isinstance(res, Refusal)
        await stop((sink, a))
    run(go())


async def _released(sink, k) -> bool:
    return (await pools(sink)).get(k) == {"r": "20"}


def test_a_recorder_killed_and_restarted_holds_what_proxies_still_hold(tmp_path):
    """The new recorder re-reads the day from the store; the reservations a proxy held are held again (its
    hello on reconnecting), settle normally, and a settlement of one settled before the restart frees nothing."""
    async def go():
        db = str(tmp_path / "c.duckdb")
        sink, a = await proxy(db)
        held = await a.admit("p", 100, 60, None, 0.0)
        gone = await a.admit("p", 100, 30, None, 0.0)
        a.settle(gone, 5)  # queued; the recorder is killed before it is sent
        a._timer.cancel()
        a._timer = None
        old = (await sink.request({"t": "budget_pools"}, 10))["epoch"]
        os.kill(sink.proc.pid, signal.SIGKILL)
        sink.proc.wait()
        with pytest.raises(StoreUnavailable):
            await a.admit("p", 100, 1, None, 0.0)
        await wait_until(lambda: _available(a), "the ledger back on a new recorder")
        st = await sink.request({"t": "budget_pools"}, 10)
        assert st["epoch"] != old
        # 60 held again; the 30 settled before the kill was released nowhere twice: its usage only
        assert st["days"][key(a, "p")] == {"r": "60", "u": "5"}
        assert isinstance(await a.admit("p", 100, 36, None, 0.0), Refusal)
        a.settle(held, 50)
        await a._drain()
        assert (await pools(sink))[key(a, "p")] == {"u": "55"}
        await stop((sink, a))
    run(go())


async def _available(ledger) -> bool:
    return ledger.available


def test_admissions_wait_for_the_days_usage_from_the_store():
    async def go():
        calls = []

        async def totals(since):
            calls.append(since)
            if len(calls) < 3:
                raise OSError("ClickHouse is away")
            return {"p": 70}, {"p": 0.5}

        led = RecorderLedger(totals)
        with pytest.raises(Unavailable) as e:
            await led.ready()
        assert "ClickHouse is away" in str(e.value) or "reading" in str(e.value)
        await asyncio.wait_for(led.seeded.wait(), 10)
        await led.ready()
        day = led.start_day
        reply = led.admit({"ledger": "L", "key": pool_key(day, "p"), "args": ["100", "31", "", "0.0", "9999999999"]},
                          "conn", None)
        assert reply["reply"] == [0, "70", "0", "0.5", "0"]
        assert led.pools.state()[pool_key(day, "p")] == {"u": "70", "uc": "0.5"}
    run(go())


@pytest.mark.parametrize("msg", [
    {"t": "budget_admit", "key": "clrk:budget:2026-01-01:p", "args": ["", "1e400", "", "0.0", "1"]},
    {"t": "budget_admit", "key": "clrk:budget:2026-01-01:p", "args": None},
    {"t": "budget_admit", "key": 5, "args": ["", "1", "", "0.0", "1"]},
    {"t": "budget_admit", "key": "other:key", "args": ["", "1", "", "0.0", "1"]},
    {"t": "budget_admit", "ledger": ["x"], "key": "clrk:budget:2026-01-01:p", "args": ["", "1", "", "0.0", "1"]},
    {"t": "budget_admit", "key": "clrk:budget:2026-01-01:p", "args": ["", str(2**63), "", "0.0", "1"]},
    {"t": "budget_settle", "items": "x"},
    {"t": "budget_settle", "items": [[1, 2, 3]] * 20_000},
    {"t": "budget_adopt", "tag": "t", "held": [["old", "clrk:budget:2026-01-01:p", -5, 0.0, "1"]]},
    {"t": "budget_adopt", "tag": None, "held": []},
    {"t": "budget_ping", "ledger": "x" * 500},
])
def test_hostile_budget_messages_get_an_error_never_a_crash(tmp_path, msg):
    async def go():
        db = str(tmp_path / "c.duckdb")
        sink, a = await proxy(db)
        _, w, ask = await raw_proxy(db, os.getpid())
        reply = await ask(msg)
        assert reply["t"] == "error" and reply["message"].startswith("budget ledger: "), reply
        # a settlement batch with a bad item: that item is refused, the others applied
        res = await a.admit("p", 100, 10, None, 0.0)
        assert res.epoch
        exp = a.today()[2]
        good = [key(a, "p"), ["0", "0", "3", "0", exp, "1"], "nope"]
        reply = await ask({"t": "budget_settle", "items": [good, ["clrk:budget:x:p", ["1"], "t"], 7]})
        assert reply["t"] == "ok" and reply["replies"][1:] == [None, None] and reply["replies"][0][0] == "3"
        w.write(wire.pack(["not", "a", "map"]))  # the connection is dropped; the recorder carries on
        assert await a.admit("p", 100, 10, None, 0.0)
        assert sink.proc.poll() is None
        await stop((sink, a))
    run(go())


def test_pid_alive_sees_the_dead_and_the_zombie():
    assert recorder_ledger.pid_alive(os.getpid())
    assert not recorder_ledger.pid_alive(dead_pid())
    p = subprocess.Popen(["true"])
    try:
        while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            pass
        assert not recorder_ledger.pid_alive(p.pid)
    finally:
        p.wait()


def test_a_second_recorder_for_the_store_leaves_the_first_in_place(tmp_path):
    """Proxies whose recorder died each start one; only one may serve the store (for ClickHouse nothing else
    stops a second from taking the socket, and half the proxies, with it)."""
    import sys

    async def go():
        db = str(tmp_path / "c.duckdb")
        sink, a = await proxy(db)
        first = (await sink.request({"t": "status"}, 10))["pid"]
        second = subprocess.run([sys.executable, "-m", "clrk.recorder", "--socket", wire.socket_path(db)],
                                env={**os.environ, "CLRK_RECORDER_DB": db}, capture_output=True, text=True, timeout=60)
        assert second.returncode == 3 and second.stderr == ""  # quietly: another recorder serves this store
        assert (await sink.request({"t": "status"}, 10))["pid"] == first
        assert not isinstance(await a.admit("p", 10, 1, None, 0.0), Refusal)
        await stop((sink, a))
    run(go())
