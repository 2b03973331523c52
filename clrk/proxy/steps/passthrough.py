"""TLS Passthrough listeners (EgressGateway `spec.listeners[].tls.mode: Passthrough`).

On such a listener the gateway does not terminate TLS: the agent's TLS session goes end to end to the
upstream (the agent trusts the upstream's own certificate, not the gateway CA). What the gateway still does:

  1. authenticates the CONNECT (ProxyAuth) and decides it at L4: agent, destination host and port. Deny
     policies apply whatever methods or paths they name (the tunnel's content is unknown, so a deny limited
     to some paths denies it whole); allow routes limited to methods or paths do not allow a tunnel (they can
     only be checked on terminated traffic); AIProviderRoutes do not apply (no model to see). A denial is the
     CONNECT's answer (status and JSON body of the contract) and is recorded.
  2. reads the TLS ClientHello: its server name, when there is one, must name the CONNECT target, and the
     tunnel must start with TLS at all (the listener's protocol is TLS). Otherwise the connection is closed
     and the refusal recorded.
  3. relays bytes both ways untouched, counting them without a hook per chunk, and records one transaction
     per tunnel when it ends: `clrk.l4.bytes_upstream` (agent -> upstream), `clrk.req.bytes` /
     `clrk.resp.bytes` (each way), duration, `error.type` when the upstream could not be reached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mitmproxy import connection, http
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import ClientTLSLayer, ServerTLSLayer, TCPLayer, modes
from mitmproxy.proxy.layers.tls import get_client_hello, parse_client_hello
from mitmproxy.tls import ClientHello

from clrk.decision import AuthResult, Decision, RequestFacts, decide
from clrk.hostnames import norm_host
from clrk.identity import trace_context
from clrk.proxy.runtime import Runtime, deny_response, listener_port
from clrk.proxy.transaction import Transaction, Tunnel, snapshot_l4

log = logging.getLogger("clrk")

RULE_PASSTHROUGH = "passthrough"
# A ClientHello is read whole before anything is decided, within these bounds (a real one is a few KiB, in
# one or two TCP segments): beyond them the connection is refused instead of buffered and re-parsed.
MAX_HELLO_BYTES = 64 * 1024
MAX_HELLO_PIECES = 64
SERVER_NAME_EXTENSION = 0


class _Tunnel:
    """One passthrough connection being relayed: its transaction, byte counts, and what allowed it."""

    __slots__ = ("cid", "tx", "auth", "host", "port", "up", "down", "error", "done", "policy", "listen_port")

    def __init__(self, cid: str, tx: Transaction, auth: Tunnel, host: str, port: int, policy, listen_port: int | None):
        self.cid, self.tx, self.auth, self.host, self.port = cid, tx, auth, host, port
        self.up = self.down = 0
        self.error: str | None = None
        self.done = False
        self.policy, self.listen_port = policy, listen_port  # the policy it was last judged under


class CountingRelay(TCPLayer):
    """mitmproxy's TCP relay without a flow (no hook per chunk, nothing kept), counting the bytes each way,
    re-judging the tunnel when the policy changed, and telling `Passthrough` when it ends or its upstream
    cannot be reached."""

    def __init__(self, context, tunnel: _Tunnel, owner: Passthrough):
        super().__init__(context, ignore=True)
        self.tunnel, self.owner = tunnel, owner

    def start(self, _) -> layer.CommandGenerator[None]:
        if self.context.server.timestamp_start is None:
            err = yield commands.OpenConnection(self.context.server)
            if err:
                self.tunnel.error = str(err)
                yield commands.CloseConnection(self.context.client)
                self._handle_event = self.done
                self.owner.end(self.tunnel)
                return
        self._handle_event = self.relay_messages

    _handle_event = start

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        t = self.tunnel
        if isinstance(event, events.DataReceived):
            if t.policy is not self.owner.rt.policy and not self.owner.still_allowed(t):
                # The route, the agent or its token went away since the tunnel opened: it ends here.
                yield commands.CloseConnection(self.context.server)
                yield commands.CloseConnection(self.context.client)
                self._handle_event = self.done
                self.owner.end(t)
                return
            if event.connection is self.context.client:
                t.up += len(event.data)
            else:
                t.down += len(event.data)
        yield from super().relay_messages(event)
        if self._handle_event == self.done:
            self.owner.end(t)


class _Refuse(layer.Layer):
    """Closes the agent's connection at once (a refused tunnel; there is no HTTP left to answer in)."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class ClientHelloGate(layer.Layer):
    """Holds a tunnel's first bytes until its TLS ClientHello is whole — at most MAX_HELLO_BYTES in at most
    MAX_HELLO_PIECES pieces — then asks `then(hello, problem)` for the layer that takes over and hands it
    everything received so far at once. mitmproxy's own TLS layer buffers up to 16 MiB and re-parses all of
    it on every piece; through this gate it gets one whole ClientHello."""

    def __init__(self, context, then: Callable[[ClientHello | None, str | None], layer.Layer]):
        super().__init__(context)
        self.then = then
        self.buf = bytearray()
        self.pieces = 0
        self.next: layer.Layer | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.next is not None:
            yield from self.next.handle_event(event)
            return
        if isinstance(event, events.DataReceived) and event.connection is self.context.client:
            self.buf += event.data
            self.pieces += 1
            data = bytes(self.buf)
            hello, problem = None, None
            if len(data) >= 3:
                if not starts_like_tls_record(data):
                    problem = "the tunnel must start with a TLS ClientHello"
                else:
                    try:
                        hello = parse_client_hello(data)
                    except ValueError:
                        problem = "the tunnel's TLS ClientHello is malformed"
            if hello is None and problem is None:
                if len(data) <= MAX_HELLO_BYTES and self.pieces <= MAX_HELLO_PIECES:
                    return  # not whole yet
                problem = f"no whole TLS ClientHello within {MAX_HELLO_BYTES} bytes in {MAX_HELLO_PIECES} pieces"
            self.buf = bytearray()
            self.next = self.then(hello, problem)
            yield from self.next.handle_event(events.Start())
            yield from self.next.handle_event(events.DataReceived(self.context.client, data))
        elif isinstance(event, events.ConnectionClosed) and event.connection is self.context.client:
            self.next = self.then(None, "the agent closed the tunnel before its TLS ClientHello")
            yield commands.CloseConnection(self.context.client)


