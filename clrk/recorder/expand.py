"""The record, built in the recorder from a transaction's raw facts (`clrk.proxy.transaction.snapshot`).

The proxy has redacted the snapshot already (`clrk.proxy.transaction.snapshot`); header values and query parameters
are redacted here again, as a second line, before the record exists. The names to redact come with the
gateway's configuration and only ever grow while the recorder runs, so a record from an older policy is
never redacted less than that policy said.

Text arrives as the proxy had it: wire bytes (method, path, header names and values), the invocation id one
character per byte, and str or — where UTF-8 could not carry it — bytes for everything else. Each text field
is decoded here with the one escape of `clrk.escape`. A transaction whose record cannot be built whole is
stored as far as it can be (`salvage`), so that its ids, agent, decision and budget charge are never lost.
"""

from __future__ import annotations

import base64
import hashlib
import math

from clrk import attributes as A
from clrk import escape
from clrk.errors import error_type
from clrk.hostnames import norm_host
from clrk.memo import remember
from clrk.redact import Redactor, decode_headers, redact_url
from clrk.snapshot import Snapshot


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


def _text(value, key: str, escaped: list[str]) -> str | None:
    """A text field of the record: str as it came (msgpack only carries valid UTF-8), bytes decoded with the
    escape of `clrk.escape`, and the field named in `escaped` when that escape was needed."""
    if value is None or isinstance(value, str):
        return value
    out, was_escaped = escape.text(value)
    if was_escaped:
        escaped.append(key)
    return out


def _texts(values: list, key: str, escaped: list[str]) -> list:
    """A list field: once one item needs the escape, every item is escaped alike, so `unescape` applies to each."""
    decoded = [escape.text(v) if isinstance(v, (str, bytes, bytearray)) else (v, False) for v in values]
    if not any(was_escaped for _, was_escaped in decoded):
        return [v for v, _ in decoded]
    escaped.append(key)
    return [escape.text(v, force=True)[0] if isinstance(v, (str, bytes, bytearray)) else v for v in values]


def _invocation(inv, escaped: list[str]) -> str | None:
    """The invocation id: the proxy keeps it as it keeps header values, one character per byte (latin-1)."""
    if isinstance(inv, str):
        if inv.isascii():
            return inv
        try:
            inv = inv.encode("latin-1")
        except UnicodeEncodeError:
            inv = inv.encode()
    return _text(inv, A.INVOCATION_ID, escaped)


# Hosts as `norm_host` writes them, and whole URLs by (redactor, host, port, scheme, path): an agent calls the
# same few hosts and, often, paths again and again. Bounded (`clrk.memo`); a path that needed the escape is
# never kept (its record must name the field in `clrk.record.escaped`).
_HOSTS: dict[str, str] = {}
_URLS: dict[tuple, str] = {}


def _host(host) -> str:
    if type(host) is str:
        h = _HOSTS.get(host)
        if h is None:
            h = remember(_HOSTS, host, len(host), norm_host(host), limit=1024, longest=256)
        return h
    return norm_host(host)


def _url(raw: Snapshot, redactor: Redactor, escaped: list[str], host: str) -> str:
    port, scheme = raw["port"], raw["scheme"] or "https"
    if raw["method"] in ("CONNECT", b"CONNECT"):
        return f"{host}:{port}"
    path = raw["path"]
    key = None
    if (type(path) is bytes or type(path) is str) and type(port) is int and type(scheme) is str:
        key = (redactor, host, port, scheme, path)
        url = _URLS.get(key)
        if url is not None:
            return url
    n = len(escaped)
    url = _full_url(host, port, scheme, path, redactor, escaped)
    if key is not None and len(escaped) == n:
        remember(_URLS, key, len(path) + len(host), url, limit=1024)
    return url


def _full_url(host: str, port, scheme: str, path, redactor: Redactor, escaped: list[str]) -> str:
    shown = f"[{host}]" if ":" in host else host
    if (scheme, port) not in (("https", 443), ("http", 80)):
        shown = f"{shown}:{port}"
    if not isinstance(path, str):
        path, was_escaped = escape.text(path)
        if was_escaped:
            escaped.append(A.URL_FULL)
    return redact_url(f"{scheme}://{shown}{path}", redactor)


def _headers(fields, redactor: Redactor, key: str, escaped: list[str]) -> dict[str, str] | None:
    if fields is None:
        return None
    out, was_escaped = decode_headers(fields, redactor)
    if was_escaped:
        escaped.append(key)
    return out


# The usual methods' text, as `bytes(method).upper()` and `_text` make it.
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT")}


