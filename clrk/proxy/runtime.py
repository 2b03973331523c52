"""State the steps share: the current policy, the record sink, the budget ledger, per-connection facts."""

from __future__ import annotations

import json
import logging
import time
import weakref

from mitmproxy import connection, http

from clrk.cost import UNKNOWN
from clrk.decision import Decision
from clrk.errors import JSON_HEADERS, error_body, no_retry_headers, seconds_until_utc_midnight
from clrk.escape import printable
from clrk.identity import AuthThrottle
from clrk.mcp import rpc_error
from clrk.policy import CompiledPolicy
from clrk.policy.compiled import AgentIdentity
from clrk.providers.base import GenAiResult
from clrk.proxy.budget import MAX_TOKENS, BudgetLedger
from clrk.proxy.capture import request_is_buffered
from clrk.proxy.mcp import McpSessions
from clrk.proxy.sink import RecordSink
from clrk.proxy.transaction import METADATA_KEY, Transaction, Tunnel, snapshot
from clrk.snapshot import Snapshot

log = logging.getLogger("clrk")


class Runtime:
    def __init__(self) -> None:
        self.policy: CompiledPolicy | None = None
        self.sink: RecordSink | None = None
        self.ledger = BudgetLedger()
        self.auth_throttle = AuthThrottle()
        # Keyed by client connection id; dropped when the client disconnects (plain dicts: this is looked up
        # on every request, and a WeakKeyDictionary lookup costs a Python-level call).
        self.tunnels: dict[str, Tunnel] = {}
        # Upstream addresses a decision allowed for a client connection, and the agent it allowed them for
        # (whose EgressRoute cidrs apply when the name is resolved); nothing else may be dialled.
        self.allowed: dict[str, dict[tuple[str, int], AgentIdentity]] = {}
        self.aliased: weakref.WeakKeyDictionary[connection.Server, tuple[str, int]] = weakref.WeakKeyDictionary()
        # The last upstream connection refused for a client connection, by the message it failed with: the flow
        # that needed it fails with that message, and its record gets error.type policy_blocked.
        self.blocked: dict[str, str] = {}
        self.unsent: list[Snapshot] = []
        self.in_flight = 0  # transactions begun and not yet recorded (what a graceful stop waits for)
        self.mcp_sessions = McpSessions()  # MCP requests waiting for an answer in another transaction

    def allow(self, client: connection.Client, host: str, port: int, agent: AgentIdentity) -> None:
        allowed = self.allowed.get(client.id)
        if allowed is None:
            self.allowed[client.id] = {(host, port): agent}
        else:
            allowed[(host, port)] = agent

    def forget(self, client: connection.Client) -> None:
        self.tunnels.pop(client.id, None)
        self.allowed.pop(client.id, None)
        self.blocked.pop(client.id, None)

    def finish(self, flow: http.HTTPFlow, tx: Transaction) -> None:
        """Ends the transaction: the provider parser's last word, the budget settled, the record shipped."""
        policy = self.policy
        if tx.recorded or policy is None:
            return
        tx.recorded = True
        if tx.counted:
            self.in_flight -= 1
        genai = tx.genai
        seen = False  # usage the provider reported (a cut stream: what it reported so far)
        if genai is not None:
            r = genai.end()
            if r.usage_visible:  # priced from it
                seen = True
                self.price(tx, r)
        res = tx.reservation
        if res is not None:
            if seen:
                # What an upstream reports, within what a record can store (and never a refund).
                actual: int | None = min(max((r.input_tokens or 0) + (r.output_tokens or 0), 0), MAX_TOKENS)
            else:
                resp = flow.response
                status = resp.status_code if resp is not None and tx.upstream_response else None
                # not served (refused, failed, unreachable): nothing to charge; served but usage unseen: the
                # reservation is charged
                actual = 0 if status is None or status >= 400 else None
            tx.budget_charged = res.tokens if actual is None else actual
            if seen and tx.cost is not None:
                actual_cost: float | None = tx.cost
            elif actual == 0:
                actual_cost = 0.0
            else:  # served, but its usage or its model's price unseen: the reserved dollars are charged
                actual_cost = None
            ledger = self.ledger
            tx.budget_used = ledger.settle(res, actual, actual_cost)
            tx.budget_charged_cost = res.cost if actual_cost is None else actual_cost
            if tx.budget_max_cost is not None:
                tx.budget_used_cost = ledger.used_cost_today(res.pool)
            tx.reservation = None
        rec = snapshot(tx, flow, policy.redactor)
        sink = self.sink
        if sink is not None:  # `submit`, without its call
            sink.submit(rec)
        else:
            self.unsent.append(rec)
        # mitmproxy's flows are reference cycles, freed only by the collector: a transaction left on its flow
        # would wait for it too, and be traversed. Later hooks of this flow find no transaction: it is recorded.
        flow.metadata.pop(METADATA_KEY, None)

    def price(self, tx: Transaction, r: GenAiResult) -> float | None:
        """Sets the transaction's cost (USD, or None when the model has no known price) and its source from the
        usage in `r`; returns the cost."""
        assert self.policy is not None
        try:
            tx.cost, tx.cost_source = self.policy.pricing.cost_of(
                r.system, r.response_model, r.input_tokens, r.output_tokens, r.cache_read_tokens,
                r.cache_creation_tokens, r.reasoning_tokens, tx.start, r.request_model)
        except Exception:  # never at the price of the record and the budget settlement
            log.exception("clrk: cannot price a call to %s", printable(str(r.response_model or r.request_model)[:100]))
            tx.cost, tx.cost_source = None, UNKNOWN
        return tx.cost

    def submit(self, rec: Snapshot) -> None:
        if self.sink is not None:
            self.sink.submit(rec)
        else:  # before the sink started: kept for it
            self.unsent.append(rec)


