"""Step WebSocketSessions: a WebSocket session after its handshake — bounded, judged per message, accounted,
and recorded once, when it ends.

mitmproxy keeps every message of a session on its flow (`flow.websocket.messages`) until the flow is
freed, assembles each message by repeated concatenation, and can only close a session by cutting its
connections. `SessionLayer`, installed in place of mitmproxy's `WebsocketLayer` (`install()`, at import,
as `clrk.proxy.limits` does for heads), relays the same way but:

  - keeps no message after the `websocket_message` hook has seen it (memory is flat however long the session);
  - assembles a message from its pieces once, and refuses one past `MAX_MESSAGE` bytes (close 1009);
  - closes a session with a close frame of the gateway's own toward both sides when a step asks
    (`close_after_hook`, or the `CloseSession` event from outside a hook: the gateway stopping).

`WebSocketSessions` follows each session: bytes and messages each way, the first `captureBody.maxBytes` of
each direction's messages (text messages as text, binary as `base64:` lines, each redacted like a JSON body),
realtime model events (`clrk.providers.realtime`: model, usage summed), the TokenBudget charged as usage
arrives (the session is closed with 1008 once the pool is spent), and the policy: a message from the agent
after a reload, or one naming another model, is judged again, and a session the policy now denies is closed
(1008). The record is written when the session ends, or when the gateway stops.

The handshake itself is judged like any request (EgressControl); `Sec-WebSocket-Extensions` is removed from
it, so no compression is negotiated: what the gateway reads, counts and bounds is what travels.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

import wsproto.events
from mitmproxy import ctx, http, websocket
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import websocket as ws_layers
from mitmproxy.proxy.layers.websocket import (
    Fragmentizer,
    WebsocketEndHook,
    WebsocketLayer,
    WebsocketMessageHook,
    WebSocketMessageInjected,
)
from mitmproxy.proxy.utils import expect
from wsproto import ConnectionState
from wsproto.frame_protocol import Opcode

from clrk.decision import AuthResult, Decision, decide
from clrk.escape import printable
from clrk.identity import AUTH_FAILED, authenticate
from clrk.providers.realtime import RealtimeParser, realtime_parser
from clrk.proxy.runtime import Runtime, listener_port
from clrk.proxy.transaction import METADATA_KEY, Transaction, snapshot

log = logging.getLogger("clrk")

MAX_MESSAGE = 16 * 1024 * 1024  # bytes of one message (all its frames); past it the session is closed (1009)
CLOSE_KEY = "clrk_ws_close"  # flow.metadata: (code, reason, forward) a step set during the message hook
CLOSED_BY_KEY = "clrk_ws_closed_by"  # flow.metadata: "gateway" once the gateway closed the session

POLICY_CLOSE = 1008  # RFC 6455 7.4.1: policy violation
TOO_BIG_CLOSE = 1009
GOING_AWAY = 1001


def close_reason(text: str) -> str:
    """A close frame's reason holds at most 123 bytes of UTF-8 (RFC 6455 5.5: 125 with the code)."""
    raw = text.encode()
    if len(raw) <= 123:
        return text
    return raw[:123].decode("utf-8", "ignore")


def close_after_hook(flow: http.HTTPFlow, code: int, reason: str, forward: bool = False) -> None:
    """From a `websocket_message` hook: end the session once the hook returns, with a close frame (code,
    reason) to both sides; the message is forwarded first when `forward`, else dropped."""
    flow.metadata[CLOSE_KEY] = (code, close_reason(reason), forward)


@dataclass
class CloseSession(WebSocketMessageInjected):
    """An event that closes a session from outside its hooks (the gateway stopping)."""

    code: int = GOING_AWAY
    reason: str = ""


class _Assembly:
    """One direction's message being assembled: its frames' pieces, joined once when it is complete."""

    __slots__ = ("frames", "parts", "size", "is_text")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.is_text = False


