"""clrk's steps, one job each, run in this order by the one addon mitmproxy sees (`clrk.proxy.gateway.Gateway`):

  PolicyLoader     options, policy load and hot reload, the mitmproxy settings clrk relies on
  ProxyAuth        who is asking, and for where (Proxy-Authorization on CONNECT or per request)
  Providers        model-provider calls recognised and parsed (gen_ai.* attributes, usage)
  EgressControl    the decision; denials answered here; the last guard before any upstream connection
  ProviderRouting  (clrk.proxy.routing) token budgets and Backends of the matched AIProviderRoute rule
  Credentials      (clrk.proxy.routing) provider keys injected on the upstream request
  Capture          bounded body capture on the pass-through (feeds the provider parser)
  Recording        one record per transaction, handed to the recorder process
  Failsafe         last: nothing goes upstream without an allow decision, whatever failed above

The data path reads top to bottom in that order; the steps share one `Runtime` and, per request, the
`Transaction` in `flow.metadata`. Each keeps mitmproxy's hook names and signatures; a step that must wait
returns an awaitable instead of being a coroutine function (the hot path stays plain calls).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable
from pathlib import Path

import certifi
from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from clrk.addresses import dial_form, literal, refusal, resolved
from clrk.decision import RULE_DESTINATION, RULE_MALFORMED, AuthResult, Decision, RequestFacts, decide
from clrk.escape import printable
from clrk.hostnames import norm_host, normalize_path, path_ambiguity, request_target
from clrk.identity import AUTH_FAILED, THROTTLED, authenticate, invocation_from_baggage, trace_context
from clrk.policy import CompiledPolicy, PolicyError, load_policy
from clrk.policy.compiled import AgentIdentity, GatewayConfig
from clrk.policy.loader import policy_files
from clrk.providers import parser_for
from clrk.proxy.budget import day_start, utc_day
from clrk.proxy.ca import ensure_ca
from clrk.proxy.capture import (
    PROVIDER_BUFFER_LIMIT,
    BodyCapture,
    request_is_buffered,
    response_is_buffered,
)
from clrk.proxy.runtime import Runtime, deny_response, listener_port, refuse
from clrk.proxy.sink import RecordSink
from clrk.proxy.transaction import METADATA_KEY, Transaction, Tunnel, header_index, scan_request_headers
from clrk.settings import Settings

log = logging.getLogger("clrk")

RELOAD_POLL_SECONDS = 0.25
DRAIN_SECONDS = 30
MITMPROXY_DEFAULT_CONFDIR = "~/.mitmproxy"
FORCED_OPTIONS = frozenset({"connection_strategy", "flow_detail", "confdir", "rawtcp"})  # see PolicyLoader._configure_mitmproxy


# --------------------------------------------------------------------------- PolicyLoader


class PolicyLoader:
    """Declares clrk's options, loads the policy, reloads it when its files change."""

    name = "clrk_policy"

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._watch: asyncio.Task | None = None
        self._signature: tuple | None = None
        self._loaded_from: str | None = None  # the clrk_policies value in force (file changes: _watch_loop)

    def load(self, loader) -> None:
        s = Settings()
        loader.add_option("clrk_policies", str, s.policies, "clrk: policy file or directory (env CLRK_POLICIES).")
        loader.add_option("clrk_db", str, s.db, "clrk: DuckDB file for records (env CLRK_DB).")
        loader.add_option(
            "clrk_dev_otlp_fallback_endpoint",
            str,
            s.dev_otlp_fallback_endpoint,
            "clrk: dev tee; every span and log record is also sent to this OTLP/HTTP base URL (empty = off).",
        )
        loader.add_option("clrk_certs", str, s.certs, "clrk: directory of the gateway's CA (env CLRK_CERTS).")

    def configure(self, updated: set[str]) -> None:
        if FORCED_OPTIONS & updated:
            # Every time, not once: a `-v`, `--flow-detail`, the confdir's config.yaml or a later `set` must
            # not undo what clrk's security relies on.
            self._configure_mitmproxy()
        if "clrk_policies" in updated and (self.rt.policy is None or ctx.options.clrk_policies != self._loaded_from):
            try:
                policy = load_policy(ctx.options.clrk_policies)
                self._apply(policy)
            except PolicyError as e:
                raise exceptions.OptionsError(f"clrk: the policy in {ctx.options.clrk_policies} is invalid:\n{e}") from None
            except OSError as e:
                raise exceptions.OptionsError(f"clrk: the policy in {ctx.options.clrk_policies} cannot be used: {e}") from None
            self._signature = self._current_signature()
            self._loaded_from = ctx.options.clrk_policies
        if "clrk_dev_otlp_fallback_endpoint" in updated and self.rt.sink is not None:
            self.rt.sink.send_config(export_config(self.rt.policy))

    def _configure_mitmproxy(self) -> None:
        changes: dict = {}
        # Never touch an upstream before the decision: the default "eager" dials on CONNECT.
        if ctx.options.connection_strategy != "lazy":
            changes["connection_strategy"] = "lazy"
        # mitmproxy's own flow log prints URLs with their query secrets; clrk logs redacted lines instead.
        if ctx.options.flow_detail != 0:
            changes["flow_detail"] = 0
        # No opaque relays on a terminating listener: bytes that are not HTTP, and a 101 that is not a
        # WebSocket, end the connection instead of becoming a raw TCP pipe (Passthrough has its own relay).
        if ctx.options.rawtcp:
            changes["rawtcp"] = False
        if ctx.options.confdir == MITMPROXY_DEFAULT_CONFDIR:
            ensure_ca(ctx.options.clrk_certs)
            changes["confdir"] = str(Path(ctx.options.clrk_certs).resolve())
        if changes:
            ctx.options.update(**changes)

    def _apply(self, policy: CompiledPolicy) -> None:
        """Puts a policy in force. Everything that can fail happens before the swap; the recorder learns the
        names to redact before the first record made under the new policy reaches it (same socket, in order)."""
        self._apply_upstream_trust(policy)
        idle = [g.idle_timeout for g in policy.gateways if g.idle_timeout is not None]
        if idle and ctx.options.tcp_timeout != min(idle):
            ctx.options.update(tcp_timeout=min(idle))
        if self.rt.sink is not None:
            self.rt.sink.send_config(export_config(policy))
        self.rt.policy = policy

    def _apply_upstream_trust(self, policy: CompiledPolicy) -> None:
        """caBundle adds to the default trust store: mitmproxy takes one file, so write the union."""
        bundles = sorted({g.ca_bundle for g in policy.gateways if g.ca_bundle})
        if not bundles:
            if ctx.options.ssl_verify_upstream_trusted_ca and "clrk-upstream-trust" in ctx.options.ssl_verify_upstream_trusted_ca:
                ctx.options.update(ssl_verify_upstream_trusted_ca=None)
            return
        pem = Path(certifi.where()).read_bytes()
        for b in bundles:
            pem += b"\n" + Path(b).read_bytes()
        digest = hashlib.sha256(pem).hexdigest()[:16]
        out = Path(ctx.options.clrk_db).resolve().parent / f"clrk-upstream-trust-{digest}.pem"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(pem)
            os.replace(tmp, out)
        if ctx.options.ssl_verify_upstream_trusted_ca != str(out):
            ctx.options.update(ssl_verify_upstream_trusted_ca=str(out))

    def running(self) -> None:
        self._watch = asyncio.create_task(self._watch_loop())

    def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    def _current_signature(self) -> tuple:
        files = [str(p) for p in policy_files(ctx.options.clrk_policies)]
        # Secret files and CA bundles count too: rotating a token file must take effect like a policy edit.
        extra = list(self.rt.policy.referenced_files) if self.rt.policy is not None else []
        sig = []
        for f in files + extra:
            try:
                st = os.stat(f)
                sig.append((f, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((f, None, None))
        return tuple(sig)

    async def _watch_loop(self) -> None:
        """Polls the policy files; a change is loaded off the event loop and swapped in whole. Nothing that
        goes wrong in one round stops the next."""
        while True:
            await asyncio.sleep(RELOAD_POLL_SECONDS)
            try:
                await self._reload_if_changed()
            except Exception as e:
                log.error("clrk: policy reload failed (%s); the last good policy stays in force", e)

    async def _reload_if_changed(self) -> None:
        try:
            sig = await asyncio.to_thread(self._current_signature)
        except PolicyError as e:
            sig = (str(e),)
        if sig == self._signature:
            return
        self._signature = sig
        try:
            policy = await asyncio.to_thread(load_policy, ctx.options.clrk_policies)
        except PolicyError as e:
            log.error("clrk: policy reload failed; the last good policy stays in force:\n%s", e)
            return
        self._apply(policy)
        log.info("clrk: policy reloaded from %s (%d documents)", ctx.options.clrk_policies, len(policy.documents))


def export_config(policy: CompiledPolicy | None) -> dict:
    gateways = {}
    if policy is not None:
        for g in policy.gateways:
            gateways[g.name] = {"endpoint": g.otlp_endpoint, "headers": dict(g.otlp_headers)}
    return {
        "gateways": gateways,
        "fallback": ctx.options.clrk_dev_otlp_fallback_endpoint or "",
        # What the recorder redacts when it builds records (it only ever adds to these).
        "redact_headers": sorted(policy.redact_headers) if policy is not None else [],
        "redact_query": sorted(policy.redact_query) if policy is not None else [],
    }


# --------------------------------------------------------------------------- ProxyAuth


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
        h, hosts, problem = scan_request_headers(req.headers.fields)
        tx = Transaction(start=req.timestamp_start, trace=trace_context(h.get("traceparent")), req_h=h, counted=True,
                         host_headers=hosts, header_problem=problem)
        self.rt.in_flight += 1
        flow.metadata[METADATA_KEY] = tx
        tx.tunnel = tunnel = self.rt.tunnels.get(flow.client_conn.id)
        tx.gateway = policy.gateway_for_port(listener_port(flow.client_conn))
        # Where the request goes: the CONNECT target for tunnelled traffic, the URL's host for plain HTTP.
        tx.dst_name, tx.dst_port = (tunnel.host, tunnel.port) if tunnel else (norm_host(req.host), req.port)
        if tunnel is not None:
            if "proxy-authorization" in h:
                del req.headers["proxy-authorization"]
            # Re-check on every request so that revoking an agent also closes its open tunnels' doors.
            tx.agent = policy.agent_still_valid(tunnel.agent.username, tunnel.digest)
            if tx.agent is None:
                tx.auth_failure = AuthResult(None, f"credentials of agent {tunnel.agent.ref} are no longer valid", AUTH_FAILED)
        else:
            auth, pending = self._authenticate(policy, h.get("proxy-authorization"), flow.client_conn)
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


# --------------------------------------------------------------------------- Providers


class Providers:
    """Recognises model-provider calls and follows them: request body in, response pieces through, usage out."""

    name = "clrk_providers"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or self.rt.policy is None or tx.dst_name is None:
            return
        tx.genai = parser_for(self.rt.policy.provider_hosts, tx.dst_name, flow.request.path)

    def request(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.genai is None or flow.request.stream:
            return
        h = tx.req_h or {}
        body = flow.request.raw_content
        if body and h.get("content-encoding"):
            # Decoded in bounded pieces and at most PROVIDER_BUFFER_LIMIT: a small compressed body must not
            # become gigabytes here.
            decoded = BodyCapture(PROVIDER_BUFFER_LIMIT, True, h["content-encoding"])
            decoded.feed(body)
            body = decoded.captured if not decoded.truncated else None
        if body:
            tx.genai.request_body(body)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.genai is None or flow.response is None:
            return
        tx.genai.response_headers(flow.response.status_code, tx.response_headers(flow).get("content-type"))


# --------------------------------------------------------------------------- EgressControl


class EgressControl:
    """Decides each request; answers denials; lets mitmproxy dial only what a decision allowed."""

    name = "clrk_egress"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> None:
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
        authority, authority_port, target_problem = request_target(
            tx.dst_name, default_port, req.authority, tx.host_headers or (), req.path, req.method)
        target_problem = tx.header_problem or target_problem
        if target_problem is None and req.authority and req.http_version.startswith("HTTP/1"):
            # An absolute-form request line in a tunnel, agreeing with it: sent on in origin-form, with a Host,
            # so the upstream is asked for exactly what was judged (and recorded).
            if not tx.host_headers:
                req.headers["host"] = req.authority
            req.authority = ""
        protocol_problem = None
        if "upgrade" in h or "http2-settings" in h:
            protocol_problem = websocket_problem(req, h)
            tx.websocket = protocol_problem is None
        path = normalize_path(req.path)
        genai = tx.genai
        tx.facts = RequestFacts(
            tx.dst_name, tx.dst_port, req.method, path, sni, authority, authority_port,
            provider=genai.name if genai else None,
            provider_names=policy.provider_names_by_host.get(tx.dst_name, ()),
            model=genai.result.request_model if genai else None,
            model_pending=genai is not None and request_is_buffered(h, provider=True),
            target_problem=target_problem,
            protocol_problem=protocol_problem,
            path_ambiguity=path_ambiguity(req.path),
        )
        if tx.gateway is not None:
            inv = h.get(tx.gateway.invocation_header)
            if inv is not None:
                del req.headers[tx.gateway.invocation_header]
            tx.invocation_id = inv[:256] if inv else invocation_from_baggage(h.get("baggage"))
        # Authentication, destination and deny policies are settled on the headers, so nothing unauthorised
        # makes the gateway read its body; None means the answer depends on the model in the body.
        d = decide(policy, tx.gateway, tx.auth_failure or AuthResult(tx.agent), tx.facts)
        if d is not None:
            self._apply(flow, tx, d)

    def request(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.decision is not None or tx.facts is None or flow.response or flow.error:
            return
        policy = self.rt.policy
        assert policy is not None
        model = tx.genai.result.request_model if tx.genai else None
        facts = tx.facts
        facts.model, facts.model_pending = model, False
        d = decide(policy, tx.gateway, tx.auth_failure or AuthResult(tx.agent), facts)
        assert d is not None
        self._apply(flow, tx, d)

    def _apply(self, flow: http.HTTPFlow, tx: Transaction, d: Decision) -> None:
        tx.decision = d
        req = flow.request
        if not d.allow:
            refuse(flow, tx, d)
            return
        if tx.req_h and "traceparent" in tx.req_h:
            req.headers["traceparent"] = tx.trace.traceparent()
        assert tx.agent is not None  # an allow decision has one
        self.rt.allow(flow.client_conn, req.host, req.port, tx.agent)

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

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> Awaitable[None] | None:
        addr = data.server.address
        if addr is None:
            return None
        allowed = self.rt.allowed.get(data.client.id)
        if allowed is None or addr not in allowed:
            # Defence in depth: whatever path led here (raw TCP in a tunnel, a protocol upgrade we did not
            # judge), no decision allowed this destination.
            data.server.error = f"clrk: connection to {addr[0]}:{addr[1]} is not allowed by policy"
            log.warning("clrk: blocked an upstream connection to %s:%s that no decision allowed", *addr)
            return None
        try:
            return self._guard(data, addr, allowed[addr])
        except Exception:  # never fail open: an unjudged address is not dialled
            data.server.error = f"clrk: {addr[0]}:{addr[1]} is not allowed: its address could not be checked"
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
            data.server.error = f"clrk: {addr[0]} is not allowed: its addresses could not be checked"
            log.exception("clrk: checking the addresses of %s:%s failed; not connecting", *addr)

    @staticmethod
    def _refuse(data: server_hooks.ServerConnectionHookData, addr: tuple[str, int], why: str) -> None:
        data.server.error = f"clrk: {addr[0]} is not allowed: {why}"
        log.warning("clrk: blocked %s:%s: %s", addr[0], addr[1], why)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        original = self.rt.aliased.pop(data.server, None)
        if original is not None:
            # mitmproxy refuses address changes on open connections (a guard against redirecting a live
            # one); this restores the destination the connection stands for, it does not redirect it.
            object.__setattr__(data.server, "address", original)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.server_connected(data)


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


# --------------------------------------------------------------------------- Capture


class Capture:
    """Bounded body capture. Bodies of unknown or large size, and every event stream, are streamed through a
    `BodyCapture` chunk by chunk (SSE reaches the agent live, memory stays bounded). Small bodies of known
    length are left to mitmproxy to buffer, as bare mitmproxy does, and summarised from its bytes when the
    record is made (`clrk.proxy.transaction.snapshot`); only an encoded one goes through a `BodyCapture`, whose
    decoding is bounded (see `clrk.proxy.capture.request_is_buffered`)."""

    name = "clrk_capture"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or flow.response or flow.error or tx.gateway is None:
            return
        h = tx.req_h or {}
        if not request_is_buffered(h, provider=tx.genai is not None):
            cfg = tx.gateway.capture
            tx.req_capture = BodyCapture(cfg.max_bytes, cfg.wants(h.get("content-type")), h.get("content-encoding"))
            flow.request.stream = tx.req_capture.feed

    def request(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.gateway is None or flow.request.stream:
            return
        h = tx.req_h or {}
        if h.get("content-encoding"):
            cfg = tx.gateway.capture
            tx.req_capture = BodyCapture(cfg.max_bytes, cfg.wants(h.get("content-type")), h["content-encoding"])
            tx.req_capture.feed(flow.request.raw_content or b"")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        resp = flow.response
        if tx is None or resp is None or flow.error or tx.gateway is None or tx.decision is None or not tx.decision.allow:
            return
        tx.upstream_response = True
        rh = tx.response_headers(flow)
        if not response_is_buffered(rh):
            cfg = tx.gateway.capture
            tx.resp_capture = BodyCapture(cfg.max_bytes, cfg.wants(rh.get("content-type")), rh.get("content-encoding"),
                                          listener=tx.genai.feed if tx.genai is not None else None)
            resp.stream = tx.resp_capture.feed

    def response(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        resp = flow.response
        if tx is None or resp is None or tx.gateway is None or resp.stream or not tx.upstream_response:
            return
        # A buffered upstream response: the provider parser reads it whole (decoded, in bounded pieces).
        encoding = tx.response_headers(flow).get("content-encoding")
        if encoding:
            cfg = tx.gateway.capture
            tx.resp_capture = BodyCapture(cfg.max_bytes, cfg.wants(tx.response_headers(flow).get("content-type")), encoding,
                                          listener=tx.genai.feed if tx.genai is not None else None)
            tx.resp_capture.feed(resp.raw_content or b"")
        elif tx.genai is not None and resp.raw_content:
            tx.genai.feed(resp.raw_content)


# --------------------------------------------------------------------------- Recording


class Recording:
    """Ends each transaction with a record; owns the connection to the recorder process and the stop: on
    SIGTERM/SIGINT no new connection is accepted, transactions in flight finish, every record is flushed."""

    name = "clrk_recording"

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._stopping = False

    async def running(self) -> None:
        loop = asyncio.get_running_loop()
        # mitmproxy stops at once on SIGTERM/SIGINT; a gateway first lets what is in flight finish.
        loop.add_signal_handler(signal.SIGTERM, self._graceful_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._graceful_stop, "SIGINT")
        sink = RecordSink(ctx.options.clrk_db)
        self.rt.sink = sink
        sink.send_config(export_config(self.rt.policy))
        for rec in self.rt.unsent:
            sink.submit(rec)
        self.rt.unsent.clear()
        try:
            await sink.start()
        except Exception as e:  # keeps trying in the background; records wait (bounded) meanwhile
            log.error("clrk: the recorder is not available yet: %s", e)
            sink.reconnect_soon()
        self._budgets_task = asyncio.create_task(self._load_budgets(sink))

    def _graceful_stop(self, signame: str) -> None:
        if self._stopping:
            log.info("clrk: %s again: stopping now", signame)
            ctx.master.shutdown()
            return
        self._stopping = True
        log.info("clrk: %s: accepting no new connections; letting %d transaction(s) in flight finish (up to %ds; "
                 "signal again to stop at once)", signame, self.rt.in_flight, DRAIN_SECONDS)
        ctx.options.update(server=False)
        self._drain_task = asyncio.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.rt.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.rt.in_flight > 0:
            log.warning("clrk: %d transaction(s) still in flight after %ds; stopping anyway", self.rt.in_flight, DRAIN_SECONDS)
        ctx.master.shutdown()

    async def _load_budgets(self, sink: RecordSink) -> None:
        """Today's usage per budget pool, from the store: budgets survive a restart. Retried until it works;
        until then budgeted routes answer 503 (they cannot know what is left)."""
        delay, warned = 0.2, False
        while not self.rt.ledger.loaded:
            day = utc_day(time.time())
            try:
                reply = await sink.request({"t": "budget_totals", "since": day_start(day)}, 30.0)
                self.rt.ledger.load(day, reply["totals"])
                if warned:
                    log.info("clrk: today's token usage is read; budgeted routes serve again")
                return
            except Exception as e:
                if not warned:
                    log.error("clrk: cannot read today's token usage from the store (%s); budgeted routes answer "
                              "503 until it can be read (retrying)", e)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def response(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.recorded:
            return
        self.rt.finish(flow, tx)

    def error(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.recorded:
            return
        if flow.response is None and flow.error is not None and tx.decision is not None and tx.decision.allow:
            # mitmproxy ends a connection that stayed silent for tcp_timeout seconds by closing it, and the
            # flow's error then reads "client disconnected". A request sent upstream that long ago and never
            # answered is an upstream timeout: say so in the record.
            sent = flow.request.timestamp_end or flow.request.timestamp_start
            idle = ctx.options.tcp_timeout
            if time.time() - sent >= idle * 0.95 and "disconnect" in flow.error.msg.lower():
                tx.error = f"timeout: the upstream did not answer within {idle} s (tcp_timeout)"
        self.rt.finish(flow, tx)

    async def done(self) -> None:
        if self.rt.sink is not None:
            with contextlib.suppress(Exception):
                await self.rt.sink.stop()


# --------------------------------------------------------------------------- Failsafe


class Failsafe:
    """The last word before a request leaves. If a step above raised (`Gateway` logs it and carries on with
    the next step), the request may lack the decision it needs: it is denied then, never let through."""

    name = "clrk_failsafe"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _deny(self, flow: http.HTTPFlow, tx: Transaction | None) -> None:
        d = Decision(False, "failsafe", "clrk could not decide this request (see the gateway log); denied", 500)
        if tx is None:
            tx = Transaction(start=flow.request.timestamp_start, trace=trace_context(None))
            flow.metadata[METADATA_KEY] = tx
        refuse(flow, tx, d)
        # Without the query: it may hold secrets, and the log is an output too.
        log.error("clrk: %s %s had no decision after the addons ran; denied", printable(flow.request.method),
                  printable(flow.request.pretty_url.split("?", 1)[0]))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        pending = tx is not None and tx.facts is not None and tx.facts.model_pending and tx.decision is None
        if tx is None or (tx.decision is None and not pending) or (tx.decision is not None and not tx.decision.allow):
            if flow.request.stream:
                flow.kill()  # the body would already be on its way upstream
            else:
                self._deny(flow, tx)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.decision is None or not tx.decision.allow:
            self._deny(flow, tx)
