"""Who is asking: proxy authentication against the Agent registry, and the agent's trace/invocation context.

Agents authenticate with HTTP Basic proxy credentials, user `<namespace>.<name>`, password = the agent's
token. The registry holds only sha256(token); comparison is constant-time. Neither the answer nor the
recorded reason ever echoes the user name or the token given (an agent may put a secret in either by
mistake): the reasons are fixed phrases, and an unknown agent name and a wrong token get byte-identical
407 answers, so the answer does not tell which agent names exist.

Repeated failures from one source address are slowed down (`AuthThrottle`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from random import getrandbits, randbytes
from urllib.parse import unquote, unquote_to_bytes

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
AUTH_THROTTLED = "too many failed proxy authentications from this address; credentials not checked"
AUTH_THROTTLED_ANSWER = ("too many failed proxy authentications from this address: fix the agent's proxy credentials, "
                         "then retry in a few seconds")


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


THROTTLED = AuthResult(None, AUTH_THROTTLED, AUTH_THROTTLED_ANSWER, 429)


class _Source:
    __slots__ = ("failures", "last", "releases")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0
        self.releases: list[float] = []  # when the answers held back now go out


class AuthThrottle:
    """Slows down repeated failed proxy authentication from one source address (IPv4, or IPv6 /64).

    Failures count until a source has had none for `window` seconds. The first `free` answers go out at
    once; each further failure's 407 is held back `base` seconds, doubling per failure up to `max_delay`,
    by an awaitable the hook returns (the event loop serves everyone else meanwhile). While `max_held`
    answers to one source are held back, its further attempts are answered 429 without their credentials
    being checked, so parallel connections cannot multiply its guessing rate. Successful authentication is
    never delayed (from this or any other source) and does not reset the count. At most `max_sources`
    sources are tracked, the longest quiet dropped first. Only failures write to the table: a request pays
    one truth test of it, and a dict lookup while some source has recent failures.
    """

    def __init__(self, free: int = 5, window: float = 60.0, base: float = 0.25, max_delay: float = 2.0,
                 max_held: int = 8, max_sources: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.free, self.window, self.base, self.max_delay = free, window, base, max_delay
        self.max_held, self.max_sources, self.clock = max_held, max_sources, clock
        self.sources: dict[str | bytes, _Source] = {}  # ordered by last failure, oldest first

    @staticmethod
    def source(peername: tuple | None) -> str | bytes:
        """The key of a client address: the IPv4 address, or the /64 of an IPv6 one (what one host holds)."""
        ip = peername[0] if peername else ""
        if ":" not in ip:
            return ip
        if ip.startswith("::ffff:") and "." in ip:
            return ip[7:]
        try:
            return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])[:8]
        except OSError:
            return ip

    def saturated(self, key: str | bytes) -> bool:
        """Whether a source has as many answers held back as it may: its next attempt is not checked."""
        s = self.sources.get(key)
        if s is None or len(s.releases) < self.max_held:
            return False
        now = self.clock()
        return sum(r > now for r in s.releases) >= self.max_held

    def failed(self, key: str | bytes) -> Awaitable[None] | None:
        """Counts a failure; returns what to await before answering it, or None to answer at once."""
        now = self.clock()
        s = self.sources.pop(key, None)
        if s is None:
            s = _Source()
        elif now - s.last > self.window:
            s.failures = 0
        s.failures += 1
        s.last = now
        self.sources[key] = s  # to the end: the dict stays ordered by last failure
        self._expire(now)
        over = s.failures - self.free
        if over <= 0:
            return None
        delay = min(self.max_delay, self.base * 2 ** min(over - 1, 30))
        s.releases = [r for r in s.releases if r > now]
        s.releases.append(now + delay)
        return asyncio.sleep(delay)

    def _expire(self, now: float) -> None:
        sources = self.sources
        while sources:
            key = next(iter(sources))
            if now - sources[key].last <= self.window and len(sources) <= self.max_sources:
                return
            del sources[key]


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


_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def trace_context(traceparent: str | None) -> TraceContext:
    """Starts the gateway's span: a child of the agent's span when `traceparent` is valid W3C, else a new trace."""
    if traceparent:
        parts = traceparent.strip().lower().split("-")
        if len(parts) >= 4 and len(parts[0]) == 2 and parts[0] != "ff" and _is_hex(parts[1], 32) and _is_hex(parts[2], 16) and len(parts[3]) == 2:
            return TraceContext(parts[1], _span_id(), parts[2], parts[3])
    # Trace and span id from one draw of 24 bytes (one call per request; bytes.hex is half the cost of formatting
    # an int, from the same generator).
    ids = randbytes(24).hex()
    trace, span = ids[:32], ids[32:]
    if trace == _ZERO_TRACE or span == _ZERO_SPAN:  # all-zero ids are invalid (W3C): 2**-64, drawn again
        return TraceContext(f"{getrandbits(128) or 1:032x}", _span_id(), None, "01")
    return TraceContext(trace, span, None, "01")


def _span_id() -> str:
    # Trace ids need uniqueness, not secrecy: the OTel SDK draws them the same way.
    return f"{getrandbits(64) or 1:016x}"


def invocation_from_baggage(baggage: str | None) -> str | None:
    """The `invocation.id` member of a W3C baggage header, if any: its percent-decoded bytes, one character per
    byte, as the invocation header's value is (the recorder decodes both alike, `clrk.escape`)."""
    if not baggage or "invocation.id" not in baggage:
        return None
    for member in baggage.split(","):
        key, sep, value = member.partition("=")
        if sep and key.strip() == "invocation.id":
            raw = value.split(";", 1)[0].strip().encode("latin-1")  # header values are one character per byte
            return unquote_to_bytes(raw)[:256].decode("latin-1") or None
    return None
