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
import socket

from mitmproxy.proxy.mode_servers import AsyncioServerInstance

from clrk import balance

enabled = False  # True in a worker of `clrk run --workers N` (N > 1)


def _sharing(listen):
    async def listen_shared(self: AsyncioServerInstance, host: str, port: int):
        if not enabled or port == 0 or self.mode.transport_protocol != "tcp":
            return await listen(self, host, port)
        b = balance.balancer
        if b is None:
            return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]
        # Connections kept even across the workers (clrk/balance.py): this worker accepts them itself, so
        # it can hand one over before reading a byte of it. asyncio's Server still owns each socket (mitmproxy
        # reads its addresses and closes it), it just does not accept on it.
        loop = asyncio.get_running_loop()
        handler = b.counted(self.handle_stream)
        servers = []
        for sock in _bind(host, port):
            servers.append(await asyncio.start_server(handler, sock=sock, start_serving=False))
            b.listen(loop, sock, handler)
        return servers

    listen_shared.__wrapped__ = listen
    return listen_shared


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for (host, port) as asyncio.start_server binds them (every address the host names, IPv6
    ones v6-only), each with SO_REUSEPORT."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = balance.server_socket(family, kind, proto, reuse_port=True)
            socks.append(s)
            try:
                s.bind(addr)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address {addr!r}: {e.strerror}") from None
            s.listen(100)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def install() -> None:
    if not hasattr(AsyncioServerInstance.listen, "__wrapped__"):
        AsyncioServerInstance.listen = _sharing(AsyncioServerInstance.listen)
