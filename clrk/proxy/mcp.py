"""One HTTP transaction's MCP messages (`McpExchange`): the requests its POST body carried, the answers that came
back (a JSON body, or the events of an SSE stream, read by `McpStream` as they pass), listings filtered to what
the MCPRoute allows, and one child record per JSON-RPC request/response pair (`children`, in the snapshot).

Only transactions to an MCPRoute's server, or carrying the transport's own headers, have an exchange: ordinary
traffic never reaches this module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from clrk import mcp
from clrk.mcp import InvalidMessage, McpBody, McpMessage
from clrk.policy.compiled import McpRule
from clrk.redact import Redactor

log = logging.getLogger("clrk")

EVENT_LIMIT = 32 * 1024 * 1024  # one SSE event (or a streamed JSON answer) held at most, to judge it whole
# Messages one transaction keeps for its child records (a session's GET stream may carry any number): past
# this they are still read and filtered, and counted, but not recorded one by one.
MAX_CHILDREN = 1000


SessionKey = tuple[str, str, int, str]  # (agent, host, port, session id)


class McpSessions:
    """Requests whose answer may come in another transaction of their session: over the older HTTP+SSE
    transport the POST is answered 202 and its answer arrives on the session's GET stream (Streamable HTTP
    does so when a stream is resumed). Kept per (agent, host, port, session) without their bodies, bounded:
    the oldest session goes first past MAX_SESSIONS, a session's oldest request past MAX_CHILDREN."""

    MAX_SESSIONS = 4096

    def __init__(self) -> None:
        self.waiting: OrderedDict[SessionKey, OrderedDict[str | int | None, tuple[McpMessage, float]]] = OrderedDict()
        # Refusals to be sent on a session's stream (HTTP+SSE), as whole SSE events.
        self.refusals: OrderedDict[SessionKey, list[bytes]] = OrderedDict()

    def refuse_later(self, key: SessionKey, events: list[bytes]) -> None:
        queued = self.refusals.setdefault(key, [])
        queued.extend(events)
        del queued[:-MAX_CHILDREN]
        if len(self.refusals) > self.MAX_SESSIONS:
            self.refusals.popitem(last=False)

    def take_refusals(self, key: SessionKey) -> list[bytes]:
        return self.refusals.pop(key, []) if self.refusals else []

    def park(self, key: SessionKey, req: McpMessage, t0: float) -> None:
        ids = self.waiting.get(key)
        if ids is None:
            ids = self.waiting[key] = OrderedDict()
            if len(self.waiting) > self.MAX_SESSIONS:
                self.waiting.popitem(last=False)
        ids[req.id] = (McpMessage(req.kind, req.id, req.method, req.target, req.target_kind), t0)  # no body kept
        if len(ids) > MAX_CHILDREN:
            ids.popitem(last=False)

    def claim(self, key: SessionKey, msg_id: str | int | None) -> tuple[McpMessage, float] | None:
        ids = self.waiting.get(key)
        if ids is None:
            return None
        found = ids.pop(msg_id, None)
        if not ids:
            del self.waiting[key]
        return found


def session_of_endpoint(url: str) -> str | None:
    """The session id an HTTP+SSE endpoint URL names (`/messages/?session_id=...`)."""
    try:
        query = parse_qs(urlsplit(url).query)
    except ValueError:
        return None
    for name in ("session_id", "sessionId"):
        if query.get(name):
            return query[name][0]
    return None


