"""The gateway's own answers and the names of failures: one place for both (pure; proxy and recorder use it).

Every answer the gateway makes itself — a denial, a budget 429, a 503, a 502/504 for an upstream that failed —
is JSON `{"error": "clrk: <reason>"}`. On a model provider's API (a request the providers registry recognised)
the same text comes in that provider's own error shape, so its official SDK raises its usual exception with
`clrk: ...` as the message instead of a bare status:

  OpenAI      {"error": {"message", "type", "code"}}
  Anthropic   {"type": "error", "error": {"type", "message"}}
  Gemini      {"error": {"code", "message", "status"}}

`error_type` gives a failure's short, stable `error.type` from the message mitmproxy or the OS wrote.
"""

from __future__ import annotations

import json
import math

JSON_HEADERS = (("content-type", "application/json"), ("cache-control", "no-store"))


def error_type(message: str) -> str:
    """A short, stable error.type for mitmproxy's error messages."""
    m = message.lower()
    if "from client, refusing" in m or m.startswith("invalid request scheme"):  # mitmproxy's request checks
        return "invalid_request"
    if "clrk:" in m and "not allowed" in m:
        return "policy_blocked"
    if "clrk:" in m and "gateway stopped" in m:
        return "gateway_stopped"
    if "refused" in m or "[errno 111]" in m:  # asyncio says "[Errno 111] Connect call failed (...)"
        return "connection_refused"
    if "[errno 113]" in m or "[errno 101]" in m:
        return "host_unreachable"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "certificate" in m or "tls" in m or "ssl" in m or "handshake" in m:
        return "tls_error"
    if "name or service not known" in m or "nodename" in m or "getaddrinfo" in m or "name resolution" in m:
        return "dns_error"
    if "client disconnected" in m or "client closed" in m:
        return "client_disconnected"
    if "reset" in m or "eof" in m or "closed" in m or "incomplete" in m or "peer" in m:
        return "upstream_reset"
    if "killed" in m:
        return "killed"
    return "upstream_error"


def upstream_failure(host: str, port: int, etype: str) -> tuple[int, str]:
    """The status and message of the gateway's answer for an upstream that failed before answering: 504 for a
    timeout, else 502."""
    return (504 if etype == "timeout" else 502), f"clrk: upstream {host}:{port}: {etype}"


# The provider's own `type` (OpenAI, Anthropic) or `status` (Gemini, google.rpc.Code) for a status code.
_OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 407: "authentication_error", 413: "invalid_request_error",
                429: "rate_limit_error"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 407: "authentication_error", 413: "request_too_large",
                   429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  407: "UNAUTHENTICATED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                  501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def error_body(provider: str | None, status: int, message: str, code: str) -> bytes:
    """The body of a gateway answer: `message` (it starts with "clrk: ") in `provider`'s error shape — a
    providers-registry name ("openai", "anthropic", "google_genai") — or clrk's own for anything else.
    `code` is clrk's machine-readable name of the refusal (OpenAI's `code` field carries it)."""
    if provider == "openai":
        kind = "insufficient_quota" if code == "clrk_budget_exceeded" else _OPENAI_TYPE.get(
            status, "server_error" if status >= 500 else "invalid_request_error")
        doc: dict = {"error": {"message": message, "type": kind, "code": code}}
    elif provider == "anthropic":
        kind = _ANTHROPIC_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")
        doc = {"type": "error", "error": {"type": kind, "message": message}}
    elif provider == "google_genai":
        grpc = _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        doc = {"error": {"code": status, "message": message, "status": grpc}}
    else:
        doc = {"error": message}
    return json.dumps(doc).encode()


def seconds_until_utc_midnight(now: float) -> int:
    """Whole seconds until the UTC day of `now` ends (at least 1): when a daily budget has room again."""
    return max(1, math.ceil(86400 - now % 86400))


def no_retry_headers(retry_after: int) -> tuple[tuple[str, str], ...]:
    """What tells clients not to retry before `retry_after` seconds: `retry-after`, and `x-should-retry: false`,
    which the openai and anthropic SDKs obey before their own retry rules (they would retry a 429)."""
    return (("retry-after", str(retry_after)), ("x-should-retry", "false"))
