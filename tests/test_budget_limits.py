"""What a budgeted AIProviderRoute admits, against a real gateway: every output multiplier in the estimate,
input the provider holds, jobs billed later, a greedy request that must not lock a shared pool, and the
overshoot bound of clrk/budget.py under concurrent agents whose calls cost more than they reserved.

Requests are hand-written (bodies no SDK would send); the fake provider shows what reached the upstream."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from clrk import attributes as A
from tests.harness import fake_provider
from tests.harness.gateway import AGENT_TOKEN, Gateway, agent_docs, gateway_doc, sha
from tests.harness.util import clrk_message

HOSTS = ["api.openai.com", "generativelanguage.googleapis.com", "api.anthropic.com"]
TOKENS = {"team-a.researcher": AGENT_TOKEN, "team-a.writer": "tok-writer-5151515151", "team-a.auditor": "tok-auditor-6262626262"}
OPENAI = "https://api.openai.com"
GEMINI = "https://generativelanguage.googleapis.com"


def budget(max_tokens: int, **extra) -> list[dict]:
    return [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": max_tokens, "scope": "Route", **extra}}]


def docs(pki, upstream) -> list[dict]:
    def doc(kind, name, spec, ns="team-a"):
        return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec}

    rules = [
        {"matches": [{"provider": "openai", "models": ["n-*"]}], "filters": budget(10_000)},
        {"matches": [{"provider": "openai", "endpoints": ["/v1/completions"]}], "filters": budget(10_000)},
        {"matches": [{"provider": "google_genai", "models": ["cand-*"]}], "filters": budget(10_000)},
        {"matches": [{"provider": "openai", "models": ["ctx-*"]}], "filters": budget(10_000, serverContextTokens=6000)},
        {"matches": [{"provider": "openai", "models": ["wide-*"]}], "filters": budget(10_000)},
        {"matches": [{"provider": "openai", "models": ["refuse-*"]}], "filters": budget(10_000, serverContext="Refuse")},
        {"matches": [{"provider": "openai", "models": ["greedy-*"]}], "filters": budget(10_000)},
        {"matches": [{"provider": "openai", "models": ["bound-*"]}], "filters": budget(1000)},
        {"matches": [{"provider": "openai", "models": ["ft-*"]}, {"provider": "openai", "endpoints": ["/v1/batches"]},
                     {"provider": "anthropic", "endpoints": ["/v1/messages/batches"]},
                     {"provider": "google_genai", "endpoints": ["/v1beta/models/*:batchGenerateContent"]}],
         "filters": budget(10_000)},
    ]
    return [
        gateway_doc(aliases={h: upstream.address for h in HOSTS}, ca_bundle=str(pki[0])),
        *agent_docs(),
        *(doc("Agent", user.split(".")[1], {"credentials": {"tokenSha256": sha(tok)}})
          for user, tok in TOKENS.items() if user != "team-a.researcher"),
        doc("AIProviderRoute", "pool", {"sourceAgents": {"namespaces": ["team-a"]}, "rules": rules}),
    ]


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream):
    fake_provider.install(upstream)
    g = Gateway(tmp_path_factory.mktemp("budget-gw"), docs(pki, upstream)).start()
    yield g
    g.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def post(gw: Gateway, url: str, body: dict | bytes, inv: str, user: str = "team-a.researcher"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with gw.client(user, TOKENS[user]) as c:
        return c.post(url, content=content, headers={"content-type": "application/json", "clrk-invocation-id": inv})


def input_estimate(body: dict) -> int:
    return len(json.dumps(body).encode()) // 4


# --------------------------------------------------------------------------- output multipliers


CHAT_CASES = [
    # (extra fields, status, output the estimate must hold: per-choice max x choices)
    ({"n": 50, "max_tokens": 1000}, 429, 50_000),
    ({"n": 5, "max_tokens": 1000}, 200, 5000),
    ({"n": 3}, 200, 3 * 1024),  # no max tokens: reserveTokens per choice
    ({"n": 10**9, "max_tokens": 1000}, 429, None),
    ({"n": 10**30, "max_tokens": 10**30}, 429, None),
    ({"n": "50", "max_tokens": 1000}, 429, 50_000),  # a lenient provider reads the string
    ({"n": 2.0, "max_tokens": 1000}, 200, 2000),
    ({"max_tokens": "20000"}, 429, 20_000),
    ({"max_completion_tokens": 100, "max_tokens": 20_000}, 429, 20_000),  # the largest the provider may honour
    ({"n": -1, "max_tokens": 1000}, 400, None),
    ({"n": 0, "max_tokens": 1000}, 400, None),
    ({"n": 2.5, "max_tokens": 1000}, 400, None),
    ({"n": True, "max_tokens": 1000}, 400, None),
    ({"n": "many", "max_tokens": 1000}, 400, None),
    ({"n": [50], "max_tokens": 1000}, 400, None),
    ({"n": 2, "max_tokens": -5}, 400, None),
]


@pytest.mark.parametrize("extra,status,output", CHAT_CASES, ids=[json.dumps(c[0]) for c in CHAT_CASES])
def test_chat_choices_multiply_the_reservation_and_unreadable_counts_are_refused(gw, upstream, extra, status, output):
    i, model = tag(), f"n-{tag()}"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = post(gw, f"{OPENAI}/v1/chat/completions", body, i)
    assert r.status_code == status, r.text
    assert len(upstream.requests_with(model)) == (1 if status == 200 else 0)
    rec = gw.wait_record(invocation=i)
    if status == 400:
        assert clrk_message(r.json()).startswith("clrk: a budgeted route cannot estimate this request: ")
        assert rec.get(A.CLRK_BUDGET_RESERVED) is None
        return
    if status == 429:
        assert "more than the whole day's 10000" in clrk_message(r.json()) and rec[A.CLRK_BUDGET_DENIED] is True
    if output is not None:
        assert rec[A.CLRK_BUDGET_RESERVED] == output + input_estimate(body)
    else:
        assert rec[A.CLRK_BUDGET_RESERVED] > 10**9


LEGACY_CASES = [
    ({"prompt": ["a", "b"], "n": 2, "best_of": 3, "max_tokens": 2000}, 429, 12_000),  # best_of generations per prompt
    ({"prompt": ["a", "b"], "best_of": 2, "max_tokens": 1000}, 200, 4000),
    ({"prompt": [1, 2, 3], "best_of": 3, "max_tokens": 1000}, 200, 3000),  # one prompt, as token ids
    ({"prompt": [[1, 2], [3]], "n": 2, "max_tokens": 1000}, 200, 4000),
]


@pytest.mark.parametrize("extra,status,output", LEGACY_CASES, ids=[json.dumps(c[0]) for c in LEGACY_CASES])
def test_legacy_completions_reserve_best_of_for_every_prompt(gw, upstream, extra, status, output):
    i, model = tag(), f"legacy-{tag()}"
    body = {"model": model, **extra}
    r = post(gw, f"{OPENAI}/v1/completions", body, i)
    assert r.status_code == status, r.text
    assert len(upstream.requests_with(model)) == (1 if status == 200 else 0)
    assert gw.wait_record(invocation=i)[A.CLRK_BUDGET_RESERVED] == output + input_estimate(body)


GEMINI_CASES = [
    ({"generationConfig": {"candidateCount": 8, "maxOutputTokens": 2000}}, 429, 16_000),
    ({"generation_config": {"candidate_count": 8, "max_output_tokens": 2000}}, 429, 16_000),  # proto3 names
    ({"generationConfig": {"candidateCount": "8", "maxOutputTokens": "2000"}}, 429, 16_000),  # proto3 numbers as text
    ({"generationConfig": {"candidateCount": 2, "maxOutputTokens": 1000}}, 200, 2000),
    ({"generationConfig": {"candidateCount": 0, "maxOutputTokens": 1000}}, 200, 1000),  # proto3: 0 is unset
    ({"generationConfig": {"candidateCount": 4}}, 200, 4 * 1024),
    ({"generationConfig": {"candidateCount": -3, "maxOutputTokens": 1000}}, 400, None),
    ({"generationConfig": {"candidateCount": 1.5}}, 400, None),
]


@pytest.mark.parametrize("extra,status,output", GEMINI_CASES, ids=[json.dumps(c[0]) for c in GEMINI_CASES])
def test_gemini_candidate_count_multiplies_the_reservation(gw, upstream, extra, status, output):
    i, model = tag(), f"cand-{tag()}"
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], **extra}
    r = post(gw, f"{GEMINI}/v1beta/models/{model}:generateContent", body, i)
    assert r.status_code == status, r.text
    assert len(upstream.requests_with(model)) == (1 if status == 200 else 0)
    rec = gw.wait_record(invocation=i)
    assert rec.get(A.CLRK_BUDGET_RESERVED) == (None if output is None else output + input_estimate(body))


# --------------------------------------------------------------------------- input the provider holds


HELD = [
    ({"previous_response_id": "resp_0123"}, "previous_response_id"),
    ({"conversation": "conv_0123"}, "conversation"),
    ({"conversation": {"id": "conv_0123"}}, "conversation"),
    ({"prompt": {"id": "pmpt_0123", "version": "2"}}, "prompt"),
]


@pytest.mark.parametrize("held,field", HELD, ids=[h[1] + str(n) for n, h in enumerate(HELD)])
def test_held_context_is_reserved_refused_or_past_the_pool_as_the_route_says(gw, upstream, held, field):
    reserve_i, refuse_i, wide_i, t = tag(), tag(), tag(), tag()
    bodies = {name: {"model": f"{name}-{t}", "input": "continue", "max_output_tokens": 100, **held} for name in ("ctx", "refuse", "wide")}
    # serverContextTokens: 6000 -> reserved on top of the output and the body
    r = post(gw, f"{OPENAI}/v1/responses", bodies["ctx"], reserve_i)
    assert r.status_code == 200, r.text
    assert gw.wait_record(invocation=reserve_i)[A.CLRK_BUDGET_RESERVED] == 100 + input_estimate(bodies["ctx"]) + 6000
    # serverContext: Refuse
    r = post(gw, f"{OPENAI}/v1/responses", bodies["refuse"], refuse_i)
    assert r.status_code == 403
    assert clrk_message(r.json()) == (f"clrk: this request bills input the provider holds ({field}), which the gateway cannot "
                                 "estimate: route pool refuses such calls (serverContext: Refuse)")
    # the default 128000 held tokens do not fit in a pool of 10000
    r = post(gw, f"{OPENAI}/v1/responses", bodies["wide"], wide_i)
    assert r.status_code == 429 and "more than the whole day's 10000" in clrk_message(r.json())
    assert gw.wait_record(invocation=wide_i)[A.CLRK_BUDGET_RESERVED] == 100 + input_estimate(bodies["wide"]) + 128_000
    assert not upstream.requests_with(f"refuse-{t}") and not upstream.requests_with(f"wide-{t}")
    # the refusing route still serves what carries its whole input
    plain = {"model": f"refuse-{t}-plain", "input": "hi", "max_output_tokens": 100}
    assert post(gw, f"{OPENAI}/v1/responses", plain, tag()).status_code == 200


def test_assistants_runs_and_gemini_cached_content_are_held_context(gw, upstream):
    t = tag()
    run = {"assistant_id": "asst_1", "model": f"ctx-run-{t}", "max_prompt_tokens": 2000, "max_completion_tokens": 500}
    i = tag()
    assert post(gw, f"{OPENAI}/v1/threads/thread_1/runs", run, i).status_code == 200
    assert gw.wait_record(invocation=i)[A.CLRK_BUDGET_RESERVED] == 500 + input_estimate(run) + 2000  # the run's own cap
    i = tag()
    assert post(gw, f"{OPENAI}/v1/threads/runs", {**run, "max_prompt_tokens": None}, i).status_code == 200
    assert gw.wait_record(invocation=i)[A.CLRK_BUDGET_RESERVED] == 500 + input_estimate({**run, "max_prompt_tokens": None}) + 6000
    i, model = tag(), f"cand-{tag()}"
    cached = {"cachedContent": "cachedContents/big-document", "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    r = post(gw, f"{GEMINI}/v1beta/models/{model}:generateContent", cached, i)
    assert r.status_code == 429 and not upstream.requests_with(model)
    assert gw.wait_record(invocation=i)[A.CLRK_BUDGET_RESERVED] == 1024 + input_estimate(cached) + 128_000


# --------------------------------------------------------------------------- calls no budget can hold


JOBS = [
    (OPENAI, "/v1/fine_tuning/jobs", {"model": "ft-base", "training_file": "file-abc"}),
    (OPENAI, "/v1/batches", {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    ("https://api.anthropic.com", "/v1/messages/batches",
     {"requests": [{"custom_id": "a", "params": {"model": "claude-x", "max_tokens": 10, "messages": []}}]}),
    (GEMINI, "/v1beta/models/gem-x:batchGenerateContent", {"batch": {"input_config": {"file_name": "files/abc"}}}),
]


@pytest.mark.parametrize("host,path,body", JOBS, ids=[j[1] for j in JOBS])
def test_jobs_billed_after_the_answer_are_refused_on_a_budgeted_route(gw, upstream, host, path, body):
    i, t0 = tag(), time.time()
    r = post(gw, host + path, body, i)
    assert r.status_code == 403 and "billed after this request is answered" in clrk_message(r.json())
    assert not [x for x in upstream.requests_since(t0) if x.path.startswith(path)]
    assert gw.wait_record(invocation=i)[A.CLRK_DECISION_RULE] == "AIProviderRoute/team-a/pool#rules[8]"


def test_a_body_the_gateway_cannot_parse_is_refused_not_estimated_as_small(gw, upstream):
    """Nested past the gateway's JSON parser, the body hides `n` and `max_tokens` a provider could still read."""
    t = tag()
    deep = b'{"model":"legacy-' + t.encode() + b'","prompt":"hi","n":100,"max_tokens":4000,"user":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    i = tag()
    r = post(gw, f"{OPENAI}/v1/completions", deep, i)
    assert r.status_code == 400 and "reads as a JSON object" in clrk_message(r.json())
    assert not upstream.requests_with(t)


