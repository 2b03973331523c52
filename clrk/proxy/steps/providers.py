"""Step Providers: model-provider calls recognised by destination and path, their bodies parsed
(gen_ai.* attributes, usage)."""

from __future__ import annotations

from mitmproxy import http

from clrk.providers import parser_for
from clrk.proxy.capture import PROVIDER_BUFFER_LIMIT, BodyCapture
from clrk.proxy.runtime import Runtime
from clrk.proxy.transaction import METADATA_KEY, Transaction


class Providers:
    """Recognises model-provider calls and follows them: request body in, response pieces through, usage out."""

    name = "clrk_providers"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        policy = self.rt.policy
        if tx is None or policy is None or tx.dst_name is None:
            return
        if tx.dst_name in policy.provider_hosts:  # (the path is decoded only for a provider's host)
            tx.genai = parser_for(policy.provider_hosts, tx.dst_name, flow.request.path)

    def request(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.genai is None or flow.request.stream:
            return
        h = tx.req_h or {}
        body = flow.request.raw_content
        if body and h.get("content-encoding"):
            # Decoded in bounded pieces and at most PROVIDER_BUFFER_LIMIT: a small compressed body must not
            # become gigabytes here.
            decoded = BodyCapture(PROVIDER_BUFFER_LIMIT, True, h["content-encoding"])
            decoded.feed(body)
            body = decoded.captured if not decoded.truncated else None
        if body:
            tx.genai.request_body(body)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.genai is None or flow.response is None:
            return
        tx.genai.response_headers(flow.response.status_code, tx.response_headers(flow).get("content-type"))