def expand(raw: Snapshot, redactor: Redactor) -> dict:
    """The record of one transaction from its raw facts. Raises on facts it cannot read (see `salvage`)."""
    escaped: list[str] = []
    t0, t1 = raw["t0"], raw["t1"]
    trace_id, span_id, parent = raw["ids"]
    method = raw["method"]
    if type(method) is bytes and method in _METHODS:
        method = _METHODS[method]
    elif not isinstance(method, str):
        method = bytes(method).upper()  # as mitmproxy shows it: ASCII letters upper-cased, other bytes kept
    host = _host(raw["host"])
    rec: dict = {
        A.TIME: t0,
        A.END_TIME: t1,
        A.TRACE_ID: trace_id,
        A.SPAN_ID: span_id,
        A.PARENT_SPAN_ID: parent,
        A.HTTP_REQUEST_METHOD: method if type(method) is str else _text(method, A.HTTP_REQUEST_METHOD, escaped),
        A.URL_FULL: _url(raw, redactor, escaped, host),
        A.SERVER_ADDRESS: host,
        A.SERVER_PORT: raw["port"],
        A.HTTP_RESPONSE_STATUS_CODE: raw["status"],
        A.CLRK_COMPONENT: A.COMPONENT_EGRESS,
        A.CLRK_GATEWAY_NAME: g if type(g := raw["gateway"]) is str else _text(g, A.CLRK_GATEWAY_NAME, escaped),
        A.CLRK_DST_NAME: d if type(d := raw["dst"]) is str else _text(d, A.CLRK_DST_NAME, escaped),
        A.CLRK_DURATION_MS: round((t1 - t0) * 1000.0, 3),
        A.INVOCATION_ID: _invocation(raw["inv"], escaped),
        A.REQUEST_HEADERS: _headers(raw["req_headers"], redactor, A.REQUEST_HEADERS, escaped),
        A.RESPONSE_HEADERS: _headers(raw.get("resp_headers"), redactor, A.RESPONSE_HEADERS, escaped),
        A.CLRK_BODY_REQUEST_REWRITTEN: raw["rewritten"],
    }
    if raw["decision"] is not None:
        _decision(rec, raw["decision"], escaped)
    if raw["agent"] is not None:
        _agent(rec, raw["agent"], escaped)
    genai = raw.get("genai")
    if genai is not None:
        apr = raw.get("apr")
        rec[A.CLRK_APR_MATCHED] = apr is not None
        if apr is not None:
            rec[A.CLRK_APR_NAME] = _text(apr[0], A.CLRK_APR_NAME, escaped)
            rec[A.CLRK_APR_NAMESPACE] = _text(apr[1], A.CLRK_APR_NAMESPACE, escaped)
        for k, v in genai.items():
            if isinstance(v, list):
                v = _texts(v, k, escaped)
            elif isinstance(v, (bytes, bytearray)):  # a str UTF-8 could not carry (`clrk.wire.encodable`)
                v = _text(v, k, escaped)
            rec[k] = v
    budget = raw.get("budget")
    if budget is not None:
        _budget(rec, budget, escaped)
        rec[A.CLRK_BUDGET_RESERVED] = raw.get("budget_reserved")
        if raw.get("budget_cost") is not None:
            _budget_cost(rec, raw["budget_cost"])

    req_bytes, req_body, req_trunc = raw["req_body"]
    resp_bytes, resp_body, resp_trunc = raw["resp_body"]
    rec[A.CLRK_REQ_BYTES] = req_bytes
    rec[A.CLRK_RESP_BYTES] = resp_bytes
    rec[A.CLRK_REQ_TRUNCATED] = bool(req_trunc)
    rec[A.CLRK_RESP_TRUNCATED] = bool(resp_trunc)
    rec[A.CLRK_BODY_TRUNCATED] = bool(req_trunc or resp_trunc)
    rec[A.CLRK_BODY_BYTES] = len(req_body or b"") + len(resp_body or b"")
    rec[A.REQUEST_BODY], rec[A.RESPONSE_BODY], rec[A.CLRK_BODY_B64] = _bodies(req_body, resp_body)

    first = raw.get("first_chunk")
    if isinstance(first, float) and first >= t0:
        rec[A.CLRK_RESP_FIRST_CHUNK_MS] = round((first - t0) * 1000.0, 3)
    if "l4" in raw:  # a TLS Passthrough tunnel
        rec[A.CLRK_L4_BYTES_UPSTREAM] = raw["l4"]
    ws = raw.get("ws")
    if ws is not None:  # a WebSocket session
        up, down, code, closed_by, reason = ws
        rec[A.CLRK_WS_MESSAGES_UP], rec[A.CLRK_WS_MESSAGES_DOWN], rec[A.CLRK_WS_CLOSE_CODE] = up, down, code
        rec[A.CLRK_WS_CLOSED_BY] = _text(closed_by, A.CLRK_WS_CLOSED_BY, escaped)
        rec[A.CLRK_WS_CLOSE_REASON] = _text(reason, A.CLRK_WS_CLOSE_REASON, escaped)

    status = raw["status"]
    error = raw["error"]
    if error is not None:
        rec[A.ERROR_TYPE] = raw.get("error_type") or error_type(error if isinstance(error, str) else escape.text(error)[0])
    elif raw.get("genai_error") and raw["upstream"]:
        rec[A.ERROR_TYPE] = _text(raw["genai_error"], A.ERROR_TYPE, escaped)
    elif raw["upstream"] and status is not None and status >= 400:
        # OTel HTTP client semconv: an error status is the error type.
        rec[A.ERROR_TYPE] = str(status)
    if raw.get("incomplete"):
        rec[A.CLRK_RECORD_INCOMPLETE] = _text(raw["incomplete"], A.CLRK_RECORD_INCOMPLETE, escaped)
    if escaped:
        rec[A.CLRK_RECORD_ESCAPED] = list(dict.fromkeys(escaped))
    return {k: v for k, v in rec.items() if v is not None}


