"""Budgets shared on Redis (`clrk_budget_store` / CLRK_BUDGET_STORE = redis://host:port/db), or held by this
gateway's recorder (`recorder`: RecorderBackend, the same steps run by clrk.recorder.ledger): every gateway
naming the same Redis keeps one ledger per pool and UTC day there, with the mechanics and the bound of
`clrk.proxy.budget` (admission keeps used + reserved ≤ max; settling replaces a reservation by its usage),
made atomic across replicas by running each step as one Lua script (loaded once, then called by EVALSHA;
reloaded by the client if a restarted Redis lost it).

A pool's day is one hash, `clrk:budget:<YYYY-MM-DD>:<pool>`, fields u (tokens used), r (tokens reserved), uc
and rc (dollars used and reserved); it expires an hour after its UTC day ends. Admission is one round trip,
awaited on the event loop (never blocking it), within STORE_TIMEOUT. Settlement and the usage a realtime
session reports are sent without waiting: queued (bounded by MAX_QUEUED, oldest dropped and counted),
pipelined in batches (every SEND_INTERVAL), retried while Redis is away, in order.

When Redis cannot be reached the gateway's `spec.budgetStore.onUnavailable` decides: failClosed (default)
refuses budgeted calls with 503 `clrk: budget store unavailable`; failOpen admits them on this process's own
ledger (`clrk.proxy.budget.BudgetLedger`), which starts from the usage it last read from Redis per pool and
from its own records of the day; what those calls cost is queued for Redis too, so the shared day has it
once Redis is back. A background probe finds Redis again; it is used for admission once what was queued
meanwhile has reached it.

A reservation whose admission times out after Redis applied it stays held until its day ends (the answer
was lost, so nobody can release it): that errs toward spending less, never more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from clrk.escape import printable
from clrk.pools import KEEP_AFTER_DAY
from clrk.proxy.budget import MAX_TOKENS, BudgetLedger, Reservation, day_start, utc_day

log = logging.getLogger("clrk")

STORE_TIMEOUT = 0.5  # seconds an admission waits for Redis before the store counts as unavailable
MAX_QUEUED = 100_000  # settlements waiting for Redis; past that the oldest are dropped (counted, logged)
BATCH = 256  # settlements per pipelined round trip
SEND_INTERVAL = 0.005  # settlements are sent this long after the first of a batch (or when BATCH are waiting)
LEASE_CALLS = 32  # a lease asked of the recorder's ledger: this many calls like the one being admitted
LEASE_IDLE = 1.0  # seconds a lease unused is kept before what is left of it is given back

# KEYS[1] the pool's day; ARGV: max tokens ("" = none), tokens, max USD ("" = none), USD, expire-at (unix s).
# Returns {1, u, uc} when admitted (the usage before it), {0, u, r, uc, rc} when it does not fit: strings, since
# Redis would truncate Lua numbers to integers.
ADMIT = """
local k = KEYS[1]
local v = redis.call('HMGET', k, 'u', 'r', 'uc', 'rc')
local u, r = tonumber(v[1]) or 0, tonumber(v[2]) or 0
local uc, rc = tonumber(v[3]) or 0, tonumber(v[4]) or 0
local no = {0, v[1] or '0', v[2] or '0', v[3] or '0', v[4] or '0'}
if ARGV[1] ~= '' and u + r + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return no end
if ARGV[3] ~= '' and uc + rc + tonumber(ARGV[4]) > tonumber(ARGV[3]) then return no end
redis.call('HINCRBY', k, 'r', ARGV[2])
if ARGV[3] ~= '' then redis.call('HINCRBYFLOAT', k, 'rc', ARGV[4]) end
redis.call('EXPIREAT', k, ARGV[5])
return {1, v[1] or '0', v[3] or '0'}
"""

# KEYS[1] the pool's day, KEYS[2] this ledger's applied mark; ARGV: tokens reserved, USD reserved (both
# released), tokens used, USD used (both charged), expire-at, this settlement's number. A charge while the
# reservation is held (a realtime session's usage) releases nothing. Returns {u, uc} after it.
# Exactly once: a ledger numbers its settlements and sends them in order, so one numbered at or below the
# mark was applied already — a batch resent because its answer was lost (Redis stopping mid-batch) changes
# nothing twice.
SETTLE = """
local k = KEYS[1]
local n = tonumber(ARGV[6])
if n <= (tonumber(redis.call('GET', KEYS[2])) or 0) then
  local v = redis.call('HMGET', k, 'u', 'uc')
  return {v[1] or '0', v[2] or '0'}
