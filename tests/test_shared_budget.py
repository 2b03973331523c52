"""Budgets shared on Redis by two real gateways (each with its own recorder and store) naming one real
redis-server: concurrent calls through both keep one pool's bound in tokens and in dollars, exactly (the
reservations that fit are admitted, no more); a restart of both keeps the day (read from Redis: neither
gateway's own records have it all); Redis stopped mid-run makes the failClosed gateway refuse budgeted calls
(503, recorded, in the provider's error shape) and the failOpen one serve them on its own ledger, and
`clrk status` says which; Redis back, both share again and what was spent meanwhile is in the shared day.

The fake provider answers `-costN` models with N prompt tokens and 5 completion tokens; `-hold` keeps calls
at the provider until the test sets RELEASE."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from clrk import attributes as A
from clrk.proxy.budget import utc_day
from clrk.proxy.budget_store import pool_key
from tests.harness import fake_provider
from tests.harness.gateway import Gateway, agent_docs, gateway_doc
from tests.harness.redis_server import RedisServer
from tests.harness.util import clrk_message, wait_for

CLRK = str(Path(sys.executable).parent / "clrk")
OPENAI = "https://api.openai.com"
MAX_TOKENS = 1000
MAX_USD = 5.0
IN, OUT = 0.001, 0.01  # USD per token
PASSWORD = "s3cret-redis-pw-5150"
TOKENS_POOL = "AIProviderRoute/team-a/shared#openai:tok-*"
OUTAGE_POOL = "AIProviderRoute/team-a/shared#openai:out-*"


def docs(pki, upstream, on_unavailable: str) -> list[dict]:
    def doc(kind, name, spec):
        return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": "team-a"},
                "spec": spec}

    gw = gateway_doc(aliases={"api.openai.com": upstream.address}, ca_bundle=str(pki[0]))
    gw["spec"]["budgetStore"] = {"onUnavailable": on_unavailable}
    rules = [
        {"matches": [{"provider": "openai", "models": ["tok-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": MAX_TOKENS}}]},
        {"matches": [{"provider": "openai", "models": ["usd-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxCostPerDay": MAX_USD}}]},
        {"matches": [{"provider": "openai", "models": ["out-*"]}],
         "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1_000_000}}]},
        {"matches": [{"provider": "openai", "models": ["free-*"]}]},
    ]
    return [
        gw, *agent_docs(),
        doc("AIProviderRoute", "shared", {"sourceAgents": {"namespaces": ["team-a"]}, "rules": rules}),
        doc("ModelPricing", "prices", {"models": [
            {"provider": "openai", "model": "usd-*", "inputPerMTok": IN * 1e6, "outputPerMTok": OUT * 1e6}]}),
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis"), password=PASSWORD).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gws(tmp_path_factory, pki, upstream, store):
    """Gateway a fails closed, b fails open; both share `store`."""
    fake_provider.install(upstream)
    env = {"CLRK_BUDGET_STORE": store.url}
    a = Gateway(tmp_path_factory.mktemp("gw-a"), docs(pki, upstream, "failClosed"), env=env).start()
    b = Gateway(tmp_path_factory.mktemp("gw-b"), docs(pki, upstream, "failOpen"), env=env).start()
    yield a, b
    for g in (a, b):
        if g.proc is not None and g.proc.poll() is None:
            g.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def post(gw: Gateway, body: dict, inv: str):
    with gw.client() as c:
        return c.post(f"{OPENAI}/v1/chat/completions", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json", "clrk-invocation-id": inv})


def status(gw: Gateway) -> tuple[dict, str]:
    js = json.loads(subprocess.run([CLRK, "status", "--db", str(gw.db), "--json"], capture_output=True, text=True,
                                   check=True).stdout)
    text = subprocess.run([CLRK, "status", "--db", str(gw.db)], capture_output=True, text=True, check=True).stdout
    return js["budget_stores"][0], text


def shared_day(store: RedisServer, pool: str) -> dict:
    return redis.Redis.from_url(store.url, decode_responses=True).hgetall(pool_key(utc_day(time.time()), pool))


def race(gws, upstream, model: str, n: int) -> tuple[list, str]:
    """`n` calls at once, alternating between the gateways, held at the provider until every one is admitted
    or refused."""
    inv = tag()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    answers = fake_provider.race_held([lambda k=k: post(gws[k % 2], body, inv) for k in range(n)], upstream, model)
    return answers, inv


def test_both_gateways_share_one_token_pool_within_its_bound(gws, upstream, store):
    model = f"tok-hold-cost1000-{tag()}"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    reserved = 50 + len(json.dumps(body).encode()) // 4
    assert MAX_TOKENS % reserved  # a ledger admitting one too many would show
    answers, inv = race(gws, upstream, model, 24)
    statuses = [a.status_code for a in answers]
    admitted = statuses.count(200)
    assert admitted == MAX_TOKENS // reserved and statuses.count(429) == 24 - admitted, statuses
    assert len(upstream.requests_with(model)) == admitted
    refusal = clrk_message(next(a for a in answers if a.status_code == 429).json())
    assert refusal.startswith(f"clrk: token budget exceeded for route shared: this request may cost up to {reserved} tokens")
    day = wait_for(lambda: (d := shared_day(store, TOKENS_POOL)) and "r" not in d and d, "settlements in Redis")
    used = int(day["u"])
    assert used == admitted * 1005  # every call's usage, from both gateways, in the one pool
    assert used <= MAX_TOKENS + admitted * (1005 - reserved)  # the bound
    # each gateway recorded its own calls; the two stores together have them all
    rows = [r for g in gws for r in g.wait_records(12, invocation=inv)]
    assert len(rows) == 24 and sum(1 for r in rows if not r[A.CLRK_BUDGET_DENIED]) == admitted
    assert {r[A.CLRK_BUDGET_POOL] for r in rows} == {TOKENS_POOL}


def test_both_gateways_share_one_dollar_pool_within_its_bound(gws, upstream, store):
    model = f"usd-hold-cost2000-{tag()}"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    reserved_usd = (50 + len(json.dumps(body).encode()) // 4) * OUT
    answers, _ = race(gws, upstream, model, 16)
    admitted = [a.status_code for a in answers].count(200)
    assert admitted == int(MAX_USD // reserved_usd) and admitted < 16
    assert "of the day's $5 are left" in clrk_message(next(a for a in answers if a.status_code == 429).json())
    pool = "AIProviderRoute/team-a/shared#openai:usd-*"
    day = wait_for(lambda: (d := shared_day(store, pool)) and "rc" not in d and d, "dollar settlements in Redis")
    cost = 2000 * IN + 5 * OUT
    assert float(day["uc"]) == pytest.approx(admitted * cost)
    assert float(day["uc"]) <= MAX_USD + admitted * (cost - reserved_usd) + 1e-9


def test_redis_away_fails_closed_or_open_as_each_gateway_says_then_shares_again(gws, upstream, store):
    a, b = gws
    i = tag()
    body = {"model": f"out-cost100-{i}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    assert post(a, body, i).status_code == 200
    before = wait_for(lambda: int(shared_day(store, OUTAGE_POOL).get("u", 0)) or None, "the call in Redis")
    assert before == 105
    store.stop()
    try:
        # a: failClosed. The 503 is in OpenAI's error shape, and recorded.
        j = tag()
        r = post(a, dict(body, model=f"out-cost100-{j}"), j)
        assert r.status_code == 503 and clrk_message(r.json()) == "clrk: budget store unavailable", r.text
        assert r.json()["error"]["type"]  # the provider's shape: the SDK raises its usual error
        assert not upstream.requests_with(f"out-cost100-{j}")
        rec = a.wait_record(invocation=j)
        assert rec[A.CLRK_DECISION] == "deny" and rec[A.HTTP_RESPONSE_STATUS_CODE] == 503
        assert "budget store unavailable" in rec[A.CLRK_DECISION_REASON]
        st, text = status(a)
        assert st["available"] is False and st["gateways"] == {"test-gw": "failClosed"}
        assert "UNAVAILABLE" in text and "failClosed, budgeted calls refused (503)" in text
        # a call that does not touch a budget pays nothing for it and is served as usual
        f = tag()
        assert post(a, dict(body, model=f"free-cost100-{f}"), f).status_code == 200
        # b: failOpen, on its own ledger; its usage waits for Redis.
        k = tag()
        r = post(b, dict(body, model=f"out-cost100-{k}"), k)
        assert r.status_code == 200, r.text
        st, text = status(b)
        assert st["available"] is False and st["gateways"] == {"test-gw": "failOpen"}
        assert "failOpen, budgeted calls admitted on this gateway's own ledger" in text
        wait_for(lambda: status(b)[0]["queued"] >= 1, "b's settlement queued for Redis")
    finally:
        store.start()  # the same port and data directory: Redis kept the day (append-only file)
    for g in gws:
        g.wait_log("is back: budgets are shared again", timeout=15)
    assert int(shared_day(store, OUTAGE_POOL)["u"]) == before + 105  # b's call, spent while Redis was away
    m = tag()
    r = post(a, dict(body, model=f"out-cost100-{m}"), m)
    assert r.status_code == 200, r.text
    wait_for(lambda: int(shared_day(store, OUTAGE_POOL)["u"]) == before + 210 or None, "a's call shared again")
    st, text = status(a)
    assert st["available"] is True and "shared" in text


def test_redis_stopped_and_restarted_under_load_fails_no_call_and_loses_no_charge(gws, store):
    """Calls keep coming through the failOpen gateway while Redis stops and starts again: every one is
    served, and the shared day ends with every call's usage, whether admitted on Redis (settled after the
    restart) or on the local ledger meanwhile."""
    _, b = gws
    wait_for(lambda: status(b)[0]["available"] or None, "b sharing budgets")
    before = int(shared_day(store, OUTAGE_POOL).get("u", 0))
    backs = b.log().count("is back: budgets are shared again")
    n, statuses = 48, []

    def one() -> None:
        i = tag()
        r = post(b, {"model": f"out-cost100-{i}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}, i)
        statuses.append(r.status_code)

    with ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(one) for _ in range(n)]
        wait_for(lambda: len(statuses) >= 12 or None, "calls before the stop", timeout=30)
        store.stop()
        wait_for(lambda: len(statuses) >= 30 or None, "calls while Redis is away", timeout=30)
        store.start()
        for f in futures:
            f.result(60)
    assert statuses == [200] * n
    wait_for(lambda: b.log().count("is back: budgets are shared again") > backs or None, "b sharing again", timeout=15)
    wait_for(lambda: int(shared_day(store, OUTAGE_POOL).get("u", 0)) == before + n * 105 or None,
             "every call's usage in the shared day", timeout=15)
    assert status(b)[0]["dropped"] == 0


def test_the_stores_password_is_nowhere(gws):
    """Its URL carries it; logs, `clrk status` and records (after an outage, whose errors were logged) do not."""
    for g in gws:
        st, text = status(g)
        assert st["url"].startswith("redis://127.0.0.1:") and PASSWORD not in json.dumps(st) + text
        assert "budget store redis://127.0.0.1:" in g.log() and PASSWORD not in g.log()
        assert PASSWORD not in json.dumps(g.records(), default=str)


def test_a_restart_of_both_keeps_the_day(gws, store):
    """Runs last: restarts both. The token pool is spent (by calls through both); each gateway, restarted,
    reads that from Redis, though its own store holds only its share of the calls."""
    for g in gws:
        g.stop()
    for g in gws:
        g.start()
    for g in gws:
        i = tag()
        r = post(g, {"model": f"tok-{i}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, i)
        assert r.status_code == 429, r.text
        assert "and 0 of the day's 1000 are left" in clrk_message(r.json())
        rec = g.wait_record(invocation=i)
        assert rec[A.CLRK_BUDGET_DAILY_USED] == int(shared_day(store, TOKENS_POOL)["u"]) > MAX_TOKENS


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "127.0.0.1:6379"])
def test_a_store_that_is_no_redis_url_stops_the_start(tmp_path, pki, upstream, url):
    """Never a silent local ledger in its place: every replica would allow the whole day."""
    g = Gateway(tmp_path, docs(pki, upstream, "failClosed"), env={"CLRK_BUDGET_STORE": url})
    with pytest.raises(RuntimeError) as e:
        g.start()
    assert "clrk_budget_store must be a redis://host:port/db URL" in str(e.value)
