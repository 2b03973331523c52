"""The addons mitmproxy loads (`mitmdump -s addons/clrk.py`, or `clrk run`), in data-path order.

They are separate top-level addons on purpose: mitmproxy runs each one's hook under its own error guard, so
an exception in one (a parser meeting hostile input, say) cannot skip the others' hooks — and `Failsafe`,
last, denies any request that reached the upstream side without an allow decision. (Children of a single
parent addon would share one guard and measurably save nothing: docs/PERFORMANCE.md.)
"""

from clrk.addons import Capture, EgressControl, Failsafe, PolicyLoader, Providers, ProxyAuth, Recording
from clrk.routing import Credentials, ProviderRouting
from clrk.runtime import Runtime

_runtime = Runtime()

addons = [
    PolicyLoader(_runtime),
    ProxyAuth(_runtime),
    Providers(_runtime),
    EgressControl(_runtime),
    ProviderRouting(_runtime),
    Credentials(_runtime),
    Capture(_runtime),
    Recording(_runtime),
    Failsafe(_runtime),
]
