"""OTLP protobuf written straight from stored rows: one span and one log record per row, framed per batch as an
ExportTraceServiceRequest / ExportLogsServiceRequest.

The OTel SDK path (a ReadableSpan and a LogRecord per row, each encoded through opentelemetry-proto message
objects by the exporter) cost most of the recorder's CPU per record. The bytes written here are what that
path sent for the same row (tests/test_otlp_wire.py decodes both with opentelemetry-proto and compares
them): span kind CLIENT, status ERROR with `error.type` as its message or UNSET, flags saying whether the
parent is remote, the log record's severity, body, event name and the span's ids and sampled flag. A row's
attributes are encoded once and shared by its span and its log record.

Pure Python: no OTel SDK or protobuf import (the wire format is stable; the field numbers are below).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Mapping, Sequence

from clrk import attributes as A
from clrk.memo import remember

log = logging.getLogger("clrk.export")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_U64 = (1 << 64) - 1
_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_VARINTS = tuple(bytes((i,)) if i < 0x80 else bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(1 << 14))


def varint(n: int) -> bytes:
    if n < 16384:
        return _VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    n = len(payload)
    return tag + (_VARINTS[n] if n < 16384 else varint(n)) + payload


# AnyValue: 1 string_value, 2 bool_value, 3 int_value, 4 double_value, 5 array_value, 6 kvlist_value
# ArrayValue / KeyValueList: 1 values;  KeyValue: 1 key, 2 value
_TRUE, _FALSE = b"\x10\x01", b"\x10\x00"


def any_value(v) -> bytes | None:
    """An AnyValue as the SDK's encoder makes it of an attribute or body value (None, bool, str, int, float,
    bytes, a sequence or mapping of those); None for a value it refuses (the SDK then leaves the attribute out)."""
    if v is None:
        return b""  # an empty AnyValue
    if isinstance(v, bool):
        return _TRUE if v else _FALSE
    if isinstance(v, str):
        return _ld(b"\x0a", v.encode())
    if isinstance(v, int):
        if not _INT64_MIN <= v <= _INT64_MAX:
            return None
        return b"\x18" + varint(int(v) & _U64)
    if isinstance(v, float):
        return b"\x21" + _pack_d(v)
    if isinstance(v, bytes):
        return _ld(b"\x3a", v)
    if isinstance(v, Sequence):
        items = [any_value(x) for x in v]
        if any(x is None for x in items):
            return None
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", x) for x in items))
    if isinstance(v, Mapping):
        kvs = [key_value(str(k), x) for k, x in v.items()]
        if any(kv is None for kv in kvs):
            return None
        return _ld(b"\x32", b"".join(_ld(b"\x0a", kv) for kv in kvs))
    return None


def key_value(key: str, v) -> bytes | None:
    av = any_value(v)
    if av is None:
        return None
    return _ld(b"\x0a", key.encode()) + _ld(b"\x12", av)


# Each attribute key's KeyValue head (field 1, the key; then field 2's tag), made once.
_KEY_HEAD = {k: _ld(b"\x0a", k.encode()) + b"\x12" for k in A.ATTRIBUTE_KEYS}


def _attribute(key: str, v) -> bytes | None:
    """An attribute's KeyValue, with its length in front (the field's tag is the caller's); None when the
    SDK's encoder would leave it out. The usual types inline, the rest as `any_value` has them."""
    t = type(v)
    if t is str:
        b = v.encode()
        n = len(b)
        av = b"\x0a" + (_VARINTS[n] if n < 16384 else varint(n)) + b
    elif t is bool:
        av = _TRUE if v else _FALSE
    elif t is int and _INT64_MIN <= v <= _INT64_MAX:
        av = b"\x18" + varint(v & _U64)
    elif t is float:
        av = b"\x21" + _pack_d(v)
    else:
        av = any_value(v)
        if av is None:
            return None
    n = len(av)
    kv = _KEY_HEAD[key] + (_VARINTS[n] if n < 16384 else varint(n)) + av
    n = len(kv)
    return (_VARINTS[n] if n < 16384 else varint(n)) + kv


