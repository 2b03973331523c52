"""MCP (Model Context Protocol) messages as the gateway reads them: JSON-RPC 2.0 in POST bodies and in SSE
events of the Streamable HTTP transport. Pure (no mitmproxy): the proxy parses with it, `clrk.decision`
judges what it parsed, and the recorder never needs it.

Parsing is strict where a lenient reading would let a call past the policy: a duplicate member name in any
JSON object, a method name that is a known MCP method in another letter case or with spaces, a `tools/call`
whose `name` is not a string, a message that is not JSON-RPC 2.0 — each makes the whole body `invalid`, and the
gateway refuses it rather than guess what the server will read. Method names and message shapes follow the
`mcp` package's types (`mcp_types`), checked here by hand so that one body is parsed once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Methods whose params name what the policy judges: (params member, the kind of thing it names).
TARGETS = {"tools/call": ("name", "tool"), "prompts/get": ("name", "prompt"), "resources/read": ("uri", "resource"),
           "resources/subscribe": ("uri", "resource"), "resources/unsubscribe": ("uri", "resource")}
# Results that list what the policy may hide: method -> (result member, the member of each item judged, kind).
LISTS = {"tools/list": ("tools", "name", "tool"), "prompts/list": ("prompts", "name", "prompt"),
         "resources/list": ("resources", "uri", "resource")}
KNOWN_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "completion/complete", "logging/setLevel", "sampling/createMessage", "elicitation/create", "roots/list",
    "notifications/initialized", "notifications/cancelled", "notifications/progress", "notifications/message",
    "notifications/roots/list_changed", "notifications/tools/list_changed", "notifications/prompts/list_changed",
    "notifications/resources/list_changed", "notifications/resources/updated",
})
_FOLDED = {m.lower(): m for m in KNOWN_METHODS}
JSON_TYPES = ("application/json",)
SSE_TYPE = "text/event-stream"
# JSON-RPC error codes the gateway answers with
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603
POLICY_DENIED = -32001  # the contract's code for a call the policy refuses
# Objects and arrays one body may hold: parsing checks every object for repeated names in Python, ~0.15 µs
# each, on the proxy's one thread; past this a body (32 MiB of `{}`) would hold everyone up for a second.
MAX_CONTAINERS = 200_000


class InvalidMessage(ValueError):
    """A body the gateway will not forward: it cannot say what the server would make of it."""


@dataclass(slots=True)
class McpMessage:
    """One JSON-RPC message. `kind`: request | notification | response | error."""

    kind: str
    id: str | int | None = None
    method: str | None = None
    target: str | None = None  # the tool or prompt name, or the resource URI, a request names
    target_kind: str | None = None  # tool | prompt | resource
    doc: dict = field(default_factory=dict, repr=False)  # the message itself (arguments, result)

    @property
    def is_error(self) -> bool:
        """A JSON-RPC error, or a tool result the server marked `isError`."""
        if self.kind == "error":
            return True
        result = self.doc.get("result")
        return self.kind == "response" and isinstance(result, dict) and result.get("isError") is True


@dataclass(slots=True)
class McpBody:
    messages: list[McpMessage]
    batch: bool = False


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidMessage(f"the member {dup[:64]!r} appears twice in one JSON object")
    return out


def _constant(name: str) -> object:
    raise InvalidMessage(f"{name} is not JSON")


def loads(data: bytes | str) -> object:
    """JSON as the gateway reads MCP bodies: no duplicate member names, no NaN or Infinity."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_constant)
    except InvalidMessage:
        raise
    except (ValueError, RecursionError) as e:
        raise InvalidMessage(f"the body is not JSON ({str(e)[:120]})") from e


def loads_bounded(body: bytes) -> object:
    """`loads`, refusing first (at C speed) a body of more than MAX_CONTAINERS objects and arrays; brackets
    inside strings count too: a bound, not a parse."""
    if len(body) > MAX_CONTAINERS and body.count(b"{") + body.count(b"[") > MAX_CONTAINERS:
        raise InvalidMessage(f"a body of more than {MAX_CONTAINERS} objects and arrays is not judged")
    return loads(body)


