"""Upstream failures answered by the gateway, not by mitmproxy: the two places mitmproxy decides alone.

- An upstream that fails before its response reached the agent (name not resolved, connection refused, TLS
  handshake failed, connection closed before or while a buffered response arrived): mitmproxy runs the
  `error` hook, then writes its own HTML page (`server: mitmproxy`) to the agent. `install()` wraps
  `HttpStream.handle_protocol_error` so that, when nothing of a response has been sent to the agent yet, the
  flow is marked `ANSWERABLE` before the `error` hook; if an addon then sets `flow.response`
  (`steps/upstream.py`: clrk's JSON, in the provider's shape), that response is sent instead of the page,
  through the ordinary HTTP/1 or HTTP/2 path, and the agent's connection stays usable.
- An upstream that takes a request and stays silent: mitmproxy's inactivity watchdog (`tcp_timeout`) closes
  the agent's connection, so the agent gets nothing to act on. The wrapped `on_timeout` first looks for
  requests of that connection waiting for their response headers; if there are any, it marks them timed out
  (`TIMED_OUT`) and closes their upstream connections instead, which fails those requests through the path
  above (a 504), and keeps watching the agent's connection. A connection with nothing waiting upstream is
  closed as before.

Patched once at import, for the mitmproxy 12 the project pins; `tests/test_answers.py` fails if an
upgrade moves these methods. Nothing here runs for a request that does not fail.
"""

from __future__ import annotations

from mitmproxy import flow as mflow
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, server
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers.http import DropStream, HttpLayer, HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook

ANSWERABLE = "clrk.answerable"  # flow.metadata: the agent has received nothing yet, an answer can still be sent
TIMED_OUT = "clrk.timed_out"  # flow.metadata: the request waited for its response longer than tcp_timeout


def _answerable(stream: HttpStream, event) -> bool:
    flow = stream.flow
    return (
        isinstance(event, ResponseProtocolError)
        and flow is not None
        and stream.client_state != stream.state_errored
        and stream.server_state not in (stream.state_done, stream.state_errored, stream.state_stream_response_body)
        and not (flow.response is not None and flow.response.stream)  # streamed: its head has reached the agent
        and bool(stream.context.client.state & ConnectionState.CAN_WRITE)
    )


def _handle_protocol_error(original):
    def handle_protocol_error(self: HttpStream, event):
        if not _answerable(self, event):
            return original(self, event)
        return _answer(self, event)

    handle_protocol_error.__wrapped__ = original
    return handle_protocol_error


def _answer(self: HttpStream, event: ResponseProtocolError):
    """mitmproxy's own handling, with the error hook's answer sent in place of its error page."""
    flow = self.flow
    upstream_response = flow.response
    flow.response = None
    flow.metadata[ANSWERABLE] = True
    flow.error = mflow.Error(event.message)
    yield HttpErrorHook(flow)
    flow.metadata.pop(ANSWERABLE, None)
    if (yield from self.check_killed(False)):
        return
    answer = flow.response
    if answer is None:  # nobody answered: mitmproxy's page, as before
        flow.response = upstream_response
        yield SendHttp(event, self.context.client)
    else:
        if flow.request.method.upper() == "HEAD":
            answer.content = b""  # an answer to HEAD has no body (the next response on the connection would be off)
        content = answer.raw_content or b""
        yield SendHttp(ResponseHeaders(self.stream_id, answer, not content), self.context.client)
        if content:
            yield SendHttp(ResponseData(self.stream_id, content), self.context.client)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        if self.client_state != self.state_done and not (flow.request.is_http2 or flow.request.is_http3):
            # The agent is still sending a body nobody will read: an HTTP/1 connection cannot be reused.
            yield commands.CloseConnection(self.context.client)
            self.client_state = self.state_errored
    self.server_state = self.state_errored
    flow.live = False
    yield DropStream(self.stream_id)


def _waiting_for_upstream(top: Layer) -> list[HttpStream]:
    """The HTTP streams in a connection's layer tree whose request went upstream whole and whose response has
    not begun. Layers hold their children in attributes of their own (`child_layer`, NextLayer's `layer`, a
    gate's `next`, HttpLayer's `streams`, or only a bound `_handle_event`), so every attribute that is or
    belongs to a layer is followed, each layer once."""
    out, todo, seen = [], [top], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, HttpStream):
            f = node.flow
            if (f is not None and f.response is None and node.client_state == node.state_done
                    and node.server_state == node.state_wait_for_response_headers):
                out.append(node)
        for value in vars(node).values():
            owner = getattr(value, "__self__", None)  # a layer that hands its events on: `_handle_event = child...`
            if isinstance(value, Layer):
                todo.append(value)
            elif isinstance(owner, Layer):
                todo.append(owner)
            elif isinstance(node, HttpLayer) and value is node.streams:
                todo.extend(value.values())
    return out


def _on_timeout(original):
    async def on_timeout(self: server.ConnectionHandler) -> None:
        waiting = _waiting_for_upstream(self.layer)
        upstreams = [io for conn, io in self.transports.items() if conn is not self.client and io.handler is not None]
        if not waiting or not upstreams:
            return await original(self)
        for stream in waiting:
            stream.flow.metadata[TIMED_OUT] = True
        self.log(f"Upstream silent for {self.timeout_watchdog.timeout} s: answering {len(waiting)} waiting "
                 f"request(s) 504 and closing their upstream connection(s)")
        for io in upstreams:
            io.handler.cancel("timeout")
        # The watchdog stops after calling this; the agent's connection is still ours to watch.
        self.timeout_watchdog.register_activity()
        await self.timeout_watchdog.watch()

    on_timeout.__wrapped__ = original
    return on_timeout


def install() -> None:
    if not hasattr(HttpStream.handle_protocol_error, "__wrapped__"):
        HttpStream.handle_protocol_error = _handle_protocol_error(HttpStream.handle_protocol_error)
    if not hasattr(server.ConnectionHandler.on_timeout, "__wrapped__"):
        server.ConnectionHandler.on_timeout = _on_timeout(server.ConnectionHandler.on_timeout)

