"""One L7 transaction as the gateway sees it, and the raw facts (`snapshot`) it leaves when it ends.

A `Transaction` lives in `flow.metadata["clrk"]` from the first hook that sees the request until it is
recorded (`Runtime.finish`), when it is taken off the flow.
`snapshot` runs once per transaction on the event loop: it gathers references, and redacts what could hold a
secret (header values, the query, captured bodies: `clrk.redact`) so that nothing unredacted leaves the proxy
process. The recorder process turns the snapshot into the record (`clrk.recorder.expand`), redacting headers
and the URL once more.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from mitmproxy import http

from clrk import attributes as A
from clrk.decision import AuthResult, Decision, RequestFacts
from clrk.identity import TraceContext
from clrk.memo import remember
from clrk.policy.compiled import AgentIdentity, CaptureConfig, CompiledPolicy, GatewayConfig
from clrk.providers import ProviderParser
from clrk.proxy.budget import Reservation
from clrk.proxy.capture import BodyCapture, request_is_buffered
from clrk.proxy.mcp import McpExchange
from clrk.redact import DEFAULT as DEFAULT_REDACTOR
from clrk.redact import Redactor
from clrk.snapshot import Snapshot

METADATA_KEY = "clrk"


@dataclass(slots=True)
class Tunnel:
    """What a successful CONNECT established: who, and to where."""

    agent: AgentIdentity
    digest: bytes
    host: str
    port: int
    sni: str | None = None  # the client's TLS server name, normalised, once its handshake is done
    l4: Decision | None = None  # on a TLS Passthrough listener: the decision made on the CONNECT
    # The last policy the agent was re-checked under, and the agent it gave (None: revoked): a policy is
    # replaced whole, never changed, so the answer holds until `rt.policy` is another object.
    checked_under: CompiledPolicy | None = None
    checked_agent: AgentIdentity | None = None
    checked_gateway: GatewayConfig | None = None  # under that policy, the gateway of the tunnel's listener


@dataclass(slots=True)
class Transaction:
    start: float
    trace: TraceContext
    gateway: GatewayConfig | None = None
    tunnel: Tunnel | None = None  # the CONNECT this request came through, if any
    agent: AgentIdentity | None = None
    auth_failure: AuthResult | None = None  # why there is no agent, and what the client is told
    facts: RequestFacts | None = None
    decision: Decision | None = None  # None until decided (a provider call waits for its body)
    dst_name: str | None = None
    dst_port: int | None = None
    invocation_id: str | None = None
    req_capture: BodyCapture | None = None
    resp_capture: BodyCapture | None = None
    genai: ProviderParser | None = None  # set for model-provider calls
    mcp: McpExchange | None = None  # set for MCP traffic (clrk.proxy.steps.mcp)
    upstream_response: bool = False  # False while the response (if any) is one the gateway made up
    request_rewritten: bool = False
    budget_pool: str | None = None
    budget_max: int | None = None
    budget_denied: bool = False
    reservation: Reservation | None = None
    budget_charged: int | None = None
    budget_reserved: int | None = None  # the call's estimate: held at admission, or what did not fit
    budget_used: int | None = None
    budget_max_cost: float | None = None  # maxCostPerDay (USD)
    budget_used_cost: float | None = None  # the pool's dollars today after this call
    budget_charged_cost: float | None = None  # what this call cost the pool in dollars
    cost: float | None = None  # gen_ai.usage.cost: USD of the call's usage (clrk.cost), when priced
    cost_source: str | None = None  # clrk.cost.source, set when the call's usage was seen
    recorded: bool = False
    error: str | None = None  # what went wrong, when the gateway knows better than flow.error
    error_type: str | None = None  # error.type, set where the failure happens (else derived from the message)
    counted: bool = False  # counted in Runtime.in_flight
    req_h: dict[str, str] | None = None  # header_index of the request as the agent sent it
    host_headers: list[str] | None = None  # every Host field of the request
    header_problem: str | None = None  # a framing problem of the request's header block (scan_request_headers)
    websocket: bool = False  # the request is a well-formed WebSocket handshake (a 101 answer may follow)
    resp_h: dict[str, str] | None = None  # header_index of the response as the upstream sent it
    # The policy under which the decision on the headers was left pending (EgressControl): set only once its
    # checks passed, so the request hook finishes it with the routes alone (`clrk.decision.decide_rules`).
    pending_under: CompiledPolicy | None = None
    provider_buffered: bool | None = None  # request_is_buffered(req_h, provider=True), once worked out

    def buffered_as_provider(self) -> bool:
        """Whether the request's body is read whole before it goes on, as a provider's or an MCP server's is
        (`clrk.proxy.capture.request_is_buffered`): several steps ask, the headers as sent do not change."""
        b = self.provider_buffered
        if b is None:
            b = self.provider_buffered = request_is_buffered(self.req_h or {}, True)
        return b

    def response_headers(self, flow: http.HTTPFlow) -> dict[str, str]:
        if self.resp_h is None:
            assert flow.response is not None
            self.resp_h = header_index(flow.response.headers.fields)
        return self.resp_h


_NAMES: dict[bytes, tuple[str, bool]] = {}  # header names seen: (lower-case text, valid token) (clrk.memo: bounded)


def _name(name: bytes) -> tuple[str, bool]:
    """A header name's lower-case text and whether it is a valid token, judged once per distinct name (a long
    name is judged every time: agents choose them, and one may be as long as a request head)."""
    return remember(_NAMES, name, len(name), (name.lower().decode("latin-1"), _TOKEN.fullmatch(name) is not None))


def header_index(fields) -> dict[str, str]:
    """Headers as {lower-case name: first value}: one pass, then dict lookups (mitmproxy's Headers scans all
    fields on every lookup)."""
    out: dict[str, str] = {}
    names = _NAMES
    for name, value in fields:
        known = names.get(name) or _name(name)
        if known[0] not in out:
            out[known[0]] = value.decode("latin-1")
    return out


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def scan_request_headers(fields) -> tuple[dict[str, str], list[str], str | None]:
    """`header_index` of a request, plus every Host value it carries and the first framing problem: a header
    name that is not a token (RFC 9110 §5.1: `Host : x` is refused, not guessed at) or a value with a line
    break (an obs-folded line, RFC 9112 §5.2, or a bare CR: an upstream may read what follows as a header of
    its own)."""
    out: dict[str, str] = {}
    hosts: list[str] = []
    problem = None
    names = _NAMES
    for name, value in fields:
        key, ok = names.get(name) or _name(name)
        if problem is None:
            if not ok:
                problem = f"the header name {key[:64]!r} is not a valid token"
            elif 10 in value or 13 in value:  # LF, CR (an int needle: a bytes one is first tried as an int, and fails)
                problem = f"the header {key[:64]} has a line break in its value (obsolete line folding, or a bare CR)"
        if key == "host":
            hosts.append(value.decode("latin-1"))
        if key not in out:
            out[key] = value.decode("latin-1")
    return out, hosts, problem


def _body_summary(capture: BodyCapture | None, raw: bytes | None, cfg: CaptureConfig | None, redactor: Redactor,
                  ctype: str | None) -> tuple:
    """(wire bytes, captured bytes or None, truncated) of one body, the captured bytes redacted. Buffered
    bodies (no capture object) are summarised here from the bytes mitmproxy holds: the cheap path every small
    transaction takes."""
    if capture is not None:
        return capture.wire_bytes, redactor.body(capture.captured, ctype), capture.truncated
    if raw is None:
        return 0, None, False
    limit = cfg.max_bytes if cfg is not None else 0
    if limit <= 0:
        return len(raw), None, False
    if not cfg.wants(ctype):
        return len(raw), None, False
    n = len(raw)
    return n, redactor.body(raw[:limit] if n > limit else raw, ctype), n > limit


def _redacted_target(path: bytes, redactor: Redactor) -> bytes:
    """The request target's bytes with sensitive query values replaced (latin-1 maps bytes to text and back
    losslessly); the same object when nothing is."""
    if path.find(b"?") < 0:  # (find: `b"?" in path` first tries the needle as an int, and fails, every time)
        return path
    text = path.decode("latin-1")
    red = redactor.path(text)
    return path if red is text else red.encode("latin-1")


_SCHEMES = {b"https": "https", b"http": "http"}  # what Request.scheme decodes, without the decode


def snapshot(tx: Transaction, flow: http.HTTPFlow, redactor: Redactor = DEFAULT_REDACTOR) -> Snapshot:
    """The raw facts of a finished transaction, for the recorder to turn into the record
    (`clrk.recorder.expand`), redacted by the transaction's gateway (`redactor` when it has none). On the
    proxy's thread: no formatting, and no copies unless something is redacted. mitmproxy's message fields are
    read from `.data` (what its properties return, without a property call each)."""
    req = flow.request.data
    resp = flow.response
    rsp = resp.data if resp is not None else None
    end = (rsp.timestamp_end if rsp is not None else None) or time.time()
    gw = tx.gateway
    if gw is not None:
        cfg = gw.capture
        redactor = gw.redactor
        gateway = gw.name
    else:
        cfg = gateway = None
    req_h = tx.req_h
    req_ctype = req_h.get("content-type") if req_h is not None else req.headers.get("content-type")
    resp_ctype = None
    if rsp is not None:
        resp_ctype = tx.resp_h.get("content-type") if tx.resp_h is not None else rsp.headers.get("content-type")
    d, a = tx.decision, tx.agent
    trace = tx.trace
    scheme = req.scheme
    raw: Snapshot = {
        "t0": tx.start,
        "t1": end,
        "ids": (trace.trace_id, trace.span_id, trace.parent_span_id),
        "method": req.method,  # bytes as sent (the recorder decodes them: clrk.escape), no decode here
        "scheme": _SCHEMES.get(scheme) or scheme.decode("utf-8", "surrogateescape"),
        "host": req.host,
        "port": req.port,
        "path": _redacted_target(req.path, redactor),  # bytes as sent, the query redacted
        "status": rsp.status_code if rsp is not None else None,
        "gateway": gateway,
        "dst": tx.dst_name,
        "inv": tx.invocation_id,  # one character per byte, like the header values it comes from
        "decision": (d.action, d.rule, d.reason) if d is not None else None,
        "agent": (a.kind, a.namespace, a.name, a.uid, a.revision) if a is not None else None,
        "rewritten": tx.request_rewritten,
        "req_headers": redactor.fields(req.headers.fields),
        "resp_headers": redactor.fields(rsp.headers.fields) if rsp is not None else None,
        "req_body": _body_summary(tx.req_capture, req.content if not flow.request.stream else None, cfg, redactor,
                                  req_ctype),
        "resp_body": _body_summary(tx.resp_capture, rsp.content if rsp is not None and not resp.stream else None,
                                   cfg, redactor, resp_ctype),
        "error": tx.error or (flow.error.msg if flow.error is not None else None),
        "error_type": tx.error_type,
        "upstream": tx.upstream_response,
    }
    limit = cfg.max_bytes if cfg is not None else 0
    if tx.genai is not None:
        pr = d.provider_rule if d is not None else None
        result = tx.genai.result
        genai = raw["genai"] = result.attributes()
        if tx.cost_source is not None:
            genai[A.CLRK_COST_SOURCE] = tx.cost_source
            if tx.cost is not None:
                genai[A.GEN_AI_USAGE_COST] = tx.cost
        raw["genai_error"] = result.error_type
        raw["apr"] = (pr.route_name, pr.route_namespace) if pr is not None else None
    if resp is not None and resp.stream and tx.resp_capture is not None and tx.resp_capture.first_at:
        raw["first_chunk"] = tx.resp_capture.first_at
    if tx.mcp is not None:
        rule = tx.mcp.rule or (d.mcp_rule if d is not None else None)
        elsewhere = resp is not None and tx.upstream_response and resp.status_code == 202  # answered on another stream
        raw["mcp"] = tx.mcp.children(end, d is not None and not d.allow, limit, (rule.capture_arguments if rule else True)
                                     and limit > 0, redactor, elsewhere)
        raw["mcp_session"] = (tx.mcp.session, tx.mcp.version)
    if tx.budget_pool is not None:
        raw["budget"] = (tx.budget_pool, tx.budget_denied, tx.budget_max, tx.budget_used, tx.budget_charged)
        raw["budget_reserved"] = tx.budget_reserved  # a key of its own: a recorder of either version reads the tuple
        if tx.budget_charged_cost is not None or tx.budget_max_cost is not None:
            raw["budget_cost"] = (tx.budget_max_cost, tx.budget_used_cost, tx.budget_charged_cost)
    return raw


def snapshot_l4(tx: Transaction, host: str, port: int, end: float, up: int, down: int, error: str | None) -> Snapshot:
    """The raw facts of a TLS Passthrough tunnel (one record per connection): bytes each way, no L7."""
    d, a = tx.decision, tx.agent
    return {
        "t0": tx.start,
        "t1": end,
        "ids": (tx.trace.trace_id, tx.trace.span_id, tx.trace.parent_span_id),
        "method": "CONNECT",
        "scheme": None,
        "host": host,
        "port": port,
        "path": "",
        "status": None,
        "gateway": tx.gateway.name if tx.gateway is not None else None,
        "dst": tx.dst_name,
        "inv": None,
        "decision": (d.action, d.rule, d.reason) if d is not None else None,
        "agent": (a.kind, a.namespace, a.name, a.uid, a.revision) if a is not None else None,
        "rewritten": False,
        "req_headers": [],
        "resp_headers": None,
        "req_body": (up, None, False),
        "resp_body": (down, None, False),
        "error": error,
        "upstream": down > 0,
        "l4": up,
    }