def _decision(rec: dict, decision, escaped: list[str]) -> None:
    action, rule, reason = decision
    rec[A.CLRK_DECISION] = _text(action, A.CLRK_DECISION, escaped)
    rec[A.CLRK_DECISION_RULE] = _text(rule, A.CLRK_DECISION_RULE, escaped)
    rec[A.CLRK_DECISION_REASON] = _text(reason, A.CLRK_DECISION_REASON, escaped)


def _agent(rec: dict, agent, escaped: list[str]) -> None:
    for key, value in zip((A.AGENT_KIND, A.AGENT_NAMESPACE, A.AGENT_NAME, A.AGENT_UID, A.AGENT_REVISION), agent, strict=True):
        rec[key] = _text(value, key, escaped)


def _budget(rec: dict, budget, escaped: list[str]) -> None:
    pool, denied, mx, used, charged = budget
    rec[A.CLRK_BUDGET_POOL] = _text(pool, A.CLRK_BUDGET_POOL, escaped)
    rec[A.CLRK_BUDGET_DENIED] = denied
    rec[A.CLRK_BUDGET_DAILY_MAX], rec[A.CLRK_BUDGET_DAILY_USED], rec[A.CLRK_BUDGET_TOKENS] = mx, used, charged


def _budget_cost(rec: dict, budget_cost) -> None:
    """The dollar figures of a budgeted call: finite floats only (a value no column fits stays out)."""
    for key, value in zip((A.CLRK_BUDGET_DAILY_MAX_COST, A.CLRK_BUDGET_DAILY_COST, A.CLRK_BUDGET_COST), budget_cost, strict=True):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            rec[key] = float(value)


_MCP_TARGET = {"tool": A.GEN_AI_TOOL_NAME, "prompt": A.GEN_AI_PROMPT_NAME, "resource": A.MCP_RESOURCE_URI}
# What a child record shares with the transaction that carried it.
_INHERITED = (A.TRACE_ID, A.URL_FULL, A.SERVER_ADDRESS, A.SERVER_PORT, A.CLRK_COMPONENT, A.CLRK_GATEWAY_NAME,
              A.CLRK_DST_NAME, A.INVOCATION_ID, A.CLRK_DECISION, A.CLRK_DECISION_RULE, A.CLRK_DECISION_REASON,
              A.AGENT_KIND, A.AGENT_NAMESPACE, A.AGENT_NAME, A.AGENT_UID, A.AGENT_REVISION)


def session_fingerprint(session) -> str | None:
    """What records say of an Mcp-Session-Id: a fingerprint that ties a session's records together; the id
    itself may let whoever holds it act in the session, and is redacted like any session header."""
    if not isinstance(session, (str, bytes)) or not session:
        return None
    raw = session.encode("utf-8", "surrogateescape") if isinstance(session, str) else session
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def mcp_rows(raw: Snapshot, parent: dict) -> list[dict]:
    """The child records of a transaction's MCP messages: one per JSON-RPC request/response pair (and per lone
    message), each a span under the transaction's."""
    children = raw.get("mcp")
    if not children:
        return []
    session, version = raw.get("mcp_session") or (None, None)
    shared = {k: parent[k] for k in _INHERITED if k in parent}
    shared[A.PARENT_SPAN_ID] = parent[A.SPAN_ID]
    shared[A.MCP_SESSION_ID] = session_fingerprint(session)
    shared[A.MCP_PROTOCOL_VERSION] = version if isinstance(version, str) else None
    rows = []
    for c in children:
        escaped: list[str] = []
        method = _text(c.get("method"), A.MCP_METHOD_NAME, escaped)
        row = {**shared, A.TIME: c["t0"], A.END_TIME: c["t1"], A.SPAN_ID: c["span"], A.MCP_METHOD_NAME: method,
               A.JSONRPC_REQUEST_ID: _text(c.get("id"), A.JSONRPC_REQUEST_ID, escaped),
               A.CLRK_DURATION_MS: round((c["t1"] - c["t0"]) * 1000.0, 3), A.ERROR_TYPE: c.get("error")}
        key = _MCP_TARGET.get(c.get("kind") or "")
        if key is not None:
            row[key] = _text(c.get("target"), key, escaped)
        if method == "tools/call":
            row[A.GEN_AI_OPERATION_NAME] = A.OPERATION_EXECUTE_TOOL
        req, resp = c.get("req"), c.get("resp")
        if req is not None or resp is not None:
            row[A.REQUEST_BODY], row[A.RESPONSE_BODY], row[A.CLRK_BODY_B64] = _bodies(req, resp)
            row[A.CLRK_BODY_BYTES] = len(req or b"") + len(resp or b"")
        if escaped:
            row[A.CLRK_RECORD_ESCAPED] = escaped
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