end
redis.call('SET', KEYS[2], ARGV[6], 'EX', 172800)
if ARGV[1] ~= '0' then
  if redis.call('HINCRBY', k, 'r', '-' .. ARGV[1]) <= 0 then redis.call('HDEL', k, 'r') end
end
if ARGV[2] ~= '0' then
  if tonumber(redis.call('HINCRBYFLOAT', k, 'rc', '-' .. ARGV[2])) <= 1e-12 then redis.call('HDEL', k, 'rc') end
end
if ARGV[3] ~= '0' then
  if (tonumber(redis.call('HGET', k, 'u')) or 0) + tonumber(ARGV[3]) >= 9.2e18 then
    redis.call('HSET', k, 'u', '9223372036854775807')
  else
    redis.call('HINCRBY', k, 'u', ARGV[3])
  end
end
if ARGV[4] ~= '0' then redis.call('HINCRBYFLOAT', k, 'uc', ARGV[4]) end
redis.call('EXPIREAT', k, ARGV[5])
local v = redis.call('HMGET', k, 'u', 'uc')
return {v[1] or '0', v[2] or '0'}
"""


async def bounded[T](call: Awaitable[T], seconds: float) -> T:
    """`call`'s result, or TimeoutError after `seconds` — whatever the client does with a cancellation (it
    runs as a task of its own: the caller stops waiting at the deadline even if the call does not stop)."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait((task,), timeout=seconds)
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: not logged as never retrieved


def pool_key(day: dt.date | str, pool: str) -> str:
    return f"clrk:budget:{day if isinstance(day, str) else day.isoformat()}:{pool}"


def expire_at(day) -> int:
    return int(day_start(day)) + 86400 + KEEP_AFTER_DAY


def _num(v: float) -> str:
    """A non-negative amount as a script argument ('0' for nothing: the scripts skip it)."""
    return "0" if not v or v <= 0 else repr(float(v))


