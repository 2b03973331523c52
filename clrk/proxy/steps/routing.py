"""Step ProviderRouting: what an allow decision of an AIProviderRoute rule sets in motion before the
request leaves: its TokenBudget (admit, or refuse before any upstream contact) and Backend (where to, which
model, stream usage on).

A budgeted route admits a call only when the gateway can estimate what it may cost (`estimate`) and that fits
in what the pool has left (clrk/budget.py). Refused before the upstream: a body it does not read whole (413)
or cannot read as a JSON object (400); a count it cannot read as one (400: `n: "many"`, `max_tokens: -1`,
`candidateCount: 2.5`, a bool), since a provider reading it some other way could cost anything; a job billed
after the answer (403: batches, fine-tuning); input the provider holds under `serverContext: Refuse` (403);
an estimate past what is left (429), which is refused rather than clamped so that it never holds the pool.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable

from mitmproxy import http

from clrk.cost import format_usd
from clrk.decision import Decision
from clrk.policy.compiled import BackendTarget, BudgetConfig, ProviderRule
from clrk.providers.base import NO_CHANGES, ProviderParser
from clrk.proxy.budget_store import Refusal, SharedLedger, StoreUnavailable
from clrk.proxy.runtime import Runtime, refuse
from clrk.proxy.transaction import METADATA_KEY, Transaction

LEDGER_WAIT_SECONDS = 10.0
INT64_MAX = 2**63 - 1  # what the record can carry


def estimate(genai: ProviderParser | None, budget: BudgetConfig) -> int:
    """The most a call may cost as far as its request tells: each generation's max output tokens (else the
    budget's reserveTokens) times how many generations it asks for, plus its body size / 4 for the input, plus
    the input the provider holds for it (the cap the request names, else serverContextTokens)."""
    if genai is None:
        return budget.reserve_tokens
    output = (genai.max_output_tokens or budget.reserve_tokens) * genai.choices
    held = (genai.max_input_tokens or budget.server_context_tokens or 0) if genai.server_context else 0
    return max(1, output + genai.request_size // 4 + held)


class ProviderRouting:
    """Applies the matched AIProviderRoute rule: budget admission first, then the Backend. Not a hook of its
    own: `EgressControl` runs `route` once, where it allows the request (a budgeted call whose body is still to
    come, on the request hook: its estimate needs the whole body)."""

    name = "clrk_provider_routing"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def route(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Plain function on the hot path; only right after start, while today's usage is still being read
        from the store, does a budgeted call wait (it then returns the awaitable that finishes the job)."""
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or flow.response or flow.error or tx.decision is None or not tx.decision.allow:
            return None
        rule = tx.decision.provider_rule
        if rule is None:
            return None
        if rule.budget is not None and not self.rt.ledger.loaded:
            return self._apply_when_loaded(flow, tx, rule)
        return self._route_call(flow, tx, rule)

    async def _apply_when_loaded(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEDGER_WAIT_SECONDS
        while not self.rt.ledger.loaded and loop.time() < deadline:
            await asyncio.sleep(0.02)
        pending = self._route_call(flow, tx, rule)
        if pending is not None:
            await pending

    def _route_call(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule) -> Awaitable[None] | None:
        """Admission, then the Backend; with a shared budget store (clrk.proxy.budget_store) the admission is a
        round trip to it, and the awaitable that finishes the job is returned."""
        waits = False
        try:
            if rule.budget is not None:
                budget = rule.budget
                tx.budget_pool = rule.pool + (f"/agent:{tx.agent.ref}" if budget.per_agent and tx.agent else "")
                tx.budget_max = budget.max_tokens_per_day
                if not tx.buffered_as_provider():
                    # A body the gateway does not read (chunked, or past 32 MiB) cannot be estimated nor made to
                    # report its usage: a budget could not hold.
                    self._deny(flow, tx, Decision(False, rule.ref, "requests to a budgeted route need a "
                                                  "Content-Length body of at most 32 MiB", 413))
                    return None
                refusal = self._unbudgetable(flow, tx, rule)
                if refusal is not None:
                    self._deny(flow, tx, refusal)
                    return None
                if isinstance(self.rt.ledger, SharedLedger):
                    priced = self._priced(flow, tx, rule)
                    if priced is None:
                        return None
                    if not self._admit_leased(flow, tx, rule, self.rt.ledger, priced):
                        waits = True
                        return self._admit_shared(flow, tx, rule, self.rt.ledger, priced)
                elif not self._admit(flow, tx, rule):
                    return None
            self._admitted(flow, tx, rule)
        finally:
            if tx.genai is not None and not waits:
                tx.genai.request_sent()  # the body has been read and possibly rewritten: let it go
        return None

    def _admitted(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule) -> None:
        backend = self._route(flow, tx, rule) if rule.backends else None
        if tx.genai is not None:
            self._mutate(flow.request, tx, backend, usage_needed=rule.budget is not None)

    def _admit_leased(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule, ledger: SharedLedger,
                      priced: tuple[int, float, float]) -> bool:
        """A call admitted from this process's lease of its pool (the recorder's ledger), with no round trip
        and nothing to await; False when there is no lease that covers it (then `_admit_shared` asks)."""
        budget, pool = rule.budget, tx.budget_pool
        assert budget is not None and pool is not None
        res = ledger.take_leased(pool, budget.max_tokens_per_day, priced[0], budget.max_cost_per_day, priced[1])
        if res is None:
            return False
        tx.reservation = res
        tx.budget_used = ledger.used_today(pool)
        if budget.max_cost_per_day is not None:
            tx.budget_used_cost = ledger.used_cost_today(pool)
        return True

    async def _admit_shared(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule, ledger: SharedLedger,
                            priced: tuple[int, float, float]) -> None:
        try:
            tokens, cost, rate = priced
            budget = rule.budget
            assert budget is not None and tx.budget_pool is not None
            pool = tx.budget_pool
            try:
                got = await ledger.admit(pool, budget.max_tokens_per_day, tokens, budget.max_cost_per_day, cost)
            except StoreUnavailable:
                if tx.gateway is None or not tx.gateway.budget_fail_open:
                    ledger.fail_closed += 1
                    self._deny(flow, tx, Decision(False, rule.ref, "budget store unavailable", 503))
                    return
                res = ledger.admit_local(pool, budget.max_tokens_per_day, tokens, budget.max_cost_per_day, cost)
                if res is None:
                    local = ledger.local
                    mx, mc = budget.max_tokens_per_day, budget.max_cost_per_day
                    self._refuse_budget(flow, tx, rule, tokens, cost, rate, local.used_today(pool),
                                        None if mx is None else local.left(pool, mx),
                                        None if mc is None else local.left_cost(pool, mc))
                    return
                got = res
            if isinstance(got, Refusal):
                mx, mc = budget.max_tokens_per_day, budget.max_cost_per_day
                self._refuse_budget(flow, tx, rule, tokens, cost, rate, got.used,
                                    None if mx is None else mx - got.used - got.reserved,
                                    None if mc is None else mc - got.used_cost - got.reserved_cost)
                return
            if flow.response is not None or flow.error is not None:  # the agent left while Redis answered
                ledger.settle(got, 0, 0.0)
                return
            tx.reservation = got
            tx.budget_used = ledger.used_today(pool)
            if budget.max_cost_per_day is not None:
                tx.budget_used_cost = ledger.used_cost_today(pool)
            self._admitted(flow, tx, rule)
        finally:
            if tx.genai is not None:
                tx.genai.request_sent()

    @staticmethod
    def _unbudgetable(flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule) -> Decision | None:
        """The refusal of a call whose cost the budget could not bound, or None."""
        budget, genai = rule.budget, tx.genai
        assert budget is not None
        if genai is None:
            return None
        if genai.request_doc is None and flow.request.raw_content:
            # Not JSON to the gateway (nested past its parser's depth, say) may still be JSON to the provider.
            return Decision(False, rule.ref, "requests to a budgeted route need a body the gateway reads as a JSON "
                                             "object", 400)
        if genai.invalid is not None:
            return Decision(False, rule.ref, f"a budgeted route cannot estimate this request: {genai.invalid}", 400)
        if genai.unbudgetable is not None:
            return Decision(False, rule.ref, f"{genai.unbudgetable}, out of the gateway's sight: a budgeted route "
                                             "does not admit them", 403)
        if genai.server_context is not None and budget.server_context_tokens is None:
            return Decision(False, rule.ref, f"this request bills input the provider holds ({genai.server_context}), "
                                             f"which the gateway cannot estimate: route {rule.route_name} refuses such "
                                             "calls (serverContext: Refuse)", 403)
        return None

    def _priced(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule) -> tuple[int, float, float] | None:
        """The call's estimate: tokens, their dollars (0 without a dollar limit) and the rate they are priced
        at; None when the call is refused because a dollar limit cannot price it."""
        budget = rule.budget
        assert budget is not None and tx.budget_pool is not None
        tokens = estimate(tx.genai, budget)
        tx.budget_reserved = min(tokens, INT64_MAX)
        cost, rate = 0.0, 0.0
        if budget.max_cost_per_day is not None:
            tx.budget_max_cost = budget.max_cost_per_day
            tx.budget_used_cost = self.rt.ledger.used_cost_today(tx.budget_pool)
            priced = self._admission_rate(tx, rule, tokens)
            if isinstance(priced, str):
                self._deny(flow, tx, Decision(False, rule.ref, f"a dollar budget cannot bound calls to {priced}: it has "
                                                               "no known price (a ModelPricing entry can give it one)", 403))
                return None
            rate = priced
            cost = tokens * rate
        return tokens, cost, rate

    def _admit(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule) -> bool:
        budget = rule.budget
        assert budget is not None
        ledger = self.rt.ledger
        pool = tx.budget_pool
        assert pool is not None
        if not ledger.loaded:
            tx.budget_used = None
            self._deny(flow, tx, Decision(False, rule.ref, "token budget ledger is not available yet; try again shortly", 503))
            return False
        priced = self._priced(flow, tx, rule)
        if priced is None:
            return False
        tokens, cost, rate = priced
        tx.reservation = ledger.admit(pool, budget.max_tokens_per_day, tokens, budget.max_cost_per_day, cost)
        if tx.reservation is None:
            mx, mc = budget.max_tokens_per_day, budget.max_cost_per_day
            self._refuse_budget(flow, tx, rule, tokens, cost, rate, ledger.used_today(pool),
                                None if mx is None else ledger.left(pool, mx),
                                None if mc is None else ledger.left_cost(pool, mc))
            return False
        tx.budget_used = ledger.used.get(pool, 0)  # used_today(pool) without a second clock read: admit just rolled the day
        return True

    def _refuse_budget(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule, tokens: int, cost: float,
                       rate: float, used: int, left: int | None, left_cost: float | None) -> None:
        """The 429 of a call that does not fit: what it may cost, and what the pool has left (tokens where
        those are short, else dollars)."""
        budget = rule.budget
        assert budget is not None
        tx.budget_denied = True
        tx.budget_used = used
        mx = budget.max_tokens_per_day
        if mx is not None and left is not None and left < max(tokens, 1):
            more = (f"more than the whole day's {mx}" if tokens > mx else f"and {max(0, left)} of the day's {mx} are left")
            what = f"{tokens} tokens, {more}"
        else:
            mc = budget.max_cost_per_day
            assert mc is not None
            left_usd = max(0.0, left_cost or 0.0)
            more = (f"more than the whole day's ${mc:g}" if cost > mc
                    else f"and {format_usd(left_usd)} of the day's ${mc:g} are left")
            what = f"{format_usd(cost)} ({tokens} tokens at {format_usd(rate * 1e6)} per million), {more}"
        self._deny(flow, tx, Decision(False, rule.ref, f"token budget exceeded for route {rule.route_name}: this "
                                                       f"request may cost up to {what}", 429))

    def _admission_rate(self, tx: Transaction, rule: ProviderRule, tokens: int) -> float | str:
        """USD per token a dollar budget reserves the call's estimate at: the dearest token price of every model
        that may serve it (the one asked for, or a Backend's rewrite of it); or the model without a price."""
        genai, policy = tx.genai, self.rt.policy
        model = genai.result.request_model if genai is not None else None
        if genai is None or policy is None or not isinstance(model, str) or not model:
            return "a model the gateway cannot name"
        models = {model}
        for backend, weight in rule.backends:
            if weight > 0:
                models.add(backend.rewrite_model(model) or model)
        rate = 0.0
        for m in sorted(models):
            price = policy.pricing.price(genai.result.system, m, tx.start)
            if price is None:
                return f"model {m[:200]}"
            rate = max(rate, price.highest_rate(tokens))
        return rate

    def _deny(self, flow: http.HTTPFlow, tx: Transaction, d: Decision) -> None:
        refuse(flow, tx, d)

    def _route(self, flow: http.HTTPFlow, tx: Transaction, rule: ProviderRule) -> BackendTarget:
        backends = rule.live_backends
        backend = backends[0] if len(backends) == 1 else random.choices(backends, rule.live_weights)[0]
        if backend.host != tx.dst_name or backend.port != tx.dst_port:
            req = flow.request
            req.host, req.port = backend.host, backend.port  # the Host header follows
            assert tx.agent is not None  # an allow decision has one
            self.rt.allow(flow.client_conn, backend.host, backend.port, tx.agent)
        return backend

    @staticmethod
    def _mutate(req: http.Request, tx: Transaction, backend: BackendTarget | None, usage_needed: bool) -> None:
        """The Backend's model rewrite; stream usage switched on where the Backend asks for it or a budget
        needs it (a budget settles on usage it can see). The provider says what to change; this is the one
        place it is applied."""
        genai = tx.genai
        assert genai is not None
        new_model = backend.rewrite_model(genai.result.request_model) if backend is not None else None
        changes = genai.request_changes(new_model, usage_needed or (backend is not None and backend.ensure_stream_usage))
        if changes is NO_CHANGES or not changes:  # (the identity first: no __bool__ call for the usual answer)
            return
        if changes.path is not None:
            _, sep, query = req.path.partition("?")
            req.path = changes.path + sep + query  # the query as it is now: a key injected on the headers stays
        if changes.members:
            req.set_content(genai.changed_body(changes.members))  # set_content encodes again, if the agent did
        tx.request_rewritten = True
