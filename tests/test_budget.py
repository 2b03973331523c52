"""The budget ledger (reservations at admission, settlement on completion, UTC days, the overshoot bound), the
estimate a request is admitted by, and the TokenBudget settings."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from clrk.policy import PolicyError, load_policy
from clrk.policy.compiled import BudgetConfig
from clrk.providers import DEFAULT_HOSTS, parser_for
from clrk.proxy.budget import BudgetLedger, day_start, utc_day
from clrk.proxy.steps.routing import estimate

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


# --------------------------------------------------------------------------- what a request is estimated at

BUDGET = BudgetConfig(10_000, False, reserve_tokens=1024, server_context_tokens=128_000)

ESTIMATES = [
    # (host, path, body, output x choices + held context beyond the body's size / 4, why)
    ("api.openai.com", "/v1/chat/completions", {"max_tokens": 100}, 100, None),
    ("api.openai.com", "/v1/chat/completions", {"max_tokens": 100, "n": 4}, 400, None),
    ("api.openai.com", "/v1/embeddings", {"input": ["a"] * 100}, 1024, None),  # inputs: the body's size
    ("api.openai.com", "/v1/completions", {"prompt": ["a", "b", "c"], "n": 2, "best_of": 4, "max_tokens": 10}, 120, None),
    ("api.openai.com", "/v1/threads/t1/runs/r1/submit_tool_outputs", {"tool_outputs": []}, 1024 + 128_000, None),
    ("api.openai.com", "/v1/threads/t1/runs", {"max_completion_tokens": 50, "max_prompt_tokens": 700}, 750, None),
    ("api.openai.com", "/v1/responses/compact", {"previous_response_id": "resp_1"}, 1024 + 128_000, None),
    ("api.openai.com", "/v1/batche%73", {"input_file_id": "f"}, None, "billed after"),  # the path the provider acts on
    ("api.openai.com", "/v1/./fine_tuning//jobs", {"model": "m", "training_file": "f"}, None, "billed after"),
    ("api.openai.com", "/v1/evals/e1/runs", {"data_source": {}}, None, "billed after"),
    ("api.anthropic.com", "/v1/messages", {"max_tokens": 10, "max_tokens_to_sample": 5000}, 5000, None),
    ("api.anthropic.com", "/v1/messages/batches/", {"requests": []}, None, "billed after"),
    ("generativelanguage.googleapis.com", "/v1beta/openai/chat/completions", {"n": 4, "max_tokens": 100}, 400, None),
    ("generativelanguage.googleapis.com", "/v1beta/models/g:generateContent",
     {"generationConfig": {"candidateCount": 2, "maxOutputTokens": 10}, "generation_config": {"candidate_count": 3}}, 30, None),
    ("generativelanguage.googleapis.com", "/v1beta/models/g%3AbatchGenerateContent", {"batch": {}}, None, "billed after"),
    ("generativelanguage.googleapis.com", "/v1beta/models/g:generateContent", {"cached_content": "cachedContents/c"}, 1024 + 128_000, None),
    ("generativelanguage.googleapis.com", "/v1beta/models/g:generateContent", {"cachedContent": ""}, 1024, None),  # proto3: unset
]


@pytest.mark.parametrize("host,path,body,beyond_body,refusal", ESTIMATES, ids=[f"{e[1]} {json.dumps(e[2])[:60]}" for e in ESTIMATES])
def test_the_estimate_covers_multipliers_and_held_context(host, path, body, beyond_body, refusal):
    p = parser_for(DEFAULT_HOSTS, host, path)
    raw = json.dumps(body).encode()
    p.request_body(raw)
    assert p.invalid is None
    if refusal is not None:
        assert refusal in p.unbudgetable
        return
    assert p.unbudgetable is None
    assert estimate(p, BUDGET) == beyond_body + len(raw) // 4


BUDGET_POLICY = """
kind: EgressGateway
metadata: {name: g}
---
kind: AIProviderRoute
metadata: {name: r}
spec:
  rules:
  - matches: [{provider: openai}]
    filters: [{type: TokenBudget, tokenBudget: %s}]
"""


@pytest.mark.parametrize("budget,held", [("{maxTokensPerDay: 100}", 128_000), ("{maxTokensPerDay: 100, serverContextTokens: 5000}", 5000),
                                         ("{maxTokensPerDay: 100, serverContext: Refuse}", None)])
def test_server_context_is_reserved_or_refused_as_configured(tmp_path, budget, held):
    (tmp_path / "p.yaml").write_text(BUDGET_POLICY % budget)
    assert load_policy(tmp_path).provider_rules[0].budget.server_context_tokens == held


@pytest.mark.parametrize("budget,problem", [
    ("{maxTokensPerDay: 100, serverContext: Refuse, serverContextTokens: 5000}", "serverContextTokens is what serverContext: Reserve reserves"),
    ("{maxTokensPerDay: 100, serverContext: refuse}", "serverContext: Input should be 'Reserve' or 'Refuse'"),
    ("{maxTokensPerDay: 100, serverContextTokens: 0}", "serverContextTokens: Input should be greater than or equal to 1"),
    # past 64 bits the record of every call of the route could not be stored (and held up the batches after it)
    ("{maxTokensPerDay: 100000000000000000000}", "maxTokensPerDay: Input should be less than or equal to 1000000000000000"),
])
def test_budget_settings_are_checked_at_load(tmp_path, budget, problem):
    (tmp_path / "p.yaml").write_text(BUDGET_POLICY % budget)
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path)
    assert problem in str(e.value)


def test_settling_after_midnight_charges_no_one_day_for_the_other():
    """A reservation made before midnight and settled after it frees its hold and charges nothing to the new
    day; the next one settles into today (settle reads the day itself, without asking `_roll`, within one)."""
    clock = Clock(day_start(dt.date(2026, 11, 30)) + 86400 - 1)
    led = BudgetLedger(clock)
    led.load(utc_day(clock.t), {"p": 10})
    r = led.admit("p", 1000, 100, 5.0, 0.5)
    clock.t += 2
    assert led.settle(r, 40, 0.25) == 0 and led.used_today("p") == 0 and led.used_cost_today("p") == 0.0
    assert led.reserved == {} and led.reserved_cost == {}
    r2 = led.admit("p", 1000, 100)
    assert led.settle(r2, None) == 100 and led.used_today("p") == 100


def test_settled_usage_stops_at_what_a_record_stores():
    from clrk.proxy.budget import MAX_TOKENS

    led = BudgetLedger(Clock(T0))
    led.load(utc_day(T0), {"p": MAX_TOKENS - 5})
    r = led.admit("p", None, 1)
    assert led.settle(r, 3) == MAX_TOKENS - 2
    r = led.admit("p", None, 1)
    assert led.settle(r, 2**70) == MAX_TOKENS and led.used_today("p") == MAX_TOKENS
