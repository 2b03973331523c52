"""Listening sockets several worker processes share (`clrk run --workers N`).

mitmproxy binds each TCP listener with `asyncio.start_server(handler, host, port)` in
`AsyncioServerInstance.listen` (mitmproxy/proxy/mode_servers.py). A second gateway process on the same port
would fail there with "address already in use". `install()` wraps that method so that, while `enabled` is
true, a TCP-only listener (every mode clrk opens: `regular@address:port`) is bound with `SO_REUSEPORT`: every
worker of one `clrk run --workers N` binds the same address and port, and Linux hands each new connection to
one of them (a hash of its addresses and ports; the connection then stays on that worker for its life).

`enabled` is set from the `clrk_workers` option (PolicyLoader.configure) before mitmproxy opens any
listener, so the listeners a policy reload opens later are shared too. With one worker (the default) the
wrapper calls mitmproxy's method unchanged. Port 0 ("any free port") cannot be shared, each worker would get
its own: `clrk run --workers` refuses it before starting (clrk/workers.py), and here it is left to mitmproxy.

Danger of SO_REUSEPORT: any other process of the same user binding the port with it joins the group and takes
part of the traffic. The supervisor probes every address it will use with a plain bind first (clrk/workers.py);
listeners added later by a policy reload are not probed. Patched once at import, for the mitmproxy 12 the
project pins; tests/test_workers.py fails if an upgrade moves the method.
"""

from __future__ import annotations

import asyncio

from mitmproxy.proxy.mode_servers import AsyncioServerInstance

enabled = False  # True in a worker of `clrk run --workers N` (N > 1)


def _sharing(listen):
    async def listen_shared(self: AsyncioServerInstance, host: str, port: int):
        if not enabled or port == 0 or self.mode.transport_protocol != "tcp":
            return await listen(self, host, port)
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    listen_shared.__wrapped__ = listen
    return listen_shared


def install() -> None:
    if not hasattr(AsyncioServerInstance.listen, "__wrapped__"):
        AsyncioServerInstance.listen = _sharing(AsyncioServerInstance.listen)