def safe_url(url: str) -> str:
    """The store's URL without its credentials (what logs and `clrk status` show)."""
    try:
        u = urllib.parse.urlsplit(url)
        host = u.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{u.port}" if u.port else "")
        return printable(urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", "")))
    except ValueError:
        return "(an invalid URL)"


@dataclass(slots=True)
class Refusal:
    """A pool's state when a reservation did not fit: what the refusal tells."""
    used: int
    reserved: int
    used_cost: float
    reserved_cost: float


class StoreUnavailable(Exception):
    pass


class Settlement:
    """One item of the settlement queue: what the settlements of one pool day made under one epoch release and
    charge, summed (SETTLE is a sum: releasing or charging a then b leaves the pool day as a + b does — but for
    the last digits of HINCRBYFLOAT's long double). Open (n == 0) while it waits: later settlements of the same
    pool day and epoch are added to it, no tuple, no text per call. Numbered when it is taken into a batch, and
    closed from then on: a batch that failed was maybe applied, so it is resent as it was, under its numbers."""

    __slots__ = ("key", "pool", "day", "expiry", "epoch", "r", "rc", "u", "uc", "n", "calls")

    def __init__(self, pool: str, day: str, expiry: str, epoch: str):
        self.key = pool_key(day, pool)
        self.pool, self.day, self.expiry, self.epoch = pool, day, expiry, epoch
        self.r = self.u = self.n = self.calls = 0
        self.rc = self.uc = 0.0

    def script_args(self) -> tuple[str, ...]:
        """SETTLE's arguments (Redis takes strings; a sum past int64 is capped, as the script caps usage)."""
        return (str(min(self.r, MAX_TOKENS)), _num(self.rc), str(min(self.u, MAX_TOKENS)), _num(self.uc),
                self.expiry, str(self.n))


RECORDER = "recorder"  # clrk_budget_store's value for the ledger held by this gateway's recorder


class Backend(Protocol):
    """Where a SharedLedger's pools are: one ADMIT per admission, numbered SETTLEs in batches, a ping to find
    it again. Replies are the scripts' (see ADMIT, SETTLE)."""

    display: str
    timed: bool  # True when its calls end by themselves at their deadline (else SharedLedger bounds them)

    leases: bool  # True when an admission may come with a lease (the recorder's ledger)

    async def admit(self, key: str, args: tuple[str, ...], mark: str, lease: tuple[int, float] | None = None,
                    release: tuple[int, float, str] | None = None) -> tuple[list, str, tuple[int, float] | None]: ...
    async def settle(self, batch: list[Settlement], mark: str) -> list: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class RedisBackend:
    """The pools on Redis: the scripts run there (EVALSHA), settlements pipelined."""

    timed = False
    leases = False

    def __init__(self, url: str, client: Any = None):
        self.display = safe_url(url)
        if client is None:
            import redis.asyncio as aioredis  # the `fleet` extra; imported only when a store is named

            client = aioredis.Redis.from_url(url, socket_timeout=STORE_TIMEOUT, socket_connect_timeout=STORE_TIMEOUT,
                                             max_connections=256, health_check_interval=0)
        self.client = client
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE)

    async def admit(self, key: str, args: tuple[str, ...], mark: str, lease: tuple[int, float] | None = None,
                    release: tuple[int, float, str] | None = None) -> tuple[list, str, tuple[int, float] | None]:
        return await self._admit(keys=[key], args=args), "", None

    async def settle(self, batch: list[Settlement], mark: str) -> list:
        """One pipelined round trip of EVALSHA calls. redis-py's script objects would first send SCRIPT EXISTS
        from every pipeline (a second round trip per batch); the script is loaded only when Redis says it has
        forgotten it (restarted, or SCRIPT FLUSH), and the batch sent again: a settlement Redis applied is
        marked as applied (`mark`), so sending it twice charges it once."""
        from redis.exceptions import NoScriptError

        try:
            return await self._settle_batch(batch, mark)
        except NoScriptError:
            await self.client.script_load(SETTLE)
            return await self._settle_batch(batch, mark)

    async def _settle_batch(self, batch: list[Settlement], mark: str) -> list:
        sha = self._settle.sha
        async with self.client.pipeline(transaction=False) as pipe:
            for it in batch:
                pipe.evalsha(sha, 2, it.key, mark, *it.script_args())
            return await pipe.execute()

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()


class RecorderError(Exception):
    """The recorder's answer to a ledger request was an error (it has not read the day's usage yet, ...)."""


