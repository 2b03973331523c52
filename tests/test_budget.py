"""The budget ledger: reservations at admission, settlement on completion, UTC days, the overshoot bound."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from clrk.budget import BudgetLedger, day_start, utc_day

T0 = day_start(dt.date(2026, 11, 30)) + 3600


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_admit_what_fits_then_refuse():
    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0), {"p": 90})
    assert led.admit("p", 100, 11) is None  # 90 used + 11 > 100: refused, not clamped to the 10 left
    r = led.admit("p", 100, 10)
    assert r is not None and led.left("p", 100) == 0
    assert led.admit("p", 100, 1) is None
    assert led.admit("p", 100, 0) is None  # a reservation is never free: a spent pool admits nothing
    assert led.settle(r, 4) == 94
    assert led.admit("p", 100, 6) is not None  # the reservation gave way to the real usage


def test_a_greedy_reservation_is_refused_and_leaves_the_pool_to_others():
    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0), {})
    assert led.admit("p", 10_000, 50_000) is None
    assert led.admit("p", 10_000, 10_001) is None
    assert led.left("p", 10_000) == 10_000
    assert led.admit("p", 10_000, 1_100) is not None


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
       requests=st.lists(st.tuples(st.integers(1, 500), st.integers(0, 1500)), min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_concurrent_admissions_overshoot_only_by_what_requests_used_beyond_their_reservations(used, max_tokens, requests):
    """All requests arrive before any settles (the worst case); each consumes `actual` after reserving `reserve`."""
    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0), {"p": used})
    admitted = [(res, actual) for reserve, actual in requests if (res := led.admit("p", max_tokens, reserve))]
    assert sum(r.tokens for r, _ in admitted) <= max(0, max_tokens - used)
    final = used
    for res, actual in admitted:
        final = led.settle(res, actual)
    excess = sum(max(0, a - r.tokens) for r, a in admitted)
    assert final <= max(used, max_tokens) + excess


class LedgerInterleavings(RuleBasedStateMachine):
    """Admissions and settlements of one pool in any order, against a model of what must hold after each step:
    a request is admitted exactly when its reservation fits in what is left, and used + reserved never passes
    max(maximum, usage at load) + Σ max(0, usage − reservation) over the settled requests (clrk/budget.py)."""

    MAX = 5_000

    @initialize(used=st.integers(0, 6_000))
    def load(self, used):
        self.led = BudgetLedger(Clock(T0))
        self.led.load(utc_day(T0), {"p": used})
        self.base = max(self.MAX, used)
        self.used, self.in_flight, self.excess = used, [], 0

    @rule(tokens=st.integers(1, 3_000), actual=st.one_of(st.none(), st.integers(0, 6_000)))
    def admit(self, tokens, actual):
        fits = self.used + sum(r.tokens for r, _ in self.in_flight) + tokens <= self.MAX
        res = self.led.admit("p", self.MAX, tokens)
        assert (res is not None) == fits
        if res is not None:
            self.in_flight.append((res, actual))

    @precondition(lambda self: self.in_flight)
    @rule(pick=st.integers(0, 10_000))
    def settle(self, pick):
        res, actual = self.in_flight.pop(pick % len(self.in_flight))
        charged = res.tokens if actual is None else actual
        self.used += charged
        self.excess += max(0, charged - res.tokens)
        assert self.led.settle(res, actual) == self.used

    @invariant()
    def bounded(self):
        reserved = sum(r.tokens for r, _ in self.in_flight)
        assert self.led.reserved.get("p", 0) == reserved
        assert self.used + reserved <= self.base + self.excess


TestLedgerInterleavings = LedgerInterleavings.TestCase
TestLedgerInterleavings.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
