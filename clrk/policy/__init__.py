"""Policy: the YAML contract (models), its loader, and its compiled runtime form."""

from clrk.policy.compiled import AgentIdentity, CompiledPolicy, GatewayConfig, HostRule, load_policy
from clrk.policy.loader import PolicyError, json_schema, load_documents

__all__ = [
    "AgentIdentity",
    "CompiledPolicy",
    "GatewayConfig",
    "HostRule",
    "PolicyError",
    "json_schema",
    "load_documents",
    "load_policy",
]