# --------------------------------------------------------------------------- a shared pool under pressure


@pytest.mark.parametrize("greedy", [{"n": 50, "max_tokens": 1000}, {"max_tokens": 1_000_000}], ids=["n50", "max1M"])
def test_a_greedy_request_cannot_lock_other_agents_out_of_the_pool(gw, upstream, greedy):
    t = tag()
    fake_provider.RELEASE.clear()
    status: list[int] = []
    greedy_body = {"model": f"greedy-hold-{t}", "messages": [{"role": "user", "content": "hi"}], **greedy}
    th = threading.Thread(target=lambda: status.append(post(gw, f"{OPENAI}/v1/chat/completions", greedy_body, tag()).status_code))
    th.start()
    try:
        deadline = time.monotonic() + 10
        while not status and not upstream.requests_with(f"greedy-hold-{t}"):  # decided: answered, or held upstream
            assert time.monotonic() < deadline
            time.sleep(0.01)
        small = {"model": f"greedy-small-{t}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
        r = post(gw, f"{OPENAI}/v1/chat/completions", small, tag(), user="team-a.writer")
        assert r.status_code == 200, r.text
    finally:
        fake_provider.RELEASE.set()
        th.join(30)
    assert status == [429] and not upstream.requests_with(f"greedy-hold-{t}")


def test_concurrent_agents_overshoot_only_by_what_they_used_beyond_their_reservations(gw, upstream):
    """30 requests from three agents on one Route pool of 1000, all held upstream until every one is decided
    (no settlement during admission: the worst case); each really costs 205 tokens, more than it reserved."""
    t, inv = tag(), tag()
    content = "hi"
    while True:  # a reservation that does not divide the pool, so a ledger admitting one too many would show
        body = {"model": f"bound-hold-cost200-{t}", "messages": [{"role": "user", "content": content}], "max_tokens": 50}
        reservation = 50 + input_estimate(body)
        if 1000 % reservation:
            break
        content += "!"
    fake_provider.RELEASE.clear()
    statuses: list[int] = []
    users = list(TOKENS)

    def one(k: int) -> None:
        statuses.append(post(gw, f"{OPENAI}/v1/chat/completions", body, inv, user=users[k % 3]).status_code)

    with ThreadPoolExecutor(30) as ex:
        try:
            futures = [ex.submit(one, k) for k in range(30)]
            deadline = time.monotonic() + 20
            while statuses.count(429) + len(upstream.requests_with(f"bound-hold-cost200-{t}")) < 30:
                assert time.monotonic() < deadline, (statuses, len(upstream.requests_with(t)))
                time.sleep(0.02)
        finally:
            fake_provider.RELEASE.set()
        for f in futures:
            f.result(30)
    admitted = statuses.count(200)
    assert statuses.count(429) == 30 - admitted and len(upstream.requests_with(f"bound-hold-cost200-{t}")) == admitted
    assert admitted == 1000 // reservation  # every reservation that fits, and not one more
    rows = [r for r in gw.wait_records(30, timeout=15, invocation=inv) if not r[A.CLRK_BUDGET_DENIED]]
    assert all(r[A.CLRK_BUDGET_RESERVED] == reservation and r[A.CLRK_BUDGET_TOKENS] == 205 for r in rows)
    used = max(r[A.CLRK_BUDGET_DAILY_USED] for r in rows)
    excess = sum(r[A.CLRK_BUDGET_TOKENS] - r[A.CLRK_BUDGET_RESERVED] for r in rows)
    assert used == 205 * admitted
    assert used <= 1000 + excess  # the bound of clrk/budget.py
    # Spent: a further request of any agent is refused before the upstream.
    after = {"model": f"bound-after-{t}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = post(gw, f"{OPENAI}/v1/chat/completions", after, tag(), user="team-a.auditor")
    assert r.status_code == 429 and "and 0 of the day's 1000 are left" in clrk_message(r.json())
    assert not upstream.requests_with(f"bound-after-{t}")
