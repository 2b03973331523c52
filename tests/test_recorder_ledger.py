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
import time

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


@pytest.mark.parametrize("leases", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_two_proxies_keep_the_bound(tmp_path, seed, leases, monkeypatch):
    """80 calls at once through two proxies: never more held than the pool; with leases off, a call is refused
    only when what is held leaves less than it (with leases on, an unused lease can be what is held: the
    sequential lease test below checks that claim step by step)."""
    if not leases:
        from clrk.proxy import budget_store

        monkeypatch.setattr(budget_store, "LEASE_CALLS", 0)  # asks for none: the recorder grants none
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
        if not leases:
            assert all(mx - held < t for res, (t, _) in zip(got, asks, strict=True) if isinstance(res, Refusal))
        for k, res, actual in admitted:
            (a if k % 2 else b).settle(res, actual)
        for p in (a, b):
            for k in list(p.leases):
                p._end_lease(k)
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


# ------------------------------------------------------------------ leases


def test_a_pool_far_from_its_limit_is_leased_so_most_calls_need_no_round_trip(tmp_path):
    """200 calls of 100 tokens on a pool of 10^9: the first admission brings a lease of 32 such calls, the next
    31 are admitted here from it, and so on; settled, then the lease given back at close: the pool holds the
    usage of the 200 calls and nothing reserved."""
    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        for _ in range(200):
            res = await a.admit("big", 10**9, 100, None, 0.0)
            assert not isinstance(res, Refusal)
            a.settle(res, 50)
        assert a.leased >= 190 and a.state({})["leased_admissions"] == a.leased
        status = (await sink.request({"t": "budget_pools"}, 10))
        assert status["admissions"] <= 10 and status["leases"] == status["admissions"]
        await a.close()
        await a._drain()
        assert (await pools(sink))[key(a, "big")] == {"u": str(200 * 50)}
        await sink.stop()
    run(go())


def test_no_lease_near_the_end_of_a_pool_so_admission_stays_exact_there(tmp_path):
    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        got = [await a.admit("small", 1000, 77, None, 0.0) for _ in range(14)]
        assert [isinstance(g, Refusal) for g in got].count(False) == 1000 // 77 and not a.leases and a.leased == 0
        await stop((sink, a))
    run(go())


@pytest.mark.parametrize("seed", range(4))
def test_leases_keep_the_bound_across_two_proxies_and_a_refusal_means_the_pool_is_held(tmp_path, seed):
    """Two proxies admitting and settling in a random order on a pool where leases are granted early: the
    recorder never holds more than the pool (used + reserved ≤ max while nothing settles above its
    reservation); a call is refused only when what is held — calls and both proxies' unused leases — leaves
    less than it; at the end, with every call settled and the leases given back, nothing is reserved and the
    usage is exactly what was charged."""
    rnd = random.Random(seed)
    mx = 4_000  # leases early (room for 64 calls of up to 60), refusals later (≈ 8,000 tokens asked in all)

    async def go():
        db = str(tmp_path / "c.duckdb")
        proxies = [await proxy(db), await proxy(db)]
        held: list[tuple[SharedLedger, object, int]] = []
        used = refused = 0
        for _ in range(500):
            _, led = rnd.choice(proxies)
            if held and rnd.random() < 0.45:
                owner, res, actual = held.pop(rnd.randrange(len(held)))
                owner.settle(res, actual)
                used += actual
                await owner._drain()  # what the next admission is judged on
                continue
            t = rnd.randint(1, 60)
            res = await led.admit("race", mx, t, None, 0.0)
            leases = sum(lease.res.tokens for _, p in proxies for lease in p.leases.values())
            if isinstance(res, Refusal):
                refused += 1
                assert mx - used - sum(r.tokens for _, r, _ in held) - leases < t
            else:
                held.append((led, res, rnd.randint(res.tokens // 2, res.tokens)))  # never above its reservation
            for _, p in proxies:
                await p._drain()
            day = (await pools(proxies[0][0])).get(key(led, "race"), {})
            assert int(day.get("u", 0)) + int(day.get("r", 0)) <= mx
            assert used + sum(r.tokens for _, r, _ in held) + leases <= mx  # what the proxies hold, as they see it
        assert sum(p.leased for _, p in proxies) > 0 and refused > 0  # leases were in play, and the pool ran out
        for owner, res, actual in held:
            owner.settle(res, actual)
            used += actual
        for _, p in proxies:
            await p.close()
            await p._drain()
        assert (await pools(proxies[0][0]))[key(proxies[0][1], "race")] == ({"u": str(used)} if used else {})
        for s, _ in proxies:
            await s.stop()
    run(go())


def test_a_lease_left_unused_is_given_back(tmp_path, monkeypatch):
    from clrk.proxy import budget_store

    monkeypatch.setattr(budget_store, "LEASE_IDLE", 0.2)

    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        res = await a.admit("idle", 10**9, 100, None, 0.0)
        assert a.leases
        assert int((await pools(sink))[key(a, "idle")]["r"]) > 100
        async def ended() -> bool:
            return not a.leases

        await wait_until(ended, "the lease ended")
        await a._drain()
        assert (await pools(sink))[key(a, "idle")] == {"r": "100"}  # the call's own reservation only
        a.settle(res, 7)
        await stop((sink, a))
    run(go())


def test_a_budget_changed_by_a_reload_ends_the_lease_in_the_next_admission(tmp_path):
    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        await a.admit("rl", 10**9, 100, None, 0.0)
        assert a.leases
        await a.admit("rl", 10**9 - 1, 100, None, 0.0)  # other limits: not from the lease; its rest given back first
        day = (await pools(sink))[key(a, "rl")]
        lease = sum(lease.res.tokens for lease in a.leases.values())
        assert int(day["r"]) == 200 + lease
        await stop((sink, a))
    run(go())


@pytest.mark.parametrize("extra", [
    {"lease": [2**62, 1.0]}, {"lease": [5, 1e300]}, {"lease": "x"}, {"lease": [True, 0.0]}, {"lease": [-5, 0.0]},
    {"release": [10**9, 0.0, "t1"]}, {"release": [5, 0.0, "unknown-tag"]}, {"release": "x"}, {"release": [-1, 0.0, "t1"]},
])
def test_a_hostile_lease_or_release_is_ignored_and_the_call_admitted_as_asked(tmp_path, extra):
    async def go():
        db = str(tmp_path / "c.duckdb")
        sink, a = await proxy(db)
        _, _, ask = await raw_proxy(db, os.getpid())
        k = key(a, "h")
        reply = await ask({"t": "budget_admit", "key": k, "args": ["1000000", "10", "", "0.0", a.today()[2]], **extra})
        assert reply["t"] == "ok" and reply["reply"][0] == 1 and "lease" not in reply
        assert (await pools(sink))[k] == {"r": "10"}
        await stop((sink, a))
    run(go())


def test_leases_granted_to_calls_admitted_at_once_are_joined_never_left_held(tmp_path):
    """20 calls admitted at once each come back with a lease; one proxy keeps one lease per pool day, so the
    others join it: what the recorder holds is exactly the calls and that lease."""
    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        got = await asyncio.gather(*[a.admit("many", 10**9, 100, None, 0.0) for _ in range(20)])
        assert not any(isinstance(g, Refusal) for g in got)
        await a._drain()
        lease = sum(lease.res.tokens for lease in a.leases.values())
        assert lease > 0 and int((await pools(sink))[key(a, "many")]["r"]) == 20 * 100 + lease
        await stop((sink, a))
    run(go())


def _hold_timer(ledger: SharedLedger) -> None:
    """Nothing is sent until the test drains (the batch timer of the settlements just made is cancelled)."""
    if ledger._timer is not None:
        ledger._timer.cancel()
        ledger._timer = None


def test_a_merged_batch_that_timed_out_is_resent_as_it_was_and_applied_once(tmp_path, monkeypatch):
    """The recorder stops answering (SIGSTOP) while a batch is on its socket: the proxy's request times out and
    the batch goes back at the head of its queue, though the recorder applies it once it runs again. Sent
    again — as it was, under its number — it changes nothing; what was settled meanwhile is an item of its
    own and counts once."""
    from clrk.proxy import budget_store

    monkeypatch.setattr(budget_store, "LEASE_CALLS", 0)  # every call reserved on the recorder: exact figures

    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        rs = [await a.admit("p", 10_000, 100, None, 0.0) for _ in range(4)]
        late = await a.admit("p", 10_000, 100, None, 0.0)
        for r in rs:
            a.settle(r, 10)
        _hold_timer(a)
        sent = a.queue[0]
        os.kill(sink.proc.pid, signal.SIGSTOP)
        try:
            assert await a._drain() is not None  # no answer in time
            assert list(a.queue) == [sent] and sent.n == a._number and (sent.r, sent.u, sent.calls) == (400, 40, 4)
            a.settle(late, 20)
            _hold_timer(a)
            assert len(a.queue) == 2 and a.queue[0] is sent and (sent.r, sent.u, sent.calls) == (400, 40, 4)
        finally:
            os.kill(sink.proc.pid, signal.SIGCONT)

        async def applied():  # the recorder read the batch whose answer was lost, and applied it
            return (await pools(sink)).get(key(a, "p")) == {"u": "40", "r": "100"}
        await wait_until(applied, "the timed-out batch applied by the recorder")
        assert await a._drain() is None
        assert (await pools(sink))[key(a, "p")] == {"u": "60"}
        st = await sink.request({"t": "budget_pools"}, 10)
        assert st["settlements"] == 5  # 5 calls, each counted once (two items, one of them sent twice)
        await stop((sink, a))
    run(go())


def test_settlements_under_two_recorder_epochs_are_never_summed(tmp_path, monkeypatch):
    """A settlement made under the recorder before a restart (its tag unknown to the new one: usage only)
    and one of a reservation the new recorder holds again (released there) wait in one queue for one pool
    day: two items, each released where it is held."""
    from clrk.proxy import budget_store

    monkeypatch.setattr(budget_store, "LEASE_CALLS", 0)

    async def go():
        sink, a = await proxy(str(tmp_path / "c.duckdb"))
        gone = await a.admit("p", 1000, 30, None, 0.0)
        held = await a.admit("p", 1000, 60, None, 0.0)
        kept = await a.admit("p", 1000, 20, None, 0.0)
        first = gone.epoch
        a.settle(gone, 5)
        _hold_timer(a)
        os.kill(sink.proc.pid, signal.SIGKILL)
        sink.proc.wait()

        async def retagged():  # the new recorder was told what this proxy holds, under a new tag
            return held.epoch != first
        with pytest.raises(StoreUnavailable):
            await a.admit("p", 1000, 1, None, 0.0)  # the sink finds the recorder gone and starts a new one
        await wait_until(retagged, "a new recorder and the proxy's hello")
        a.settle(held, 50)
        _hold_timer(a)
        assert [(it.epoch, it.calls) for it in a.queue] == [(first, 1), (held.epoch, 1)]

        async def drained():
            return await a._drain() is None
        await wait_until(drained, "the new recorder answering settlements")
        # 30 released nowhere (the old recorder held it), 60 released here, 20 still held; usage 55
        assert (await pools(sink))[key(a, "p")] == {"u": "55", "r": "20"}
        a.settle(kept, 0)
        await stop((sink, a))
    run(go())


def test_settlements_sent_as_numbers_are_checked_like_strings_and_counted_per_call():
    """What a proxy sends now (amounts and number as numbers, and how many calls an item sums) and what a
    hostile peer might send instead: a malformed item is refused alone (None), the others applied."""
    led = RecorderLedger(lambda _ts: None)  # never seeded here: settle is called directly
    day = utc_day(time.time()).isoformat()
    k, exp = pool_key(day, "p"), str(int(time.time()) + 86400)
    bad = [[0, 0, 1.5, 0, exp, 2], [True, 0, 1, 0, exp, 2], [0, float("nan"), 1, 0, exp, 2],
           [0, -1.0, 1, 0, exp, 2], [0, 0, 2**63, 0, exp, 2], [0, 0, -1, 0, exp, 2], [0, 0, 1, float("inf"), exp, 2],
           [0, 0, 1, 0, exp, 0], [0, 0, 1, 0, "x", 2], [0, 0, 1, 0, exp, 2.0], [0, 0, 1, "0", exp, 2],
           [0, 0, 1, 1e300, exp, 2]]
    items = [[k, args, led.epoch] for args in bad]
    items += [[k, [0, 0, 1, 0, exp, 2], led.epoch, 0], [k, [0, 0, 1, 0, exp, 2], led.epoch, "3"],
              [k, [0, 0, 1, 0, exp, 2], led.epoch, True], [k, [0, 0, 1, 0, exp, 2], led.epoch, 2, "x"]]
    items += [[k, [0, 0, 3, 0.25, exp, 7], led.epoch, 6], [k, [0, 0, 3, 0.25, exp, 7], led.epoch, 6],
              [k, ["0", "0", "4", "0", exp, "8"], led.epoch]]
    out = led.settle({"ledger": "L", "items": items}, object(), None)["replies"]
    assert out[:-3] == [None] * (len(items) - 3)
    assert out[-3:] == [["3", "0.25"], ["3", "0.25"], ["7", "0.25"]]  # the second 7 is the first one again
    assert led.pools.state()[k] == {"u": "7", "uc": "0.25"} and led.settlements == 7
