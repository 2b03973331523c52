"""Prices and costs (clrk.cost): known usage × known prices per provider, cached and reasoning tokens,
long-context tiers, ModelPricing overrides, unknown models, the bounded cache, and the no-network rule.

The hand-written figures are the providers' list prices as genai-prices 0.2.3 (pinned) carries them; the
last test holds every model of the three providers against genai-prices' own calculator.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from clrk import attributes as A
from clrk import cost
from clrk.cost import POLICY, UNKNOWN, PriceBook, cost_of
from clrk.policy import PolicyError, load_policy

NOW = time.time()
LIB = cost.library_source()


def usd(per_mtok_sum: float) -> float:
    return per_mtok_sum / 1e6


@pytest.mark.parametrize("provider, model, usage, expected", [
    # OpenAI: input includes cached tokens ($2.50 / $1.25 cached / $10 out), dated ids match their model
    ("openai", "gpt-4o-2024-08-06", (1000, 500, 200, 0, 0), usd(800 * 2.5 + 200 * 1.25 + 500 * 10)),
    ("openai", "gpt-4o", (1000, 500, 0, 0, 0), usd(1000 * 2.5 + 500 * 10)),
    # reasoning tokens are within the output and billed at the output price ($1.10 / $4.40, cached $0.55)
    ("openai", "o3-mini", (2000, 3000, 1000, 0, 2500), usd(1000 * 1.1 + 1000 * 0.55 + 3000 * 4.4)),
    # Anthropic: input includes cache reads ($0.30) and writes ($3.75); $3 / $15
    ("anthropic", "claude-3-5-sonnet-20241022", (60, 6, 30, 20, 0), usd(10 * 3 + 30 * 0.3 + 20 * 3.75 + 6 * 15)),
    ("anthropic", "claude-3-5-haiku-latest", (1000, 100, 0, 0, 0), usd(1000 * 0.8 + 100 * 4)),
    # Gemini: output includes thoughts, priced as output ($0.30 / $2.50, cached $0.03)
    ("google_genai", "gemini-2.5-flash", (1000, 700, 400, 0, 500), usd(600 * 0.3 + 400 * 0.03 + 700 * 2.5)),
    ("google_genai", "gemini-2.0-flash-001", (11, 11, 5, 0, 7), usd(6 * 0.1 + 5 * 0.025 + 11 * 0.4)),
    # long context: past 200k input tokens every token takes the higher tier ($1.25 -> $2.50 in, $10 -> $15 out)
    ("google_genai", "gemini-2.5-pro", (200_000, 1000, 0, 0, 0), usd(200_000 * 1.25 + 1000 * 10)),
    ("google_genai", "gemini-2.5-pro", (200_001, 1000, 0, 0, 0), usd(200_001 * 2.5 + 1000 * 15)),
])
def test_known_usage_times_known_prices(provider, model, usage, expected):
    got, source = cost_of(provider, model, *usage, when=NOW)
    assert source == LIB and LIB.startswith("genai-prices ")
    assert got == pytest.approx(expected, rel=1e-9)


def test_unknown_model_has_no_cost_not_zero():
    assert cost_of("openai", "my-finetune-that-no-one-lists", 1000, 10) == (None, UNKNOWN)
    assert cost_of("anthropic", None, 1000, 10) == (None, UNKNOWN)
    assert cost_of("some_future_provider", "gpt-4o", 1000, 10) == (None, UNKNOWN)
    # a model priced per audio hour, not per token, is unknown too
    assert cost_of("openai", "whisper-1", 1000, 10) == (None, UNKNOWN)


def test_counts_the_record_cannot_hold_are_read_as_zero():
    # what a provider reports is data: a negative or non-integer count never makes a refund
    got, _ = cost_of("openai", "gpt-4o", -5, 10, cache_read=True, reasoning=-1, when=NOW)
    assert got == pytest.approx(usd(10 * 10))
    # more cached than input (an inconsistent report) does not go below zero either
    got, _ = cost_of("openai", "gpt-4o", 10, 0, cache_read=50, when=NOW)
    assert got == pytest.approx(usd(50 * 1.25))


GATEWAY = "apiVersion: clrk.apoxy.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: gw}\nspec: {}\n---\n"
PRICING = GATEWAY + """
apiVersion: clrk.apoxy.dev/v1alpha1
kind: ModelPricing
metadata: {name: negotiated}
spec:
  models:
  - {provider: openai, model: "gpt-4o*", inputPerMTok: 2.0, outputPerMTok: 8.0, cachedInputPerMTok: 1.0}
  - {provider: anthropic, model: "claude-*", inputPerMTok: 3.0, outputPerMTok: 15.0, cachedInputPerMTok: 0.3,
     cacheWritePerMTok: 3.75, reasoningPerMTok: 20}
  - {provider: "*", model: "Llama-3.1-*", inputPerMTok: 0.2, outputPerMTok: 0.6}
