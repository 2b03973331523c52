"""Step Capture: bounded body capture on the pass-through (feeds the provider parser)."""

from __future__ import annotations

from mitmproxy import http

from clrk.mcp import JSON_TYPES, SSE_TYPE
from clrk.proxy.capture import PROVIDER_BUFFER_LIMIT, BodyCapture, request_is_buffered, response_is_buffered
from clrk.proxy.mcp import McpStream
from clrk.proxy.runtime import Runtime
from clrk.proxy.steps.mcp import answer_body, answer_headers
from clrk.proxy.transaction import METADATA_KEY, Transaction


class Capture:
    """Bounded body capture. Bodies of unknown or large size, and every event stream, are streamed through a
    `BodyCapture` chunk by chunk (SSE reaches the agent live, memory stays bounded). Small bodies of known
    length are left to mitmproxy to buffer, as bare mitmproxy does, and summarised from its bytes when the
    record is made (`clrk.proxy.transaction.snapshot`); only an encoded one goes through a `BodyCapture`, whose
    decoding is bounded (see `clrk.proxy.capture.request_is_buffered`)."""

    name = "clrk_capture"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or flow.response or flow.error or tx.gateway is None:
            return
        h = tx.req_h or {}
        provider = tx.genai is not None or tx.mcp is not None
        if not (tx.buffered_as_provider() if provider else request_is_buffered(h, provider=False)):
            cfg = tx.gateway.capture
            tx.req_capture = BodyCapture(cfg.max_bytes, cfg.wants(h.get("content-type")), h.get("content-encoding"))
            flow.request.stream = tx.req_capture.feed

    def request(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.gateway is None or flow.request.stream:
            return
        h = tx.req_h or {}
        if h.get("content-encoding"):
            cfg = tx.gateway.capture
            tx.req_capture = BodyCapture(cfg.max_bytes, cfg.wants(h.get("content-type")), h["content-encoding"])
            tx.req_capture.feed(flow.request.raw_content or b"")

    request.encoded_only = True  # type: ignore[attr-defined]  # the Gateway calls it when req_h has content-encoding

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        resp = flow.response
        if tx is None or resp is None or flow.error or tx.gateway is None or tx.decision is None or not tx.decision.allow:
            return
        tx.upstream_response = True
        rh = tx.response_headers(flow)
        if tx.mcp is not None:
            answer_headers(tx, rh)
        if not response_is_buffered(rh) and not (tx.mcp is not None and mcp_response_buffered(rh)):
            cfg = tx.gateway.capture
            tx.resp_capture = BodyCapture(cfg.max_bytes, cfg.wants(rh.get("content-type")), rh.get("content-encoding"),
                                          listener=tx.genai.feed if tx.genai is not None else None)
            resp.stream = tx.resp_capture.feed
            ctype = rh.get("content-type") or ""
            if tx.mcp is not None and not rh.get("content-encoding") and ctype.startswith((SSE_TYPE, *JSON_TYPES)):
                # MCP answers are read as they pass (pairs recorded, listings filtered): SSE event by event.
                resp.stream = McpStream(tx.mcp, tx.resp_capture.feed, sse=ctype.startswith(SSE_TYPE))
                if "content-length" in resp.headers:
                    del resp.headers["content-length"]

    def response(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        resp = flow.response
        if tx is None or resp is None or tx.gateway is None or resp.stream or not tx.upstream_response:
            return
        if tx.mcp is not None:
            answer_body(flow, tx)
        # A buffered upstream response: the provider parser reads it whole (decoded, in bounded pieces).
        encoding = tx.response_headers(flow).get("content-encoding")
        if encoding:
            cfg = tx.gateway.capture
            tx.resp_capture = BodyCapture(cfg.max_bytes, cfg.wants(tx.response_headers(flow).get("content-type")), encoding,
                                          listener=tx.genai.feed if tx.genai is not None else None)
            tx.resp_capture.feed(resp.raw_content or b"")
        elif tx.genai is not None and resp.raw_content:
            tx.genai.feed(resp.raw_content)


def mcp_response_buffered(rh: dict[str, str]) -> bool:
    """An MCP JSON answer of known length up to 32 MiB is read whole, so a listing in it can be filtered."""
    cl = rh.get("content-length")
    return ((rh.get("content-type") or "").startswith(JSON_TYPES) and cl is not None and cl.isdigit()
            and int(cl) <= PROVIDER_BUFFER_LIMIT and "transfer-encoding" not in rh)