def _id(doc: dict) -> str | int | None:
    v = doc.get("id")
    if v is None or (isinstance(v, (str, int)) and not isinstance(v, bool)):
        return v
    raise InvalidMessage("a JSON-RPC id must be a string or an integer")


def message(doc: object) -> McpMessage:
    """One JSON-RPC 2.0 message, or InvalidMessage."""
    if not isinstance(doc, dict):
        raise InvalidMessage("a JSON-RPC message must be an object")
    if doc.get("jsonrpc") != "2.0":
        raise InvalidMessage("not a JSON-RPC 2.0 message (jsonrpc must be \"2.0\")")
    if "method" in doc:
        method = doc["method"]
        if not isinstance(method, str):
            raise InvalidMessage("a JSON-RPC method must be a string")
        if method not in KNOWN_METHODS:
            folded = _FOLDED.get(method.strip().lower())
            if folded is not None:
                raise InvalidMessage(f"the method {method[:64]!r} is {folded!r} spelled otherwise; MCP method names "
                                     "are exact")
        kind = "request" if "id" in doc else "notification"
        msg = McpMessage(kind, _id(doc) if kind == "request" else None, method, doc=doc)
        spec = TARGETS.get(method)
        if spec is not None:
            params = doc.get("params")
            if not isinstance(params, dict) or not isinstance(params.get(spec[0]), str):
                raise InvalidMessage(f"{method} needs params.{spec[0]} as a string")
            msg.target, msg.target_kind = params[spec[0]], spec[1]
        return msg
    if "result" in doc or "error" in doc:
        return McpMessage("error" if "error" in doc else "response", _id(doc), doc=doc)
    raise InvalidMessage("a JSON-RPC message needs a method, a result or an error")


def parse_body(body: bytes) -> McpBody:
    """The messages of a POST body (one message or a batch), or InvalidMessage."""
    doc = loads_bounded(body)
    if isinstance(doc, list):
        if not doc:
            raise InvalidMessage("an empty JSON-RPC batch")
        return McpBody([message(d) for d in doc], batch=True)
    return McpBody([message(doc)])


def rpc_error(msg_id: str | int | None, code: int, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": text}}


def filter_listing(doc: dict, method: str, allows) -> int:
    """Removes from a `*/list` result what `allows(kind, name)` refuses; returns how many were removed. Items
    whose judged member is not a string are removed too: nothing the policy cannot name reaches the agent."""
    spec = LISTS.get(method)
    result = doc.get("result")
    if spec is None or not isinstance(result, dict) or not isinstance(result.get(spec[0]), list):
        return 0
    items = result[spec[0]]
    kept = [it for it in items if isinstance(it, dict) and isinstance(it.get(spec[1]), str) and allows(spec[2], it[spec[1]])]
    result[spec[0]] = kept
    return len(items) - len(kept)


class SseEvents:
    """Splits an event stream into whole events (the bytes of each, separator included), bounded: an event
    longer than `limit` raises InvalidMessage (the gateway cannot judge what it cannot hold)."""

    __slots__ = ("buf", "limit")

    def __init__(self, limit: int):
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while True:
            ends = [(i, n) for sep, n in ((b"\n\n", 2), (b"\r\n\r\n", 4), (b"\r\r", 2)) if (i := self.buf.find(sep)) >= 0]
            if not ends:
                break
            i, n = min(ends)
            out.append(bytes(self.buf[:i + n]))
            del self.buf[:i + n]
        if len(self.buf) > self.limit:
            raise InvalidMessage(f"an event stream event longer than {self.limit} bytes")
        return out

    def rest(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


def event_data(event: bytes) -> str | None:
    """The data of one SSE event (its `data:` lines joined), or None when it has none."""
    lines = event.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    data = [ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:")]
    return "\n".join(data) if data else None


def event_type(event: bytes) -> str:
    """The `event:` field of one SSE event (`message` when it has none)."""
    for line in event.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.startswith("event:"):
            return line[6:].strip()
    return "message"


def replace_event_data(event: bytes, data: str) -> bytes:
    """The event with its data replaced by `data` (one line: compact JSON), its other fields kept."""
    lines = event.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept = [ln for ln in lines if ln and not ln.startswith("data:")]
    return ("\n".join([*kept, f"data: {data}"]) + "\n\n").encode()
