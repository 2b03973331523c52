"""Step EgressControl: the decision (`clrk.decision.decide`), denials answered, and the last guard before
any upstream connection (`server_connect`: allowed addresses only, hostAliases, every resolved address judged)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket
from collections.abc import Awaitable
from dataclasses import fields

from mitmproxy import http
from mitmproxy.proxy import server_hooks

from clrk.addresses import dial_form, literal, refusal, resolved
from clrk.decision import AuthResult, Decision, RequestFacts, decide, decide_agent, decide_rules
from clrk.hostnames import norm_host, path_facts, request_target
from clrk.identity import invocation_from_baggage
from clrk.policy import CompiledPolicy
from clrk.policy.compiled import AgentIdentity, GatewayConfig
from clrk.proxy.dispatch import Step, run_steps
from clrk.proxy.runtime import Runtime, listener_port, refuse
from clrk.proxy.transaction import METADATA_KEY, Transaction

log = logging.getLogger("clrk")

# EgressControl builds RequestFacts positionally: the fields it passes, in their order (checked when tests run).
assert [f.name for f in fields(RequestFacts)][:15] == [
    "host", "port", "method", "path", "sni", "authority", "authority_port", "provider", "provider_names", "model",
    "model_pending", "model_later", "target_problem", "protocol_problem", "path_ambiguity"]


class EgressControl:
    """Decides each request; answers denials; lets mitmproxy dial only what a decision allowed; and, where it
    allows a request, runs what an allow sets in motion (`then_allowed`), exactly once per request."""

    name = "clrk_egress"

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._allowed: tuple[Step, ...] = ()  # routing, then credentials (set by the Gateway: then_allowed)
        self._allowed_routing: tuple[Step, ...] = ()
        self._allowed_credentials: tuple[Step, ...] = ()
        self.read_mcp: Step | None = None  # McpTraffic.read_request (set by the Gateway)

    def then_allowed(self, routing: Step, credentials: Step) -> None:
        """The steps an allow decision sets in motion, in order, each under its own error guard: the
        AIProviderRoute rule's budget admission and Backend, then the provider credentials."""
        self._allowed = (routing, credentials)
        self._allowed_routing = (routing,)
        self._allowed_credentials = (credentials,)

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or flow.response or flow.error or tx.dst_name is None:
            return
        policy = self.rt.policy
        assert policy is not None
        req = flow.request
        h = tx.req_h
        assert h is not None
        client = flow.client_conn
        tunnel = tx.tunnel
        sni = None
        if tunnel is not None and client.sni:
            if tunnel.sni is None:
                tunnel.sni = norm_host(client.sni)
            sni = tunnel.sni
        default_port = 443 if client.tls_established or req.scheme == "https" else 80
        # Each of mitmproxy's Request properties decodes its bytes again when read: read once here.
        target, method, req_authority = req.path, req.method, req.authority
        authority, authority_port, target_problem = request_target(
            tx.dst_name, default_port, req_authority, tx.host_headers or (), target, method)
        target_problem = tx.header_problem or target_problem
        if target_problem is None and req_authority and req.http_version.startswith("HTTP/1"):
            # An absolute-form request line in a tunnel, agreeing with it: sent on in origin-form, with a Host,
            # so the upstream is asked for exactly what was judged (and recorded).
            if not tx.host_headers:
                req.headers["host"] = req_authority
            req.authority = ""
        protocol_problem = None
        if "upgrade" in h or "http2-settings" in h:
            protocol_problem = websocket_problem(req, h)
            tx.websocket = protocol_problem is None
        path, ambiguity = path_facts(target)
        genai = tx.genai
        dst = tx.dst_name
        # Positional, in RequestFacts' field order (keywords cost twice as much to bind, on every request).
        if genai is None:
            provider = model = None
            pending = False
        else:
            provider, model, pending = genai.name, genai.result.request_model, tx.buffered_as_provider()
        tx.facts = RequestFacts(dst, tx.dst_port, method, path, sni, authority, authority_port, provider,
                                policy.provider_names_by_host.get(dst, ()), model, pending, False,
                                target_problem, protocol_problem, ambiguity)
        if tx.mcp is not None:
            # An MCP request is judged on its messages: its body (any method's; HTTP/2 may send one without a
            # length) is read first, bounded like a provider's.
            if tx.buffered_as_provider():
                tx.facts.mcp_pending = True
            else:
                tx.facts.mcp_problem = "an MCP request body of unknown length or over 32 MiB cannot be judged"
        if tx.gateway is not None:
            inv = h.get(tx.gateway.invocation_header)
            if inv is not None:
                del req.headers[tx.gateway.invocation_header]
            if inv:
                tx.invocation_id = inv[:256]
            elif "baggage" in h:
                tx.invocation_id = invocation_from_baggage(h["baggage"])
        # Authentication, destination and deny policies are settled on the headers, so nothing unauthorised
        # makes the gateway read its body; None means the answer depends on the model in the body.
        d = _decide(policy, tx, tx.facts)
        if d is None:
            tx.pending_under = policy  # what remains of the decision is finished under this policy (request)
            return None
        return self._apply(flow, tx, d, "requestheaders", body_in=False)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or flow.response or flow.error:
            return None
        if tx.mcp is not None and self.read_mcp is not None:
            self.read_mcp(flow)  # an MCP request's messages, which the decision judges
        d = tx.decision
        if d is not None:
            # Allowed on the headers: a budgeted call was left to be routed now, with its body in (see _apply).
            if d.allow and self._budget_waits_for_body(tx, d):
                return run_steps("request", self._allowed_routing, flow)
            return None
        if tx.facts is None:
            return None
        policy = self.rt.policy
        assert policy is not None
        model = tx.genai.result.request_model if tx.genai else None
        facts = tx.facts
        if facts.mcp_pending:  # still waiting: its body was not read, so its messages cannot be judged
            facts.mcp_problem = "the MCP request body could not be read"
        facts.model, facts.model_pending, facts.mcp_pending = model, False, False
        if tx.pending_under is policy and tx.agent is not None and tx.gateway is not None and tx.auth_failure is None:
            # Left pending on the headers under this very policy, past every check that does not depend on the
            # body: only the routes are left to judge, now with the model (and MCP messages) in.
            d = decide_rules(policy, tx.gateway, tx.agent, facts)
        else:  # the policy was replaced meanwhile (or the headers were never judged): the whole decision again
            d = _decide(policy, tx, facts)
        assert d is not None
        return self._apply(flow, tx, d, "request", body_in=True)

    def _apply(self, flow: http.HTTPFlow, tx: Transaction, d: Decision, hook: str, body_in: bool) -> Awaitable[None] | None:
        """Puts the decision in force. An allow runs what follows it here, once: routing, then credentials
        (what waits, the budget ledger still loading, is returned to be awaited; the gateway's later steps
        run after it). A budgeted call allowed on its headers has its credentials set now and is routed on
        the request hook, once the whole body it is estimated from is in."""
        tx.decision = d
        req = flow.request
        if not d.allow:
            refuse(flow, tx, d)
            return None
        if tx.req_h and "traceparent" in tx.req_h:
            req.headers["traceparent"] = tx.trace.traceparent()
        assert tx.agent is not None  # an allow decision has one
        self.rt.allow(flow.client_conn, req.host, req.port, tx.agent)
        if not body_in and self._budget_waits_for_body(tx, d):
            return run_steps(hook, self._allowed_credentials, flow)
        return run_steps(hook, self._allowed, flow)

    @staticmethod
    def _budget_waits_for_body(tx: Transaction, d: Decision) -> bool:
        """A budgeted call whose body the gateway reads whole: its estimate waits for that body."""
        rule = d.provider_rule
        return rule is not None and rule.budget is not None and tx.buffered_as_provider()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.status_code != 101 or flow.error:
            return
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is not None and tx.websocket and resp.headers.get("upgrade", "").strip().lower() == "websocket":
            return
        # A switch the agent did not ask for (or not to WebSocket) would make the connection an opaque relay.
        if tx is not None:
            tx.error = (f"clrk: the upstream switched protocols (101, upgrade {resp.headers.get('upgrade', '')[:64]!r}) "
                        "without a WebSocket handshake to answer; connection cut")
            tx.error_type = "protocol_error"
        log.warning("clrk: cut %s %s: the upstream answered 101 without a WebSocket handshake",
                    flow.request.method, flow.request.host)
        flow.kill()

    responseheaders.switch_only = True  # type: ignore[attr-defined]  # the Gateway calls it for a 101 only

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> Awaitable[None] | None:
        addr = data.server.address
        if addr is None:
            return None
        allowed = self.rt.allowed.get(data.client.id)
        if allowed is None or addr not in allowed:
            # Defence in depth: whatever path led here (raw TCP in a tunnel, a protocol upgrade we did not
            # judge), no decision allowed this destination.
            self._block(data, f"clrk: connection to {addr[0]}:{addr[1]} is not allowed by policy")
            log.warning("clrk: blocked an upstream connection to %s:%s that no decision allowed", *addr)
            return None
        try:
            return self._guard(data, addr, allowed[addr])
        except Exception:  # never fail open: an unjudged address is not dialled
            self._block(data, f"clrk: {addr[0]}:{addr[1]} is not allowed: its address could not be checked")
            log.exception("clrk: checking the address of %s:%s failed; not connecting", *addr)
            return None

    def _guard(self, data: server_hooks.ServerConnectionHookData, addr: tuple[str, int],
               agent: AgentIdentity) -> Awaitable[None] | None:
        policy = self.rt.policy
        gateway = policy.gateway_for_port(listener_port(data.client)) if policy else None
        host = norm_host(addr[0])
        alias = gateway.host_aliases.get(host) if gateway else None
        # TLS to the upstream names the host the decision allowed (not the client's SNI: a Backend may
        # send the request elsewhere), and its certificate is checked against that name.
        sni = data.server.sni or addr[0]
        if sni.endswith("."):
            sni = sni.rstrip(".")  # RFC 6066: a server name has no trailing dot; OpenSSL refuses one
        data.server.sni = sni
        if alias is not None:
            # Dial the alias (the operator's own target: trusted, not judged); the address is put back once
            # connected so that mitmproxy's connection reuse still matches on the real destination.
            self.rt.aliased[data.server] = addr
            data.server.address = alias
            return None
        if policy is None or gateway is None:
            self._refuse(data, addr, "no EgressGateway listens on this port")
            return None
        if not (gateway.block_private or policy.deny_cidrs):
            return None
        ip = literal(host)
        if ip is not None:
            refused = refusal(policy, gateway, agent, host, addr[1], (ip,))
            if refused is not None:
                self._refuse(data, addr, f"{refused.where} is {refused.why}")
            elif addr[0] != dial_form(ip):
                # 2130706433 or 127.1: dial the address judged, not a spelling for the resolver to read again.
                self.rt.aliased[data.server] = addr
                data.server.address = (dial_form(ip), addr[1])
            return None
        return self._check_resolution(data, policy, gateway, agent, host, addr)  # the one step that waits

    async def _check_resolution(self, data: server_hooks.ServerConnectionHookData, policy: CompiledPolicy,
                                gateway: GatewayConfig, agent: AgentIdentity, host: str, addr: tuple[str, int]) -> None:
        """A name is allowed, but where does it lead? Resolve it once, refuse it if any answer is in a denied
        range or an unopened private network, and dial an address that was checked, so that no second lookup
        (DNS rebinding) can answer differently."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
        except Exception as e:  # not only OSError: an unencodable name raises UnicodeError; never fail open
            data.server.error = f"cannot resolve {addr[0]}: {e}"
            return
        try:
            ips = list(dict.fromkeys(resolved(info[4][0]) for info in infos))
            if not ips:
                data.server.error = f"cannot resolve {addr[0]}: getaddrinfo returned no address"
                return
            refused = refusal(policy, gateway, agent, host, addr[1], ips)
            if refused is not None:
                self._refuse(data, addr, f"it resolves to {refused.where}, {refused.why}")
                return
            self.rt.aliased[data.server] = addr
            data.server.address = (dial_form(ips[0]), addr[1])
        except Exception:  # never fail open: left as it was, the name would be resolved again and dialled
            self._block(data, f"clrk: {addr[0]} is not allowed: its addresses could not be checked")
            log.exception("clrk: checking the addresses of %s:%s failed; not connecting", *addr)

    def _block(self, data: server_hooks.ServerConnectionHookData, message: str) -> None:
        """Refuses the upstream connection; the flow that needed it fails with `message`, and the error hook
        gives its record error.type policy_blocked (`Runtime.blocked`)."""
        data.server.error = message
        self.rt.blocked[data.client.id] = message

    def _refuse(self, data: server_hooks.ServerConnectionHookData, addr: tuple[str, int], why: str) -> None:
        self._block(data, f"clrk: {addr[0]} is not allowed: {why}")
        log.warning("clrk: blocked %s:%s: %s", addr[0], addr[1], why)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        original = self.rt.aliased.pop(data.server, None)
        if original is not None:
            # mitmproxy refuses address changes on open connections (a guard against redirecting a live
            # one); this restores the destination the connection stands for, it does not redirect it.
            object.__setattr__(data.server, "address", original)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.server_connected(data)


def _decide(policy: CompiledPolicy, tx: Transaction, facts: RequestFacts) -> Decision | None:
    """`decide` for the transaction's agent, or its authentication failure."""
    failure, agent = tx.auth_failure, tx.agent
    if failure is None and agent is not None:
        return decide_agent(policy, tx.gateway, agent, facts)  # no AuthResult made for the usual request
    return decide(policy, tx.gateway, failure or AuthResult(agent), facts)