class SessionLayer(WebsocketLayer):
    """mitmproxy's WebSocket relay with bounded memory and gateway-initiated closes (see the module doc)."""

    @expect(events.DataReceived, events.ConnectionClosed, WebSocketMessageInjected)
    def relay_messages(self, event: events.Event):
        flow = self.flow
        assert flow.websocket is not None
        if isinstance(event, CloseSession):
            yield from self._close(event.code, event.reason)
            return
        if isinstance(event, events.ConnectionEvent):
            from_client = event.connection == self.context.client
            injected = False
        elif isinstance(event, WebSocketMessageInjected):
            from_client = event.message.from_client
            injected = True
        else:  # pragma: no cover
            raise AssertionError(f"Unexpected event: {event}")
        src_ws, dst_ws = (self.client_ws, self.server_ws) if from_client else (self.server_ws, self.client_ws)
        asm: _Assembly | None = getattr(src_ws, "clrk_asm", None)
        if asm is None:
            asm = src_ws.clrk_asm = _Assembly()  # type: ignore[attr-defined]

        if isinstance(event, events.DataReceived):
            src_ws.receive_data(event.data)
        elif isinstance(event, events.ConnectionClosed):
            src_ws.receive_data(None)
        else:
            fragmentizer = Fragmentizer([], event.message.type == Opcode.TEXT)
            src_ws._events.extend(fragmentizer(event.message.content))

        for ws_event in src_ws.events():
            if isinstance(ws_event, wsproto.events.Message):
                is_text = isinstance(ws_event.data, str)
                data = ws_event.data.encode() if is_text else bytes(ws_event.data)
                asm.is_text = is_text
                asm.parts.append(data)
                asm.size += len(data)
                if asm.size > MAX_MESSAGE:
                    flow.metadata[CLOSED_BY_KEY] = "gateway"
                    who = "agent" if from_client else "upstream"
                    flow.metadata["clrk_ws_error"] = (f"clrk: the {who} sent a message over {MAX_MESSAGE} bytes; "
                                                      "session closed (1009)", "message_too_big")
                    yield from self._close(TOO_BIG_CLOSE, f"clrk: message over {MAX_MESSAGE} bytes")
                    return
                if not (ws_event.frame_finished or ws_event.message_finished):
                    continue
                asm.frames.append(asm.parts[0] if len(asm.parts) == 1 else b"".join(asm.parts))
                asm.parts = []
                if not ws_event.message_finished:
                    continue
                frames = asm.frames
                content = frames[0] if len(frames) == 1 else b"".join(frames)
                fragmentizer = Fragmentizer(frames, is_text)
                asm.frames, asm.size = [], 0
                message = websocket.WebSocketMessage(Opcode.TEXT if is_text else Opcode.BINARY, from_client, content,
                                                     injected=injected)
                flow.websocket.messages.append(message)
                yield WebsocketMessageHook(flow)
                flow.websocket.messages.clear()  # nothing is kept once the hook has seen it
                close = flow.metadata.pop(CLOSE_KEY, None)
                if close is not None and not close[2]:
                    yield from self._close(close[0], close[1])
                    return
                if not message.dropped:
                    for msg in fragmentizer(message.content):
                        yield dst_ws.send2(msg)
                if close is not None:
                    yield from self._close(close[0], close[1])
                    return
            elif isinstance(ws_event, (wsproto.events.Ping, wsproto.events.Pong)):
                yield dst_ws.send2(ws_event)
            elif isinstance(ws_event, wsproto.events.CloseConnection):
                ws = flow.websocket
                ws.timestamp_end = time.time()
                ws.closed_by_client = from_client
                ws.close_code = ws_event.code
                ws.close_reason = ws_event.reason
                for w in (self.server_ws, self.client_ws):
                    if w.state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
                        yield w.send2(ws_event)
                    yield commands.CloseConnection(w.conn)
                yield WebsocketEndHook(flow)
                flow.live = False
                self._handle_event = self.done
                return
            else:  # pragma: no cover
                raise AssertionError(f"Unexpected WebSocket event: {ws_event}")

    def _close(self, code: int, reason: str):
        """The gateway ends the session: a close frame (code, reason) to each side still open, both connections
        closed, then the end hook."""
        flow = self.flow
        ws = flow.websocket
        assert ws is not None
        flow.metadata[CLOSED_BY_KEY] = "gateway"
        ws.timestamp_end = time.time()
        ws.close_code = code
        ws.close_reason = reason
        for w in (self.server_ws, self.client_ws):
            if w.state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
                yield w.send2(wsproto.events.CloseConnection(code=code, reason=reason))
            yield commands.CloseConnection(w.conn)
        yield WebsocketEndHook(flow)
        flow.live = False
        self._handle_event = self.done


def install() -> None:
    """mitmproxy's HTTP layer creates `websocket.WebsocketLayer(...)` by module attribute: ours is used from
    now on (mitmproxy 12; tests/test_websocket.py fails if the layer stops being ours)."""
    ws_layers.WebsocketLayer = SessionLayer  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- the step


