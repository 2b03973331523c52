"""The gateway's answers in process: each provider's error shape for each kind of refusal, clrk's own shape
elsewhere, and the headers of a budget 429 and of a 503."""

from __future__ import annotations

import json

import pytest

from clrk.decision import Decision
from clrk.errors import error_body, seconds_until_utc_midnight, upstream_failure
from clrk.proxy.runtime import deny_response

SHAPES = [
    (None, 403, "clrk_denied", {"error": "clrk: m"}),
    ("openai", 403, "clrk_denied", {"error": {"message": "clrk: m", "type": "permission_error", "code": "clrk_denied"}}),
    ("openai", 429, "clrk_budget_exceeded",
     {"error": {"message": "clrk: m", "type": "insufficient_quota", "code": "clrk_budget_exceeded"}}),
    ("openai", 502, "clrk_upstream_dns_error",
     {"error": {"message": "clrk: m", "type": "server_error", "code": "clrk_upstream_dns_error"}}),
    ("anthropic", 400, "clrk_denied", {"type": "error", "error": {"type": "invalid_request_error", "message": "clrk: m"}}),
    ("anthropic", 429, "clrk_budget_exceeded", {"type": "error", "error": {"type": "rate_limit_error", "message": "clrk: m"}}),
    ("anthropic", 504, "clrk_upstream_timeout", {"type": "error", "error": {"type": "timeout_error", "message": "clrk: m"}}),
    ("anthropic", 503, "clrk_unavailable", {"type": "error", "error": {"type": "api_error", "message": "clrk: m"}}),
    ("google_genai", 403, "clrk_denied", {"error": {"code": 403, "message": "clrk: m", "status": "PERMISSION_DENIED"}}),
    ("google_genai", 429, "clrk_budget_exceeded", {"error": {"code": 429, "message": "clrk: m", "status": "RESOURCE_EXHAUSTED"}}),
    ("google_genai", 504, "clrk_upstream_timeout", {"error": {"code": 504, "message": "clrk: m", "status": "DEADLINE_EXCEEDED"}}),
    ("google_genai", 451, "clrk_denied", {"error": {"code": 451, "message": "clrk: m", "status": "FAILED_PRECONDITION"}}),
]


@pytest.mark.parametrize("provider,status,code,expected", SHAPES, ids=[f"{s[0]}-{s[1]}" for s in SHAPES])
def test_each_provider_gets_its_own_error_shape(provider, status, code, expected):
    assert json.loads(error_body(provider, status, "clrk: m", code)) == expected


def test_upstream_failures_are_502_and_a_timeout_504():
    assert upstream_failure("api.x.com", 443, "dns_error") == (502, "clrk: upstream api.x.com:443: dns_error")
    assert upstream_failure("api.x.com", 8443, "timeout") == (504, "clrk: upstream api.x.com:8443: timeout")


def test_the_utc_day_ends_at_midnight():
    midnight = 1_800_000_000 - 1_800_000_000 % 86400
    assert seconds_until_utc_midnight(midnight + 1) == 86399
    assert seconds_until_utc_midnight(midnight - 0.5) == 1  # never 0: "retry now" is what it must not say
    assert seconds_until_utc_midnight(midnight) == 86400


def test_a_budget_429_says_not_to_retry_until_the_day_ends_and_a_503_to_retry_shortly():
    r = deny_response(Decision(False, "AIProviderRoute/ns/r#rules[0]", "token budget exceeded", 429), "anthropic", True)
    assert r.headers["x-should-retry"] == "false" and 0 < int(r.headers["retry-after"]) <= 86400
    assert json.loads(r.content)["error"]["message"] == "clrk: token budget exceeded"
    r = deny_response(Decision(False, "AIProviderRoute/ns/r#rules[0]", "ledger not read yet", 503), "openai")
    assert r.headers["retry-after"] == "1" and "x-should-retry" not in r.headers
    assert json.loads(r.content)["error"]["code"] == "clrk_unavailable"
    # Off provider APIs: clrk's shape; a 429 that is no budget refusal carries no budget headers.
    r = deny_response(Decision(False, "x", "slow down", 429))
    assert json.loads(r.content) == {"error": "clrk: slow down"} and "retry-after" not in r.headers
    r = deny_response(Decision(False, "auth", "who are you", 407))
    assert r.headers["proxy-authenticate"] == 'Basic realm="clrk"' and r.headers["content-type"] == "application/json"
