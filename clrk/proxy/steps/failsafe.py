"""Step Failsafe, last: nothing goes upstream without an allow decision, whatever failed above."""

from __future__ import annotations

import logging

from mitmproxy import http

from clrk.decision import Decision
from clrk.escape import printable
from clrk.identity import trace_context
from clrk.proxy.runtime import Runtime, refuse
from clrk.proxy.transaction import METADATA_KEY, Transaction

log = logging.getLogger("clrk")


class Failsafe:
    """The last word before a request leaves. If a step above raised (`Gateway` logs it and carries on with
    the next step), the request may lack the decision it needs: it is denied then, never let through."""

    name = "clrk_failsafe"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _deny(self, flow: http.HTTPFlow, tx: Transaction | None,
              why: str = "the gateway could not decide this request (see its log); denied") -> None:
        d = Decision(False, "failsafe", why, 500)
        if tx is None:
            tx = Transaction(start=flow.request.timestamp_start, trace=trace_context(None))
            flow.metadata[METADATA_KEY] = tx
        refuse(flow, tx, d)
        # Without the query: it may hold secrets, and the log is an output too.
        log.error("clrk: %s %s had no decision after the addons ran; denied", printable(flow.request.method),
                  printable(flow.request.pretty_url.split("?", 1)[0]))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is not None:
            d = tx.decision
            if d is not None:
                if d.allow:
                    return
            else:  # left pending until the body is in (a provider's model, MCP messages): decided on `request`
                facts = tx.facts
                if facts is not None and (facts.model_pending or facts.mcp_pending):
                    return
        if flow.request.stream:
            flow.kill()  # the body would already be on its way upstream
        else:
            self._deny(flow, tx)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.decision is None or not tx.decision.allow:
            self._deny(flow, tx)
            return
        rule = tx.decision.provider_rule
        if rule is not None and rule.budget is not None and tx.reservation is None:
            # Allowed by a budgeted rule but never admitted (the step that admits raised): it would cost unaccounted.
            self._deny(flow, tx, "the gateway could not admit this call against its token budget (see its log); denied")
