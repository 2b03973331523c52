"""Token budgets: per pool and UTC day, reserved at admission and settled on completion.

A pool is one AIProviderRoute rule (scope Route) or one rule and agent (scope Agent), named by the route and
what the rule matches (`ProviderRule.pool`), so reordering rules or changing a budget keeps the day's usage.
A request holds a reservation, its estimate (see `clrk.proxy.steps.routing.estimate`: max output tokens × choices, or
`reserveTokens` × choices, plus its body size / 4, plus `serverContextTokens` when the provider adds input it
holds), from admission until the provider's usage replaces it (the reservation itself is charged when the
usage is not visible). A request is admitted only if its whole reservation fits in what the pool has left
(max − used − reserved), so no request can hold more than is left, and one asking for more than that is
refused rather than clamped: a clamped reservation would still hand it the whole remainder, locking out
every other agent of the pool while it runs, and would no longer cover what it may spend.

Bound: admission keeps used + reserved ≤ max, and settling a reservation of r tokens by a usage of u changes
used + reserved by u − r. So at every moment, for any interleaving of admissions and settlements,

    used + reserved ≤ max(maxTokensPerDay, usage already charged when the day was loaded)
                      + Σ over settled requests of max(0, u − r)

and the day's usage passes the maximum by at most what requests consumed beyond their own reservations —
never by a reservation, however many requests run at once. That excess can only come from estimate errors:
input tokenized above body bytes / 4 (non-Latin text, images, audio or files the provider fetches or holds by
reference, system prompts and tool lists it adds); output of a request naming no max (past `reserveTokens`
per choice); held context past `serverContextTokens`. Output beyond the max a request names is refused by the
provider, so it is not part of it. (For a fixed maxTokensPerDay; after a reload lowers it, nothing is admitted
until usage is back under the new one. Reservations made the day before still count until they settle, but
their usage is not charged to the new day.)

Dollar limits (`maxCostPerDay`) keep a second account per pool with the same mechanics: a call reserves its
estimate priced at the highest per-token price of the model it may be served by (its output price, in
practice), is admitted only if that fits in the dollars left, and settles to its cost (clrk.cost) — so the
same bound holds in dollars: spent ≤ maxCostPerDay + Σ max(0, cost − reserved cost). A call is admitted only
if it fits under every limit the pool has.

The ledger lives in the proxy (admission is on the request path, a dict lookup); it is rebuilt at start
from the day's records in the store, so a restart keeps the day's usage. Every charge reaches the store:
a record that cannot be stored whole is stored without what does not fit, its budget fields kept
(`clrk.recorder.expand.salvage`, `clrk.recorder.store.storable`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


def utc_day(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date()


def day_start(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


MAX_TOKENS = 2**63 - 1  # what a record stores (BIGINT): a pool's usage is kept within it (it is spent either way)


@dataclass(slots=True)
class Reservation:
    pool: str
    tokens: int
    day: dt.date
    cost: float = 0.0  # USD held in the pool's dollar account (0 without a maxCostPerDay)
    shared: bool = False  # held on the shared store (clrk.proxy.budget_store), not in this process's ledger
    epoch: str = ""  # with the recorder as the store: whose ledger holds it (see clrk.recorder.ledger)


class BudgetLedger:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.day = utc_day(clock())
        self._day_bounds = (day_start(self.day), day_start(self.day + dt.timedelta(days=1)))
        self.used: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.used_cost: dict[str, float] = {}  # USD, pools with a maxCostPerDay
        self.reserved_cost: dict[str, float] = {}
        self.loaded = False

    def _roll(self, now: float | None = None) -> dt.date:
        if now is None:
            now = self.clock()
        start, end = self._day_bounds
        if start <= now < end:  # on every admission and settlement: two float compares, no datetime
            return self.day
        today = utc_day(now)
        self._day_bounds = (day_start(today), day_start(today + dt.timedelta(days=1)))
        if today != self.day:
            self.day = today
            self.used = {}
            self.used_cost = {}
        return today

    def load(self, day: dt.date, totals: Mapping[str, int], cost_totals: Mapping[str, float] | None = None) -> None:
        """The day's settled usage per pool (tokens, and USD), from the store."""
        if day == self._roll():
            self.used = {pool: min(total, MAX_TOKENS) for pool, total in totals.items()}
            self.used_cost = {pool: float(total) for pool, total in (cost_totals or {}).items() if total}
        self.loaded = True

    def used_cost_today(self, pool: str) -> float:
        self._roll()
        return self.used_cost.get(pool, 0.0)

    def left_cost(self, pool: str, max_cost: float) -> float:
        """The dollars the pool can still reserve today (negative once spending passed the maximum)."""
        self._roll()
        return max_cost - self.used_cost.get(pool, 0.0) - self.reserved_cost.get(pool, 0.0)

    def used_today(self, pool: str) -> int:
        self._roll()
        return self.used.get(pool, 0)

    def left(self, pool: str, max_tokens: int) -> int:
        """What the pool can still reserve today (negative once usage passed the maximum)."""
        self._roll()
        return max_tokens - self.used.get(pool, 0) - self.reserved.get(pool, 0)

    def admit(self, pool: str, max_tokens: int | None, tokens: int, max_cost: float | None = None,
              cost: float = 0.0) -> Reservation | None:
        """Reserves `tokens` (at least 1) and, with a dollar limit, `cost` USD (more than 0) if they fit in what
        the pool has left today under each limit it has; None if they do not."""
        day = self._roll()
        tokens = max(tokens, 1)  # a free reservation would be admitted into a spent pool
        if max_tokens is not None and self.used.get(pool, 0) + self.reserved.get(pool, 0) + tokens > max_tokens:
            return None
        if max_cost is not None:
            cost = max(cost, 1e-9)  # likewise in dollars
            if self.used_cost.get(pool, 0.0) + self.reserved_cost.get(pool, 0.0) + cost > max_cost:
                return None
            self.reserved_cost[pool] = self.reserved_cost.get(pool, 0.0) + cost
        else:
            cost = 0.0
        self.reserved[pool] = self.reserved.get(pool, 0) + tokens
        return Reservation(pool, tokens, day, cost)

    def charge(self, res: Reservation, tokens: int, cost: float = 0.0) -> int:
        """Charges usage reported while the reservation is still held (a WebSocket session reports usage per
        response, and keeps its reservation until it ends): tokens, and their dollars; returns the pool's usage
        today."""
        today = self._roll()
        if res.day == today:
            if tokens > 0:
                self.used[res.pool] = min(self.used.get(res.pool, 0) + tokens, MAX_TOKENS)
            if cost > 0:
                self.used_cost[res.pool] = self.used_cost.get(res.pool, 0.0) + cost
        return self.used.get(res.pool, 0)

    def settle(self, res: Reservation, actual: int | None, actual_cost: float | None = None) -> int:
        """Replaces the reservation by the real usage (or charges the reservation when usage is unknown), and
        its dollars by the real cost (likewise); returns the pool's usage today."""
        pool = res.pool
        reserved = self.reserved
        left = reserved.get(pool, 0) - res.tokens
        if left > 0:
            reserved[pool] = left
        else:
            reserved.pop(pool, None)
        if res.cost:
            left_cost = self.reserved_cost.get(pool, 0.0) - res.cost
            if left_cost > 1e-12:  # float sums of reservations: what is left of nothing is nothing
                self.reserved_cost[pool] = left_cost
            else:
                self.reserved_cost.pop(pool, None)
        now = self.clock()
        start, end = self._day_bounds
        today = self.day if start <= now < end else self._roll(now)  # `_roll`'s own test first: no call within the day
        used = self.used
        if res.day == today:
            total = used.get(pool, 0) + (res.tokens if actual is None else actual)
            used[pool] = total = total if total < MAX_TOKENS else MAX_TOKENS
            charge = res.cost if actual_cost is None else actual_cost
            if charge:  # kept for every pool, so a dollar limit added later today knows what was spent
                self.used_cost[pool] = self.used_cost.get(pool, 0.0) + charge
            return total
        return used.get(pool, 0)