class McpExchange:
    """The MCP side of one transaction. `rule`: the MCPRoute that allowed it (None: recognised on an ordinary
    route, recorded but not filtered). `sessions` and `where` (agent, host, port): where requests wait for an
    answer in another transaction of their session."""

    __slots__ = ("session", "version", "rule", "body", "pending", "done", "filtered", "unrecorded", "sessions",
                 "where", "legacy")

    def __init__(self, session: str | None, version: str | None, sessions: McpSessions | None = None,
                 where: tuple[str, str, int] | None = None, legacy: bool = False):
        self.legacy = legacy  # the older HTTP+SSE transport: the session is named by the endpoint's URL
        self.session = session
        self.version = version
        self.sessions = sessions
        self.where = where
        self.rule: McpRule | None = None
        self.body: McpBody | None = None
        self.pending: dict[str | int | None, tuple[McpMessage, float]] = {}  # request id -> (request, when)
        # finished pairs and lone messages: (request or None, answer or None, start, end)
        self.done: list[tuple[McpMessage | None, McpMessage | None, float, float]] = []
        self.filtered = 0  # listing entries removed
        self.unrecorded = 0  # messages past MAX_CHILDREN

    def _keep(self, pair: tuple[McpMessage | None, McpMessage | None, float, float]) -> None:
        if len(self.done) < MAX_CHILDREN:
            self.done.append(pair)
        else:
            self.unrecorded += 1

    def _key(self) -> SessionKey | None:
        if self.sessions is None or self.where is None or not self.session:
            return None
        return (*self.where, self.session)

    def request(self, body: McpBody, now: float) -> None:
        """The messages of the POST body: requests wait for their answer (here, or in another transaction of
        their session); notifications and answers to the server's own requests stand alone."""
        self.body = body
        key = self._key()
        for m in body.messages:
            if m.kind == "request":
                self.pending[m.id] = (m, now)
                if key is not None:
                    self.sessions.park(key, m, now)  # type: ignore[union-attr]
            else:
                self._keep((m, None, now, now))

    def learn_endpoint(self, data: str) -> None:
        """HTTP+SSE: the stream's `endpoint` event names the session its POSTs will carry."""
        if self.session is None:
            self.session = session_of_endpoint(data.strip())

    def refuse_on_stream(self, errors: tuple[tuple[str | int | None, int, str], ...]) -> bool:
        """HTTP+SSE: the gateway's JSON-RPC errors for this POST's requests go on the session's stream (sent
        before the next bytes the server sends there). False when there is no session to send them on."""
        key = self._key()
        if key is None:
            return False
        self.sessions.refuse_later(key, [  # type: ignore[union-attr]
            b"event: message\r\ndata: " + json.dumps(mcp.rpc_error(i, code, text)).encode() + b"\r\n\r\n"
            for i, code, text in errors])
        return True

    def settle(self, answered_elsewhere: bool) -> None:
        """The transaction is over: requests it did not see answered wait no longer, unless its answer said they
        will be answered elsewhere (202)."""
        key = self._key()
        if key is None or answered_elsewhere:
            return
        for msg_id in self.pending:
            self.sessions.claim(key, msg_id)  # type: ignore[union-attr]

    def answer(self, doc: object, now: float) -> object:
        """One answer from the server (a message or a batch): paired with its request, a listing filtered;
        returns the document as the agent must see it."""
        for d in doc if isinstance(doc, list) else [doc]:
            try:
                m = mcp.message(d)
            except InvalidMessage:
                continue
            asked = None
            if m.kind in ("response", "error"):
                asked = self.pending.pop(m.id, None)
                key = self._key()
                if key is not None:  # answered: waits no longer (here), or was asked in another transaction
                    claimed = self.sessions.claim(key, m.id)  # type: ignore[union-attr]
                    asked = asked or claimed
            if asked is not None:
                req, t0 = asked
                if self.rule is not None and m.kind == "response" and req.method in mcp.LISTS:
                    self.filtered += mcp.filter_listing(d, req.method, self.rule.allows)
                self._keep((req, m, t0, now))
            else:  # a server-to-client request or notification, or an answer to nothing asked here
                if self.rule is not None and m.kind == "response":
                    # An answer whose request this transaction did not carry (one replayed on the session's GET
                    # stream): a listing is recognised by its shape, and filtered all the same.
                    for method in mcp.LISTS:
                        self.filtered += mcp.filter_listing(d, method, self.rule.allows)
                self._keep((m, None, now, now))
        return doc

    def wants_listing(self) -> bool:
        """A listing is awaited whose answer may need filtering."""
        return self.rule is not None and any(req.method in mcp.LISTS for req, _ in self.pending.values())

    def rewrite_json(self, body: bytes, now: float) -> bytes | None:
        """A JSON answer read whole: the bytes the agent gets instead, or None to keep them."""
        try:
            doc = mcp.loads_bounded(body)
        except InvalidMessage as e:
            return self._unreadable(str(e), now)
        before = self.filtered
        self.answer(doc, now)
        return json.dumps(doc, separators=(",", ":")).encode() if self.filtered != before else None

    def _unreadable(self, why: str, now: float) -> bytes | None:
        """An answer that cannot be read: passed on as it is, unless a listing awaits its answer, which is then
        the gateway's JSON-RPC error (a listing is never passed on unfiltered)."""
        if not self.wants_listing():
            return None
        errors = []
        for msg_id, (req, t0) in list(self.pending.items()):
            if req.method in mcp.LISTS:
                err = mcp.rpc_error(msg_id, mcp.INTERNAL_ERROR, f"clrk: the server's answer could not be read to filter "
                                                               f"it ({why[:200]})")
                self._keep((req, mcp.message(err), t0, now))
                del self.pending[msg_id]
                errors.append(err)
        log.warning("clrk: an MCP answer could not be read (%s); the listing it may hold is answered with an error", why)
        return json.dumps(errors[0] if len(errors) == 1 else errors).encode()

    def children(self, end: float, denied: bool, limit: int, capture: bool, redactor: Redactor,
                 answered_elsewhere: bool = False) -> list[dict]:
        """One child record's facts per pair (the recorder makes them rows: `clrk.recorder.expand.mcp_rows`).
        Requests left unanswered end with the transaction: refused by the gateway, no answer came, or — the
        server said 202 — answered in another transaction of the session (its record names the request)."""
        self.settle(answered_elsewhere and not denied)
        out = []
        # (request or lone message, answer, start, end, a request of this transaction left unanswered)
        pairs = [(*pair, False) for pair in self.done] + [(req, None, t0, end, True) for req, t0 in self.pending.values()]
        if len(pairs) > MAX_CHILDREN or self.unrecorded:
            log.warning("clrk: an MCP transaction carried %d messages; the first %d are recorded one by one",
                        len(pairs) + self.unrecorded, MAX_CHILDREN)
            pairs = pairs[:MAX_CHILDREN]
        for req, ans, t0, t1, unanswered in pairs:
            first = req or ans
            assert first is not None
            error = None
            if ans is not None and ans.is_error:
                err = ans.doc.get("error")
                error = str(err.get("code")) if isinstance(err, dict) and "code" in err else "tool_error"
            elif unanswered:
                error = "policy_denied" if denied else (None if answered_elsewhere else "no_response")
            out.append({
                "span": os.urandom(8).hex(), "t0": t0, "t1": t1, "method": first.method, "kind": first.target_kind,
                "target": first.target, "id": None if first.id is None else str(first.id), "error": error,
                "req": _captured(req, limit, redactor) if capture and req is not None and req.doc else None,
                "resp": _captured(ans, limit, redactor) if capture and ans is not None else None,
            })
        return out


