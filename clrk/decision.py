"""Per-request egress decisions: a pure function of (policy, gateway, agent, request facts).

The order is the policy contract's: authenticate → destination agreement → EgressDenyPolicy →
blockPrivateNetworks (IP-literal destinations; a name's addresses are judged when it is resolved, see
`clrk.addresses`) → MCPRoute (each JSON-RPC message of the body: `clrk.mcp`) → AIProviderRoute → EgressRoute →
defaultPolicy. Every `Decision` carries the rule that made
it and a reason a human can act on; both are recorded and the reason is what a denied agent reads.

A provider call's model usually sits in its request body. `decide` is first called when the headers
arrive; if the answer depends on the model and the body is yet to come (`model_pending`), it returns None
and is finished with the model once the body is in (`decide_rules`: the checks that do not depend on the
body are not run again).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from clrk.addresses import IPAddress, literal, private, views
from clrk.mcp import INVALID_REQUEST, POLICY_DENIED, McpBody
from clrk.memo import remember
from clrk.policy.compiled import (
    AgentIdentity,
    CompiledPolicy,
    GatewayConfig,
    HostRule,
    McpRule,
    ProviderMatchRule,
    ProviderRule,
)

RULE_AUTH = "authentication"
RULE_DESTINATION = "destination-check"
RULE_NO_GATEWAY = "gateway"
RULE_PROTOCOL = "protocol-check"
RULE_MALFORMED = "malformed-request"  # refused by mitmproxy's own checks before any rule was asked


@dataclass(slots=True)
class RequestFacts:
    """What the gateway knows about where a request is going, all hostnames normalized (see `norm_host`).

    `host`/`port` are the destination the gateway would dial: the CONNECT target for tunnelled traffic, the
    URL authority for plain-HTTP proxying. `sni` and `authority` are what the client claimed inside: the TLS
    server name and the Host header / `:authority`. `method`/`path` are None for decisions made below L7.
    """

    host: str
    port: int
    method: str | None = None
    path: str | None = None
    sni: str | None = None
    authority: str | None = None
    authority_port: int | None = None
    provider: str | None = None  # provider (schema) name when the destination serves a model API
    # What an AIProviderRoute `provider:` may call this destination: the provider whose own API host it is,
    # and the Backends whose upstream it is. A Backend's host is not the provider's just for sharing its schema.
    provider_names: tuple[str, ...] = ()
    model: str | None = None
    model_pending: bool = False
    # The model is named later, inside the session (a realtime WebSocket whose URL names none: Gemini Live's
    # `setup` message): a rule's model globs cannot be judged at the handshake, and are judged once the
    # session names its model (clrk.proxy.steps.websocket).
    model_later: bool = False
    # Set by the proxy when the request itself leaves its destination unclear (two Host headers, a target that
    # is not a path, a folded header line...): denied as a destination mismatch.
    target_problem: str | None = None
    # Why the request asks for a protocol switch the gateway cannot inspect (anything but an RFC 6455
    # WebSocket handshake): denied.
    protocol_problem: str | None = None
    # Why servers may read `path` differently (`clrk.hostnames.path_ambiguity`), for rules limited by path.
    path_ambiguity: str | None = None
    # An MCP request (clrk.mcp): the body is still to come (`mcp_pending`), its messages once read, or why they
    # cannot be read (`mcp_problem`: not JSON-RPC, a body too large or of unknown length...).
    mcp_pending: bool = False
    mcp: McpBody | None = None
    mcp_problem: str | None = None


@dataclass(slots=True)
class Decision:
    allow: bool
    rule: str  # what made it, as recorded (clrk.decision.rule): "EgressRoute/<ns>/<name>", "destination-check"...
    reason: str
    status: int = 200
    provider_rule: ProviderRule | None = None  # the AIProviderRoute rule that allowed a provider call
    host_rule: HostRule | None = None  # the EgressRoute or EgressDenyPolicy that decided, if one did
    answer: str | None = None  # what a denied client reads, when it must differ from the recorded reason
    mcp_rule: McpRule | None = None  # the MCPRoute that decided an MCP request
    # A denied MCP request is answered in JSON-RPC: (id, code, message) for each request of the body, and
    # whether the body was a batch (the answer is then an array).
    rpc_errors: tuple[tuple[str | int | None, int, str], ...] | None = None
    rpc_batch: bool = False

    @property
    def action(self) -> str:
        return "allow" if self.allow else "deny"


@dataclass(slots=True)
class AuthResult:
    """The outcome of proxy authentication: an agent, or why there is none (`failure`, recorded) and what the
    client is told (`answer`: the same for every failure that must not tell agent names apart)."""

    agent: AgentIdentity | None
    failure: str | None = None
    answer: str | None = None
    status: int = 407


def _dest(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _provider_match(mt: ProviderMatchRule, req: RequestFacts) -> bool:
    if mt.matches(req.provider_names, req.model, req.path):
        return True
    # A model named later: the rule's other conditions now, its model globs once the session names the model.
    return (req.model is None and req.model_later and mt.provider in req.provider_names
            and (not mt.endpoints or any(fnmatch.fnmatchcase(req.path or "", e) for e in mt.endpoints)))


def decide(
    policy: CompiledPolicy, gateway: GatewayConfig | None, auth: AuthResult, req: RequestFacts
) -> Decision | None:
    """Decides one request, or returns None when that needs the model of a body not read yet.
    Pure: no I/O, no clock, no state; safe to call from tests."""
    agent = auth.agent
    if agent is None:
        return Decision(False, RULE_AUTH, auth.failure or "proxy authentication required", auth.status, answer=auth.answer)
    return decide_agent(policy, gateway, agent, req)


def decide_agent(policy: CompiledPolicy, gateway: GatewayConfig | None, agent: AgentIdentity,
                 req: RequestFacts) -> Decision | None:
    """`decide` for an authenticated agent (what the proxy calls per request: no AuthResult made for it)."""
    if gateway is None:
        return Decision(False, RULE_NO_GATEWAY, "no EgressGateway listens on this port", 403)
    ip = literal(req.host)
    ips = views(ip) if ip is not None else ()
    d = _checks(policy, gateway, agent, req, ip, ips)
    return d if d is not None else _rules(policy, gateway, agent, req, ips)


def _checks(policy: CompiledPolicy, gateway: GatewayConfig, agent: AgentIdentity, req: RequestFacts,
            ip: IPAddress | None, ips: tuple) -> Decision | None:
    """What denies a request whatever its body says: destination agreement, EgressDenyPolicy, private
    networks. None when none does."""
    if req.sni is not None and req.sni != req.host:
        return Decision(
            False,
            RULE_DESTINATION,
            f"TLS server name {req.sni} does not match the CONNECT target {req.host}",
            403,
        )
    if req.authority is not None:
        if req.authority != req.host or (req.authority_port is not None and req.authority_port != req.port):
            shown = _dest(req.authority, req.authority_port) if req.authority_port else req.authority
            return Decision(
                False,
                RULE_DESTINATION,
                f"Host {shown} does not match the connection's destination {_dest(req.host, req.port)}",
                403,
            )

    if req.target_problem is not None:
        return Decision(False, RULE_DESTINATION, req.target_problem, 403)
    if req.protocol_problem is not None:
        return Decision(False, RULE_PROTOCOL, req.protocol_problem, 403)

    l4 = req.method is None  # a TLS Passthrough tunnel: no method or path to see
    ambiguous = req.path_ambiguity is not None
    for rule in policy.deny_rules:
        # At L4 a deny rule limited to some methods or paths still denies: what the tunnel will carry is unknown.
        if rule.matches(agent, req.host, req.port, req.method, req.path, l4, ambiguous, ips):
            reason = rule.deny_message or f"{_dest(req.host, req.port)} is denied by {rule.ref}"
            if ambiguous and rule.paths and not rule.deny_message:
                reason = f"{reason}: the path {req.path} is ambiguous ({req.path_ambiguity}) and the rule limits paths"
            return Decision(False, rule.ref, reason, rule.deny_status, host_rule=rule)
    if ip is not None and req.host not in gateway.host_aliases:
        refused = private(policy, gateway, agent, req.host, req.port, (ip,))
        if refused is not None:
            embedded = f" ({refused.matched})" if refused.matched != refused.address else ""
            return Decision(False, refused.rule, f"{_dest(req.host, req.port)}{embedded} is {refused.why}", 403)
    return None


def decide_rules(policy: CompiledPolicy, gateway: GatewayConfig, agent: AgentIdentity, req: RequestFacts) -> Decision | None:
    """The routes of `decide`, after its checks (MCPRoute, AIProviderRoute, EgressRoute, defaultPolicy), or None
    while the model or MCP messages of a body not read yet are needed. Called alone only to finish a decision
    `decide` left pending on the request's headers, under the same policy, once its body is in: nothing the
    checks read can have changed since (authentication, destination, deny rules and address ranges do not
    depend on the body), so they are not run twice."""
    return _rules(policy, gateway, agent, req, None)  # the addresses are worked out if the routes are reached


def _rules(policy: CompiledPolicy, gateway: GatewayConfig, agent: AgentIdentity, req: RequestFacts,
           ips: tuple | None) -> Decision | None:
    ambiguous = req.path_ambiguity is not None
    if req.path is not None and policy.mcp_host(req.host):
        for mr in policy.mcp_rules:
            if mr.agents.matches(agent) and mr.server_for(req.host, req.port, req.path, ambiguous) is not None:
                if req.mcp_pending:
                    return None
                return _judge_mcp(mr, req)

    provider_note = ""
    if req.provider is not None and req.path is not None:
        candidates = policy.provider_rules_for(agent)
        if candidates and req.model is None and req.model_pending:
            return None
        allowed = _provider_allow(policy, agent, candidates, req, ambiguous)
        if allowed is not None:
            return allowed
        provider_note = f"no AIProviderRoute rule matches {req.provider} model {req.model or '(unknown)'} at {req.path}, and "

    if ips is None:
        ip = literal(req.host)
        ips = views(ip) if ip is not None else ()
    for rule in policy.routes:
        if rule.matches(agent, req.host, req.port, req.method, req.path, False, ambiguous, ips):
            return Decision(True, rule.ref, f"{_dest(req.host, req.port)} allowed by {rule.ref}", host_rule=rule)

    default_rule = f"EgressGateway/{gateway.name}/defaultPolicy"
    if gateway.default_allow:
        return Decision(True, default_rule, "no route matched; defaultPolicy is allow-all")
    what = _dest(req.host, req.port)
    if req.method is not None:
        what = f"{req.method} {what}{req.path or ''}"
    note = f" (its path is ambiguous: {req.path_ambiguity}; routes limited by path never allow such paths)" if ambiguous else ""
    return Decision(False, default_rule, f"{provider_note}no route allows {what} for agent {agent.ref} (deny-all){note}", 403)


def _provider_allow(policy: CompiledPolicy, agent: AgentIdentity, candidates: tuple[ProviderRule, ...],
                    req: RequestFacts, ambiguous: bool) -> Decision | None:
    """The allow of the first of `candidates` (the agent's AIProviderRoute rules) that matches the call, or None.
    A pure function of the policy, the agent and the call's shape: remembered on the policy per shape (a reload
    brings an empty memory), the agent kept with the answer so that its id is not reused while remembered;
    bounded (`clrk.memo`: model and path are the agent's, so long ones are never kept)."""
    key = (id(agent), req.provider, req.provider_names, req.model, req.path, ambiguous, req.model_later)
    memo = policy.provider_answers
    hit = memo.get(key)
    if hit is not None and hit[0] is agent:
        return hit[1]
    d = None
    for pr in candidates:
        if any(_provider_match(mt, req) and not (ambiguous and mt.endpoints) for mt in pr.matches):
            what = f"{req.provider} {req.model or 'request'} to {req.path}"
            if req.model is None and req.model_later:
                what += " (its model is judged when the session names it)"
            d = Decision(True, pr.ref, f"{what} allowed by {pr.ref}", provider_rule=pr)
            break
    return remember(memo, key, len(req.path or "") + len(req.model or ""), (agent, d))[1]


def _judge_mcp(mr: McpRule, req: RequestFacts) -> Decision:
    """An MCP request to a server of `mr`: refused whole if it cannot be read or any message in it names a tool,
    prompt or resource the route does not allow (a batch is not split: nothing of it reaches the server)."""
    where = f"{req.method} {_dest(req.host, req.port)}{req.path}"
    if req.path_ambiguity is not None:
        reason = f"the path {req.path} is ambiguous ({req.path_ambiguity}) on an MCP server of {mr.ref}"
        return Decision(False, mr.ref, reason, 403, mcp_rule=mr)
    if req.mcp_problem is not None:
        reason = f"{where}: {req.mcp_problem}"
        return Decision(False, mr.ref, reason, 400, mcp_rule=mr, rpc_errors=((None, INVALID_REQUEST, f"clrk: {req.mcp_problem}"),))
    body = req.mcp
    if body is None:
        return Decision(True, mr.ref, f"{where} allowed by {mr.ref}", mcp_rule=mr)
    refused = next((m for m in body.messages if m.target_kind is not None and not mr.allows(m.target_kind, m.target or "")), None)
    if refused is None:
        return Decision(True, mr.ref, f"{where} allowed by {mr.ref}", mcp_rule=mr)
    why = f"{refused.target_kind} {refused.target} is not allowed by MCPRoute {mr.namespace}/{mr.name}"
    errors = []
    for m in body.messages:
        if m.kind != "request":
            continue
        if m is refused or (m.target_kind is not None and not mr.allows(m.target_kind, m.target or "")):
            text = f"clrk: {m.target_kind} {m.target} is not allowed by MCPRoute {mr.namespace}/{mr.name}"
        else:
            text = f"clrk: not sent: its batch holds a call that is not allowed ({why})"
        errors.append((m.id, POLICY_DENIED, text))
    return Decision(False, mr.ref, why, 200, mcp_rule=mr, rpc_errors=tuple(errors), rpc_batch=body.batch)
