"""Records for the store tests: a fleet's day of provider calls (several agents, routes and models over two
UTC days, priced and not, budgeted and denied), hostile values, and the comparison both stores are held to."""

from __future__ import annotations

import random
import time

from clrk import attributes as A

HOSTILE = [
    "o'brien", 'say "hi"', "back\\slash", "\\'; DROP TABLE records; --", "tab\tnew\nline\r", "nul\0byte",
    "`backtick`", "percent%_under", "ünïcödé ✓", "?", "{x:String}", "' OR 1=1 --",
]


def record(i: int, t: float, **kw) -> dict:
    r = {A.TIME: t, A.END_TIME: t + 0.25, A.TRACE_ID: f"{i:032x}", A.SPAN_ID: f"{i:016x}",
         A.HTTP_REQUEST_METHOD: "POST", A.HTTP_RESPONSE_STATUS_CODE: 200, A.SERVER_ADDRESS: "api.openai.com",
         A.URL_FULL: "https://api.openai.com/v1/chat/completions", A.CLRK_DECISION: "allow",
         A.REQUEST_HEADERS: {"content-type": "application/json", "authorization": A.REDACTED},
         A.CLRK_REQ_TRUNCATED: False}
    r.update(kw)
    return r


def fleet_day(now: float) -> list[dict]:
    """Provider calls of several agents, routes, models over two UTC days, priced and not, budgeted and
    denied, plus plain HTTP and an unauthenticated denial (no agent)."""
    rng = random.Random(15)
    today = now // 86400 * 86400
    rows = []
    for i in range(120):
        t = today + rng.uniform(-86400, now - today - 1)
        agent = rng.choice([("team-a", "researcher"), ("team-b", "coder"), ("team-a", HOSTILE[i % len(HOSTILE)])])
        model = rng.choice(["gpt-4o-mini", "claude-3-5-haiku", "o'model\\x", None])
        kw = {A.AGENT_NAMESPACE: agent[0], A.AGENT_NAME: agent[1], A.GEN_AI_SYSTEM: "openai",
              A.GEN_AI_REQUEST_MODEL: model, A.CLRK_APR_NAMESPACE: "team-a", A.CLRK_APR_NAME: rng.choice(["openai", "anthropic"]),
              A.GEN_AI_USAGE_INPUT_TOKENS: rng.choice([None, rng.randrange(1, 5000)]),
              A.GEN_AI_USAGE_OUTPUT_TOKENS: rng.choice([None, rng.randrange(1, 900)]),
              A.GEN_AI_RESPONSE_FINISH_REASONS: rng.choice([None, ["stop"], ["length", "stop"]]),
              A.GEN_AI_RESPONSE_STREAM: rng.choice([None, True, False])}
        if rng.random() < 0.6:
            kw[A.GEN_AI_USAGE_COST] = rng.choice([0.1, 0.2, 0.3, 1e-7, 3.3333e-5, 0.0])
            kw[A.CLRK_COST_SOURCE] = "genai-prices 0.2.3"
        elif rng.random() < 0.5:
            kw[A.CLRK_COST_SOURCE] = "unknown"
        if rng.random() < 0.5:
            kw[A.CLRK_BUDGET_POOL] = rng.choice(["team-a/openai/daily", "team-b/o'pool"])
            kw[A.CLRK_BUDGET_TOKENS] = rng.randrange(0, 6000)
            kw[A.CLRK_BUDGET_DAILY_MAX] = rng.choice([None, 100_000, 200_000])
            if rng.random() < 0.5:
                kw[A.CLRK_BUDGET_COST] = rng.choice([0.25, 0.5, 1e-6])
                kw[A.CLRK_BUDGET_DAILY_MAX_COST] = rng.choice([None, 5.0, 10.0])
        if rng.random() < 0.1:
            kw[A.CLRK_BUDGET_DENIED] = True
            kw[A.HTTP_RESPONSE_STATUS_CODE] = 429
        rows.append(record(i, t, **kw))
    rows.append(record(900, now - 5, **{A.SERVER_ADDRESS: "example.org", A.URL_FULL: "https://example.org/'\"?q=1"}))
    rows.append(record(901, now - 4, **{A.CLRK_DECISION: "deny", A.HTTP_RESPONSE_STATUS_CODE: 407,
                                         A.GEN_AI_SYSTEM: "openai", A.GEN_AI_USAGE_INPUT_TOKENS: 3}))
    return rows


def canon(rows: list[dict]) -> list[dict]:
    """Rows in a fixed order (ties in ORDER BY are the engine's business), floats to 1e-9 dollars."""
    fix = [{k: (round(v, 9) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return sorted(fix, key=lambda r: repr(sorted(r.items())))


def assert_same_answers(ch, duck) -> None:
    """The same records into both stores, in batches as the recorder writes: every read answers the same
    (records and budgets to the nano-dollar, spend to the last bit and in the same order)."""
    now = time.time()
    rows = fleet_day(now)
    for i in range(0, len(rows), 40):  # in batches, as the recorder writes
        ch.insert([dict(r) for r in rows[i:i + 40]])
        duck.insert([dict(r) for r in rows[i:i + 40]])
    for query in ({"limit": 0}, {"limit": 10}, {"agent": "team-a/researcher", "limit": 0}, {"agent": "team-a.researcher"},
                  {"status": 429, "limit": 0}, {"host": "*.openai.com", "limit": 0}, {"host": "example.org"},
                  {"since": "1h", "limit": 0}, {"decision": "deny"}):
        got, want = ch.records(query), duck.records(query)
        assert len(got) == len(want) and canon(got) == canon(want), query
    newest = duck.records({"limit": 5})
    assert [r[A.SPAN_ID] for r in ch.records({"limit": 5})] == [r[A.SPAN_ID] for r in newest]  # newest first
    for query in ({}, {"by": ["day"]}, {"by": ["agent"]}, {"by": ["model"], "usd": True}, {"by": ["route", "model"]},
                  {"by": ["day", "agent"], "since": "2d"}, {"agent": "team-b/coder"}, {"model": "o'model\\x"},
                  {"route": "team-a/openai", "by": ["agent"]}):
        got, want = ch.spend(query), duck.spend(query)
        assert got and sorted(got, key=repr) == sorted(want, key=repr), query  # to the last bit of every dollar
        # the order is the same too, wherever DuckDB's is decided (no ties in its sort keys)
        keys = [k for k in ("day", "cost_usd" if query.get("usd") else None, "total_tokens") if k and k in got[0]]
        assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
    since = now // 86400 * 86400
    assert canon(ch.budgets(since)) == canon(duck.budgets(since)) and ch.budgets(since)
    (t1, c1), (t2, c2) = ch.totals(since), duck.totals(since)
    assert t1 == t2 and t1 and c1.keys() == c2.keys() and all(abs(c1[k] - c2[k]) < 1e-9 for k in c1)