def _captured(m: McpMessage, limit: int, redactor: Redactor) -> bytes | None:
    raw = json.dumps(m.doc, separators=(",", ":"), ensure_ascii=False).encode()
    return redactor.body(raw[:limit] if len(raw) > limit else raw, "application/json")


class McpStream:
    """The stream callable for an MCP answer streamed through the gateway: an SSE stream is passed on event by
    event (each one read, a listing in it filtered), a JSON answer of unknown length is held whole (bounded) and
    passed on at its end. `inner` is the capture's own callable, fed what the upstream sent."""

    __slots__ = ("exchange", "inner", "events", "held", "failed", "swallow", "limit")

    def __init__(self, exchange: McpExchange, inner: Callable[[bytes], bytes] | None, sse: bool,
                 limit: int = EVENT_LIMIT):
        self.exchange = exchange
        self.inner = inner
        self.limit = limit
        self.events = mcp.SseEvents(limit) if sse else None
        self.held = bytearray()
        self.failed = False  # no longer read: what comes is passed on as it is...
        self.swallow = False  # ...or, when a listing could not be filtered, not at all

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        """What to pass on for `chunk` (b"": the end). Nothing to pass yet is [], never b"": mitmproxy writes an
        empty piece of a chunked body as the body's last chunk."""
        if self.inner is not None:
            self.inner(chunk)
        if self.failed:
            return [] if self.swallow or not chunk else [chunk]
        now = time.time()
        if self.events is None:
            if chunk:
                self.held += chunk
                if len(self.held) > self.limit:
                    return self._give_up("a JSON answer longer than the limit")
                return []
            body = bytes(self.held)
            self.held.clear()
            out = self.exchange.rewrite_json(body, now) or body
            return [out] if out else []
        try:
            events = self.events.feed(chunk) if chunk else [self.events.rest()]
        except InvalidMessage as e:
            return self._give_up(str(e))
        out = []
        for ev in events:
            data = mcp.event_data(ev) if ev else None
            if data is None:
                out.append(ev)
                continue
            if mcp.event_type(ev) == "endpoint":  # HTTP+SSE: where the session's POSTs go (not JSON-RPC)
                self.exchange.learn_endpoint(data)
                out.append(ev)
                continue
            new = self.exchange.rewrite_json(data.encode(), now)
            out.append(mcp.replace_event_data(ev, new.decode()) if new is not None else ev)
        if self.exchange.legacy is False and self.exchange.session is not None and self.exchange.sessions is not None:
            key = self.exchange._key()
            if key is not None:
                out.extend(self.exchange.sessions.take_refusals(key))  # refusals of the session's POSTs (HTTP+SSE)
        return [b"".join(out)] if any(out) else []

    def _give_up(self, why: str) -> list[bytes]:
        """What cannot be read is passed on unread, unless a listing awaits its answer: the listing is then the
        gateway's JSON-RPC error and the rest of the answer is not passed on (it may hold the listing)."""
        self.failed = True
        refusal = self.exchange._unreadable(why, time.time())
        if refusal is not None:
            self.swallow = True
            self.held.clear()
            if self.events is not None:
                self.events.rest()
                return [b"event: message\r\ndata: " + refusal + b"\r\n\r\n"]
            return [refusal]
        log.warning("clrk: MCP answer no longer read: %s", why)
        held = bytes(self.held) + (self.events.rest() if self.events is not None else b"")
        self.held.clear()
        return [held] if held else []
