"""Who is asking: proxy authentication against the Agent registry, and the agent's trace/invocation context.

Agents authenticate with HTTP Basic proxy credentials, user `<namespace>.<name>`, password = the agent's
token. The registry holds only sha256(token); comparison is constant-time. Neither the answer nor the
recorded reason ever echoes the user name or the token given (an agent may put a secret in either by
mistake): the reasons are fixed phrases, and an unknown agent name and a wrong token get byte-identical
407 answers, so the answer does not tell which agent names exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random
from dataclasses import dataclass
from urllib.parse import unquote

from clrk.decision import AuthResult
from clrk.policy.compiled import CompiledPolicy

_PROXY_URL = "HTTPS_PROXY=http://<namespace>.<agent>:<token>@host:port"
AUTH_MISSING = f"proxy credentials required ({_PROXY_URL})"
AUTH_NOT_BASIC = f"proxy credentials must use the Basic scheme ({_PROXY_URL})"
AUTH_MALFORMED = f"malformed proxy credentials: expected Basic base64(<namespace>.<agent>:<token>) ({_PROXY_URL})"
AUTH_UNKNOWN_AGENT = "unknown agent name (the name given is not recorded)"
AUTH_WRONG_TOKEN = "wrong token for a registered agent (the name given is not recorded)"
# What a client with credentials that name no agent, or the wrong token, reads: one text for both.
AUTH_FAILED = f"proxy authentication failed: check the agent name and token in the proxy URL ({_PROXY_URL})"


def authenticate(policy: CompiledPolicy, proxy_authorization: str | None) -> AuthResult:
    """Checks a Proxy-Authorization header value against the Agent registry."""
    if not proxy_authorization:
        return AuthResult(None, AUTH_MISSING)
    scheme, _, encoded = proxy_authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return AuthResult(None, AUTH_NOT_BASIC)
    try:
        user, sep, token = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return AuthResult(None, AUTH_MALFORMED)
    if not sep:
        return AuthResult(None, AUTH_MALFORMED)
    # Clients percent-encode userinfo taken from a proxy URL; some forward it as written.
    user = unquote(user)
    token = unquote(token)
    entry = policy.agents.get(user)
    digest = hashlib.sha256(token.encode()).digest()
    if entry is None:
        # Same work as a known agent, so timing does not tell which agent names exist.
        hmac.compare_digest(digest, b"\0" * 32)
        return AuthResult(None, AUTH_UNKNOWN_AGENT, AUTH_FAILED)
    agent, expected = entry
    if not hmac.compare_digest(digest, expected):
        return AuthResult(None, AUTH_WRONG_TOKEN, AUTH_FAILED)
    return AuthResult(agent)


@dataclass(slots=True)
class TraceContext:
    """The ids of the gateway's span, and its parent's when the agent sent a valid `traceparent`."""

    trace_id: str  # 32 lower-case hex
    span_id: str  # 16 lower-case hex
    parent_span_id: str | None
    flags: str  # 2 hex, the agent's sampling flags (or "01")

    def traceparent(self) -> str:
        """The traceparent to forward upstream: same trace, the gateway's span as parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


_HEX = frozenset("0123456789abcdef")


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and set(s) <= _HEX and s != "0" * n


def trace_context(traceparent: str | None) -> TraceContext:
    """Starts the gateway's span: a child of the agent's span when `traceparent` is valid W3C, else a new trace."""
    if traceparent:
        parts = traceparent.strip().lower().split("-")
        if len(parts) >= 4 and len(parts[0]) == 2 and parts[0] != "ff" and _is_hex(parts[1], 32) and _is_hex(parts[2], 16) and len(parts[3]) == 2:
            return TraceContext(parts[1], _span_id(), parts[2], parts[3])
    return TraceContext(f"{random.getrandbits(128) or 1:032x}", _span_id(), None, "01")


def _span_id() -> str:
    # Trace ids need uniqueness, not secrecy: the OTel SDK draws them the same way.
    return f"{random.getrandbits(64) or 1:016x}"


def invocation_from_baggage(baggage: str | None) -> str | None:
    """The `invocation.id` member of a W3C baggage header, if any."""
    if not baggage or "invocation.id" not in baggage:
        return None
    for member in baggage.split(","):
        key, sep, value = member.partition("=")
        if sep and key.strip() == "invocation.id":
            return unquote(value.split(";", 1)[0].strip())[:256] or None
    return None