def websocket_problem(req: http.Request, h: dict[str, str]) -> str | None:
    """Why a request that asks to switch protocols is not a well-formed RFC 6455 handshake (version 13), or
    None. Anything else that upgrades (h2c, TLS, a custom protocol) would turn the connection into a relay the
    gateway cannot inspect, so it is refused."""
    if not req.http_version.startswith("HTTP/1.1"):
        return f"{req.http_version} requests cannot switch protocols"
    upgrades = req.headers.get_all("upgrade")
    if len(upgrades) != 1 or upgrades[0].strip().lower() != "websocket":
        shown = ", ".join(u[:64] for u in upgrades) or "(none)"
        return f"switching protocols to {shown!r} is not allowed (only WebSocket, RFC 6455)"
    if req.method != "GET":
        return "a WebSocket handshake must be a GET"
    if "upgrade" not in {t.strip().lower() for t in h.get("connection", "").split(",")}:
        return "a WebSocket handshake must carry 'Connection: Upgrade'"
    if h.get("sec-websocket-version", "").strip() != "13":
        return "a WebSocket handshake must be version 13 (Sec-WebSocket-Version)"
    try:
        key_ok = len(base64.b64decode(h.get("sec-websocket-key", "").strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        key_ok = False
    if not key_ok:
        return "a WebSocket handshake must carry a Sec-WebSocket-Key of 16 base64-encoded bytes"
    return None
