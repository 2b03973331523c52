"""The proxy → recorder contract for one transaction: the raw facts the proxy takes when a transaction ends
(`clrk.proxy.transaction.snapshot`, `snapshot_l4`), shipped as msgpack (`clrk.wire`), and turned into the
record by the recorder (`clrk.recorder.expand`). Both sides name its keys from this one definition. A
TypedDict is a plain dict at run time: nothing is checked or copied on the proxy's hot path.

Values are what msgpack carries; after the trip tuples arrive as lists, and the recorder still reads every
value defensively (`salvage`): a snapshot is data from another process.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

# (wire bytes, captured bytes or None, truncated) of one body
BodySummary = tuple[int, bytes | None, bool]
HeaderFields = list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]


class Snapshot(TypedDict):
    t0: float  # start, epoch seconds
    t1: float  # end
    ids: tuple[str, str, str | None]  # trace id, span id, parent span id (hex)
    method: bytes | str  # bytes as sent; "CONNECT" for a passthrough tunnel
    scheme: str | None
    host: str
    port: int
    path: bytes | str  # the request target as sent, its query redacted
    status: int | None
    gateway: str | None
    dst: str | None  # the destination the decision judged
    inv: str | None  # invocation id
    decision: tuple[str, str | None, str] | None  # (action, rule, reason)
    agent: tuple[str, str, str, str | None, int | None] | None  # (kind, namespace, name, uid, revision)
    rewritten: bool  # the request was rewritten (Backend model, stream usage)
    req_headers: HeaderFields  # redacted
    resp_headers: HeaderFields | None  # redacted
    req_body: BodySummary
    resp_body: BodySummary
    error: str | None
    error_type: NotRequired[str | None]  # error.type where the proxy knows it; else derived from `error`
    upstream: bool  # the response came from the upstream (not made up by the gateway)
    genai: NotRequired[dict]  # gen_ai.* attributes of a provider call
    genai_error: NotRequired[str | None]
    apr: NotRequired[tuple[str, str] | None]  # the AIProviderRoute (name, namespace)
    budget: NotRequired[tuple[str, bool, int | None, int | None, int | None]]  # pool, denied, max, used, charged
    budget_reserved: NotRequired[int | None]
    budget_cost: NotRequired[tuple[float | None, float | None, float | None]]  # USD: max, used today, charged
    first_chunk: NotRequired[float]  # a streamed answer: when its first body bytes arrived (epoch seconds)
    l4: NotRequired[int]  # a TLS Passthrough tunnel: bytes agent → upstream
    # a WebSocket session: (messages agent → upstream, messages upstream → agent, close code, closed by
    # "client" | "upstream" | "gateway", close reason)
    ws: NotRequired[tuple[int, int, int | None, str | None, str | None]]
    # MCP: one entry per JSON-RPC request/response pair, each a child record ({"span", "t0", "t1", "method",
    # "kind", "target", "id", "error", "req", "resp"}: clrk.proxy.mcp.McpExchange.children), and the session
    # (Mcp-Session-Id, MCP-Protocol-Version)
    mcp: NotRequired[list[dict]]
    mcp_session: NotRequired[tuple[str | None, str | None]]
    incomplete: NotRequired[str]  # what the proxy could not encode (only on that failure path)