"""


def test_model_pricing_overrides_and_adds_prices(tmp_path):
    (tmp_path / "p.yaml").write_text(PRICING)
    book = load_policy(tmp_path).pricing
    # overrides the bundled price of every gpt-4o* model, dated ids included
    assert book.cost_of("openai", "gpt-4o-2024-08-06", 1000, 500, 200, when=NOW) == (
        pytest.approx(usd(800 * 2 + 200 * 1 + 500 * 8)), POLICY)
    assert book.cost_of("anthropic", "claude-sonnet-4-5", 100, 50, 10, 20, 30, when=NOW) == (
        pytest.approx(usd(70 * 3 + 10 * 0.3 + 20 * 3.75 + 20 * 15 + 30 * 20)), POLICY)
    # adds an open model under any provider, glob matched without regard to case; cache defaults to input
    assert book.cost_of("openai", "llama-3.1-70b-instruct", 1000, 100, 500, when=NOW) == (
        pytest.approx(usd(1000 * 0.2 + 100 * 0.6)), POLICY)
    # what no entry matches keeps the bundled price
    assert book.cost_of("openai", "gpt-5", 1000, 0, when=NOW) == (pytest.approx(usd(1000 * 1.25)), LIB)
    assert book.cost_of("openai", "nobody-lists-this", 1000, 0) == (None, UNKNOWN)


@pytest.mark.parametrize("entry, error", [
    ('{provider: openai, model: "x", inputPerMTok: -1, outputPerMTok: 1}', "spec.models[0].inputPerMTok"),
    ('{provider: openai, model: "x", inputPerMTok: 1, outputPerMTok: .inf}', "spec.models[0].outputPerMTok"),
    ('{provider: azure, model: "x", inputPerMTok: 1, outputPerMTok: 1}', "spec.models[0].provider"),
    ('{provider: openai, model: "x", inputPerMTok: 1}', "spec.models[0].outputPerMTok"),
    ('{provider: openai, model: "x", inputPerMTok: 1, outputPerMTok: 1, currency: EUR}', "spec.models[0].currency"),
])
def test_model_pricing_is_validated(tmp_path, entry, error):
    (tmp_path / "p.yaml").write_text(GATEWAY +
        f"apiVersion: clrk.apoxy.dev/v1alpha1\nkind: ModelPricing\nmetadata: {{name: bad}}\nspec:\n  models:\n  - {entry}\n")
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path)
    assert re.search(r"p\.yaml:11:\d+: document 2 \(ModelPricing bad\)", str(e.value)) and error in str(e.value)


def test_a_model_seen_before_is_a_dict_hit_and_the_cache_is_bounded(monkeypatch):
    book = PriceBook()
    looked_up = []
    library_price = cost._library_price
    monkeypatch.setattr(cost, "_library_price", lambda *a: looked_up.append(a) or library_price(*a))
    assert book.price("openai", "gpt-4o-2024-08-06", NOW) is book.price("openai", "gpt-4o-2024-08-06", NOW)
    first = book.cost_of("openai", "gpt-4o-2024-08-06", 1000, 500, 200, when=NOW)
    for _ in range(1000):  # a library calculation is ≈ 50 µs; a hit is ≈ 1 µs
        assert book.cost_of("openai", "gpt-4o-2024-08-06", 1000, 500, 200, when=NOW) == first
    assert len(looked_up) == 1 and first[0] is not None
    for i in range(cost.CACHE_SIZE + 10):  # models come from requests: an agent can name any number of them
        book.price("openai", f"gpt-4o-made-up-{i}", NOW)
    assert len(book._cache) <= cost.CACHE_SIZE


def test_cost_of_attributes_prices_the_model_that_answered():
    attrs = {A.GEN_AI_SYSTEM: "openai", A.GEN_AI_REQUEST_MODEL: "gpt-4o", A.GEN_AI_RESPONSE_MODEL: "gpt-4o-mini-2024-07-18",
             A.GEN_AI_USAGE_INPUT_TOKENS: 1000, A.GEN_AI_USAGE_OUTPUT_TOKENS: 100}
    assert cost.BUNDLED.cost_of_attributes(attrs, NOW)[0] == pytest.approx(usd(1000 * 0.15 + 100 * 0.6))


@pytest.mark.parametrize("child", [True, False], ids=["child-process", "in-process-fallback"])
def test_prices_never_come_from_the_network(child):
    """Loading and using the prices with every socket refused: nothing is fetched, no updater thread runs,
    and a price update installed in genai-prices (what its UpdatePrices does) is not what clrk uses — whether
    the data is read by the child interpreter (which refuses connections itself) or, failing that, here."""
    code = f"""
