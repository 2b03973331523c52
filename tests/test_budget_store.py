"""The shared budget ledger (clrk/proxy/budget_store.py) against a real redis-server, in process: the Lua
scripts' arithmetic in tokens and dollars, the overshoot bound across two ledgers (two replicas) sharing one
Redis, the keys' expiry, the scripts reloaded after Redis lost them, and settlements queued while Redis is
away and sent when it is back."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time

import pytest
import redis

from clrk.proxy.budget import MAX_TOKENS, day_start, utc_day
from clrk.proxy.budget_store import (
    KEEP_AFTER_DAY,
    Refusal,
    SharedLedger,
    StoreUnavailable,
    pool_key,
    safe_url,
)
from tests.harness.redis_server import RedisServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.stop()


@pytest.fixture
def pool(request):
    return f"AIProviderRoute/ns/{request.node.name}#openai:*"


def raw(server) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def run(coro):
    return asyncio.run(coro)


def test_admission_and_settlement_arithmetic(server, pool):
    async def go():
        a = SharedLedger(server.url)
        r1 = await a.admit(pool, 100, 60, None, 0.0)
        assert r1.shared and r1.tokens == 60
        no = await a.admit(pool, 100, 41, None, 0.0)  # 60 reserved + 41 > 100: refused, not clamped
        assert no == Refusal(0, 60, 0.0, 0.0)
        r2 = await a.admit(pool, 100, 40, None, 0.0)
        assert isinstance(await a.admit(pool, 100, 0, None, 0.0), Refusal)  # never free: a full pool admits nothing
        a.settle(r1, 10)  # the reservation gives way to the usage
        a.settle(r2, None)  # usage unseen: the reservation is charged
        await a._drain()
        h = raw(server).hgetall(pool_key(r1.day, pool))
        assert h == {"u": "50"}  # nothing reserved is left over
        assert a.used_today(pool) == 50
        r3 = await a.admit(pool, 100, 50, None, 0.0)
        assert not isinstance(r3, Refusal)
        await a.close()
    run(go())


def test_a_batch_resent_after_its_answer_was_lost_is_applied_once(server, pool):
    """Redis stopping mid-batch: it may have applied what it never answered, and the ledger sends the batch
    again. Settlements are numbered, so the second sending changes nothing; later ones still count."""
    async def go():
        a = SharedLedger(server.url)
        r1 = await a.admit(pool, 1000, 60, None, 0.0)
        r2 = await a.admit(pool, 1000, 40, None, 0.0)
        a.settle(r1, 10)
        a.settle(r2, 20)
        batch = list(a.queue)
        assert await a._drain() is None
        await a._send_batch(batch)  # the same batch again, as after a lost answer
        await a._send_batch(batch[1:])
        h = raw(server).hgetall(pool_key(r1.day, pool))
        assert h == {"u": "30"}
        r3 = await a.admit(pool, 1000, 5, None, 0.0)
        a.settle(r3, 7)
        assert await a._drain() is None
        assert raw(server).hgetall(pool_key(r1.day, pool)) == {"u": "37"}
        await a.close()
    run(go())


def test_dollars_are_kept_beside_tokens(server, pool):
    async def go():
        a = SharedLedger(server.url)
        r1 = await a.admit(pool, None, 100, 1.0, 0.75)
        assert not isinstance(r1, Refusal) and r1.cost == 0.75
        no = await a.admit(pool, None, 100, 1.0, 0.3)
        assert isinstance(no, Refusal) and no.reserved_cost == pytest.approx(0.75)
        a.settle(r1, 80, 0.125)
        await a._drain()
        h = raw(server).hgetall(pool_key(r1.day, pool))
        assert float(h["uc"]) == 0.125 and "rc" not in h and h["u"] == "80"
        assert a.used_cost_today(pool) == 0.125
        tiny = await a.admit(pool, None, 1, 1.0, 0.0)  # a reservation of at least 1e-9 dollars
        assert tiny.cost == 1e-9
        a.settle(tiny, 0, 0.0)
        await a._drain()
        assert "rc" not in raw(server).hgetall(pool_key(r1.day, pool))
        # both limits: a call is admitted only under each
        assert isinstance(await a.admit(pool, 1000, 10, 1.0, 0.9), Refusal)
        assert isinstance(await a.admit(pool, 50, 100, 1.0, 0.1), Refusal)
        await a.close()
    run(go())


@pytest.mark.parametrize("seed", range(5))
def test_two_replicas_keep_the_bound(server, seed):
    """Two ledgers on one Redis, admissions racing from both before any settles: exactly the reservations that
    fit are admitted (in the order Redis ran them), and the day passes the max only by usage beyond them."""
    rnd = random.Random(seed)
    pool = f"race-{seed}-{rnd.random()}"
    mx = rnd.randint(1, 5000)
    asks = [(rnd.randint(1, 400), rnd.randint(0, 800)) for _ in range(80)]

    async def go():
        a, b = SharedLedger(server.url), SharedLedger(server.url)
        got = await asyncio.gather(*[(a if k % 2 else b).admit(pool, mx, t, None, 0.0) for k, (t, _) in enumerate(asks)])
        admitted = [(res, actual) for res, (_, actual) in zip(got, asks, strict=True) if not isinstance(res, Refusal)]
        held = sum(r.tokens for r, _ in admitted)
        assert held <= mx
        assert all(r.reserved + t > mx - r.used for r, (t, _) in zip(got, asks, strict=True) if isinstance(r, Refusal))
        assert all(mx - held < t for res, (t, _) in zip(got, asks, strict=True) if isinstance(res, Refusal))
        for k, (res, actual) in enumerate(admitted):
            (a if k % 2 else b).settle(res, actual)
        await a._drain()
        await b._drain()
        h = raw(server).hgetall(pool_key(utc_day(a.clock()), pool))
        used = sum(actual for _, actual in admitted)
        assert int(h.get("u", 0)) == used and "r" not in h
        assert used <= mx + sum(max(0, actual - r.tokens) for r, actual in admitted)
        await a.close()
        await b.close()
    run(go())


def test_keys_expire_after_their_day(server, pool):
    async def go():
        a = SharedLedger(server.url)
        res = await a.admit(pool, 10, 1, None, 0.0)
        ttl_at = raw(server).expiretime(pool_key(res.day, pool))
        assert ttl_at == int(day_start(res.day + dt.timedelta(days=1))) + KEEP_AFTER_DAY
        await a.close()
    run(go())


def test_a_settlement_of_a_day_long_gone_leaves_nothing_behind(server, pool):
    """A reservation from a day whose key has expired: releasing it must not leave a key without expiry."""
    async def go():
        a = SharedLedger(server.url)
        res = await a.admit(pool, 10, 3, None, 0.0)
        raw(server).delete(pool_key(res.day, pool))
        res.day = res.day - dt.timedelta(days=3)
        a.settle(res, 2)
        await a._drain()
        assert not raw(server).exists(pool_key(res.day, pool))
        await a.close()
    run(go())


def test_usage_is_capped_at_what_a_record_stores(server, pool):
    async def go():
        a = SharedLedger(server.url)
        res = await a.admit(pool, None, 1, 1e12, 1.0)
        a.settle(res, MAX_TOKENS)
        r2 = await a.admit(pool, None, 1, 1e12, 1.0)
        a.settle(r2, MAX_TOKENS)
        await a._drain()
        assert raw(server).hget(pool_key(res.day, pool), "u") == str(MAX_TOKENS)
        await a.close()
    run(go())


def test_scripts_come_back_after_redis_forgot_them(server, pool):
    async def go():
        a = SharedLedger(server.url)
        assert not isinstance(await a.admit(pool, 10, 1, None, 0.0), Refusal)
        raw(server).script_flush()
        r = await a.admit(pool, 10, 1, None, 0.0)
        assert not isinstance(r, Refusal)
        raw(server).script_flush()
        a.settle(r, 1)
        assert await a._drain() is None and a.available
        await a.close()
    run(go())


def test_a_settlement_batch_is_one_round_trip_and_a_flushed_script_is_loaded_again(server, pool):
    """Settlements go as EVALSHA alone (no SCRIPT EXISTS before each pipelined batch); when Redis has forgotten
    the script, it is loaded and the batch sent again, each settlement applied once."""
    async def go():
        r = raw(server)
        a = SharedLedger(server.url)
        reservations = [await a.admit(pool, 1000, 10, None, 0.0) for _ in range(4)]
        r.config_resetstat()
        for res in reservations[:2]:
            a.settle(res, 3)
            assert await a._drain() is None
        stats = r.info("commandstats")
        assert "cmdstat_script|exists" not in stats and "cmdstat_script" not in stats
        assert stats["cmdstat_evalsha"]["calls"] == 2
        r.script_flush()
        for res in reservations[2:]:
            a.settle(res, 3)
        assert await a._drain() is None and a.available
        h = r.hgetall(pool_key(reservations[0].day, pool))
        assert h == {"u": "12"}  # four settlements of 3, the two re-sent after NOSCRIPT counted once
        await a.close()
    run(go())


def test_settlements_wait_for_redis_and_admission_says_it_is_away(tmp_path, pool):
    server = RedisServer(tmp_path / "r").start()
    try:
        async def go():
            a = SharedLedger(server.url)
            res = await a.admit(pool, 100, 30, None, 0.0)
            server.stop()
            with pytest.raises(StoreUnavailable):
                await a.admit(pool, 100, 1, None, 0.0)
            assert not a.available and a.down_reason
            with pytest.raises(StoreUnavailable):  # no round trip while it is away
                await a.admit(pool, 100, 1, None, 0.0)
            a.settle(res, 12)
            assert len(a.queue) == 1
            server.start()
            while not a.available:
                await asyncio.sleep(0.02)
            assert not a.queue
            assert raw(server).hgetall(pool_key(res.day, pool)) == {"u": "12"}  # sent before admission resumed
            await a.close()
        run(go())
    finally:
        server.stop()


def test_a_silent_redis_times_out_admission(tmp_path, pool):
    server = RedisServer(tmp_path / "r").start()
    try:
        async def go():
            a = SharedLedger(server.url)
            await a.admit(pool, 100, 1, None, 0.0)
            server.pause()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(StoreUnavailable):
                await a.admit(pool, 100, 1, None, 0.0)
            assert loop.time() - t0 < 2
            server.resume()
            while not a.available:
                await asyncio.sleep(0.02)
            await a.close()
        run(go())
    finally:
        server.resume()
        server.stop()


def test_the_url_shown_has_no_password():
    assert safe_url("redis://user:s3cret@10.0.0.1:6380/2") == "redis://10.0.0.1:6380/2"
    assert "s3cret" not in safe_url("rediss://:s3cret@[::1]:6380/0")


def test_a_new_utc_day_starts_from_zero_and_yesterdays_calls_are_not_charged_to_it(server, pool):
    clock = Clock(time.time())

    async def go():
        a = SharedLedger(server.url, clock=clock)
        res = await a.admit(pool, 100, 100, None, 0.0)
        assert isinstance(await a.admit(pool, 100, 1, None, 0.0), Refusal)
        clock.t += 86400
        tomorrow = await a.admit(pool, 100, 100, None, 0.0)  # a new day: the whole pool again
        assert not isinstance(tomorrow, Refusal) and tomorrow.day == res.day + dt.timedelta(days=1)
        a.settle(res, 70)  # yesterday's reservation: released there, its usage not charged to the new day
        await a._drain()
        assert raw(server).hgetall(pool_key(res.day, pool)) == {}
        assert raw(server).hgetall(pool_key(tomorrow.day, pool)) == {"r": "100"}
        await a.close()
    run(go())


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_usage_charged_while_a_session_holds_its_reservation(server, pool):
    """A realtime session's usage is charged as it arrives; the reservation stays until the session ends."""
    async def go():
        a = SharedLedger(server.url)
        res = await a.admit(pool, 1000, 100, 1.0, 0.5)
        assert a.charge(res, 40, 0.01) == 40  # what the gateway knows at once, before Redis answers
        assert a.charge(res, 30, 0.02) == 70
        await a._drain()
        h = raw(server).hgetall(pool_key(res.day, pool))
        assert (h["u"], h["r"], float(h["uc"]), float(h["rc"])) == ("70", "100", pytest.approx(0.03), 0.5)
        a.settle(res, 0, 0.0)  # the session ends: its usage was charged already
        await a._drain()
        h = raw(server).hgetall(pool_key(res.day, pool))
        assert h["u"] == "70" and "r" not in h and "rc" not in h
        await a.close()
    run(go())