def tls_server_names(hello: ClientHello) -> int:
    """How many server_name extensions the ClientHello carries (a valid one has at most one)."""
    return sum(1 for ext_type, _ in hello.extensions if ext_type == SERVER_NAME_EXTENSION)


class Passthrough:
    """Decides and relays tunnels on TLS Passthrough listeners (see the module docstring); also puts every
    other tunnel's TLS ClientHello through a bounded gate, and refuses TLS spoken to the proxy port itself."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.open: dict[str, _Tunnel] = {}  # client connection id -> tunnel being relayed

    def _listener_is_passthrough(self, client: connection.Client) -> bool:
        policy = self.rt.policy
        return policy is not None and bool(policy.passthrough_ports) and listener_port(client) in policy.passthrough_ports

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """After ProxyAuth: the L4 decision, answered on the CONNECT itself when it is a denial."""
        if flow.response or flow.error or not self._listener_is_passthrough(flow.client_conn):
            return
        tunnel = self.rt.tunnels.get(flow.client_conn.id)
        if tunnel is None:
            return  # not authenticated: ProxyAuth answered and recorded it
        policy = self.rt.policy
        assert policy is not None
        gateway = policy.gateway_for_port(listener_port(flow.client_conn))
        d = decide(policy, gateway, AuthResult(tunnel.agent), RequestFacts(tunnel.host, tunnel.port))
        assert d is not None  # no provider facts: never pending
        if d.allow:
            tunnel.l4 = d
            self.rt.allow(flow.client_conn, flow.request.host, flow.request.port, tunnel.agent)
            return
        tx = self._transaction(flow.request.timestamp_start, tunnel.agent, tunnel.host, tunnel.port, gateway, d)
        del self.rt.tunnels[flow.client_conn.id]
        flow.response = deny_response(d)
        log.info("clrk: denied passthrough CONNECT %s:%s for %s: %s", tunnel.host, tunnel.port, tunnel.agent.ref, d.reason)
        self.rt.finish(flow, tx)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """clrk decides before mitmproxy's own next-layer addon. Three cases:
        TLS spoken to the proxy port itself (no CONNECT): refused — agents use http:// proxies, and
        mitmproxy would buffer and re-parse up to 16 MiB of an unauthenticated ClientHello.
        A passthrough tunnel: always through the gate, then refused or relayed (never left to mitmproxy,
        which would relay or intercept a first piece it cannot judge).
        Any other tunnel whose ClientHello is not whole yet: through the gate, then mitmproxy's TLS layers."""
        ctx = nextlayer.context
        client = ctx.client
        if len(ctx.layers) == 1 and isinstance(ctx.layers[0], modes.HttpProxy):
            if starts_like_tls_record(nextlayer.data_client()):
                log.info("clrk: refused TLS spoken to the proxy port by %s (use an http:// proxy URL)", client.peername)
                nextlayer.layer = _Refuse(ctx)
            return
        tunnel = self.rt.tunnels.get(client.id)
        if tunnel is None:
            return
        if tunnel.l4 is not None:
            if client.id not in self.open and not isinstance(nextlayer.layer, ClientHelloGate):
                nextlayer.layer = ClientHelloGate(ctx, lambda hello, problem: self._tunnel_layer(ctx, tunnel, hello, problem))
            return
        data = nextlayer.data_client()
        if nextlayer.layer is None and starts_like_tls_record(data) and get_client_hello(data) is None:
            nextlayer.layer = ClientHelloGate(ctx, lambda hello, problem: _intercepting_tls(ctx) if problem is None else _Refuse(ctx))

    def _tunnel_layer(self, ctx, tunnel, hello: ClientHello | None, problem: str | None) -> layer.Layer:
        """The passthrough tunnel's ClientHello is in (or cannot be): refuse and record, or relay."""
        if problem is None and hello is not None:
            count = tls_server_names(hello)
            sni = norm_host(hello.sni) if hello.sni else None
            if count > 1 or (count == 1 and sni is None):
                problem = "the TLS ClientHello's server name is not one valid host name"
            elif sni is not None and sni != tunnel.host:
                problem = f"TLS server name {sni} does not match the CONNECT target {tunnel.host}"
        client = ctx.client
        policy = self.rt.policy
        gateway = policy.gateway_for_port(listener_port(client)) if policy else None
        now = time.time()
        if problem is not None:
            d = Decision(False, RULE_PASSTHROUGH, problem, 403)
            tx = self._transaction(now, tunnel.agent, tunnel.host, tunnel.port, gateway, d)
            log.info("clrk: closed a passthrough tunnel to %s:%s for %s: %s", tunnel.host, tunnel.port, tunnel.agent.ref, problem)
            self.rt.submit(snapshot_l4(tx, tunnel.host, tunnel.port, now, 0, 0, None))
            return _Refuse(ctx)
        tx = self._transaction(now, tunnel.agent, tunnel.host, tunnel.port, gateway, tunnel.l4)
        addr = ctx.server.address
        t = self.open[client.id] = _Tunnel(client.id, tx, tunnel, addr[0] if addr else tunnel.host,
                                          addr[1] if addr else tunnel.port, policy, listener_port(client))
        self.rt.in_flight += 1
        return CountingRelay(ctx, t, self)

    def still_allowed(self, t: _Tunnel) -> bool:
        """After a policy change: the tunnel's agent and token still valid, and its destination still allowed."""
        policy = self.rt.policy
        t.policy = policy
        agent = policy.agent_still_valid(t.auth.agent.username, t.auth.digest) if policy is not None else None
        if policy is None or agent is None:
            t.error = "clrk: not allowed any more: the agent's credentials changed; tunnel closed"
            return False
        gateway = policy.gateway_for_port(t.listen_port)
        d = decide(policy, gateway, AuthResult(agent), RequestFacts(t.tx.dst_name, t.tx.dst_port))
        if d is None or not d.allow:
            t.error = f"clrk: not allowed any more ({d.reason if d else 'undecided'}); tunnel closed"
            return False
        return True

    def client_disconnected(self, client: connection.Client) -> None:
        t = self.open.get(client.id)
        if t is not None:
            self.end(t)

    def done(self) -> None:
        """The gateway stops: every tunnel still open is recorded now, as far as it went."""
        for t in list(self.open.values()):
            if t.error is None:
                t.error = "clrk: gateway stopped with the tunnel open"
            self.end(t)

    def end(self, t: _Tunnel) -> None:
        """Records a tunnel once, when its relay finishes, its agent goes away or the gateway stops."""
        if t.done:
            return
        t.done = True
        self.rt.in_flight -= 1
        self.open.pop(t.cid, None)
        self.rt.submit(snapshot_l4(t.tx, t.host, t.port, time.time(), t.up, t.down, t.error))

    @staticmethod
    def _transaction(start: float, agent, host: str, port: int, gateway, d: Decision) -> Transaction:
        tx = Transaction(start=start, trace=trace_context(None))
        tx.agent, tx.dst_name, tx.dst_port, tx.gateway, tx.decision = agent, host, port, gateway, d
        return tx


def _intercepting_tls(ctx) -> layer.Layer:
    """What mitmproxy's next-layer addon puts on a TLS tunnel it intercepts."""
    server_tls = ServerTLSLayer(ctx)
    server_tls.child_layer = ClientTLSLayer(ctx)
    return server_tls
