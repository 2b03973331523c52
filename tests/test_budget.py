"""The budget ledger: reservations at admission, settlement on completion, UTC days, the overshoot bound."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from clrk.budget import BudgetLedger, day_start, utc_day

T0 = day_start(dt.date(2026, 11, 30)) + 3600


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_admit_until_spent_then_refuse():
    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0), {"p": 90})
    r = led.admit("p", 100, 30)
    assert r is not None
    assert led.admit("p", 100, 30) is None  # 90 used + 30 reserved >= 100
    assert led.settle(r, 4) == 94
    assert led.admit("p", 100, 30) is not None  # the reservation gave way to the real usage


def test_unknown_usage_charges_the_reservation():
    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0), {})
    r = led.admit("p", 100, 40)
    assert led.settle(r, None) == 40


def test_a_new_utc_day_starts_from_zero():
    clock = Clock(T0)
    led = BudgetLedger(clock)
    led.load(utc_day(T0), {"p": 100})
    assert led.admit("p", 100, 1) is None
    clock.t += 86400
    assert led.admit("p", 100, 1) is not None and led.used_today("p") == 0


def test_load_of_another_day_is_ignored():
    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0 - 86400), {"p": 1000})
    assert led.loaded and led.used_today("p") == 0


@given(used=st.integers(0, 10_000), max_tokens=st.integers(1, 10_000),
       requests=st.lists(st.tuples(st.integers(1, 500), st.integers(0, 500)), min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_concurrent_admissions_overshoot_at_most_one_reservation_plus_excess(used, max_tokens, requests):
    """All requests arrive before any settles (the worst case); each consumes `actual` after reserving `reserve`."""
    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0), {"p": used})
    admitted = [(res, actual) for reserve, actual in requests if (res := led.admit("p", max_tokens, reserve))]
    for res, actual in admitted:
        final = led.settle(res, actual)
    if not admitted:
        assert used >= max_tokens
        return
    largest = max(r.tokens for r, _ in admitted)
    excess = sum(max(0, a - r.tokens) for r, a in admitted)
    assert final <= max(used, max_tokens) + largest + excess
    # and admission stopped once reservations covered what was left
    assert sum(r.tokens for r, _ in admitted[:-1]) < max(0, max_tokens - used) or len(admitted) == 1