def refuse(flow: http.HTTPFlow, tx: Transaction, d: Decision) -> None:
    """Denies the request: the JSON answer of the contract (in the provider's error shape on a provider's API),
    or — when its body has yet to arrive and is large or of unknown length — a cut connection, since answering
    would mean reading and holding that body first. The record says who was denied and why either way."""
    tx.decision = d
    req = flow.request
    h = tx.req_h or {}
    if not req.stream and req.raw_content is None and not request_is_buffered(h, False):  # a body, large or unknown
        flow.kill()
    elif d.rpc_errors and tx.mcp is not None and tx.mcp.legacy and tx.mcp.refuse_on_stream(d.rpc_errors):
        # The older HTTP+SSE transport: its clients read answers only from the session's stream, where the
        # refusal now waits; the POST gets what the server would have said.
        flow.response = http.Response.make(202, b"Accepted", {"content-type": "text/plain; charset=utf-8"})
    else:
        flow.response = deny_response(d, tx.genai.name if tx.genai is not None else None, tx.budget_denied)
        if req.method.upper() == "HEAD":
            flow.response.content = b""  # mitmproxy would write the body after the head: no HEAD answer has one
        if tx.facts is not None and tx.facts.protocol_problem is not None and req.http_version.startswith("HTTP/1"):
            # A refused protocol switch: what the agent sent after the request was meant for the other protocol,
            # never to be read as a next HTTP request. The connection ends with the answer.
            flow.response.headers["connection"] = "close"
    log.info("clrk: denied %s %s:%s%s for %s: %s", printable(req.method), tx.dst_name, tx.dst_port,
             printable(req.path.split("?", 1)[0]), tx.agent.ref if tx.agent else "unauthenticated client", printable(d.reason))


def deny_response(d: Decision, provider: str | None = None, budget_exceeded: bool = False) -> http.Response:
    """The gateway's answer for a refusal: `{"error": "clrk: <reason>"}`, or `provider`'s error shape with that
    text. A budget refusal says when to come back (the UTC day's end) and that retrying sooner is useless."""
    headers = dict(JSON_HEADERS)
    if d.rpc_errors is not None:
        # An MCP request: answered in JSON-RPC, so the agent's MCP client reports the refusal as the call's error.
        errors = [rpc_error(i, code, text) for i, code, text in d.rpc_errors]
        doc = errors if d.rpc_batch else (errors[0] if errors else None)
        return http.Response.make(d.status if doc is not None else 202, json.dumps(doc).encode() if doc is not None else b"",
                                  headers)
    if d.status == 407:
        headers["proxy-authenticate"] = 'Basic realm="clrk"'
    if budget_exceeded:
        code = "clrk_budget_exceeded"
        headers.update(no_retry_headers(seconds_until_utc_midnight(time.time())))
    elif d.status == 503:
        code = "clrk_unavailable"
        headers["retry-after"] = "1"  # the budget ledger being read at start: a moment
    else:
        code = "clrk_denied" if d.status < 500 else "clrk_error"
    body = error_body(provider, d.status, f"clrk: {d.answer or d.reason}", code)
    return http.Response.make(d.status, body, headers)


def gateway_answer(status: int, message: str, provider: str | None, code: str) -> http.Response:
    """An answer the gateway makes for a request it let through (an upstream that failed, say)."""
    return http.Response.make(status, error_body(provider, status, message, code), dict(JSON_HEADERS))


def listener_port(client: connection.Client) -> int | None:
    return client.sockname[1] if client.sockname else None
