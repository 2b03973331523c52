"""Budgets held by the recorder (`clrk_budget_store=recorder`): two real gateway processes on different ports
writing one DuckDB file (so one recorder), as `clrk run --workers` runs them. Concurrent budgeted calls
through both keep one pool's bound exactly; a gateway killed (-9) while its calls hold reservations frees
them for the other once it is gone; the recorder killed while calls are held is restarted by the gateways,
holds those reservations again (the pool admits nothing more meanwhile) and ends with every call's usage
once, nothing reserved left.

Calls are held at the fake provider (`-hold`) until every one is decided (fake_provider.race_held)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest

from clrk import attributes as A
from clrk import wire
from clrk.proxy.budget import utc_day
from clrk.proxy.budget_store import pool_key
from tests.harness import fake_provider
from tests.harness.gateway import Gateway
from tests.harness.util import clrk_message, wait_for
from tests.test_shared_budget import CLRK, MAX_TOKENS, TOKENS_POOL, docs, post, tag

POOL = "AIProviderRoute/team-a/shared#openai:{}-*"


def budget_docs(pki, upstream) -> list[dict]:
    """test_shared_budget's policy, failClosed, with two more pools of MAX_TOKENS (kill-*, rst-*) and a large
    one (big-*)."""
    out = docs(pki, upstream, "failClosed")
    route = next(d for d in out if d["kind"] == "AIProviderRoute")
    for name in ("kill", "rst"):
        route["spec"]["rules"].insert(0, {"matches": [{"provider": "openai", "models": [f"{name}-*"]}], "filters": [
            {"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": MAX_TOKENS}}]})
    route["spec"]["rules"].insert(0, {"matches": [{"provider": "openai", "models": ["big-*"]}], "filters": [
        {"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 10**9}}]})
    return out


@pytest.fixture(scope="module")
def gws(tmp_path_factory, pki, upstream):
    fake_provider.install(upstream)
    db = tmp_path_factory.mktemp("store") / "clrk.duckdb"
    env = {"CLRK_BUDGET_STORE": "recorder"}
    a = Gateway(tmp_path_factory.mktemp("gw-a"), budget_docs(pki, upstream), env=env, db=str(db)).start()
    b = Gateway(tmp_path_factory.mktemp("gw-b"), budget_docs(pki, upstream), env=env, db=str(db)).start()
    yield a, b
    live = [g for g in (a, b) if g.proc is not None and g.proc.poll() is None]
    for g in live:
        g.proc.send_signal(signal.SIGTERM)  # both first: the recorder goes once the last one is gone
    for g in live:
        g.stop()


def ledger(gw: Gateway) -> dict:
    with wire.BlockingClient(wire.socket_path(gw.db)) as c:
        return c.request({"t": "budget_pools"})


def day(gw: Gateway, pool: str) -> dict:
    return ledger(gw)["days"].get(pool_key(utc_day(time.time()), pool), {})


def body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


def reserved(model: str) -> int:
    return 50 + len(json.dumps(body(model)).encode()) // 4


def call(gw: Gateway, model: str, inv: str):
    """A call whose gateway may be killed under it: its answer, or one with no status."""
    try:
        return post(gw, body(model), inv)
    except httpx.HTTPError:
        return SimpleNamespace(status_code=None)


def test_the_gateways_run_this_code_and_share_one_recorder(gws):
    a, b = gws
    assert a.db == b.db and a.port != b.port
    assert "budgets are shared on recorder" in a.log() + b.log()
    assert ledger(a)["proxies"] == 2
    js = json.loads(subprocess.run([CLRK, "status", "--db", str(a.db), "--json"], capture_output=True, text=True,
                                   check=True).stdout)
    assert [bs["url"] for bs in js["budget_stores"]] == ["recorder", "recorder"]
    assert js["budget_ledger"]["ready"] and js["budget_ledger"]["proxies"] == 2
    text = subprocess.run([CLRK, "status", "--db", str(a.db)], capture_output=True, text=True, check=True).stdout
    assert "budget store recorder: shared" in text and "budget ledger held by this recorder: " in text


def test_both_gateways_share_one_token_pool_within_its_bound(gws, upstream):
    model = f"tok-hold-cost1000-{tag()}"
    r = reserved(model)
    assert MAX_TOKENS % r
    inv = tag()
    answers = fake_provider.race_held([lambda k=k: post(gws[k % 2], body(model), inv) for k in range(24)], upstream,
                                      model)
    statuses = [x.status_code for x in answers]
    admitted = statuses.count(200)
    assert admitted == MAX_TOKENS // r and statuses.count(429) == 24 - admitted, statuses
    assert len(upstream.requests_with(model)) == admitted
    d = wait_for(lambda: (v := day(gws[0], TOKENS_POOL)) and "r" not in v and v, "settlements in the recorder")
    assert int(d["u"]) == admitted * 1005 <= MAX_TOKENS + admitted * (1005 - r)
    rows = gws[1].wait_records(24, invocation=inv)  # one store: the calls of both gateways
    assert sum(1 for row in rows if row[A.CLRK_BUDGET_DENIED]) == 24 - admitted


def test_far_from_its_limit_a_pool_is_leased_and_most_calls_need_no_round_trip(gws):
    """40 calls through the two gateways on a pool of 10^9 tokens: most are admitted from a lease, without a
    round trip to the recorder; every call's usage reaches the shared day once, and what is left of the leases
    is given back (a second unused): nothing stays reserved."""
    pool = POOL.format("big")
    before = ledger(gws[0])
    inv = tag()
    statuses = [post(gws[k % 2], body(f"big-cost100-{tag()}"), inv).status_code for k in range(40)]
    assert statuses == [200] * 40
    after = ledger(gws[0])
    asked = after["admissions"] - before["admissions"]
    assert after["leases"] > before["leases"] and asked <= 10, asked
    d = wait_for(lambda: (v := day(gws[0], pool)) and "r" not in v and v, "usage settled and leases given back")
    assert int(d["u"]) == 40 * 105
    rows = gws[1].wait_records(40, invocation=inv)
    assert all(row[A.CLRK_BUDGET_POOL] == pool and not row[A.CLRK_BUDGET_DENIED] for row in rows)


def test_a_gateway_killed_while_holding_reservations_frees_them_for_the_other(gws, upstream):
    a, b = gws
    pool = POOL.format("kill")
    model = f"kill-hold-cost100-{tag()}"
    n = MAX_TOKENS // reserved(model)
    seen: dict = {}

    def kill_a() -> None:
        assert int(day(a, pool)["r"]) == n * reserved(model)  # a holds the pool
        i = tag()
        seen["before"] = post(b, body(f"kill-pass-cost100-{i}"), i)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        t0 = time.monotonic()
        seen["after"] = wait_for(lambda: (r := post(b, body(f"kill-pass-cost100-{tag()}"), tag())).status_code == 200 and r,
                                 "b admitted once a's reservations are released", timeout=20)
        seen["waited"] = time.monotonic() - t0

    answers = fake_provider.race_held([lambda: call(a, model, tag()) for _ in range(n + 2)], upstream, model,
                                      while_held=kill_a)
    assert [x.status_code for x in answers].count(429) == 2
    assert seen["before"].status_code == 429, seen["before"].text
    assert clrk_message(seen["before"].json()).startswith("clrk: token budget exceeded")
    assert seen["waited"] >= 1.0  # released after the grace, not at once
    d = wait_for(lambda: (v := day(b, pool)) and "r" not in v and v, "b's call settled")
    assert int(d["u"]) == 105  # b's one call; a's held calls were never charged (a died before they ended)
    a.log_path.rename(a.dir / "gateway-killed.log")  # start() waits for this run's "proxy listening"
    a.start()  # for the next test


def test_the_recorder_killed_under_load_is_restarted_and_keeps_the_bound(gws, upstream):
    a, b = gws
    pool = POOL.format("rst")
    model = f"rst-hold-cost100-{tag()}"
    r = reserved(model)
    n = MAX_TOKENS // r
    seen: dict = {}

    def kill_recorder() -> None:
        before = ledger(a)
        assert int(before["days"][pool_key(utc_day(time.time()), pool)]["r"]) == n * r
        old = os_pid(a)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: os_pid(a, old), "a new recorder", timeout=20)
        # while the calls are held: the pool is full again (what the proxies hold is held by the new recorder)
        seen["during"] = wait_for(lambda: (x := post(b, body(f"rst-pass-cost100-{tag()}"), tag())).status_code != 503 and x,
                                  "the ledger on the new recorder", timeout=20)
        seen["epochs"] = (before["epoch"], ledger(a)["epoch"])

    inv = tag()
    answers = fake_provider.race_held([lambda k=k: call(gws[k % 2], model, inv) for k in range(n + 4)], upstream,
                                      model, while_held=kill_recorder)
    statuses = [x.status_code for x in answers]
    assert statuses.count(200) == n and statuses.count(429) == 4, statuses
    assert seen["during"].status_code == 429, seen["during"].text
    assert seen["epochs"][0] != seen["epochs"][1]
    d = wait_for(lambda: (v := day(a, pool)) and "r" not in v and v, "every held call settled")
    assert int(d["u"]) == n * 105  # each call's usage once; nothing released twice (r would be negative or gone early)
    assert n * 105 > MAX_TOKENS  # the day is spent: nothing more is admitted, on either
    assert all(post(g, body(f"rst-pass-cost100-{tag()}"), tag()).status_code == 429 for g in gws)


def os_pid(gw: Gateway, not_this: int | None = None) -> int | None:
    try:
        with wire.BlockingClient(wire.socket_path(gw.db), timeout=2) as c:
            pid = c.request({"t": "status"})["pid"]
    except (OSError, wire.WireError):
        return None
    return pid if pid != not_this else None