import socket, threading
def refuse(*a, **k): raise AssertionError("network use")
socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse
from clrk import cost
if not {child}:
    def no_child(): raise OSError("no child process")
    cost._extract = no_child
cost.preload().join()
from genai_prices import data_snapshot
data_snapshot.set_custom_snapshot(data_snapshot.DataSnapshot(providers=[], from_auto_update=True))
usd, source = cost.cost_of("openai", "gpt-4o", 1000, 0)
assert source.startswith("genai-prices ") and abs(usd - 0.0025) < 1e-12, (usd, source)
assert sorted(cost._library[1]) == ["anthropic", "google", "openai"], sorted(cost._library[1])
assert not [t for t in threading.enumerate() if "genai" in t.name], threading.enumerate()
import sys
print("ok", "genai_prices.data" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"ok {not child}", out.stderr  # the whole data stays out of this process


def test_every_bundled_model_is_priced_as_genai_prices_prices_it():
    """The fast path (flat per-token rates, tiers) against the library's own calculation, for every model of
    the three providers and usages with cache reads, cache writes, reasoning and long context."""
    from genai_prices import Usage, data

    when = datetime.fromtimestamp(NOW, UTC)
    ids = {v: k for k, v in cost.PROVIDER_IDS.items()}
    checked = 0
    for prov in data.providers:
        if prov.id not in ids:
            continue
        for info in prov.models:
            for i, o, cr, cw, r in [(1000, 500, 0, 0, 0), (300_000, 2000, 1000, 500, 700), (1200, 4000, 200, 0, 3000),
                                    (150_000, 10, 120_000, 0, 0), (250_000, 100, 0, 100_000, 50)]:
                try:
                    lib = info.calc_price(Usage(input_tokens=i, output_tokens=o, cache_read_tokens=cr, cache_write_tokens=cw,
                                                output_reasoning_tokens=r), prov, genai_request_timestamp=when).total_price
                except ValueError:  # usage a model's units cannot take (no cache writes, say)
                    continue
                got, source = cost.BUNDLED.cost_of(ids[prov.id], info.id, i, o, cr, cw, r, NOW)
                if got is None:  # priced in other units (audio hours, per request): unknown, not a wrong figure
                    assert source == UNKNOWN
                    break
                assert got == pytest.approx(float(lib), rel=1e-9, abs=1e-12), (prov.id, info.id, (i, o, cr, cw, r))
                checked += 1
    assert checked > 500


def test_an_unlisted_dated_id_of_the_model_asked_for_takes_its_price():
    # a snapshot newer than the price data answers for the alias asked for
    assert cost_of("openai", "gpt-4o-mini-2031-01-01", 1000, 0, when=NOW, request_model="gpt-4o-mini") == (
        pytest.approx(usd(1000 * 0.15)), LIB)
    # a different model that answered (a Backend rewrote the request) is never priced as the one asked for
    assert cost_of("openai", "llama-local", 1000, 0, when=NOW, request_model="gpt-4o") == (None, UNKNOWN)
    # no answer's model: the one asked for
    assert cost_of("openai", None, 1000, 0, when=NOW, request_model="gpt-4o")[0] == pytest.approx(usd(1000 * 2.5))



ODD_COUNTS = [1000, 0, -5, None, True, False, 2.0, "12", 2**63 - 1, 2**70]


@pytest.mark.parametrize("model, request_model", [("gpt-4o-2024-08-06", None), (None, "gpt-4o"), ("", "gpt-4o-mini"),
                                                   ("gpt-4o-mini-2031-01-01", "gpt-4o-mini"), ("llama-local", "gpt-4o")])
def test_a_price_looked_up_before_costs_what_the_first_lookup_said(model, request_model):
    """`cost_of` takes a short way for a price its book holds: the same dollars and source as the full lookup,
    whatever the counts (odd ones included), for every way the model can be named."""
    warm = PriceBook()
    warm.cost_of("openai", model, 1, 1, when=NOW, request_model=request_model)
    for counts in [(1000, 500, 200, 0, 0), *((v, v, v, v, v) for v in ODD_COUNTS), (10, 0, 50, 3, 0), (5, 9, 0, 0, 20)]:
        cold = PriceBook()
        assert warm.cost_of("openai", model, *counts, when=NOW, request_model=request_model) == cold.cost_of(
            "openai", model, *counts, when=NOW, request_model=request_model), counts


def test_a_reloaded_policy_prices_with_its_own_prices(tmp_path):
    """Each policy has its own book: a reload that changes a ModelPricing entry is priced with the new entry at
    once, though the old book has the model in its memory."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "p.yaml").write_text(PRICING)
    (new / "p.yaml").write_text(PRICING.replace("inputPerMTok: 2.0, outputPerMTok: 8.0", "inputPerMTok: 4.0, outputPerMTok: 16.0"))
    before = load_policy(old).pricing
    assert before.cost_of("openai", "gpt-4o", 1000, 500, when=NOW) == (pytest.approx(usd(1000 * 2 + 500 * 8)), POLICY)
    assert before.cost_of("openai", "gpt-4o", 1000, 500, when=NOW)[0] == pytest.approx(usd(1000 * 2 + 500 * 8))
    after = load_policy(new).pricing
    assert after.cost_of("openai", "gpt-4o", 1000, 500, when=NOW) == (pytest.approx(usd(1000 * 4 + 500 * 16)), POLICY)


def test_a_price_past_the_time_it_holds_until_is_looked_up_again():
    """A remembered price carries until when it holds (a dated price change, a time-of-day price): a call after
    that is priced by a new lookup, not from memory."""
    book = PriceBook()
    right = book.cost_of("openai", "gpt-4o", 1000, 500, when=NOW)
    stale = cost.flat_price("stale", 100.0, 100.0)
    book._cache[("openai", "gpt-4o")] = cost._Resolved(stale, NOW + 10)
    assert book.cost_of("openai", "gpt-4o", 1000, 500, when=NOW + 5)[1] == "stale"  # still in force
    assert book.cost_of("openai", "gpt-4o", 1000, 500, when=NOW + 10) == right  # not any more
    assert book._cache[("openai", "gpt-4o")].price.source == LIB


# --------------------------------------------------------------------------- dollar budgets (the ledger)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clrk.proxy.budget import BudgetLedger, day_start, utc_day  # noqa: E402

T0 = day_start(datetime(2026, 11, 30).date()) + 3600


def test_a_pool_admits_only_what_fits_under_each_of_its_limits():
    led = BudgetLedger(lambda: T0)
    led.load(utc_day(T0), {"p": 0}, {"p": 4.0})
    assert led.admit("p", None, 100, 5.0, 1.5) is None  # $4 spent + $1.50 > $5: refused, not clamped
    r = led.admit("p", None, 100, 5.0, 0.75)
    assert r is not None and r.cost == 0.75 and led.left_cost("p", 5.0) == pytest.approx(0.25)
    assert led.admit("p", 1000, 901, 5.0, 0.01) is None  # the dollars fit, the tokens do not
    assert led.admit("p", None, 1, 5.0, 0.0) is not None  # a reservation is never free, but $1e-9 fits
    led.settle(r, 80, 0.25)  # settled to its cost
    assert led.used_cost_today("p") == pytest.approx(4.25) and led.left_cost("p", 5.0) == pytest.approx(0.75 - 1e-9)


def test_a_served_call_without_a_cost_is_charged_its_reserved_dollars_and_a_new_day_starts_from_zero():
    now = [T0]
    led = BudgetLedger(lambda: now[0])
    led.load(utc_day(T0), {})
    r = led.admit("p", None, 10, 1.0, 0.4)
    led.settle(r, None, None)
    assert led.used_cost_today("p") == pytest.approx(0.4) and not led.reserved_cost
    now[0] += 86400
    assert led.used_cost_today("p") == 0 and led.admit("p", None, 10, 1.0, 0.99) is not None


@given(spent=st.floats(0, 20), max_cost=st.floats(0.01, 20),
       calls=st.lists(st.tuples(st.floats(0.001, 3), st.floats(0, 6)), min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_concurrent_dollar_admissions_overshoot_only_by_what_calls_cost_beyond_their_reservations(spent, max_cost, calls):
    """All calls are admitted before any settles (the worst case); each costs `actual` after reserving `reserve`."""
    led = BudgetLedger(lambda: T0)
    led.load(utc_day(T0), {}, {"p": spent})
    admitted = [(res, actual) for reserve, actual in calls if (res := led.admit("p", None, 1, max_cost, reserve))]
    assert sum(r.cost for r, _ in admitted) <= max(0.0, max_cost - spent) + 1e-9
    for res, actual in admitted:
        led.settle(res, 1, actual)
    excess = sum(max(0.0, a - r.cost) for r, a in admitted)
    assert led.used_cost_today("p") <= max(spent, max_cost) + excess + 1e-9


@pytest.mark.parametrize("budget, error", [
    ("{maxCostPerDay: 25.0, scope: Agent}", None),
    ("{maxTokensPerDay: 1000, maxCostPerDay: 0.5}", None),
    ("{scope: Agent}", "a TokenBudget needs maxTokensPerDay, maxCostPerDay (USD), or both"),
    ("{maxCostPerDay: 0}", "maxCostPerDay"),
    ("{maxCostPerDay: .nan}", "maxCostPerDay"),
    ("{maxCostPerDay: 1e300}", "maxCostPerDay"),
])
def test_a_token_budget_takes_a_dollar_limit(tmp_path, budget, error):
    (tmp_path / "p.yaml").write_text(GATEWAY + f"""apiVersion: clrk.apoxy.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: r}}
