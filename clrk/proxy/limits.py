"""Bounds mitmproxy leaves open, closed here: the size of an HTTP/1 message head.

mitmproxy's HTTP/1 layers buffer a request or response head until its blank line, without limit (their own
source says `FIXME: protect against header size DoS`): a client that never ends a header line, before it has
even authenticated, grows the proxy by every byte it sends. `install()` wraps both `read_headers` so that a
head past `MAX_HEAD` bytes ends the connection: a request with 431 (as servers answer), a response as an
upstream protocol error (the agent gets a 502). Patched once at import, before any connection exists, for
the mitmproxy 12 the project pins; `tests/test_hostile.py` fails if an upgrade moves these methods.
Nothing was parsed, so no record is made; the refusal is logged with the client's address.
"""

from __future__ import annotations

from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, ResponseProtocolError
from mitmproxy.utils import human

MAX_HEAD = 256 * 1024  # bytes of one message head: far above real clients (servers cut at 8-64 KiB)


def _refuse_request(self: _http1.Http1Server):
    yield commands.Log(f"clrk: {human.format_address(self.conn.peername)}: request head over {MAX_HEAD} bytes; "
                       "answered 431 and closed")
    yield commands.SendData(self.conn, _http1.make_error_response(431, f"clrk: request head over {MAX_HEAD} bytes"))
    yield commands.CloseConnection(self.conn)
    self.state = self.done


def _refuse_response(self: _http1.Http1Client):
    yield commands.CloseConnection(self.conn)
    if self.stream_id is not None:
        yield ReceiveHttp(ResponseProtocolError(
            self.stream_id, f"clrk: the upstream's response head is over {MAX_HEAD} bytes", ErrorCode.GENERIC_SERVER_ERROR))


def _bounded(read_headers, refuse):
    # A plain function returning the original generator: no extra generator frame on every event.
    def read(self, event):
        if isinstance(event, events.DataReceived) and len(self.buf) > MAX_HEAD:
            return refuse(self)
        return read_headers(self, event)

    read.__wrapped__ = read_headers
    return read


def install() -> None:
    for cls, refuse in ((_http1.Http1Server, _refuse_request), (_http1.Http1Client, _refuse_response)):
        if not hasattr(cls.read_headers, "__wrapped__"):
            cls.read_headers = _bounded(cls.read_headers, refuse)