# --------------------------------------------------------------------------- when the record cannot be built

_HEX = frozenset("0123456789abcdef")
INT64_MAX = 2**63 - 1


def _hex_id(v) -> bool:
    return isinstance(v, str) and len(v) in (16, 32) and set(v) <= _HEX


def _epoch(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1e11


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v <= INT64_MAX else None


def salvage(raw, why: str) -> dict | None:
    """What can still be stored of a transaction whose whole record cannot be built: its ids and times, and
    whichever of the gateway, agent, decision, invocation id, destination and budget charge are readable, with
    `clrk.record.incomplete` saying why the rest is missing. The budget charge is what matters most: the day's
    usage is rebuilt from the stored records at start. None when not even the ids and start time are usable:
    such a record cannot be stored at all."""
    if not isinstance(raw, dict):
        return None
    ids = raw.get("ids")
    if not isinstance(ids, (list, tuple)) or len(ids) != 3 or not (_hex_id(ids[0]) and _hex_id(ids[1])):
        return None
    t0, t1 = raw.get("t0"), raw.get("t1")
    if not _epoch(t0):
        return None
    escaped: list[str] = []
    rec: dict = {
        A.TIME: t0,
        A.END_TIME: t1 if _epoch(t1) else t0,
        A.TRACE_ID: ids[0],
        A.SPAN_ID: ids[1],
        A.PARENT_SPAN_ID: ids[2] if _hex_id(ids[2]) else None,
        A.CLRK_COMPONENT: A.COMPONENT_EGRESS,
        A.CLRK_RECORD_INCOMPLETE: escape.text(escape.to_bytes(why))[0],
    }
    optional = {
        A.CLRK_GATEWAY_NAME: lambda: _text(raw["gateway"], A.CLRK_GATEWAY_NAME, escaped),
        A.CLRK_DST_NAME: lambda: _text(raw["dst"], A.CLRK_DST_NAME, escaped),
        A.SERVER_ADDRESS: lambda: _text(raw["host"], A.SERVER_ADDRESS, escaped),
        A.SERVER_PORT: lambda: _int(raw["port"]),
        A.INVOCATION_ID: lambda: _invocation(raw["inv"], escaped),
    }
    for key, read in optional.items():
        try:
            rec[key] = read()
        except Exception:  # noqa: S112 - optional: what cannot be read stays out
            continue
    for part, fill in (("decision", _decision), ("agent", _agent), ("budget", _salvage_budget),
                       ("budget_cost", lambda rec, v, _escaped: _budget_cost(rec, v))):
        try:
            fill(rec, raw[part], escaped)
        except Exception:  # noqa: S112 - optional: what cannot be read stays out
            continue
    if escaped:
        rec[A.CLRK_RECORD_ESCAPED] = list(dict.fromkeys(escaped))
    return {k: v for k, v in rec.items() if v is not None}


def _salvage_budget(rec: dict, budget, escaped: list[str]) -> None:
    pool, denied, mx, used, charged = budget
    if not isinstance(pool, (str, bytes)):
        return
    rec[A.CLRK_BUDGET_POOL] = _text(pool, A.CLRK_BUDGET_POOL, escaped)
    rec[A.CLRK_BUDGET_DENIED] = denied if isinstance(denied, bool) else None
    for key, value in ((A.CLRK_BUDGET_DAILY_MAX, mx), (A.CLRK_BUDGET_DAILY_USED, used), (A.CLRK_BUDGET_TOKENS, charged)):
        if isinstance(value, int) and not isinstance(value, bool):
            rec[key] = max(0, min(value, INT64_MAX))  # a charge past what a record holds still spends the pool
