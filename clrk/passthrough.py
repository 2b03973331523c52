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

from mitmproxy import connection, http
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import TCPLayer
from mitmproxy.proxy.layers.tls import parse_client_hello

from clrk.decision import AuthResult, Decision, RequestFacts, decide
from clrk.hostnames import norm_host
from clrk.identity import trace_context
from clrk.runtime import Runtime, deny_response, listener_port
from clrk.transaction import Transaction, snapshot_l4

log = logging.getLogger("clrk")

RULE_PASSTHROUGH = "passthrough"


class _Tunnel:
    """One passthrough connection being relayed: its transaction and byte counts."""

    __slots__ = ("cid", "tx", "host", "port", "up", "down", "error", "done")

    def __init__(self, cid: str, tx: Transaction, host: str, port: int):
        self.cid, self.tx, self.host, self.port = cid, tx, host, port
        self.up = self.down = 0
        self.error: str | None = None
        self.done = False


class CountingRelay(TCPLayer):
    """mitmproxy's TCP relay without a flow (no hook per chunk), counting the bytes each way and telling
    `Passthrough` when the tunnel ends or its upstream cannot be reached."""

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
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self.tunnel.up += len(event.data)
            else:
                self.tunnel.down += len(event.data)
        yield from super().relay_messages(event)
        if self._handle_event == self.done:
            self.owner.end(self.tunnel)


class _Refuse(layer.Layer):
    """Closes the agent's connection at once (a refused tunnel; there is no HTTP left to answer in)."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class Passthrough:
    """Decides and relays tunnels on TLS Passthrough listeners (see the module docstring)."""

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
            self.rt.allow(flow.client_conn, flow.request.host, flow.request.port)
            return
        tx = self._transaction(flow.request.timestamp_start, tunnel.agent, tunnel.host, tunnel.port, gateway, d)
        del self.rt.tunnels[flow.client_conn.id]
        flow.response = deny_response(d)
        log.info("clrk: denied passthrough CONNECT %s:%s for %s: %s", tunnel.host, tunnel.port, tunnel.agent.ref, d.reason)
        self.rt.finish(flow, tx)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """The tunnel's first bytes: a TLS ClientHello naming the CONNECT target, then the counting relay."""
        client = nextlayer.context.client
        tunnel = self.rt.tunnels.get(client.id)
        if tunnel is None or tunnel.l4 is None or client.id in self.open:
            return
        data = nextlayer.data_client()
        refusal = None
        if not starts_like_tls_record(data):
            if len(data) < 3 and nextlayer.layer is None:
                return  # not enough bytes to tell yet
            refusal = "the tunnel of a TLS Passthrough listener must start with a TLS ClientHello"
        else:
            try:
                hello = parse_client_hello(data)
            except ValueError:
                refusal = "the tunnel's TLS ClientHello is malformed"
            else:
                if hello is None:
                    nextlayer.layer = None  # wait for the rest of the ClientHello
                    return
                sni = norm_host(hello.sni) if hello.sni else None
                if sni is not None and sni != tunnel.host:
                    refusal = f"TLS server name {sni} does not match the CONNECT target {tunnel.host}"
        gateway = self.rt.policy.gateway_for_port(listener_port(client)) if self.rt.policy else None
        now = time.time()
        if refusal is not None:
            d = Decision(False, RULE_PASSTHROUGH, refusal, 403)
            tx = self._transaction(now, tunnel.agent, tunnel.host, tunnel.port, gateway, d)
            nextlayer.layer = _Refuse(nextlayer.context)
            log.info("clrk: closed a passthrough tunnel to %s:%s for %s: %s", tunnel.host, tunnel.port, tunnel.agent.ref, refusal)
            self.rt.submit(snapshot_l4(tx, tunnel.host, tunnel.port, now, 0, 0, None))
            return
        tx = self._transaction(now, tunnel.agent, tunnel.host, tunnel.port, gateway, tunnel.l4)
        addr = nextlayer.context.server.address
        t = self.open[client.id] = _Tunnel(client.id, tx, addr[0] if addr else tunnel.host, addr[1] if addr else tunnel.port)
        self.rt.in_flight += 1
        nextlayer.layer = CountingRelay(nextlayer.context, t, self)

    def client_disconnected(self, client: connection.Client) -> None:
        t = self.open.get(client.id)
        if t is not None:
            self.end(t)

    def end(self, t: _Tunnel) -> None:
        """Records a tunnel once, when its relay finishes or its agent goes away, whichever comes first."""
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
