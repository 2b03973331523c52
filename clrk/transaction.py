"""One L7 transaction as the gateway sees it, and the record (PRODUCT.md §3) built from it when it ends.

A `Transaction` lives in `flow.metadata["clrk"]` from the first hook that sees the request to the last.
`build_record` runs once per transaction on the event loop: it only reads fields and redacts; everything
expensive (SQL, spans) happens in the recorder process.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from mitmproxy import http

from clrk import attributes as A
from clrk.budget import Reservation
from clrk.capture import BodyCapture
from clrk.decision import Decision, RequestFacts
from clrk.identity import TraceContext
from clrk.policy.compiled import AgentIdentity, CompiledPolicy, GatewayConfig
from clrk.providers import ProviderParser
from clrk.redact import headers_dict, redact_url

METADATA_KEY = "clrk"


@dataclass(slots=True)
class Transaction:
    start: float
    trace: TraceContext
    gateway: GatewayConfig | None = None
    agent: AgentIdentity | None = None
    auth_failure: str | None = None
    facts: RequestFacts | None = None
    decision: Decision | None = None  # None until decided (a provider call waits for its body)
    dst_name: str | None = None
    dst_port: int | None = None
    invocation_id: str | None = None
    req_capture: BodyCapture | None = None
    resp_capture: BodyCapture | None = None
    genai: ProviderParser | None = None  # set for model-provider calls
    upstream_response: bool = False  # False while the response (if any) is one the gateway made up
    request_rewritten: bool = False
    routed: bool = False  # the AIProviderRoute rule's budget and backend were applied
    credentials_injected: bool = False
    budget_pool: str | None = None
    budget_max: int | None = None
    budget_denied: bool = False
    reservation: Reservation | None = None
    budget_charged: int | None = None
    budget_used: int | None = None
    recorded: bool = False
    req_h: dict[str, str] | None = None  # header_index of the request as the agent sent it
    resp_h: dict[str, str] | None = None  # header_index of the response as the upstream sent it

    def response_headers(self, flow: http.HTTPFlow) -> dict[str, str]:
        if self.resp_h is None:
            assert flow.response is not None
            self.resp_h = header_index(flow.response.headers.fields)
        return self.resp_h


def header_index(fields) -> dict[str, str]:
    """Headers as {lower-case name: first value}: one pass, then dict lookups (mitmproxy's Headers scans all
    fields on every lookup)."""
    out: dict[str, str] = {}
    for name, value in fields:
        key = name.lower().decode("latin-1")
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


def error_type(message: str) -> str:
    """A short, stable error.type for mitmproxy's error messages."""
    m = message.lower()
    if "clrk:" in m and "not allowed" in m:
        return "policy_blocked"
    if "refused" in m:
        return "connection_refused"
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


def build_record(tx: Transaction, flow: http.HTTPFlow, policy: CompiledPolicy) -> dict:
    req = flow.request
    resp = flow.response
    end = (resp.timestamp_end if resp is not None and resp.timestamp_end else None) or time.time()
    if req.method == "CONNECT":
        url = f"{req.host}:{req.port}"
    else:
        url = redact_url(req.url, policy.redact_query)
    rec: dict = {
        A.TIME: tx.start,
        A.END_TIME: end,
        A.TRACE_ID: tx.trace.trace_id,
        A.SPAN_ID: tx.trace.span_id,
        A.PARENT_SPAN_ID: tx.trace.parent_span_id,
        A.HTTP_REQUEST_METHOD: req.method,
        A.URL_FULL: url,
        A.SERVER_ADDRESS: req.host,
        A.SERVER_PORT: req.port,
        A.HTTP_RESPONSE_STATUS_CODE: resp.status_code if resp is not None else None,
        A.CLRK_COMPONENT: A.COMPONENT_EGRESS,
        A.CLRK_GATEWAY_NAME: tx.gateway.name if tx.gateway else None,
        A.CLRK_DST_NAME: tx.dst_name,
        A.CLRK_DURATION_MS: round((end - tx.start) * 1000.0, 3),
        A.INVOCATION_ID: tx.invocation_id,
        A.REQUEST_HEADERS: headers_dict(req.headers.fields, policy.redact_headers),
        A.RESPONSE_HEADERS: headers_dict(resp.headers.fields, policy.redact_headers) if resp is not None else None,
    }
    d = tx.decision
    if d is not None:
        rec[A.CLRK_DECISION] = d.action
        rec[A.CLRK_DECISION_RULE] = d.rule
        rec[A.CLRK_DECISION_REASON] = d.reason
    rec[A.CLRK_BODY_REQUEST_REWRITTEN] = tx.request_rewritten
    if tx.genai is not None:
        pr = d.provider_rule if d is not None else None
        rec[A.CLRK_APR_MATCHED] = pr is not None
        if pr is not None:
            rec[A.CLRK_APR_NAME] = pr.route_name
            rec[A.CLRK_APR_NAMESPACE] = pr.route_namespace
    if tx.budget_pool is not None:
        rec[A.CLRK_BUDGET_POOL] = tx.budget_pool
        rec[A.CLRK_BUDGET_DENIED] = tx.budget_denied
        rec[A.CLRK_BUDGET_DAILY_MAX] = tx.budget_max
        rec[A.CLRK_BUDGET_DAILY_USED] = tx.budget_used
        rec[A.CLRK_BUDGET_TOKENS] = tx.budget_charged
    a = tx.agent
    if a is not None:
        rec[A.AGENT_KIND] = a.kind
        rec[A.AGENT_NAMESPACE] = a.namespace
        rec[A.AGENT_NAME] = a.name
        rec[A.AGENT_UID] = a.uid
        rec[A.AGENT_REVISION] = a.revision

    rq, rs = tx.req_capture, tx.resp_capture
    req_body = rq.captured if rq else None
    resp_body = rs.captured if rs else None
    rec[A.CLRK_REQ_BYTES] = rq.wire_bytes if rq else 0
    rec[A.CLRK_RESP_BYTES] = rs.wire_bytes if rs else 0
    rec[A.CLRK_REQ_TRUNCATED] = bool(rq and rq.truncated)
    rec[A.CLRK_RESP_TRUNCATED] = bool(rs and rs.truncated)
    rec[A.CLRK_BODY_TRUNCATED] = rec[A.CLRK_REQ_TRUNCATED] or rec[A.CLRK_RESP_TRUNCATED]
    rec[A.CLRK_BODY_BYTES] = len(req_body or b"") + len(resp_body or b"")
    rec[A.REQUEST_BODY], rec[A.RESPONSE_BODY], rec[A.CLRK_BODY_B64] = _bodies(req_body, resp_body)

    genai = tx.genai.result if tx.genai is not None else None
    if genai is not None:
        rec.update(genai.attributes())
    if flow.error is not None:
        rec[A.ERROR_TYPE] = error_type(flow.error.msg)
    elif genai is not None and genai.error_type and tx.upstream_response:
        rec[A.ERROR_TYPE] = genai.error_type
    elif tx.upstream_response and resp is not None and resp.status_code >= 400:
        # OTel HTTP client semconv: an error status is the error type.
        rec[A.ERROR_TYPE] = str(resp.status_code)
    return rec