class RecorderBackend:
    """The pools held by this gateway's recorder (clrk.recorder.ledger, the scripts in clrk.pools), shared by
    every proxy process of the store; spoken to over the proxy's connection to it (RecordSink.request).

    The recorder can be restarted (it is a process of its own), and a new one does not know what was
    reserved before it. So each reservation carries the tag of the recorder ledger it is held in (`epoch`):
    on every (re)connection this proxy tells the recorder what it still holds, under which tags (`hello`),
    and a recorder adds to its pools what it does not hold already, then holds all of it under a new tag;
    a settlement carrying a tag the recorder does not know releases nothing (it charges its usage only)."""

    display = RECORDER
    timed = True
    leases = True

    def __init__(self, ledger: SharedLedger):
        self.ledger = ledger
        self.sink: Any = None

    def attach(self, sink) -> None:
        self.sink = sink
        sink.on_connect.append(self.hello)

    def hello(self) -> list[dict]:
        """What this proxy holds, for a recorder it has just connected to; the reservations are re-tagged."""
        tag = secrets.token_hex(8)
        held = []
        for res in (self.ledger.live or {}).values():
            held.append([res.epoch, pool_key(res.day, res.pool), res.tokens, res.cost, str(expire_at(res.day))])
            res.epoch = tag
        return [{"t": "budget_adopt", "ledger": self.ledger._mark, "tag": tag, "held": held}]

    async def _request(self, message: dict, timeout: float) -> dict:
        if self.sink is None:
            raise ConnectionError("not connected to the recorder yet")
        reply = await self.sink.request(message, timeout)
        if reply.get("t") != "ok":
            raise RecorderError(printable(str(reply.get("message") or "error"))[:200])
        return reply

    async def admit(self, key: str, args: tuple[str, ...], mark: str, lease: tuple[int, float] | None = None,
                    release: tuple[int, float, str] | None = None) -> tuple[list, str, tuple[int, float] | None]:
        msg: dict = {"t": "budget_admit", "ledger": mark, "key": key, "args": list(args)}
        if lease is not None:
            msg["lease"] = [lease[0], lease[1]]
        if release is not None:
            msg["release"] = [release[0], release[1], release[2]]
        reply = await self._request(msg, STORE_TIMEOUT)
        granted = reply.get("lease")
        if not (isinstance(granted, list) and len(granted) == 2 and isinstance(granted[0], int) and granted[0] > 0
                and isinstance(granted[1], (int, float)) and granted[1] >= 0):
            granted = None
        return reply["reply"], reply["epoch"], (granted[0], float(granted[1])) if granted else None

    async def settle(self, batch: list[Settlement], mark: str) -> list:
        # Numbers, not SETTLE's strings: msgpack carries them as they are (clrk.recorder.ledger takes both); the
        # fourth member is how many calls the item sums (the recorder's count of settlements).
        items = [[it.key, [min(it.r, MAX_TOKENS), it.rc, min(it.u, MAX_TOKENS), it.uc, it.expiry, it.n], it.epoch,
                  it.calls] for it in batch]
        reply = await self._request({"t": "budget_settle", "ledger": mark, "items": items}, STORE_TIMEOUT * 4)
        return reply["replies"]

    async def ping(self) -> None:
        await self._request({"t": "budget_ping", "ledger": self.ledger._mark}, STORE_TIMEOUT)

    async def close(self) -> None:
        pass


@dataclass(slots=True)
class Lease:
    """Part of a pool's day this proxy holds on the recorder's ledger beyond its calls' reservations: calls that
    fit in it are admitted here, without a round trip (`res.tokens`/`res.cost` is what is left; it is in `live`,
    so a new recorder is told of it like any reservation). Valid only under the limits it was granted for."""
    res: Reservation
    limits: tuple[int | None, float | None]
    used_at: float
    timer: asyncio.TimerHandle | None = None


