"""Step ProxyAuth: who is asking, and for where (Proxy-Authorization on CONNECT, or per request for
plain-HTTP proxying). Starts each request's `Transaction`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from mitmproxy import http

from clrk.decision import RULE_DESTINATION, RULE_MALFORMED, AuthResult, Decision, RequestFacts, decide
from clrk.hostnames import norm_host
from clrk.identity import AUTH_FAILED, THROTTLED, authenticate, invocation_from_baggage, trace_context
from clrk.policy import CompiledPolicy
from clrk.proxy.runtime import Runtime, deny_response, listener_port
from clrk.proxy.transaction import METADATA_KEY, Transaction, Tunnel, header_index, scan_request_headers

log = logging.getLogger("clrk")


class ProxyAuth:
    """Authenticates agents: once per CONNECT tunnel, or per request for plain-HTTP proxying."""

    name = "clrk_auth"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def client_disconnected(self, client) -> None:
        self.rt.forget(client)

    def _authenticate(self, policy: CompiledPolicy, header: str | None, client) -> tuple[AuthResult, Awaitable[None] | None]:
        """The agent, or the failure and what to await before answering it (repeated failures from one
        source are held back: `AuthThrottle`). Only attempts that present credentials count."""
        throttle = self.rt.auth_throttle
        source = None
        if header and throttle.sources:
            source = throttle.source(client.peername)
            if throttle.saturated(source):
                return THROTTLED, None
        auth = authenticate(policy, header)
        if auth.agent is not None or not header:
            return auth, None
        return auth, throttle.failed(source if source is not None else throttle.source(client.peername))

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            return None
        policy = self.rt.policy
        assert policy is not None
        header = flow.request.headers.pop("proxy-authorization", None)
        auth, pending = self._authenticate(policy, header, flow.client_conn)
        nested = flow.client_conn.id in self.rt.tunnels
        if auth.agent is not None and not nested:
            digest = policy.agents[auth.agent.username][1]
            self.rt.tunnels[flow.client_conn.id] = Tunnel(auth.agent, digest, norm_host(flow.request.host), flow.request.port)
            return None
        # No tunnel without credentials, nor inside another; the refusal is a transaction of its own.
        tx = Transaction(start=flow.request.timestamp_start, trace=trace_context(None), auth_failure=auth)
        tx.gateway = policy.gateway_for_port(listener_port(flow.client_conn))
        tx.dst_name = norm_host(flow.request.host)
        tx.agent = auth.agent
        if nested:  # a tunnel inside a tunnel would leave the outer one's checks behind
            tx.decision = Decision(False, RULE_DESTINATION, "CONNECT inside a CONNECT tunnel is not allowed", 403)
        else:
            tx.decision = decide(policy, tx.gateway, auth, RequestFacts(tx.dst_name, flow.request.port))
        flow.response = deny_response(tx.decision)
        log.info("clrk: denied CONNECT %s:%s: %s", flow.request.host, flow.request.port, tx.decision.reason)
        self.rt.finish(flow, tx)
        return pending  # the answer goes out once this is done

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            if flow.error is not None and METADATA_KEY not in flow.metadata and self.rt.policy is not None:
                self._refused_by_mitmproxy(flow)
            return None
        policy = self.rt.policy
        assert policy is not None
        req = flow.request
        h, hosts, problem = scan_request_headers(req.data.headers.fields)
        # Positional and then set: binding keywords among the Transaction's ~50 parameters costs more.
        tx = Transaction(req.data.timestamp_start, trace_context(h.get("traceparent")))
        tx.req_h, tx.host_headers, tx.counted = h, hosts, True
        if problem is not None:
            tx.header_problem = problem
        self.rt.in_flight += 1
        flow.metadata[METADATA_KEY] = tx
        client = flow.client_conn
        tx.tunnel = tunnel = self.rt.tunnels.get(client.id)
        if tunnel is not None:
            # Where the request goes: the CONNECT target.
            tx.dst_name, tx.dst_port = tunnel.host, tunnel.port
            if "proxy-authorization" in h:
                del req.headers["proxy-authorization"]
            # Re-check on every request so that revoking an agent also closes its open tunnels' doors (under
            # the policy it was last checked under, the answer is the one it gave, and so is the gateway of
            # the connection's listener).
            if tunnel.checked_under is not policy:
                tunnel.checked_agent = policy.agent_still_valid(tunnel.agent.username, tunnel.digest)
                tunnel.checked_gateway = policy.gateway_for_port(listener_port(client))
                tunnel.checked_under = policy
            tx.gateway = tunnel.checked_gateway
            tx.agent = tunnel.checked_agent
            if tx.agent is None:
                tx.auth_failure = AuthResult(None, f"credentials of agent {tunnel.agent.ref} are no longer valid", AUTH_FAILED)
        else:
            tx.gateway = policy.gateway_for_port(listener_port(client))
            tx.dst_name, tx.dst_port = norm_host(req.host), req.port  # plain HTTP: the URL's host
            auth, pending = self._authenticate(policy, h.get("proxy-authorization"), client)
            if "proxy-authorization" in h:
                del req.headers["proxy-authorization"]
            tx.agent = auth.agent
            if auth.agent is None:
                tx.auth_failure = auth
            return pending  # the following steps (the decision, its 407) run once this is done
        return None

    def _refused_by_mitmproxy(self, flow: http.HTTPFlow) -> None:
        """A request mitmproxy refused on its headers before any step saw it (a header name with bytes no HTTP
        token has, both Content-Length and Transfer-Encoding...; it answered 400 and sent nothing upstream) is
        still a transaction: recorded, with the agent it came from, when the error hook ends it."""
        policy = self.rt.policy
        assert policy is not None
        req = flow.request
        h = header_index(req.headers.fields)
        tx = Transaction(start=req.timestamp_start, trace=trace_context(h.get("traceparent")), req_h=h)
        tx.tunnel = tunnel = self.rt.tunnels.get(flow.client_conn.id)
        tx.gateway = policy.gateway_for_port(listener_port(flow.client_conn))
        tx.dst_name, tx.dst_port = (tunnel.host, tunnel.port) if tunnel else (norm_host(req.host), req.port)
        if not req.host:  # refused before mitmproxy took the destination from the Host header
            req.data.host, req.data.port = tx.dst_name, tx.dst_port or 0
        if tunnel is not None:
            tx.agent = policy.agent_still_valid(tunnel.agent.username, tunnel.digest)
        else:
            tx.agent = authenticate(policy, h.get("proxy-authorization")).agent
        req.headers.pop("proxy-authorization", None)
        if tx.gateway is not None:
            inv = h.get(tx.gateway.invocation_header)
            if inv is not None:
                del req.headers[tx.gateway.invocation_header]
            tx.invocation_id = inv[:256] if inv else invocation_from_baggage(h.get("baggage"))
        tx.decision = Decision(False, RULE_MALFORMED, f"the request is malformed: {flow.error.msg}", 400)
        flow.metadata[METADATA_KEY] = tx