def test_fail_open_starts_from_what_redis_said_and_tells_redis_what_it_spent(tmp_path, pool):
    server = RedisServer(tmp_path / "r").start()
    try:
        async def go():
            a = SharedLedger(server.url)
            res = await a.admit(pool, 100, 60, None, 0.0)
            a.settle(res, 60)
            await a._drain()
            server.stop()
            with pytest.raises(StoreUnavailable):
                await a.admit(pool, 100, 10, None, 0.0)
            assert a.admit_local(pool, 100, 41, None, 0.0) is None  # 60 used, as Redis last said
            local = a.admit_local(pool, 100, 40, None, 0.0)
            assert local is not None and not local.shared
            assert a.settle(local, 35) == 95
            server.start()
            while not a.available:
                await asyncio.sleep(0.02)
            assert raw(server).hgetall(pool_key(res.day, pool)) == {"u": "95"}
            await a.close()
        run(go())
    finally:
        server.stop()


def test_settlements_of_a_pool_are_summed_and_a_resent_merged_batch_is_applied_once(server, pool):
    """Settlements of one pool day waiting together are one item, numbered once when it is sent. A batch put
    back at the head of the queue (what _drain does when its answer is lost: Redis may have applied it) goes
    out again as it was — same numbers, nothing added to it — so Redis skips it; what was settled meanwhile
    is an item of its own and counts."""
    async def go():
        a = SharedLedger(server.url)
        rs = [await a.admit(pool, 10_000, 100, None, 0.0) for _ in range(5)]
        late = await a.admit(pool, 10_000, 100, None, 0.0)
        for r in rs:
            a.settle(r, 10)
        assert len(a.queue) == 1 and a.queued() == 5
        sent = a.queue[0]
        assert await a._drain() is None
        assert sent.n == a._number and (sent.r, sent.u, sent.calls) == (500, 50, 5)
        assert raw(server).hgetall(pool_key(rs[0].day, pool)) == {"u": "50", "r": "100"}
        a.queue.extendleft([sent])  # the answer lost: back at the head, maybe applied
        a.settle(late, 20)
        assert len(a.queue) == 2 and a.queue[0] is sent and (sent.r, sent.u, sent.calls) == (500, 50, 5)
        assert a.queue[1].n == 0
        assert await a._drain() is None
        assert raw(server).hgetall(pool_key(rs[0].day, pool)) == {"u": "70"}
        assert raw(server).get(a._mark) == str(a._number) == str(sent.n + 1)
        await a.close()
    run(go())