class SharedLedger:
    """The ledger on Redis, with `local` (a BudgetLedger) for failOpen. Its reading methods answer from what
    this gateway last read from Redis (records and realtime sessions use them); admission asks Redis."""

    shared = True

    def __init__(self, url: str, clock: Callable[[], float] = time.time, client: Any = None):
        self.url = url
        self.clock = clock
        self.local = BudgetLedger(clock)
        self.available = True  # until an operation says otherwise
        self.down_since: float | None = None
        self.down_reason = ""
        self.fail_open_used = 0  # admissions made on the local ledger while Redis was away
        self.fail_closed = 0  # budgeted calls refused because Redis was away
        self.dropped = 0  # settlements lost (the queue overflowed)
        self.queue: collections.deque[Settlement] = collections.deque()
        self._open: dict[tuple[str, str, str], Settlement] = {}  # (pool, day, epoch) -> its item not yet sent
        # Settlements are numbered, per ledger, in the order they are sent (see SETTLE): the mark's key is this
        # ledger's own, so a restarted gateway starts a new count.
        self._mark = f"clrk:budget:applied:{secrets.token_hex(8)}"
        self._number = 0
        self.seen: dict[tuple[str, str], tuple[int, float]] = {}  # (day, pool) -> (tokens, USD) last read
        self.on_change: Callable[[], None] | None = None  # told when availability or counters change
        self.backend: Backend = RecorderBackend(self) if url == RECORDER else RedisBackend(url, client)
        self.display = self.backend.display
        # Reservations held on the store and not yet settled, when the store can forget them (the recorder:
        # see RecorderBackend.hello); None on Redis, which does not.
        self.live: dict[int, Reservation] | None = {} if isinstance(self.backend, RecorderBackend) else None
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._probe: asyncio.Task | None = None
        self._day_bounds = (0.0, 0.0)
        self._today: tuple[dt.date, str, str] = (dt.date.min, "", "")
        self.leases: dict[str, Lease] = {}  # pool day key -> what this proxy holds of it (the recorder's ledger)
        self.leased = 0  # calls admitted from a lease

    def attach(self, sink) -> None:
        """The proxy's connection to its recorder (clrk.proxy.sink.RecordSink): the store, when it is `recorder`."""
        if isinstance(self.backend, RecorderBackend):
            self.backend.attach(sink)

    def today(self) -> tuple[dt.date, str, str]:
        """The UTC day, its ISO form and its keys' expiry (unix seconds, as text): two float compares a call."""
        now = self.clock()
        start, end = self._day_bounds
        if not start <= now < end:
            day = utc_day(now)
            self._day_bounds = (day_start(day), day_start(day) + 86400)
            self._today = (day, day.isoformat(), str(expire_at(day)))
            keep = {day.isoformat(), (day - dt.timedelta(days=1)).isoformat()}
            self.seen = {k: v for k, v in self.seen.items() if k[0] in keep}  # what was read of older days
        return self._today

    # ---------------------------------------------------------------- what the steps read

    @property
    def loaded(self) -> bool:
        return True  # Redis holds the day; the local ledger is needed only to fail open

    def load(self, day, totals, cost_totals=None) -> None:
        self.local.load(day, totals, cost_totals)

    def _seen(self, pool: str) -> tuple[int, float]:
        return self.seen.get((self.today()[1], pool), (0, 0.0))

    def used_today(self, pool: str) -> int:
        return max(self._seen(pool)[0], self.local.used_today(pool) if not self.available else 0)

    def used_cost_today(self, pool: str) -> float:
        return max(self._seen(pool)[1], self.local.used_cost_today(pool) if not self.available else 0.0)

    def _saw(self, day: str, pool: str, used: int, cost: float) -> tuple[int, float]:
        """Usage only grows within a day: keeps the largest figure read (replies may come out of order)."""
        u0, c0 = self.seen.get((day, pool), (0, 0.0))
        v = (max(u0, used), max(c0, cost))
        self.seen[(day, pool)] = v
        return v

    # ---------------------------------------------------------------- admission

    async def admit(self, pool: str, max_tokens: int | None, tokens: int, max_cost: float | None,
                    cost: float) -> Reservation | Refusal:
        """Reserves on Redis what `BudgetLedger.admit` would; raises StoreUnavailable when Redis cannot answer."""
        day, iso, expiry = self.today()
        tokens = max(tokens, 1)
        cost = max(cost, 1e-9) if max_cost is not None else 0.0
        key = pool_key(iso, pool)
        left = None  # what is left of a lease that does not cover this call: given back within its admission
        if (lease := self.leases.get(key)) is not None:
            res = self._from_lease(lease, tokens, cost, max_tokens, max_cost)
            if res is not None:
                return res
            left = self._end_lease(key, send=False)
        if not self.available:
            if left is not None:
                self._send(left, left.tokens, left.cost, 0, 0.0)
            raise StoreUnavailable(self.down_reason)
        args = ("" if max_tokens is None else str(max_tokens), str(tokens),
                "" if max_cost is None else repr(float(max_cost)), repr(cost), expiry)
        want = (tokens * LEASE_CALLS, cost * LEASE_CALLS) if self.backend.leases and LEASE_CALLS > 0 else None
        try:
            call = self.backend.admit(key, args, self._mark, want,
                                      (left.tokens, left.cost, left.epoch) if left is not None else None)
            # The recorder's requests carry their own deadline (RecordSink.request); a Redis call is bounded here.
            reply, epoch, granted = await (call if self.backend.timed else bounded(call, STORE_TIMEOUT))
        except Exception as e:  # timeout, connection refused or reset, a Redis error
            # The lease's remainder may or may not have been given back: kept held (errs toward spending less).
            self._down(e)
            raise StoreUnavailable(self.down_reason) from None
        if int(reply[0]) == 1:
            self._saw(iso, pool, int(reply[1]), float(reply[2]))
            res = Reservation(pool, tokens, day, cost, shared=True, epoch=epoch)
            if self.live is not None:
                self.live[id(res)] = res
                if granted is not None:
                    self._add_lease(key, Reservation(pool, granted[0], day, granted[1] if max_cost is not None else 0.0,
                                                     shared=True, epoch=epoch), (max_tokens, max_cost))
            return res
        used, cost_used = self._saw(iso, pool, int(reply[1]), float(reply[3]))
        return Refusal(used, int(reply[2]), cost_used, float(reply[4]))

    # ---------------------------------------------------------------- leases (the recorder's ledger)

    def take_leased(self, pool: str, max_tokens: int | None, tokens: int, max_cost: float | None,
                    cost: float) -> Reservation | None:
        """`admit`'s answer when this process's lease of the pool covers the call (no round trip, nothing to
        await), else None (then `admit`)."""
        lease = self.leases.get(pool_key(self.today()[1], pool)) if self.leases else None
        if lease is None:
            return None
        return self._from_lease(lease, max(tokens, 1), max(cost, 1e-9) if max_cost is not None else 0.0, max_tokens,
                                max_cost)

    def _from_lease(self, lease: Lease, tokens: int, cost: float, max_tokens: int | None,
                    max_cost: float | None) -> Reservation | None:
        """The call's reservation taken from `lease`, or None when the lease does not cover it (or was granted
        under other limits: a reload changed the budget)."""
        left = lease.res
        if lease.limits != (max_tokens, max_cost) or left.tokens < tokens or (max_cost is not None and left.cost < cost):
            return None
        left.tokens -= tokens
        left.cost -= cost
        lease.used_at = time.monotonic()
        res = Reservation(left.pool, tokens, left.day, cost, shared=True, epoch=left.epoch)
        if self.live is not None:
            self.live[id(res)] = res
        self.leased += 1
        return res

    def _add_lease(self, key: str, res: Reservation, limits: tuple[int | None, float | None]) -> None:
        """A lease granted with an admission. Calls admitted at once may each bring one: a second one joins the
        lease already held (same recorder, same limits), or is given back at once — never left held unused."""
        lease = self.leases.get(key)
        if lease is not None:
            if lease.res.epoch == res.epoch and lease.limits == limits:
                lease.res.tokens += res.tokens
                lease.res.cost += res.cost
                return
            self._send(res, res.tokens, res.cost, 0, 0.0)
            return
        if self.live is None:
            return
        self.live[id(res)] = res
        lease = self.leases[key] = Lease(res, limits, time.monotonic())
        lease.timer = asyncio.get_running_loop().call_later(LEASE_IDLE, self._lease_idle, key, lease)

    def _lease_idle(self, key: str, lease: Lease) -> None:
        if self.leases.get(key) is not lease:
            return
        idle = time.monotonic() - lease.used_at
        if idle >= LEASE_IDLE:
            self._end_lease(key)
        else:
            lease.timer = asyncio.get_running_loop().call_later(LEASE_IDLE - idle, self._lease_idle, key, lease)

    def _end_lease(self, key: str, send: bool = True) -> Reservation | None:
        """Ends the lease of `key`: what is left of it is given back — sent as a settlement that charges
        nothing, or (send=False) returned, for the caller to give back within its admission."""
        lease = self.leases.pop(key, None)
        if lease is None:
            return None
        if lease.timer is not None:
            lease.timer.cancel()
        if self.live is not None:
            self.live.pop(id(lease.res), None)
        left = lease.res
        left.tokens, left.cost = max(left.tokens, 0), max(left.cost, 0.0)
        if send:
            self._send(left, left.tokens, left.cost, 0, 0.0)
            return None
        return left

    def admit_local(self, pool: str, max_tokens: int | None, tokens: int, max_cost: float | None,
                    cost: float) -> Reservation | None:
        """failOpen: the local ledger, seeded with what was last read from Redis for the pool."""
        u, c = self._seen(pool)
        local = self.local
        local._roll()
        if u > local.used.get(pool, 0):
            local.used[pool] = u
        if c > local.used_cost.get(pool, 0.0):
            local.used_cost[pool] = c
        self.fail_open_used += 1
        return local.admit(pool, max_tokens, tokens, max_cost, cost)

    # ---------------------------------------------------------------- settlement (not awaited)

    def charge(self, res: Reservation, tokens: int, cost: float = 0.0) -> int:
        if not res.shared:
            self.local.charge(res, tokens, cost)
        self._send(res, 0, 0.0, max(tokens, 0), max(cost, 0.0))
        return self.used_today(res.pool)

    def settle(self, res: Reservation, actual: int | None, actual_cost: float | None = None) -> int:
        tokens = res.tokens if actual is None else min(max(actual, 0), MAX_TOKENS)
        cost = res.cost if actual_cost is None else max(actual_cost, 0.0)
        if self.live is not None:
            self.live.pop(id(res), None)
        if not res.shared:  # admitted while failing open: settled here, and its usage told to Redis
            self.local.settle(res, actual, actual_cost)
            self._send(res, 0, 0.0, tokens, cost)
        else:
            self._send(res, res.tokens, res.cost, tokens, cost)
        return self.used_today(res.pool)

    def _send(self, res: Reservation, r: int, rc: float, u: int, uc: float) -> None:
        today, day, expiry = self.today()
        if res.day != today:  # the new day is not charged for yesterday's calls (as in BudgetLedger)
            if not (r or rc):
                return
            u, uc = 0, 0.0
            day, expiry = res.day.isoformat(), str(expire_at(res.day))
        elif not (r or rc or u or uc):
            return
        pool = res.pool
        if u or uc:  # what this gateway now knows the pool has used at least
            s = self.seen.get((day, pool), (0, 0.0))
            self.seen[(day, pool)] = (min(s[0] + u, MAX_TOKENS), s[1] + uc)
        it = self._open.get((pool, day, res.epoch))
        if it is None:
            it = self._open[(pool, day, res.epoch)] = Settlement(pool, day, expiry, res.epoch)
            self.queue.append(it)
            if len(self.queue) > MAX_QUEUED:
                self._drop()
        it.r += r
        it.rc += rc
        it.u += u
        it.uc += uc
        it.calls += 1
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain_forever())
        if len(self.queue) >= BATCH:
            self._wake.set()
        elif self._timer is None:  # a batch per SEND_INTERVAL: one round trip for every settlement made meanwhile
            self._timer = asyncio.get_running_loop().call_later(SEND_INTERVAL, self._send_now)

    def _drop(self) -> None:
        """The queue is full (MAX_QUEUED pool days waiting): its oldest item is lost, with every call it sums."""
        it = self.queue.popleft()
        if it.n == 0 and self._open.get((it.pool, it.day, it.epoch)) is it:
            del self._open[(it.pool, it.day, it.epoch)]
        before = self.dropped
        self.dropped += it.calls
        if before == 0 or any(before < m <= self.dropped for m in (10, 100)) or before // 1000 != self.dropped // 1000:
            log.error("clrk: budget store %s: %d settlement(s) lost so far (the queue for Redis is full)",
                      self.display, self.dropped)
        self._changed()

    def _send_now(self) -> None:
        self._timer = None
        self._wake.set()

    async def _drain_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.available:
                failed = await self._drain()
                if failed is not None:
                    self._down(failed)

    async def _drain(self) -> BaseException | None:
        """Sends what is queued, in order, a pipelined batch per round trip; what made it fail (the batch back
        at the head of the queue), or None once the queue is empty."""
        queue, opened = self.queue, self._open
        while queue:
            batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            # Numbered in queue order as they are taken: items sent before (a failed batch, back at the head)
            # keep their numbers, so the batch goes out in increasing numbers and a prefix of it applied
            # before a failure is skipped when it comes again. Taken, an item is closed: nothing more is
            # added to what may be in flight.
            for it in batch:
                if it.n == 0:
                    self._number += 1
                    it.n = self._number
                    opened.pop((it.pool, it.day, it.epoch), None)
            try:
                replies = await bounded(self._send_batch(batch), STORE_TIMEOUT * 4)
            except Exception as e:
                queue.extendleft(reversed(batch))
                return e
            for it, reply in zip(batch, replies, strict=True):
                if reply is None:  # the recorder refused it as malformed (it never will take it)
                    continue
                self._saw(it.day, it.pool, int(reply[0]), float(reply[1]))
        return None

    async def _send_batch(self, batch: list[Settlement]) -> list:
        return await self.backend.settle(batch, self._mark)

    # ---------------------------------------------------------------- availability

    def _down(self, e: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        self.down_since = self.clock()
        self.down_reason = printable(f"{type(e).__name__}: {e}"[:200]) if str(e) else type(e).__name__
        log.error("clrk: budget store %s unavailable (%s); budgeted calls follow spec.budgetStore.onUnavailable "
                  "until it is back", self.display, self.down_reason)
        self._changed()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._find_again())

    async def _find_again(self) -> None:
        """Pings Redis until it answers, then sends what was queued meanwhile; only then is it used again."""
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            try:
                await bounded(self.backend.ping(), STORE_TIMEOUT)
            except Exception:
                continue
            if await self._drain() is None:
                break
        self.available = True
        self.down_since = None
        log.info("clrk: budget store %s is back: budgets are shared again", self.display)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            with contextlib.suppress(Exception):
                self.on_change()

    def queued(self) -> int:
        """Settlements waiting to be sent (calls, however they are summed into items)."""
        return sum(it.calls for it in self.queue)

    def state(self, fail_open: dict[str, bool]) -> dict:
        """What `clrk status` shows: the store, whether it is in use, what each gateway does meanwhile."""
        out: dict = {"url": self.display, "available": self.available, "queued": self.queued(),
                     "dropped": self.dropped, "fail_open_admissions": self.fail_open_used,
                     "fail_closed_refusals": self.fail_closed}
        if self.backend.leases:
            out["leased_admissions"] = self.leased
        if not self.available:
            out["down_since"] = self.down_since
            out["reason"] = self.down_reason
            out["gateways"] = {name: ("failOpen" if fo else "failClosed") for name, fo in sorted(fail_open.items())}
        return out

    async def close(self) -> None:
        """At a graceful stop: leases are given back, what is queued is sent if the store answers (briefly), then
        the connections close."""
        for key in list(self.leases):
            self._end_lease(key)
        if self.available and self.queue:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._drain()
        if self.queue:
            log.error("clrk: budget store %s: %d settlement(s) not sent at stop", self.display, self.queued())
        for t in (self._worker, self._probe):
            if t is not None:
                t.cancel()
        with contextlib.suppress(Exception):
            await self.backend.close()