# Attributes whose values repeat from record to record (the gateway, agent, decision, provider, model, method,
# host): their encoded KeyValue is kept (`clrk.memo`: bounded, a flood of distinct values costs what it did
# without it) instead of being encoded again for every record. A bool attribute has only two encodings.
_REPEATED = frozenset({
    A.GEN_AI_SYSTEM, A.GEN_AI_PROVIDER_NAME, A.GEN_AI_OPERATION_NAME, A.GEN_AI_REQUEST_MODEL, A.GEN_AI_RESPONSE_MODEL,
    A.CLRK_COST_SOURCE, A.MCP_METHOD_NAME, A.MCP_PROTOCOL_VERSION, A.HTTP_REQUEST_METHOD, A.SERVER_ADDRESS,
    A.CLRK_COMPONENT, A.CLRK_GATEWAY_NAME, A.CLRK_APR_NAME, A.CLRK_APR_NAMESPACE, A.CLRK_DST_NAME,
    A.CLRK_BUDGET_POOL, A.CLRK_WS_CLOSED_BY, A.CLRK_DECISION, A.CLRK_DECISION_RULE, A.CLRK_DECISION_REASON,
    A.AGENT_KIND, A.AGENT_NAMESPACE, A.AGENT_NAME, A.AGENT_UID, A.AGENT_REVISION, A.ERROR_TYPE,
})
_REPEATED_INTS = frozenset({A.HTTP_RESPONSE_STATUS_CODE, A.SERVER_PORT})
_BOOLS = {k: (_attribute(k, False), _attribute(k, True)) for k in A.ATTRIBUTE_KEYS}
_STR_SEEN: dict = {}  # (key, str value) -> its encoded attribute
_INT_SEEN: dict = {}  # (key, int value) -> ... (apart: 1 == True would share a dict entry)
_PLANS: dict = {}  # a row's key order -> (key, how its values are encoded) for its attributes, in their order


def _plan(keys: tuple) -> tuple:
    """The attributes of a row with these keys, in the order the SDK encoded them, each with how its value is
    encoded: 1 looked up among the repeated strings, 2 among the repeated ints, 0 encoded as it comes."""
    present = set(keys)
    return tuple((k, 1 if k in _REPEATED else 2 if k in _REPEATED_INTS else 0)
                 for k in A.ATTRIBUTE_KEYS if k in present)


def attributes(row: Mapping) -> list[bytes]:
    """The row's attributes, each a length-prefixed KeyValue (`_attribute`), in `A.ATTRIBUTE_KEYS` order."""
    keys = tuple(row)
    plan = _PLANS.get(keys)
    if plan is None:  # rows come in a few shapes (the keys `expand` sets); a hostile mix is bounded
        plan = remember(_PLANS, keys, 0, _plan(keys), limit=1024)
    parts = []
    for k, how in plan:
        v = row[k]
        if v is None:
            continue
        t = type(v)
        if t is bool:
            parts.append(_BOOLS[k][v])
            continue
        if how == 1 and t is str:
            kv = _STR_SEEN.get((k, v))
            if kv is None:
                try:
                    kv = remember(_STR_SEEN, (k, v), len(v), _attribute(k, v))
                except UnicodeEncodeError:  # a lone surrogate: the SDK's encoder refuses the attribute too
                    continue
        elif how == 2 and t is int:
            kv = _INT_SEEN.get((k, v))
            if kv is None:
                kv = _attribute(k, v)
                if kv is not None:
                    remember(_INT_SEEN, (k, v), 0, kv)
        else:
            try:
                kv = _attribute(k, v)
            except UnicodeEncodeError:  # a lone surrogate: the SDK's encoder refuses the attribute too
                continue
        if kv is not None:
            parts.append(kv)
    return parts


def resource_field(attributes: Mapping) -> bytes:
    """Field 1 (resource) of a ResourceSpans / ResourceLogs."""
    kvs = [key_value(str(k), v) for k, v in attributes.items()]
    return _ld(b"\x0a", b"".join(_ld(b"\x0a", kv) for kv in kvs if kv))