spec:
  rules:
  - matches: [{{provider: openai}}]
    filters: [{{type: TokenBudget, tokenBudget: {budget}}}]
""")
    if error is None:
        rule = load_policy(tmp_path).provider_rules[0]
        assert rule.budget is not None and rule.budget.max_cost_per_day in (25.0, 0.5)
        assert rule.budget.max_tokens_per_day in (None, 1000)
        return
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path)
    assert error in str(e.value) and "spec.rules[0].filters[0].tokenBudget" in str(e.value)


@pytest.mark.parametrize("model", [123, ["gpt-4o"], {"m": 1}, True, "gpt-4o" + "x" * 300, "\x00\u202e"])
def test_a_model_that_is_no_model_id_is_unknown_and_never_cached(model):
    """A request's or a response's `model` is data: whatever it is, pricing answers unknown without raising."""
    book = PriceBook()
    assert book.cost_of("openai", model, 1000, 10, when=NOW) == (None, UNKNOWN)
    assert book.cost_of("openai", "gpt-4o-2031-01-01", 1000, 10, when=NOW, request_model=model)[1] in (UNKNOWN,)
    assert not [k for k in book._cache if len(k[1]) > cost.MAX_MODEL_LENGTH]


def test_a_record_that_cannot_be_built_whole_keeps_its_dollar_charge():
    """The day's dollars are rebuilt from the stored records at start: salvage keeps them (a value no column
    fits, such as a NaN, stays out)."""
    from clrk.recorder.expand import salvage

    raw = {"ids": ("a" * 32, "b" * 16, None), "t0": T0, "budget": ("pool", False, None, 10, 5),
           "budget_cost": (5.0, 1.25, 0.5), "genai": object()}
    rec = salvage(raw, "a value no column fits")
    assert (rec[A.CLRK_BUDGET_DAILY_MAX_COST], rec[A.CLRK_BUDGET_DAILY_COST], rec[A.CLRK_BUDGET_COST]) == (5.0, 1.25, 0.5)
    rec = salvage({**raw, "budget_cost": (float("nan"), "x", 0.5)}, "why")
    assert rec[A.CLRK_BUDGET_COST] == 0.5 and A.CLRK_BUDGET_DAILY_MAX_COST not in rec and A.CLRK_BUDGET_DAILY_COST not in rec


def test_the_largest_counts_a_record_holds_give_a_finite_cost():
    """Usage is what the upstream says: 64-bit counts (what the parsers keep) price to a finite float, which
    a dollar pool then counts as spent."""
    big = 2**63 - 1
    got, source = cost_of("anthropic", "claude-3-5-sonnet-20241022", big, big, big, big, big, when=NOW)
    assert source == LIB and math.isfinite(got) and got > 1e12
    led = BudgetLedger(lambda: T0)
    led.load(utc_day(T0), {})
    res = led.admit("p", None, 10, 5.0, 0.1)
    led.settle(res, 2**62, got)
    assert led.left_cost("p", 5.0) < 0 and led.admit("p", None, 1, 5.0, 1e-6) is None
