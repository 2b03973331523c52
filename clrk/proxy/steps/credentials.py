"""Step Credentials: CredentialInjectionPolicy, the provider key set on the upstream request over whatever
the agent sent."""

from __future__ import annotations

from mitmproxy import http

from clrk.proxy.runtime import Runtime
from clrk.proxy.transaction import METADATA_KEY, Transaction


class Credentials:
    """Sets the provider key a CredentialInjectionPolicy names, over whatever the agent sent. Not a hook of its
    own: `EgressControl` runs `inject` once, where it allows the request, after the routing."""

    name = "clrk_credentials"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def inject(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        policy = self.rt.policy
        if tx is None or policy is None or flow.response or flow.error or tx.decision is None or not tx.decision.allow:
            return
        d = tx.decision
        if d.provider_rule is not None:
            injections = policy.injections_for("AIProviderRoute", d.provider_rule.route_name, d.provider_rule.route_namespace)
        elif d.mcp_rule is not None:
            injections = policy.injections_for("MCPRoute", d.mcp_rule.name, d.mcp_rule.namespace)
        elif d.host_rule is not None and not d.host_rule.deny:
            injections = policy.injections_for("EgressRoute", d.host_rule.name, d.host_rule.namespace)
        else:
            injections = ()
        if not injections and tx.gateway is not None and tx.genai is not None:
            # The gateway-wide credential is a provider key: it goes with provider calls, never to other hosts.
            injections = policy.injections_for("EgressGateway", tx.gateway.name, tx.gateway.namespace)
        for inj in injections:
            if inj.type == "Header":
                flow.request.headers[inj.field] = inj.prefix + inj.secret
            else:
                flow.request.query[inj.field] = inj.prefix + inj.secret