def scope_field(name: str) -> bytes:
    """Field 1 (scope) of a ScopeSpans / ScopeLogs: an InstrumentationScope with only its name."""
    return _ld(b"\x0a", _ld(b"\x0a", name.encode()))


def request(resource: bytes, resource_schema_url: str, scope: bytes, items: Iterable[bytes]) -> bytes:
    """An ExportTraceServiceRequest or ExportLogsServiceRequest (the same shape: 1 resource_spans/logs {1
    resource, 2 scope_spans/logs {1 scope, 2 spans/log_records}, 3 schema_url}) of one resource and scope;
    `items` are spans or log records as `encode` made them (each already field 2 of its scope)."""
    scoped = scope + b"".join(items)
    body = resource + _ld(b"\x12", scoped)
    if resource_schema_url:
        body += _ld(b"\x1a", resource_schema_url.encode())
    return _ld(b"\x0a", body)


def span_name(row: Mapping) -> str:
    if A.is_mcp_child(row):  # an MCP message's child record: "{mcp.method.name} {target}"
        method = row.get(A.MCP_METHOD_NAME) or "response"  # an answer to a request no record of it carried
        target = row.get(A.GEN_AI_TOOL_NAME) or row.get(A.GEN_AI_PROMPT_NAME) or row.get(A.MCP_RESOURCE_URI)
        return f"{method} {target}" if target else method
    op = row.get(A.GEN_AI_OPERATION_NAME)
    if op:
        return f"{op} {row.get(A.GEN_AI_REQUEST_MODEL) or 'unknown'}"
    return f"{row.get(A.HTTP_REQUEST_METHOD) or 'UNKNOWN'} {row.get(A.SERVER_ADDRESS) or ''}".strip()


_HEADERS_SEEN: dict = {}  # (name, value) -> the header's encoded KeyValue: most repeat (content-type, host, ...)


def _str_map(d: Mapping) -> bytes | None:
    """A KeyValueList AnyValue of a dict (the headers: str to str at their fastest)."""
    out = []
    seen = _HEADERS_SEEN
    for k, v in d.items():
        if type(k) is str and type(v) is str:
            kv = seen.get((k, v))
            if kv is not None:  # already length-prefixed
                out.append(kv)
                continue
            kb, vb = k.encode(), v.encode()
            n = len(vb)
            av = b"\x0a" + (_VARINTS[n] if n < 16384 else varint(n)) + vb
            kv = _ld(b"\x0a", kb) + _ld(b"\x12", av)
            n = len(kv)
            out.append(remember(seen, (k, v), len(k) + len(v), (_VARINTS[n] if n < 16384 else varint(n)) + kv))
            continue
        kv = key_value(str(k), v)
        if kv is None:
            return None
        n = len(kv)
        out.append((_VARINTS[n] if n < 16384 else varint(n)) + kv)
    return _ld(b"\x32", b"\x0a" + b"\x0a".join(out) if out else b"")


_SIDES = ((_ld(b"\x0a", b"request"), A.REQUEST_HEADERS, A.REQUEST_BODY),
          (_ld(b"\x0a", b"response"), A.RESPONSE_HEADERS, A.RESPONSE_BODY))
_HEADERS_KEY, _BODY_KEY = _ld(b"\x0a", b"headers"), _ld(b"\x0a", b"body")


def body_value(row: Mapping) -> bytes | None:
    """`any_value(log_body(row))`, without building the dict first."""
    sides = []
    for key, hk, bk in _SIDES:
        fields = []
        headers = row.get(hk)
        if headers:
            av = _str_map(headers) if isinstance(headers, Mapping) else any_value(dict(headers))
            if av is None:
                return None
            fields.append(_ld(b"\x0a", _HEADERS_KEY + _ld(b"\x12", av)))
        body = row.get(bk)
        if body is not None:
            av = any_value(body)
            if av is None:
                return None
            fields.append(_ld(b"\x0a", _BODY_KEY + _ld(b"\x12", av)))
        sides.append(_ld(b"\x0a", key + _ld(b"\x12", _ld(b"\x32", b"".join(fields)))))
    return _ld(b"\x32", b"".join(sides))


