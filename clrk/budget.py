"""Token budgets: per pool and UTC day, reserved at admission and settled on completion.

A pool is one AIProviderRoute rule (scope Route) or one rule and agent (scope Agent), named by the route and
what the rule matches (`ProviderRule.pool`), so reordering rules or changing a budget keeps the day's usage.
A request is admitted while the pool's used + reserved tokens are below the day's maximum; it then holds a
reservation (its max output tokens, or the budget's `reserveTokens`, plus its body size / 4 as the input
estimate) until the provider's usage replaces it (the reservation itself is charged when the usage is not
visible).

Bound: concurrent requests can overshoot the maximum by at most one reservation (the last one admitted
below it) plus what admitted requests consume beyond their reservations — and output beyond the max tokens
a request names is refused by the provider, so that part is only the input estimate's error.

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


class BudgetLedger:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.day = utc_day(clock())
        self._day_bounds = (day_start(self.day), day_start(self.day + dt.timedelta(days=1)))
        self.used: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.loaded = False

    def _roll(self) -> dt.date:
        now = self.clock()
        start, end = self._day_bounds
        if start <= now < end:  # on every admission and settlement: two float compares, no datetime
            return self.day
        today = utc_day(now)
        self._day_bounds = (day_start(today), day_start(today + dt.timedelta(days=1)))
        if today != self.day:
            self.day = today
            self.used = {}
        return today

    def load(self, day: dt.date, totals: Mapping[str, int]) -> None:
        """The day's settled usage per pool, from the store."""
        if day == self._roll():
            self.used = {pool: min(total, MAX_TOKENS) for pool, total in totals.items()}
        self.loaded = True

    def used_today(self, pool: str) -> int:
        self._roll()
        return self.used.get(pool, 0)

    def admit(self, pool: str, max_tokens: int, tokens: int) -> Reservation | None:
        """Reserves `tokens` if the pool has budget left; None when it is spent."""
        day = self._roll()
        if self.used.get(pool, 0) + self.reserved.get(pool, 0) >= max_tokens:
            return None
        self.reserved[pool] = self.reserved.get(pool, 0) + tokens
        return Reservation(pool, tokens, day)

    def settle(self, res: Reservation, actual: int | None) -> int:
        """Replaces the reservation by the real usage (or charges the reservation when usage is unknown);
        returns the pool's usage today."""
        left = self.reserved.get(res.pool, 0) - res.tokens
        if left > 0:
            self.reserved[res.pool] = left
        else:
            self.reserved.pop(res.pool, None)
        today = self._roll()
        if res.day == today:
            self.used[res.pool] = min(self.used.get(res.pool, 0) + (res.tokens if actual is None else actual), MAX_TOKENS)
        return self.used.get(res.pool, 0)
