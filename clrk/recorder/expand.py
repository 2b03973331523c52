"""The record of PRODUCT.md §3, built in the recorder from a transaction's raw facts (`clrk.transaction.snapshot`).

The proxy has redacted the snapshot already (`clrk.transaction.snapshot`); header values and query parameters
are redacted here again, as a second line, before the record exists. The names to redact come with the
gateway's configuration and only ever grow while the recorder runs, so a record from an older policy is
never redacted less than that policy said.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

from clrk import attributes as A
from clrk.redact import Redactor, headers_dict, redact_url


def error_type(message: str) -> str:
    """A short, stable error.type for mitmproxy's error messages."""
    m = message.lower()
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


def _bodies(req: bytes | None, resp: bytes | None) -> tuple[str | None, str | None, bool]:
    """Bodies as text; if either is not UTF-8, both are base64 so `clrk.body.b64` says it for both."""
    try:
        return (
            req.decode("utf-8") if req is not None else None,
            resp.decode("utf-8") if resp is not None else None,
            False,
        )
    except UnicodeDecodeError:
        return (
            base64.b64encode(req).decode() if req is not None else None,
            base64.b64encode(resp).decode() if resp is not None else None,
            True,
        )


def _decode_fields(fields: Iterable) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in fields]


def _url(raw: dict, redactor: Redactor) -> str:
    host, port, scheme = raw["host"], raw["port"], raw["scheme"] or "https"
    if raw["method"] == "CONNECT":
        return f"{host}:{port}"
    shown = f"[{host}]" if ":" in host else host
    if (scheme, port) not in (("https", 443), ("http", 80)):
        shown = f"{shown}:{port}"
    return redact_url(f"{scheme}://{shown}{raw['path']}", redactor)


def expand(raw: dict, redactor: Redactor) -> dict:
    """The record of one transaction's raw facts, its headers and URL redacted by `redactor`."""
    t0, t1 = raw["t0"], raw["t1"]
    trace_id, span_id, parent = raw["ids"]
    resp_fields = raw.get("resp_headers")
    rec: dict = {
        A.TIME: t0,
        A.END_TIME: t1,
        A.TRACE_ID: trace_id,
        A.SPAN_ID: span_id,
        A.PARENT_SPAN_ID: parent,
        A.HTTP_REQUEST_METHOD: raw["method"],
        A.URL_FULL: _url(raw, redactor),
        A.SERVER_ADDRESS: raw["host"],
        A.SERVER_PORT: raw["port"],
        A.HTTP_RESPONSE_STATUS_CODE: raw["status"],
        A.CLRK_COMPONENT: A.COMPONENT_EGRESS,
        A.CLRK_GATEWAY_NAME: raw["gateway"],
        A.CLRK_DST_NAME: raw["dst"],
        A.CLRK_DURATION_MS: round((t1 - t0) * 1000.0, 3),
        A.INVOCATION_ID: raw["inv"],
        A.REQUEST_HEADERS: headers_dict(_decode_fields(raw["req_headers"]), redactor),
        A.RESPONSE_HEADERS: headers_dict(_decode_fields(resp_fields), redactor) if resp_fields is not None else None,
        A.CLRK_BODY_REQUEST_REWRITTEN: raw["rewritten"],
    }
    if raw["decision"] is not None:
        rec[A.CLRK_DECISION], rec[A.CLRK_DECISION_RULE], rec[A.CLRK_DECISION_REASON] = raw["decision"]
    if raw["agent"] is not None:
        (rec[A.AGENT_KIND], rec[A.AGENT_NAMESPACE], rec[A.AGENT_NAME], rec[A.AGENT_UID], rec[A.AGENT_REVISION]) = raw["agent"]
    genai = raw.get("genai")
    if genai is not None:
        apr = raw.get("apr")
        rec[A.CLRK_APR_MATCHED] = apr is not None
        if apr is not None:
            rec[A.CLRK_APR_NAME], rec[A.CLRK_APR_NAMESPACE] = apr
        rec.update(genai)
    budget = raw.get("budget")
    if budget is not None:
        (rec[A.CLRK_BUDGET_POOL], rec[A.CLRK_BUDGET_DENIED], rec[A.CLRK_BUDGET_DAILY_MAX], rec[A.CLRK_BUDGET_DAILY_USED],
         rec[A.CLRK_BUDGET_TOKENS]) = budget

    req_bytes, req_body, req_trunc = raw["req_body"]
    resp_bytes, resp_body, resp_trunc = raw["resp_body"]
    rec[A.CLRK_REQ_BYTES] = req_bytes
    rec[A.CLRK_RESP_BYTES] = resp_bytes
    rec[A.CLRK_REQ_TRUNCATED] = bool(req_trunc)
    rec[A.CLRK_RESP_TRUNCATED] = bool(resp_trunc)
    rec[A.CLRK_BODY_TRUNCATED] = bool(req_trunc or resp_trunc)
    rec[A.CLRK_BODY_BYTES] = len(req_body or b"") + len(resp_body or b"")
    rec[A.REQUEST_BODY], rec[A.RESPONSE_BODY], rec[A.CLRK_BODY_B64] = _bodies(req_body, resp_body)

    if "l4" in raw:  # a TLS Passthrough tunnel
        rec[A.CLRK_L4_BYTES_UPSTREAM] = raw["l4"]

    status = raw["status"]
    if raw["error"] is not None:
        rec[A.ERROR_TYPE] = error_type(raw["error"])
    elif raw.get("genai_error") and raw["upstream"]:
        rec[A.ERROR_TYPE] = raw["genai_error"]
    elif raw["upstream"] and status is not None and status >= 400:
        # OTel HTTP client semconv: an error status is the error type.
        rec[A.ERROR_TYPE] = str(status)
    return {k: v for k, v in rec.items() if v is not None}
