"""clrk's steps, one job each, run in this order by the one addon mitmproxy sees (`clrk.mitmaddon.Gateway`):

  PolicyLoader     options, policy load and hot reload, the mitmproxy settings clrk relies on
  ProxyAuth        who is asking, and for where (Proxy-Authorization on CONNECT or per request)
  Providers        model-provider calls recognised and parsed (gen_ai.* attributes, usage)
  EgressControl    the decision; denials answered here; the last guard before any upstream connection
  ProviderRouting  (clrk.routing) token budgets and Backends of the matched AIProviderRoute rule
  Credentials      (clrk.routing) provider keys injected on the upstream request
  Capture          bounded body capture on the pass-through (feeds the provider parser)
  Recording        one record per transaction, handed to the recorder process
  Failsafe         last: nothing goes upstream without an allow decision, whatever failed above

The data path reads top to bottom in that order; the steps share one `Runtime` and, per request, the
`Transaction` in `flow.metadata`. Each keeps mitmproxy's hook names and signatures; a step that must wait
returns an awaitable instead of being a coroutine function (the hot path stays plain calls).
"""

from __future__ import annotations

import asyncio
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
from mitmproxy.net.http import url as mitm_url
from mitmproxy.proxy import server_hooks

from clrk.budget import day_start, utc_day
from clrk.ca import ensure_ca
from clrk.capture import (
    PROVIDER_BUFFER_LIMIT,
    BodyCapture,
    request_is_buffered,
    response_is_buffered,
)
from clrk.decision import AuthResult, Decision, RequestFacts, decide
from clrk.hostnames import canonical_ip, norm_host, normalize_path
from clrk.identity import AUTH_FAILED, THROTTLED, authenticate, invocation_from_baggage, trace_context
from clrk.policy import CompiledPolicy, PolicyError, load_policy
from clrk.policy.loader import policy_files
from clrk.providers import parser_for
from clrk.runtime import Runtime, Tunnel, deny_response, listener_port, refuse
from clrk.settings import Settings
from clrk.sink import RecordSink
from clrk.transaction import METADATA_KEY, Transaction, header_index

log = logging.getLogger("clrk")

