"""The budget ledger the recorder holds when gateways run with `clrk_budget_store=recorder`: one set of pools
(clrk.pools: the Redis scripts' ADMIT and SETTLE, in memory) shared by every proxy process connected to this
recorder, so N worker processes on a host keep one pool's bound as one process does.

Requests (clrk.wire messages from a proxy's RecordSink; clrk.proxy.budget_store.RecorderBackend):
  {"t": "budget_adopt", "ledger": L, "tag": T, "held": [[tag, key, tokens, usd, expire-at], ...]}  (no reply)
  {"t": "budget_admit", "ledger": L, "key": K, "args": [...ADMIT], "lease": [tokens, USD]?,
   "release": [tokens, USD, tag]?} -> {"reply": [...], "epoch": T, "lease": [tokens, USD]?}  (LEASE_ROOM)
  {"t": "budget_settle", "ledger": L, "items": [[K, [...SETTLE], tag, calls?], ...]} -> {"replies": [[u, uc] | None]}
    (SETTLE's amounts and number as strings or numbers; `calls`: how many settlements the item sums)
  {"t": "budget_ping", "ledger": L} -> {}
Answered at once, on the event loop, between any two awaits of a flush (the pools are a few dicts).

The day's usage before this recorder started is read from the store (`seed`) before any admission or
settlement is answered: until the store answers, the ledger is unavailable to the proxies (their
`onUnavailable` applies), as Redis being away would be.

Holdings: per proxy ledger (L, one per proxy process), what its admissions reserved and its settlements
have not released yet, per pool day. When every connection of a ledger has ended and its process is gone
(checked every GRACE seconds; a proxy that reconnects keeps them), they are released. A reservation carries
the tag of the ledger it is held by: this recorder's epoch, or a tag a proxy adopted its reservations under
(`budget_adopt`, sent on each connection: what it still holds from before, which a new recorder adds to its
pools). A settlement with a tag this recorder does not hold releases nothing, so a restart never frees
what others hold here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from clrk.escape import printable
from clrk.pools import PoolError, Pools, check_admit, check_key, check_settle, day_expiry, key_day, pool_key

log = logging.getLogger("clrk.recorder")

GRACE = 2.0  # seconds after a proxy's last connection ends before its process is looked at
ADOPT_WINDOW = 0.4  # after the recorder starts listening, seconds for proxies to (re)connect and say what they hold
SEED_WAIT = 0.45  # an early admission waits this long for both (under the proxy's 0.5 s)
MAX_ITEMS = 10_000  # settlements in one request
# Leases: an admission may ask for one (`"lease": [tokens, USD]`). Besides the call's own reservation the proxy
# then holds more of the pool, to admit its next calls on its own (clrk.proxy.budget_store: no round trip per
# call). Granted only while the pool is far from its limit — at least LEASE_ROOM times the call left after it —
# and at most 1/LEASE_SHARE of what is left; so once a pool nears its end every call is admitted here, one by
# one. A lease is a reservation like any other (held, released when its proxy dies, declared again after a
# restart), so the bound is unchanged. An admission may also give back what is left of a lease first
# (`"release": [tokens, USD, tag]`), in the same step, so a call its lease no longer covers is judged on the
# pool without that remainder.
LEASE_ROOM = 64
LEASE_SHARE = 16
MAX_LEASE_TOKENS = 2**53  # the most a lease may ask for (a larger ask is ignored, not trusted)
MAX_LEASE_USD = 1e12


class Unavailable(Exception):
    """The ledger cannot answer yet (the day's usage is not read from the store)."""


@dataclass
class Holder:
    """One proxy process's ledger."""
    pid: int | None = None
    conns: set = field(default_factory=set)
    tags: set[str] = field(default_factory=set)  # adoption tags valid here (besides the epoch)
    holds: dict[str, list] = field(default_factory=dict)  # key -> [tokens, USD] reserved, not released
    reaper: asyncio.Task | None = None


def _utc_day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()


def _day_start(day: str) -> float:
    return dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


class RecorderLedger:
    def __init__(self, totals: Callable[[float], Awaitable[tuple[dict, dict]]],
                 clock: Callable[[], float] = time.time):
        self.clock = clock
        self.pools = Pools(clock)
        self.epoch = secrets.token_hex(8)
        self.start_day = _utc_day(clock())  # days before it are not answered (their usage is not read)
        self._totals = totals
        self.seeded = asyncio.Event()
        self.seed_error = "the recorder is reading today's usage from the store"
        self._seeding: asyncio.Task | None = None
        self.holders: dict[str, Holder] = {}
        self.by_conn: dict[object, set[str]] = {}
        self.admissions = self.refusals = self.settlements = self.released = 0
        self.leases = 0  # admissions that came with a lease
        self.opened = time.monotonic()  # when the recorder started listening (set by it)
        self._ready = False
        self._last_sweep = clock()

    # ---------------------------------------------------------------- the day's usage from the store

    def seed_soon(self) -> None:
        if self._seeding is None and not self.seeded.is_set():
            self._seeding = asyncio.get_running_loop().create_task(self._seed())

    async def _seed(self) -> None:
        delay, logged = 0.2, False
        day = self.start_day
        while True:
            try:
                totals, costs = await self._totals(_day_start(day))
                break
            except Exception as e:  # ClickHouse away: retried; the proxies meanwhile do what onUnavailable says
                self.seed_error = f"the store cannot be read: {printable(str(e))[:200]}"
                if not logged:
                    log.error("budget ledger: cannot read today's usage from the store (%s); budgeted calls are "
                              "refused or admitted locally (onUnavailable) until it can be read", self.seed_error)
                    logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        expiry = day_expiry(day)
        for pool in set(totals) | set(costs):
            self.pools.charge(pool_key(day, pool), int(totals.get(pool) or 0), float(costs.get(pool) or 0.0), expiry)
        self.seeded.set()
        log.info("budget ledger %s: today's usage read for %d pool(s); answering admissions", self.epoch,
                 len(set(totals) | set(costs)))

    async def ready(self) -> None:
        """Returns once the day's usage is read and proxies had ADOPT_WINDOW to tell what they hold (after a
        restart, an admission answered earlier could take what another proxy holds and has not said yet);
        raises Unavailable if that is not so within SEED_WAIT."""
        if self._ready:
            return
        self.seed_soon()
        deadline = time.monotonic() + SEED_WAIT
        while True:
            now = time.monotonic()
            if self.seeded.is_set() and now >= self.opened + ADOPT_WINDOW:
                self._ready = True
                return
            if now >= deadline:
                raise Unavailable(self.seed_error if not self.seeded.is_set()
                                  else "the recorder is gathering what proxies hold")
            await asyncio.sleep(0.01)

    # ---------------------------------------------------------------- requests

    def _holder(self, ledger: object, conn: object, pid: int | None) -> Holder:
        if not isinstance(ledger, str) or not 0 < len(ledger) <= 200:
            raise PoolError("no ledger id")
        h = self.holders.get(ledger)
        if h is None:
            h = self.holders[ledger] = Holder()
        if conn not in h.conns:
            h.conns.add(conn)
            self.by_conn.setdefault(conn, set()).add(ledger)
            if isinstance(pid, int):
                h.pid = pid
            if h.reaper is not None:
                h.reaper.cancel()
                h.reaper = None
        return h

    def adopt(self, msg: dict, conn: object, pid: int | None) -> None:
        """A proxy's connection starts: it tells what it still holds, under the tags it was given."""
        h = self._holder(msg.get("ledger"), conn, pid)
        tag, held = msg.get("tag"), msg.get("held") or []
        if not isinstance(tag, str) or not 0 < len(tag) <= 64 or not isinstance(held, list) or len(held) > 1_000_000:
            raise PoolError("budget_adopt: malformed")
        added = 0
        for item in held:
            if not (isinstance(item, list) and len(item) == 5):
                raise PoolError("budget_adopt: malformed holding")
            old, key, tokens, usd, at = item
            key = check_key(key)
            if not (isinstance(tokens, int) and 0 <= tokens < 2**63 and isinstance(usd, (int, float))
                    and 0 <= usd < 1e300 and isinstance(at, str) and at.isdigit()):
                raise PoolError("budget_adopt: malformed holding")
            if old == self.epoch or old in h.tags:
                continue  # held here already
            self._hold(h, key, tokens, float(usd))
            if tokens:
                self.pools.hincrby(key, "r", str(tokens))
            if usd > 0:
                self.pools.hincrbyfloat(key, "rc", repr(float(usd)))
            self.pools.expireat(key, at)
            added += 1
        h.tags.add(tag)
        if added:
            log.info("budget ledger %s: a proxy (pid %s) holds %d reservation(s) from before; they are held here",
                     self.epoch, h.pid, added)
        self.seed_soon()

    def admit(self, msg: dict, conn: object, pid: int | None) -> dict:
        h = self._holder(msg.get("ledger"), conn, pid)
        key, args = check_key(msg.get("key")), check_admit(msg.get("args"))
        if key_day(key) < self.start_day:
            raise Unavailable("a day before this recorder started")
        self._sweep()
        self._release(h, key, msg.get("release"))
        granted = self._lease(key, args, msg.get("lease"))
        if granted is not None:
            reply = self.pools.admit(key, (args[0], str(int(args[1]) + granted[0]), args[2],
                                           repr(float(args[3]) + granted[1]), args[4]))
            if reply[0] != 1:  # the lease did not fit after all: the call alone
                granted = None
        if granted is None:
            reply = self.pools.admit(key, args)
        if reply[0] == 1:
            self.admissions += 1
            gt, gc = granted or (0, 0.0)
            self._hold(h, key, int(args[1]) + gt, float(args[3]) + gc if args[2] != "" else 0.0)
        else:
            self.refusals += 1
        out = {"reply": reply, "epoch": self.epoch}
        if granted is not None and reply[0] == 1:
            self.leases += 1
            out["lease"] = [granted[0], granted[1]]
        return out

    def _release(self, h: Holder, key: str, what: object) -> None:
        """What is left of a lease, given back by its proxy before its next admission (ignored when malformed,
        or held under a tag this recorder does not hold: as a settlement of it would be)."""
        if what is None:
            return
        if not (isinstance(what, list) and len(what) == 3 and isinstance(what[0], int) and not isinstance(what[0], bool)
                and isinstance(what[1], (int, float)) and not isinstance(what[1], bool) and isinstance(what[2], str)):
            log.warning("budget ledger: a malformed lease release from pid %s is ignored", h.pid)
            return
        tokens, usd, tag = what[0], float(what[1]), what[2]
        held = h.holds.get(key, [0, 0.0])
        if not (tag == self.epoch or tag in h.tags) or not (0 <= tokens <= held[0] and 0.0 <= usd <= held[1] + 1e-9):
            return  # not held here (a recorder before this one), or more than this proxy holds: nothing to release
        self.pools.release(key, str(tokens), repr(usd) if usd > 0 else "0")
        self._hold(h, key, -tokens, -usd)

    def _lease(self, key: str, args: tuple[str, ...], want: object) -> tuple[int, float] | None:
        """What of `want` (tokens, USD) the proxy may hold besides its call (`args`), or None: nothing asked,
        nothing to spare (LEASE_ROOM), or a malformed ask (ignored: the call is admitted as asked)."""
        if not (isinstance(want, list) and len(want) == 2 and isinstance(want[0], int) and not isinstance(want[0], bool)
                and isinstance(want[1], (int, float)) and not isinstance(want[1], bool)):
            return None
        want_t, want_c = want[0], float(want[1])
        if not (0 < want_t <= MAX_LEASE_TOKENS and 0.0 <= want_c <= MAX_LEASE_USD):
            return None
        u, r, uc, rc = (float(x or 0) for x in self.pools.hmget(key, "u", "r", "uc", "rc"))
        call_t, call_c = int(args[1]), float(args[3])
        grant_t = want_t
        if args[0] != "":
            room = float(args[0]) - u - r - call_t
            if room < LEASE_ROOM * call_t:
                return None
            grant_t = min(want_t, int(room // LEASE_SHARE))
        grant_c = 0.0
        if args[2] != "":
            room_c = float(args[2]) - uc - rc - call_c
            if room_c < LEASE_ROOM * max(call_c, 1e-9):
                return None
            grant_c = min(want_c, room_c / LEASE_SHARE)
        return (grant_t, grant_c) if grant_t > 0 else None

    def settle(self, msg: dict, conn: object, pid: int | None) -> dict:
        ledger = msg.get("ledger")
        h = self._holder(ledger, conn, pid)
        items = msg.get("items")
        if not isinstance(items, list) or len(items) > MAX_ITEMS:
            raise PoolError("budget_settle: malformed")
        replies: list = []
        for item in items:
            try:
                # [key, SETTLE's arguments, tag] or, from a proxy that sums a batch's settlements of one pool
                # day, [key, args, tag, calls] (how many it sums: counted as that many settlements)
                if not (isinstance(item, list) and len(item) in (3, 4) and isinstance(item[2], str)
                        and (len(item) == 3 or (type(item[3]) is int and 0 < item[3] < 2**63))):
                    raise PoolError("malformed settlement")
                key, args, tag = check_key(item[0]), check_settle(item[1]), item[2]
            except PoolError:
                replies.append(None)
                log.warning("budget ledger: a malformed settlement from pid %s is ignored", h.pid)
                continue
            held = tag == self.epoch or tag in h.tags
            if not held:  # reserved on a ledger gone since (a recorder before this one): usage only
                args = ("0", "0", *args[2:])
            mark = self.pools.get_mark(ledger)
            applied = float(args[5]) > (float(mark) if mark is not None else 0.0)
            replies.append(self.pools.settle(key, ledger, args))
            if applied:
                self.settlements += item[3] if len(item) == 4 else 1
                if held:
                    self._hold(h, key, -int(args[0]), -float(args[1]))
        return {"replies": replies}

    def _hold(self, h: Holder, key: str, tokens: int, usd: float) -> None:
        v = h.holds.get(key)
        if v is None:
            v = h.holds[key] = [0, 0.0]
        v[0] += tokens
        v[1] += usd
        if v[0] <= 0 and v[1] <= 1e-12:
            del h.holds[key]

    # ---------------------------------------------------------------- proxies that end

    def disconnected(self, conn: object) -> None:
        for ledger in self.by_conn.pop(conn, ()):
            h = self.holders.get(ledger)
            if h is None:
                continue
            h.conns.discard(conn)
            if not h.conns and h.reaper is None:
                h.reaper = asyncio.get_running_loop().create_task(self._reap(ledger, h))

    async def _reap(self, ledger: str, h: Holder) -> None:
        """Releases what a proxy held once it is gone: no connection, and no process (checked every GRACE)."""
        while True:
            await asyncio.sleep(GRACE)
            if h.conns or self.holders.get(ledger) is not h:
                return
            if h.pid is not None and pid_alive(h.pid):
                continue
            break
        del self.holders[ledger]
        n = 0
        for key, (tokens, usd) in h.holds.items():
            self.pools.release(key, str(tokens) if tokens > 0 else "0", repr(float(usd)) if usd > 1e-12 else "0")
            n += 1
        self.released += n
        if n:
            log.info("budget ledger %s: proxy %s is gone; what it held in %d pool day(s) is released", self.epoch,
                     h.pid, n)

    def _sweep(self) -> None:
        now = self.clock()
        if now - self._last_sweep > 60:
            self._last_sweep = now
            self.pools.sweep()

    def state(self) -> dict:
        """What `clrk status` shows of it."""
        return {"epoch": self.epoch, "ready": self.seeded.is_set(), "reason": None if self.seeded.is_set() else
                self.seed_error, "pools": len(self.pools.hashes), "proxies": len(self.holders),
                "admissions": self.admissions, "refusals": self.refusals, "settlements": self.settlements,
                "released": self.released, "leases": self.leases}