def test_a_batch_spanning_midnight_keeps_each_day_apart(server, pool):
    """Yesterday's reservation settled after midnight releases on yesterday's key (no usage charged there or
    to the new day), today's calls are summed on today's: two items of one batch, each applied once."""
    clock = Clock(day_start(utc_day(time.time())) + 86400 - 0.5)

    async def go():
        a = SharedLedger(server.url, clock=clock)
        old = await a.admit(pool, 1000, 300, None, 0.0)
        old_used = await a.admit(pool, 1000, 100, None, 0.0)
        a.settle(old_used, 40)  # before midnight: charged to its day
        clock.t += 1
        new = [await a.admit(pool, 1000, 50, None, 0.0) for _ in range(3)]
        a.settle(old, 250)
        for r in new:
            a.settle(r, 5)
        assert [(it.day, it.calls) for it in a.queue] == [(old.day.isoformat(), 2), (new[0].day.isoformat(), 3)]
        assert await a._drain() is None
        assert raw(server).hgetall(pool_key(old.day, pool)) == {"u": "40"}
        assert raw(server).hgetall(pool_key(new[0].day, pool)) == {"u": "15"}
        await a.close()
    run(go())


def test_fail_open_settlements_are_summed_while_redis_is_away_and_charged_once(tmp_path, pool):
    """While Redis is away, what failOpen calls spend and a shared reservation's settlement wait as one item
    of the pool's day (the queue does not grow per call); Redis has all of it once, when it is back."""
    server = RedisServer(tmp_path / "r").start()
    try:
        async def go():
            a = SharedLedger(server.url)
            shared = await a.admit(pool, 1000, 60, None, 0.0)
            server.stop()
            with pytest.raises(StoreUnavailable):
                await a.admit(pool, 1000, 10, None, 0.0)
            a.settle(shared, 30)
            for _ in range(50):
                local = a.admit_local(pool, 1000, 10, None, 0.0)
                assert local is not None and not local.shared
                a.settle(local, 7)
            assert len(a.queue) == 1 and a.queued() == 51 and a.state({})["queued"] == 51
            assert a.used_today(pool) == 30 + 350
            server.start()
            while a.queue or not a.available:
                await asyncio.sleep(0.02)
            assert raw(server).hgetall(pool_key(shared.day, pool)) == {"u": "380"}
            assert raw(server).get(a._mark) == "1"  # 51 settlements, one item, one number
            await a.close()
        run(go())
    finally:
        server.stop()


def test_a_full_queue_drops_its_oldest_item_and_counts_every_call_it_held(server, monkeypatch):
    from clrk.proxy import budget_store

    monkeypatch.setattr(budget_store, "MAX_QUEUED", 2)

    async def go():
        a = SharedLedger(server.url)
        res = {p: [await a.admit(p, None, 10, None, 0.0) for _ in range(4)] for p in ("q-a", "q-b", "q-c")}
        a._down(ConnectionError("test: away"))  # nothing is sent meanwhile
        a._probe.cancel()
        for p in ("q-a", "q-b"):
            for r in res[p][:3]:
                a.settle(r, 1)
        assert (len(a.queue), a.dropped) == (2, 0)
        a.settle(res["q-c"][0], 1)  # a third pool day: q-a's item (3 calls) goes
        assert (len(a.queue), a.dropped, a.queued()) == (2, 3, 4)
        a.settle(res["q-a"][3], 1)  # q-a's item is gone: a new one, and the oldest left (q-b) goes in turn
        assert [it.pool for it in a.queue] == ["q-c", "q-a"] and a.dropped == 6
        a.queue.clear()
        a._open.clear()
        await a.close()
    run(go())