def log_body(row: Mapping) -> dict:
    """The captured transaction as the log record's body."""
    body: dict = {}
    for side, hk, bk in (("request", A.REQUEST_HEADERS, A.REQUEST_BODY), ("response", A.RESPONSE_HEADERS, A.RESPONSE_BODY)):
        part = {}
        if row.get(hk):
            part["headers"] = dict(row[hk])
        if row.get(bk) is not None:
            part["body"] = row[bk]
        body[side] = part
    return body


_KIND_CLIENT = b"\x30\x03"  # Span.kind (6) = SPAN_KIND_CLIENT
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", 0x100)  # Span.flags (16, fixed32): has-is-remote, not remote
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", 0x300)  # ... and the parent is remote
_STATUS_UNSET = b"\x7a\x00"  # Span.status (15), empty
_LOG_FLAGS = b"\x45" + struct.pack("<I", 1)  # LogRecord.flags (8, fixed32): the span's sampled flag
_EVENT = _ld(b"\x62", b"clrk.transaction")  # LogRecord.event_name (12)
_INFO = b"\x10\x09" + _ld(b"\x1a", b"INFO")  # severity_number (2) SEVERITY_NUMBER_INFO, severity_text (3)
_WARN = b"\x10\x0d" + _ld(b"\x1a", b"WARN")


def encode(row: Mapping, observed_ns: int | None = None) -> tuple[bytes, bytes]:
    """The row's span and log record, each as field 2 of its ScopeSpans / ScopeLogs."""
    parts = attributes(row)
    # As the SDK had them: the hex as a number, in 16 and 8 bytes (a salvaged record's shorter id padded, a
    # longer one refused).
    trace_int, span_int = int(row[A.TRACE_ID], 16), int(row[A.SPAN_ID], 16)
    trace_id, span_id = trace_int.to_bytes(16, "big"), span_int.to_bytes(8, "big")
    start_ns = int(row[A.TIME] * 1e9)
    end_ns = int((row.get(A.END_TIME) or row[A.TIME]) * 1e9)
    end = _pack_q(end_ns)
    parent = row.get(A.PARENT_SPAN_ID)
    parent_int = int(parent, 16) if parent else 0
    if not trace_int:
        parent_int = 0  # the SDK takes a parent of trace id 0 or span id 0 for none
    error = row.get(A.ERROR_TYPE)
    failed = error is not None
    if failed:
        status = _ld(b"\x7a", _ld(b"\x12", str(error).encode()) + b"\x18\x02")
    else:
        status = _STATUS_UNSET
    span = b"".join((
        b"\x0a\x10", trace_id, b"\x12\x08", span_id,
        b"\x22\x08" + parent_int.to_bytes(8, "big") if parent_int else b"",
        _ld(b"\x2a", span_name(row).encode()), _KIND_CLIENT,
        b"\x39", _pack_q(start_ns), b"\x41", end,
        b"\x4a" + b"\x4a".join(parts) if parts else b"",
        status, _FLAGS_REMOTE if parent_int else _FLAGS_LOCAL,
    ))
    body = body_value(row)
    record = b"".join((
        b"\x09", end,
        _WARN if failed or row.get(A.CLRK_DECISION) == "deny" else _INFO,
        _ld(b"\x2a", body) if body is not None else b"",
        b"\x32" + b"\x32".join(parts) if parts else b"",
        _LOG_FLAGS, b"\x4a\x10" + trace_id if trace_int else b"", b"\x52\x08" + span_id if span_int else b"",
        b"\x59", _pack_q(time.time_ns() if observed_ns is None else observed_ns),
        _EVENT,
    ))
    return _ld(b"\x12", span), _ld(b"\x12", record)
