"""Dollars against a real gateway: ModelPricing prices a call, a maxCostPerDay pool shared by concurrent
agents is admitted and settled in dollars within the bound of clrk/proxy/budget.py, a model with no price
cannot be admitted under a dollar limit, `clrk spend --usd` sums what the records say, and a restart keeps the
day's dollars.

Prices are a ModelPricing document's, chosen so that figures are exact: $1000 per million input tokens, $100
cached, $10000 output (a token is $0.001, $0.0001, $0.01). The fake provider answers `-costN` models with N
input tokens (4 of them cached) and 5 output tokens (2 of them reasoning)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from clrk import attributes as A
from tests.harness import fake_provider
from tests.harness.gateway import AGENT_TOKEN, Gateway, agent_docs, gateway_doc, sha
from tests.harness.util import clrk_message

CLRK = str(Path(sys.executable).parent / "clrk")
OPENAI = "https://api.openai.com"
TOKENS = {"team-a.researcher": AGENT_TOKEN, "team-a.writer": "tok-writer-7373737373"}
MAX_USD = 5.0
IN, CACHED, OUT = 0.001, 0.0001, 0.01  # USD per token


def call_cost(prompt: int) -> float:
    return (prompt - 4) * IN + 4 * CACHED + 5 * OUT


def docs(pki, upstream) -> list[dict]:
    def doc(kind, name, spec, ns="team-a"):
        return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec}

    rules = [
        {"matches": [{"provider": "openai", "models": ["usd-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxCostPerDay": MAX_USD, "scope": "Route"}}]},
        {"matches": [{"provider": "openai", "models": ["both-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1_000_000, "maxCostPerDay": 1.0}}]},
        {"matches": [{"provider": "openai", "models": ["unpriced-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxCostPerDay": 100.0}}]},
    ]
    return [
        gateway_doc(aliases={"api.openai.com": upstream.address}, ca_bundle=str(pki[0])),
        *agent_docs(),
        doc("Agent", "writer", {"credentials": {"tokenSha256": sha(TOKENS["team-a.writer"])}}),
        doc("AIProviderRoute", "dollars", {"sourceAgents": {"namespaces": ["team-a"]}, "rules": rules}),
        doc("ModelPricing", "test-prices", {"models": [
            {"provider": "openai", "model": "usd-*", "inputPerMTok": IN * 1e6, "cachedInputPerMTok": CACHED * 1e6,
             "outputPerMTok": OUT * 1e6},
            {"provider": "openai", "model": "both-*", "inputPerMTok": IN * 1e6, "cachedInputPerMTok": CACHED * 1e6,
             "outputPerMTok": OUT * 1e6},
        ]}),
    ]


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream):
    fake_provider.install(upstream)
    g = Gateway(tmp_path_factory.mktemp("cost-gw"), docs(pki, upstream)).start()
    yield g
    g.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def post(gw: Gateway, body: dict, inv: str, user: str = "team-a.researcher"):
    with gw.client(user, TOKENS[user]) as c:
        return c.post(f"{OPENAI}/v1/chat/completions", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json", "clrk-invocation-id": inv})


def test_a_call_is_priced_by_model_pricing_and_charged_to_its_dollar_pool(gw):
    i = tag()
    r = post(gw, {"model": f"both-cost100-{i}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}, i)
    assert r.status_code == 200, r.text
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_COST_SOURCE] == "policy"
    assert rec[A.GEN_AI_USAGE_COST] == pytest.approx(call_cost(100)) == rec[A.CLRK_BUDGET_COST]
    assert rec[A.CLRK_BUDGET_DAILY_MAX_COST] == 1.0 and rec[A.CLRK_BUDGET_DAILY_COST] == pytest.approx(call_cost(100))
    assert rec[A.CLRK_BUDGET_DAILY_MAX] == 1_000_000 and rec[A.CLRK_BUDGET_TOKENS] == 105


def test_a_call_that_may_cost_more_than_the_day_is_refused_in_dollars(gw, upstream):
    """Within the token limit, past the dollar one: the estimate (max output + body / 4) at the output price."""
    i, model = tag(), f"both-{tag()}"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    r = post(gw, body, i)
    assert r.status_code == 429
    reserved = 200 + len(json.dumps(body).encode()) // 4
    err = clrk_message(r.json())
    assert err.startswith("clrk: token budget exceeded for route dollars: this request may cost up to ")
    assert f"({reserved} tokens at $10,000.00 per million), more than the whole day's $1" in err
    assert not upstream.requests_with(model)
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_BUDGET_DENIED] is True and rec[A.CLRK_BUDGET_RESERVED] == reserved
    assert A.CLRK_BUDGET_COST not in rec and A.GEN_AI_USAGE_COST not in rec  # charged nothing, as for tokens


@pytest.mark.parametrize("model", [f"unpriced-{tag()}", "usd-" + "\u202e" * 3 + "a" * 20_000], ids=["unlisted", "hostile"])
def test_a_model_without_a_price_cannot_be_admitted_under_a_dollar_limit(gw, upstream, model):
    """Unlisted, or no model id at all (20 kB, bidi controls): refused before the upstream, the name bounded."""
    i = tag()
    r = post(gw, {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, i)
    assert r.status_code == 403
    assert clrk_message(r.json()) == (f"clrk: a dollar budget cannot bound calls to model {model[:200]}: it has no known "
                                 "price (a ModelPricing entry can give it one)")
    assert not upstream.requests_with(model)
    assert gw.wait_record(invocation=i)[A.CLRK_DECISION] == "deny"


def test_a_dollar_budget_reached_by_concurrent_agents_holds_its_bound(gw, upstream):
    """Two agents, 24 calls at once, every one held at the provider until all are admitted or refused: the pool
    admits exactly the reservations that fit in $5, and settles each at its cost ($2.0464, more than the
    $0.80-odd reserved), so the day passes $5 only by what calls cost beyond their reservations."""
    t, inv = tag(), tag()
    content = "hi"
    while True:  # a reservation that does not divide the pool, so a ledger admitting one too many would show
        body = {"model": f"usd-hold-cost2000-{t}", "messages": [{"role": "user", "content": content}], "max_tokens": 50}
        reserved = 50 + len(json.dumps(body).encode()) // 4
        if 500 % reserved:
            break
        content += "!"
    reserved_usd = reserved * OUT
    users = list(TOKENS)
    answers = fake_provider.race_held([lambda k=k: post(gw, body, inv, user=users[k % 2]) for k in range(24)], upstream,
                                      f"usd-hold-cost2000-{t}", timeout=20)
    statuses = [a.status_code for a in answers]
    admitted = statuses.count(200)
    assert admitted == int(MAX_USD // reserved_usd) and statuses.count(429) == 24 - admitted
    assert len(upstream.requests_with(f"usd-hold-cost2000-{t}")) == admitted
    refusal = clrk_message(next(a for a in answers if a.status_code == 429).json())
    assert refusal.startswith("clrk: token budget exceeded for route dollars: this request may cost up to $")
    assert "of the day's $5 are left" in refusal
    rows = gw.wait_records(24, timeout=15, invocation=inv)
    served = [r for r in rows if not r[A.CLRK_BUDGET_DENIED]]
    assert {r[A.AGENT_NAME] for r in served} == {"researcher", "writer"}
    assert all(r[A.CLRK_BUDGET_COST] == pytest.approx(call_cost(2000)) == r[A.GEN_AI_USAGE_COST] for r in served)
    spent = max(r[A.CLRK_BUDGET_DAILY_COST] for r in served)
    assert spent == pytest.approx(admitted * call_cost(2000))
    assert spent <= MAX_USD + sum(r[A.CLRK_BUDGET_COST] - reserved_usd for r in served) + 1e-9  # the bound
    assert all(r[A.CLRK_BUDGET_DAILY_MAX_COST] == MAX_USD for r in rows)


def test_clrk_spend_in_dollars(gw):
    i = tag()
    model = f"both-cost10-{i}"
    r = post(gw, {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, i)
    assert r.status_code == 200, r.text
    rec = gw.wait_record(invocation=i)
    out = subprocess.run([CLRK, "spend", "--db", str(gw.db), "--json", "--usd", "--by", "agent,route,model", "--budgets"],
                         capture_output=True, text=True, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    row = next(x for x in lines if x.get("model") == model)
    assert row["cost_usd"] == pytest.approx(call_cost(10)) == rec[A.GEN_AI_USAGE_COST] and row["unpriced"] == 0
    assert (row["agent"], row["route"]) == ("team-a/researcher", "team-a/dollars")
    spend = [x for x in lines if "budget" not in x]
    assert [x["cost_usd"] for x in spend] == sorted((x["cost_usd"] for x in spend), reverse=True)  # dearest first
    budgets = {x["budget"]["pool"]: x["budget"] for x in lines if "budget" in x}
    pool = budgets["AIProviderRoute/team-a/dollars#openai:usd-*"]
    assert pool["max_usd"] == MAX_USD and pool["used_usd"] > MAX_USD and pool["left_usd"] == 0
    text = subprocess.run([CLRK, "spend", "--db", str(gw.db), "--usd", "--by", "model", "--since", "1h", "--budgets"],
                          capture_output=True, text=True, check=True).stdout
    assert text.splitlines()[0].split() == ["model", "requests", "input", "output", "total", "usd", "unpriced"]
    assert "of $5.00 spent, $0.00 left" in text
    line = subprocess.run([CLRK, "records", "--db", str(gw.db), "--invocation", i], capture_output=True, text=True,
                          check=True).stdout.strip()
    cells = line.split()  # one record a line: ... model, tokens, dollars, then the destination
    assert cells[-4:-1] == [model, "10/5", "$0.0564"], line


def test_a_restart_keeps_the_days_dollars(gw):
    """Runs last in this module: it restarts the gateway. The pool spent past $5 above stays spent."""
    gw.stop()
    gw.start()
    i = tag()
    r = post(gw, {"model": f"usd-{i}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, i)
    assert r.status_code == 429, r.text
    rec = gw.wait_record(invocation=i)
    assert rec[A.CLRK_BUDGET_DAILY_COST] > MAX_USD and rec[A.CLRK_BUDGET_DENIED] is True