class MessageCapture:
    """The first `limit` bytes of one direction's messages, as text: one line per message, a text message as
    it is, a binary one as `base64:` and its base64. Each message is redacted like a JSON body before it is
    kept (a binary one before it is encoded). Past the limit only `truncated` changes."""

    __slots__ = ("limit", "parts", "size", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, content: bytes, is_text: bool, gateway) -> None:
        room = self.limit - self.size
        if room <= 0:
            self.truncated = True
            return
        head = content[:64].lstrip()[:1]
        json_like = head in (b"{", b"[")
        media = "application/json" if json_like else ("text/plain" if is_text else "application/octet-stream")
        if not gateway.capture.wants(media):
            return
        if is_text:
            piece = content[:room]  # only what can be kept is redacted (the redactor reads JSON cut anywhere)
            if json_like:
                piece = gateway.redactor.body(piece, "application/json")
            line = piece[:room].decode("utf-8", "ignore").encode()  # never ends inside a character
            cut = len(content) > room or len(line) < len(piece)
        else:
            raw = content[: (room // 4) * 3 + 3]
            if json_like:
                raw = gateway.redactor.body(raw, "application/json")
            line = (b"base64:" + base64.b64encode(raw))[:room]
            cut = len(raw) < len(content) or len(line) < 7 + 4 * ((len(raw) + 2) // 3)
        if len(line) < room:
            line += b"\n"
        self.parts.append(line)
        self.size += len(line)
        if cut:
            self.truncated = True

    def captured(self) -> bytes | None:
        return b"".join(self.parts) if self.parts else None


@dataclass(slots=True)
class Session:
    flow: http.HTTPFlow
    tx: Transaction
    policy: object  # the policy the session was last judged under
    up: MessageCapture | None
    down: MessageCapture | None
    realtime: RealtimeParser | None
    model: str | None
    up_bytes: int = 0
    down_bytes: int = 0
    up_messages: int = 0
    down_messages: int = 0
    charged: int = 0  # tokens charged to the budget as usage arrived
    charged_cost: float = 0.0  # and their dollars (the session's cost so far, at the model's prices)


class WebSocketSessions:
    """Follows each WebSocket session from its 101 to its end; one record per session (see the module doc)."""

    name = "clrk_websocket"

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.open: dict[str, Session] = {}  # by flow id: what the gateway records if it stops first

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.req_h is None or "upgrade" not in tx.req_h:
            return  # the ordinary request: one dict lookup
        if tx.req_h["upgrade"].strip().lower() != "websocket":
            return
        # No compression: the gateway relays, counts and bounds what travels (and no small frame can
        # inflate into a large message inside the proxy).
        flow.request.headers.pop("sec-websocket-extensions", None)
        if tx.genai is not None:
            rp = realtime_parser(tx.genai.name, flow.request.path)
            if rp is not None:
                tx.genai = rp

    requestheaders.upgrade_only = True  # type: ignore[attr-defined]  # the Gateway calls it when "upgrade" in req_h

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.status_code != 101:
            return  # the ordinary response: one comparison
        if "sec-websocket-extensions" in resp.headers:
            # Not offered (removed from the handshake), so not accepted: mitmproxy would otherwise inflate
            # what an upstream compresses unasked.
            del resp.headers["sec-websocket-extensions"]

    responseheaders.switch_only = True  # type: ignore[attr-defined]  # the Gateway calls it for a 101 only

    def request(self, flow: http.HTTPFlow) -> None:
        """A realtime handshake whose URL names no model (Gemini Live names it in `setup`): the rules' model
        globs are judged once the session names it (`_judge`), not now against no model at all."""
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or not tx.websocket or tx.facts is None or not isinstance(tx.genai, RealtimeParser):
            return
        if tx.genai.result.request_model is None:
            tx.facts.model_later = True

    request.websocket_only = True  # type: ignore[attr-defined]  # the Gateway calls it for handshakes only

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.recorded or self.rt.policy is None:
            return
        if tx.counted:
            # A session may last hours: a graceful stop does not wait for it (it is closed with 1001 and
            # recorded when the gateway stops, `done`).
            self.rt.in_flight -= 1
            tx.counted = False
        cfg = tx.gateway.capture if tx.gateway is not None else None
        limit = cfg.max_bytes if cfg is not None else 0
        rp = tx.genai if isinstance(tx.genai, RealtimeParser) else None
        self.open[flow.id] = Session(flow, tx, self.rt.policy, MessageCapture(limit) if limit else None,
                                     MessageCapture(limit) if limit else None, rp,
                                     rp.result.request_model if rp is not None else None)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        s = self.open.get(flow.id)
        ws = flow.websocket
        if s is None or ws is None or not ws.messages:
            return
        msg = ws.messages[-1]
        content = msg.content
        is_text = msg.is_text
        if msg.from_client:
            s.up_bytes += len(content)
            s.up_messages += 1
            if s.up is not None and not s.up.truncated:
                s.up.add(content, is_text, s.tx.gateway)
            if s.realtime is not None:
                s.realtime.client_message(content)
            self._judge(s, flow)
        else:
            s.down_bytes += len(content)
            s.down_messages += 1
            if s.down is not None and not s.down.truncated:
                s.down.add(content, is_text, s.tx.gateway)
            if s.realtime is not None:
                tokens = s.realtime.server_message(content)
                if tokens and s.tx.reservation is not None:
                    self._charge(s, flow, tokens)

    def _judge(self, s: Session, flow: http.HTTPFlow) -> None:
        """A message from the agent: judged again when the policy changed or the session now names another
        model; the budget pool must not be spent. A denial ends the session (1008) without forwarding it."""
        tx = s.tx
        policy = self.rt.policy
        model = s.realtime.result.request_model if s.realtime is not None else None
        if policy is not s.policy or model != s.model:
            s.policy, s.model = policy, model
            d = self._decide(s, flow)
            if d is not None and not d.allow:
                why = f"clrk: {d.answer or d.reason}"  # what the agent reads (a fixed answer for credentials)
                tx.error, tx.error_type = f"the policy now denies this session: {d.reason}", "policy_denied"
                log.info("clrk: closed a WebSocket session of %s to %s: %s", tx.agent.ref if tx.agent else "?",
                         tx.dst_name, printable(d.reason))  # the reason may quote a model the agent named
                close_after_hook(flow, POLICY_CLOSE, why)
                return
        if tx.reservation is not None and self._spent(tx):
            self._over_budget(s, flow, forward=False)

    def _spent(self, tx: Transaction) -> bool:
        """Whether the session's budget pool has nothing left today, in tokens or in dollars."""
        pool, ledger = tx.budget_pool, self.rt.ledger
        if pool is None:
            return False
        if tx.budget_max is not None and ledger.used_today(pool) >= tx.budget_max:
            return True
        return tx.budget_max_cost is not None and ledger.used_cost_today(pool) >= tx.budget_max_cost

    def _decide(self, s: Session, flow: http.HTTPFlow) -> Decision | None:
        tx = s.tx
        policy = self.rt.policy
        if policy is None or tx.facts is None:
            return None
        # The agent's credentials are checked again too: revoking or rotating a token ends its sessions.
        failure = None
        if tx.tunnel is not None:
            agent = policy.agent_still_valid(tx.tunnel.agent.username, tx.tunnel.digest)
            if agent is None:
                failure = AuthResult(None, f"credentials of agent {tx.tunnel.agent.ref} are no longer valid", AUTH_FAILED)
        else:  # plain-HTTP proxying: the handshake carried them
            auth = authenticate(policy, (tx.req_h or {}).get("proxy-authorization"))
            agent = auth.agent
            if agent is None:
                failure = auth
        facts = tx.facts
        facts.model, facts.model_pending = s.model, False
        facts.model_later = s.model is None  # still unnamed: judged as at the handshake
        gateway = policy.gateway_for_port(listener_port(flow.client_conn))
        return decide(policy, gateway, failure or AuthResult(agent), facts)

    def _charge(self, s: Session, flow: http.HTTPFlow, tokens: int) -> None:
        tx = s.tx
        assert tx.reservation is not None
        s.charged += tokens
        # The session's cost so far at its model's prices; what it adds since the last report is charged too.
        cost = self.rt.price(tx, s.realtime.result) if s.realtime is not None else None
        added = 0.0
        if cost is not None and cost > s.charged_cost:
            added, s.charged_cost = cost - s.charged_cost, cost
        tx.budget_used = self.rt.ledger.charge(tx.reservation, tokens, added)
        if tx.budget_max_cost is not None:
            tx.budget_used_cost = self.rt.ledger.used_cost_today(tx.reservation.pool)
        if self._spent(tx):
            self._over_budget(s, flow, forward=True)

    def _over_budget(self, s: Session, flow: http.HTTPFlow, forward: bool) -> None:
        tx = s.tx
        rule = tx.decision.provider_rule if tx.decision is not None else None
        why = f"clrk: token budget exceeded for route {rule.route_name if rule is not None else '?'}"
        tx.budget_denied = True
        if tx.budget_max is not None and (tx.budget_used or 0) >= tx.budget_max:
            spent = f"{tx.budget_used} of the day's {tx.budget_max} tokens used"
        else:
            spent = f"${tx.budget_used_cost or 0:.4f} of the day's ${tx.budget_max_cost or 0:.2f} spent"
        tx.error, tx.error_type = f"{why}: {spent}", "budget_exceeded"
        log.info("clrk: closed a WebSocket session of %s to %s: %s", tx.agent.ref if tx.agent else "?", tx.dst_name, why)
        close_after_hook(flow, POLICY_CLOSE, why, forward=forward)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        s = self.open.pop(flow.id, None)
        if s is not None:
            self._finish(s, time.time())

    def done(self) -> None:
        """The gateway stops: each open session is told (1001) and recorded now, as far as it went."""
        if not self.open:
            return
        master = getattr(ctx, "master", None)
        server = master.addons.get("proxyserver") if master is not None else None
        for s in list(self.open.values()):
            self.open.pop(s.flow.id, None)
            if s.tx.error is None:
                s.tx.error, s.tx.error_type = "clrk: the gateway stopped with the session open", "gateway_stopped"
            s.flow.metadata[CLOSED_BY_KEY] = "gateway"
            if s.flow.websocket is not None and s.flow.websocket.close_code is None:
                s.flow.websocket.close_code = GOING_AWAY
            if server is not None:
                try:
                    server.inject_event(CloseSession(s.flow, websocket.WebSocketMessage(Opcode.TEXT, True, b""),
                                                     GOING_AWAY, "clrk: the gateway is stopping"))
                except Exception:  # noqa: S110 - best effort: the connection may be gone already
                    pass
            self._finish(s, time.time())

    def _finish(self, s: Session, end: float) -> None:
        tx, flow, rt = s.tx, s.flow, self.rt
        if tx.recorded or rt.policy is None:
            return
        tx.recorded = True
        if tx.counted:
            rt.in_flight -= 1
        ws = flow.websocket
        closed_by = flow.metadata.pop(CLOSED_BY_KEY, None)
        if closed_by is None and ws is not None and ws.closed_by_client is not None:
            closed_by = "client" if ws.closed_by_client else "upstream"
        code = ws.close_code if ws is not None else None
        problem = flow.metadata.pop("clrk_ws_error", None)
        if problem is not None and tx.error is None:
            tx.error, tx.error_type = problem
        if tx.error is None and code == 1006:
            who = "agent" if closed_by == "client" else "upstream"
            tx.error = f"the {who} dropped the connection without a close frame (1006)"
            tx.error_type = "client_disconnected" if closed_by == "client" else "upstream_reset"
        if tx.reservation is not None:
            seen = s.realtime is not None
            # Usage a realtime session reports was charged as it came; one whose events the gateway cannot
            # read is charged its reservation, like a served call whose usage is unseen.
            res = tx.reservation
            tx.budget_charged = s.charged + (0 if seen else res.tokens)
            tx.budget_charged_cost = s.charged_cost + (0.0 if seen else res.cost)
            tx.budget_used = rt.ledger.settle(res, 0 if seen else None, 0.0 if seen else None)
            if tx.budget_max_cost is not None:
                tx.budget_used_cost = rt.ledger.used_cost_today(res.pool)
            tx.reservation = None
        if tx.genai is not None:
            tx.genai.end()
            if tx.genai.result.usage_visible:  # the session's whole usage, priced like any call
                rt.price(tx, tx.genai.result)
        rec = snapshot(tx, flow, rt.policy.redactor)
        rec["t1"] = end
        rec["req_body"] = (s.up_bytes, s.up.captured() if s.up else None, bool(s.up and s.up.truncated))
        rec["resp_body"] = (s.down_bytes, s.down.captured() if s.down else None, bool(s.down and s.down.truncated))
        reason = ws.close_reason if ws is not None else None
        rec["ws"] = (s.up_messages, s.down_messages, code, closed_by, reason or None)
        rec["upstream"] = True
        rt.submit(rec)
        flow.metadata.pop(METADATA_KEY, None)