RELOAD_POLL_SECONDS = 0.25
DRAIN_SECONDS = 30
MITMPROXY_DEFAULT_CONFDIR = "~/.mitmproxy"
FORCED_OPTIONS = frozenset({"connection_strategy", "flow_detail", "confdir"})  # see PolicyLoader._configure_mitmproxy


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
        if ctx.options.confdir == MITMPROXY_DEFAULT_CONFDIR:
            ensure_ca(ctx.options.clrk_certs)
            changes["confdir"] = str(Path(ctx.options.clrk_certs).resolve())
        if changes:
            ctx.options.update(**changes)

    def _apply(self, policy: CompiledPolicy) -> None:
        """Puts a policy in force. Everything that can fail happens before the swap; the recorder learns the
        names to redact before the first record made under the new policy reaches it (same socket, in order)."""
        self._apply_upstream_trust(policy)
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
        if auth.agent is not None:
            digest = policy.agents[auth.agent.username][1]
            self.rt.tunnels[flow.client_conn.id] = Tunnel(auth.agent, digest, norm_host(flow.request.host), flow.request.port)
            return None
        # No tunnel without credentials; the refusal is a transaction of its own.
        tx = Transaction(start=flow.request.timestamp_start, trace=trace_context(None), auth_failure=auth)
        tx.gateway = policy.gateway_for_port(listener_port(flow.client_conn))
        tx.dst_name = norm_host(flow.request.host)
        tx.decision = decide(policy, tx.gateway, auth, RequestFacts(tx.dst_name, flow.request.port))
        flow.response = deny_response(tx.decision)
        log.info("clrk: denied CONNECT %s:%s: %s", flow.request.host, flow.request.port, tx.decision.reason)
        self.rt.finish(flow, tx)
        return pending  # the answer goes out once this is done

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            return None
        policy = self.rt.policy
        assert policy is not None
        req = flow.request
        h = header_index(req.headers.fields)
        tx = Transaction(start=req.timestamp_start, trace=trace_context(h.get("traceparent")), req_h=h, counted=True)
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
        authority = authority_port = None
        host_header = req.host_header if (req.is_http2 or req.is_http3) else h.get("host")
        if host_header:
            default_port = 443 if client.tls_established or req.scheme == "https" else 80
            dst = tx.dst_name
            if host_header == dst:  # the common cases, without parsing
                authority, authority_port = host_header, default_port
            elif (":" not in dst and host_header.startswith(dst) and host_header[len(dst)] == ":"
                  and (p := host_header[len(dst) + 1:]).isdigit() and p.isascii() and len(p) <= 5):
                authority, authority_port = dst, int(p)
            else:
                try:
                    a_host, a_port = mitm_url.parse_authority(host_header, check=False)
                except ValueError:
                    a_host, a_port = host_header, None
                authority = norm_host(a_host)
                authority_port = a_port if a_port is not None else default_port
        path = normalize_path(req.path)
        genai = tx.genai
        tx.facts = RequestFacts(
            tx.dst_name, tx.dst_port, req.method, path, sni, authority, authority_port,
            provider=genai.name if genai else None,
            provider_names=policy.provider_names_by_host.get(tx.dst_name, ()),
            model=genai.result.request_model if genai else None,
            model_pending=genai is not None and request_is_buffered(h, provider=True),
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
        self.rt.allow(flow.client_conn, req.host, req.port)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> Awaitable[None] | None:
        addr = data.server.address
        if addr is None:
            return None
        if addr not in self.rt.allowed.get(data.client.id, ()):
            # Defence in depth: whatever path led here (raw TCP in a tunnel, a protocol upgrade we did not
            # judge), no decision allowed this destination.
            data.server.error = f"clrk: connection to {addr[0]}:{addr[1]} is not allowed by policy"
            log.warning("clrk: blocked an upstream connection to %s:%s that no decision allowed", *addr)
            return None
        policy = self.rt.policy
        gateway = policy.gateway_for_port(listener_port(data.client)) if policy else None
        alias = gateway.host_aliases.get(norm_host(addr[0])) if gateway else None
        # TLS to the upstream names the host the decision allowed (not the client's SNI: a Backend may
        # send the request elsewhere), and its certificate is checked against that name.
        sni = data.server.sni or addr[0]
        if sni.endswith("."):
            sni = sni.rstrip(".")  # RFC 6066: a server name has no trailing dot; OpenSSL refuses one
        data.server.sni = sni
        if alias is not None:
            # Dial the alias; the address is put back once connected so that mitmproxy's connection reuse
            # still matches on the real destination.
            self.rt.aliased[data.server] = addr
            data.server.address = alias
        elif policy is not None and policy.denied_ips and canonical_ip(addr[0]) is None:
            return self._check_resolution(data, policy, addr)  # the one step that waits (a DNS lookup)
        return None

    async def _check_resolution(self, data: server_hooks.ServerConnectionHookData, policy: CompiledPolicy,
                                addr: tuple[str, int]) -> None:
        """A name is allowed, but where does it lead? When deny rules name IP addresses (a metadata service,
        a private range host), resolve it here, refuse it if any answer is denied, and dial the address that
        was checked, so that no second lookup can answer differently."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
        except Exception as e:  # not only OSError: an unencodable name raises UnicodeError; never fail open
            data.server.error = f"cannot resolve {addr[0]}: {e}"
            return
        tunnel = self.rt.tunnels.get(data.client.id)
        agent = tunnel.agent if tunnel is not None else None
        ips = [canonical_ip(info[4][0]) or info[4][0] for info in infos]
        for ip in ips:
            for rule in policy.denied_ips.get(ip, ()):
                if agent is None or rule.agents.matches(agent):
                    data.server.error = f"clrk: {addr[0]} is not allowed: it resolves to {ip}, denied by {rule.ref}"
                    log.warning("clrk: blocked %s:%s: it resolves to %s, denied by %s", addr[0], addr[1], ip, rule.ref)
                    return
        self.rt.aliased[data.server] = addr
        data.server.address = (ips[0], addr[1])

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        original = self.rt.aliased.pop(data.server, None)
        if original is not None:
            # mitmproxy refuses address changes on open connections (a guard against redirecting a live
            # one); this restores the destination the connection stands for, it does not redirect it.
            object.__setattr__(data.server, "address", original)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.server_connected(data)


# --------------------------------------------------------------------------- Capture


class Capture:
    """Bounded body capture. Bodies of unknown or large size, and every event stream, are streamed through a
    `BodyCapture` chunk by chunk (SSE reaches the agent live, memory stays bounded). Small bodies of known
    length are left to mitmproxy to buffer, as bare mitmproxy does, and summarised from its bytes when the
    record is made (`clrk.transaction.snapshot`); only an encoded one goes through a `BodyCapture`, whose
    decoding is bounded (see `clrk.capture.request_is_buffered`)."""

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
        log.error("clrk: %s %s had no decision after the addons ran; denied", flow.request.method,
                  flow.request.pretty_url.split("?", 1)[0])

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
