"""The one addon mitmproxy loads (`mitmdump -s addons/clrk.py`, or `clrk run`): `Gateway`, which runs clrk's
steps (clrk/proxy/steps/, one file each) in data-path order.

Why one addon and not nine: mitmproxy looks every hook up on every addon for every event (requestheaders,
request, responseheaders, response, and an `update` after each), so each top-level addon costs a traversal,
a getattr and an error guard per event whether it implements the hook or not. With nine addons that was
≈ 6% of the proxy's instructions per request (bench/instructions.py; docs/PERFORMANCE.md). `Gateway`
calls only the steps a hook has, straight from a tuple.

Each step still runs under its own error guard, as mitmproxy would run a top-level addon: an exception in
one (a parser meeting hostile input, say) is logged and cannot skip the others — and `Failsafe`, last,
denies any request that reached the upstream side without an allow decision.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import http

from clrk.proxy import failures, limits, reuseport
from clrk.proxy.dispatch import Step, failed, run_steps, run_steps_after
from clrk.proxy.runtime import Runtime
from clrk.proxy.steps.auth import ProxyAuth
from clrk.proxy.steps.capture import Capture
from clrk.proxy.steps.credentials import Credentials
from clrk.proxy.steps.egress import EgressControl
from clrk.proxy.steps.failsafe import Failsafe
from clrk.proxy.steps.mcp import McpTraffic
from clrk.proxy.steps.passthrough import Passthrough
from clrk.proxy.steps.policy import PolicyLoader
from clrk.proxy.steps.providers import Providers
from clrk.proxy.steps.recording import Recording
from clrk.proxy.steps.routing import ProviderRouting
from clrk.proxy.steps.upstream import UpstreamFailure
from clrk.proxy.steps.websocket import WebSocketSessions
from clrk.proxy.steps.websocket import install as install_websocket_layer
from clrk.proxy.transaction import METADATA_KEY, Transaction

TRAFFIC_HOOKS = ("client_disconnected", "http_connect", "next_layer", "requestheaders", "request", "responseheaders",
                 "response", "error", "server_connect", "server_connected", "server_connect_error",
                 "websocket_start", "websocket_message", "websocket_end")


# mitmproxy buffers a message head without limit; bounded before any connection exists.
limits.install()
# mitmproxy answers failed upstreams with its own HTML page, or by closing a silent agent's connection.
failures.install()
# mitmproxy keeps every WebSocket message on its flow; clrk's relay keeps none (steps/websocket.py).
install_websocket_layer()
# mitmproxy binds each listener for one process; `clrk run --workers N` shares them (SO_REUSEPORT).
reuseport.install()

class Gateway:
    """clrk inside mitmproxy. This is the one place the order of the steps is written; each is a file of
    clrk/proxy/steps/, and they run in data-path order:

      PolicyLoader     options, policy load and hot reload, the mitmproxy settings clrk relies on
      ProxyAuth        who is asking, and for where (Proxy-Authorization on CONNECT or per request)
      Passthrough      TLS Passthrough listeners: CONNECT decided at L4, ClientHello checked, bytes relayed
      Providers        model-provider calls recognised and parsed (gen_ai.* attributes, usage)
      WebSocketSessions  WebSocket sessions after the 101: bounded, judged per message, accounted, recorded
      McpTraffic       MCP requests read before the decision; answers paired, listings filtered, one child each
      EgressControl    the decision; denials answered here; the last guard before any upstream connection;
                       where it allows a request, it runs once what an allow sets in motion:
        ProviderRouting  token budgets and Backends of the matched AIProviderRoute rule
        Credentials      provider keys injected on the upstream request
      Capture          bounded body capture on the pass-through (feeds the provider parser)
      UpstreamFailure  an upstream that failed before answering: clrk's JSON 502/504 instead of mitmproxy's page
      Recording        one record per transaction, handed to the recorder process
      Failsafe         last: nothing goes upstream without an allow decision, whatever failed above
    """

    name = "clrk"

    def __init__(self, rt: Runtime | None = None):
        self.rt = rt = rt or Runtime()
        self.policy = PolicyLoader(rt)
        self.auth = ProxyAuth(rt)
        self.passthrough = Passthrough(rt)
        self.providers = Providers(rt)
        self.websocket = WebSocketSessions(rt)
        self.mcp = McpTraffic(rt)
        self.egress = EgressControl(rt)
        self.routing = ProviderRouting(rt)
        self.credentials = Credentials(rt)
        self.capture = Capture(rt)
        self.upstream = UpstreamFailure(rt)
        self.recording = Recording(rt)
        self.failsafe = Failsafe(rt)
        # What an allow decision sets in motion runs where the decision is made, once per request.
        self.egress.then_allowed(self.routing.route, self.credentials.inject)
        self.egress.read_mcp = self.mcp.read_request
        steps = (self.policy, self.auth, self.passthrough, self.providers, self.websocket, self.mcp, self.egress, self.capture,
                 self.upstream, self.recording, self.failsafe)
        self.steps: dict[str, tuple[Step, ...]] = {
            hook: tuple(getattr(s, hook) for s in steps if callable(getattr(s, hook, None))) for hook in TRAFFIC_HOOKS
        }
        # What an ordinary request does not reach is not called for it: a step's hook marked `switch_only` acts
        # on a 101 answer alone, one marked `websocket_only` on a WebSocket handshake alone (Transaction.websocket).
        self._not_switched = tuple(s for s in self.steps["responseheaders"] if not getattr(s, "switch_only", False))
        self._not_websocket = tuple(s for s in self.steps["request"] if not getattr(s, "websocket_only", False))
        # and one marked `encoded_only` on a request body sent with a Content-Encoding alone.
        self._plain_body = tuple(s for s in self._not_websocket if not getattr(s, "encoded_only", False))
        # requestheaders: the first step (ProxyAuth) starts the Transaction; after it, a step marked `upgrade_only`
        # runs only for a request that carries an Upgrade header (or whose headers were not indexed).
        first, *rest = self.steps["requestheaders"]
        self._rh_first, self._rh_rest = first, tuple(rest)
        self._rh_no_upgrade = tuple(s for s in rest if not getattr(s, "upgrade_only", False))

    # Lifecycle: errors here must reach mitmproxy (an invalid policy at start-up stops the gateway).

    def load(self, loader) -> None:
        self.policy.load(loader)

    def configure(self, updated: set[str]) -> None:
        self.policy.configure(updated)

    async def running(self) -> None:
        await self.policy.running()
        await self.recording.running()
        # What start-up built (mitmproxy, every module, the policy) lives as long as the process: frozen, it is
        # left out of the collector's full passes, which otherwise walk those ~100k objects every few thousand
        # requests (≈ 13 µs per request; docs/PERFORMANCE.md). Frozen objects are still freed by reference
        # counting (a replaced policy holds no cycles); only a cycle among them would outlive its use.
        gc.collect()  # what is garbage now is not frozen with the rest
        gc.freeze()

    async def done(self) -> None:
        self.policy.done()
        self.passthrough.done()  # open tunnels recorded before the last records are shipped
        self.websocket.done()  # and open WebSocket sessions
        await self.recording.done()

    # The three hooks that choose, per request, which of their steps it reaches; every other traffic hook runs
    # all the steps that have it (below).

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        first = self._rh_first
        try:
            pending = first(flow)
        except Exception:
            failed("requestheaders", first)
            pending = None
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        h = tx.req_h if tx is not None else None
        rest = self._rh_no_upgrade if h is not None and "upgrade" not in h else self._rh_rest
        return run_steps_after("requestheaders", first, rest, flow, pending)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.websocket:
            steps = self.steps["request"]
        elif tx.req_h is not None and tx.req_h.get("content-encoding"):
            steps = self._not_websocket
        else:
            steps = self._plain_body
        return run_steps("request", steps, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        resp = flow.response
        steps = self.steps["responseheaders"] if resp is None or resp.status_code == 101 else self._not_switched
        return run_steps("responseheaders", steps, flow)


def _traffic_hook(hook: str) -> Callable[[Gateway, Any], Awaitable[None] | None]:
    def run(self: Gateway, arg: Any) -> Awaitable[None] | None:
        return run_steps(hook, self.steps[hook], arg)

    run.__name__, run.__qualname__ = hook, f"Gateway.{hook}"
    return run


# Traffic hooks: each runs the steps that have it, one guard per step.
for _hook in TRAFFIC_HOOKS:
    if _hook not in Gateway.__dict__:
        setattr(Gateway, _hook, _traffic_hook(_hook))


addons = [Gateway()]
