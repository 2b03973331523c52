"""Step UpstreamFailure: an upstream that failed before its response reached the agent is answered by the
gateway — `{"error": "clrk: upstream <host>:<port>: <error.type>"}` (502; 504 for a timeout), in the provider's
error shape on a provider's API — instead of mitmproxy's HTML page (`clrk/proxy/failures.py` sends it)."""

from __future__ import annotations

from mitmproxy import ctx, http

from clrk.errors import error_type, upstream_failure
from clrk.proxy.failures import ANSWERABLE, TIMED_OUT
from clrk.proxy.runtime import Runtime, gateway_answer
from clrk.proxy.transaction import METADATA_KEY, Transaction


class UpstreamFailure:
    """Names the failure (error.type, kept in the record) and makes the answer the agent receives."""

    name = "clrk_upstream_failure"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is None or not flow.metadata.get(ANSWERABLE):
            return
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        req = flow.request
        blocked = self.rt.blocked.get(flow.client_conn.id)
        if flow.metadata.get(TIMED_OUT):
            etype = "timeout"
            if tx is not None:
                tx.error = f"timeout: the upstream did not answer within {ctx.options.tcp_timeout} s (tcp_timeout)"
        elif blocked is not None and blocked in flow.error.msg:  # the connection clrk refused (its message says why)
            etype = "policy_blocked"
        else:
            etype = (tx.error_type if tx is not None else None) or error_type(flow.error.msg)
        status, message = upstream_failure(req.host, req.port, etype)
        if etype == "policy_blocked" and blocked is not None:
            message = blocked
        provider = None
        if tx is not None:
            tx.error_type = etype
            tx.upstream_response = False  # what the agent receives is the gateway's answer
            provider = tx.genai.name if tx.genai is not None else None
        flow.response = gateway_answer(status, message, provider, f"clrk_upstream_{etype}")
