"""Step McpTraffic: MCP (JSON-RPC over Streamable HTTP) recognised on MCPRoute servers and on allowed routes
that carry the transport's headers; POST bodies read and parsed before the decision (`clrk.decision` judges
each tool, prompt and resource named); answers paired with their requests and listings filtered."""

from __future__ import annotations

from mitmproxy import http

from clrk import mcp
from clrk.mcp import InvalidMessage
from clrk.proxy.capture import PROVIDER_BUFFER_LIMIT, BodyCapture
from clrk.proxy.mcp import McpExchange, McpStream, session_of_endpoint
from clrk.proxy.runtime import Runtime
from clrk.proxy.transaction import METADATA_KEY, Transaction


class McpTraffic:
    """Recognises MCP transactions (the one hook: a set lookup for ordinary requests) and reads their requests
    before they are decided (`read_request`, called by EgressControl). Answers are read by Capture, which calls
    `answer_headers` and `answer_body`, or streams them through `clrk.proxy.mcp.McpStream`."""

    name = "clrk_mcp"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        policy = self.rt.policy
        if tx is None or policy is None or tx.dst_name is None or tx.req_h is None or flow.response or flow.error:
            return
        h, host = tx.req_h, tx.dst_name
        # Every request pays this: set and dict lookups, the wildcard scan only where an MCPRoute has one.
        if (host in policy.mcp_hosts or "mcp-session-id" in h or "mcp-protocol-version" in h
                or ((policy.mcp_any_host or policy.mcp_suffixes) and policy.mcp_host(host))):
            # The session: Streamable HTTP's header, or the older transport's endpoint URL (`?session_id=`).
            session = h.get("mcp-session-id")
            legacy = session is None and "?" in flow.request.path and (session := session_of_endpoint(flow.request.path)) is not None
            where = (tx.agent.ref if tx.agent is not None else "", tx.dst_name, tx.dst_port or 0)
            tx.mcp = McpExchange(session, h.get("mcp-protocol-version"), self.rt.mcp_sessions, where, legacy)
            if "accept-encoding" in h:
                # Answers are read (and listings filtered) as they pass: asked for uncompressed.
                flow.request.headers["accept-encoding"] = "identity"

    def read_request(self, flow: http.HTTPFlow) -> None:
        """The POST body's messages, parsed before the decision. Not a hook (ordinary requests would pay for it):
        `EgressControl.request` calls it for transactions that have an exchange."""
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.mcp is None or flow.response or flow.error or flow.request.stream:
            return
        facts = tx.facts
        body = flow.request.raw_content
        h = tx.req_h or {}
        problem = None
        if body and h.get("content-encoding"):
            decoded = BodyCapture(PROVIDER_BUFFER_LIMIT, True, h["content-encoding"])
            decoded.feed(body)
            body = decoded.captured if not decoded.truncated and not decoded.error else None
            if body is None:
                problem = f"a {h['content-encoding'][:32]} body that does not decode within {PROVIDER_BUFFER_LIMIT} bytes"
        if body:  # whatever the method: a body on an MCP route is JSON-RPC, or refused
            try:
                tx.mcp.request(mcp.parse_body(body), tx.start)
            except InvalidMessage as e:
                problem = str(e)
        if facts is not None and facts.mcp_pending:
            facts.mcp, facts.mcp_problem, facts.mcp_pending = tx.mcp.body, problem, False


def answer_headers(tx: Transaction, rh: dict[str, str]) -> None:
    """The answer's head: the session it names, and the route whose listings its body is filtered to."""
    assert tx.mcp is not None
    d = tx.decision
    tx.mcp.rule = d.mcp_rule if d is not None and d.allow else None
    if tx.mcp.session is None:
        tx.mcp.session = rh.get("mcp-session-id")


def answer_body(flow: http.HTTPFlow, tx: Transaction) -> None:
    """A buffered answer, read whole: its messages paired with their requests, a listing filtered."""
    resp = flow.response
    assert tx.mcp is not None and resp is not None
    ctype = tx.response_headers(flow).get("content-type") or ""
    if not ctype.startswith(mcp.JSON_TYPES) and not ctype.startswith(mcp.SSE_TYPE):
        return
    body = resp.content  # decoded by mitmproxy (bounded: a buffered answer is at most 32 MiB)
    if not body:
        return
    if ctype.startswith(mcp.SSE_TYPE):  # a short event stream the upstream gave a length
        s = McpStream(tx.mcp, None, sse=True)
        new = b"".join([*s(body), *s(b"")])
    else:
        new = tx.mcp.rewrite_json(body, resp.timestamp_end or tx.start) or body
    if new != body:
        resp.content = new
