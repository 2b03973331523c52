"""The addon mitmproxy loads (`mitmdump -s addons/clrk.py`, or `clrk run`): one parent, one child per job."""

from clrk.addons import Capture, EgressControl, PolicyLoader, Providers, ProxyAuth, Recording
from clrk.routing import Credentials, ProviderRouting
from clrk.runtime import Runtime


class Clrk:
    """clrk's addons, in data-path order, as the children of one addon.

    mitmproxy dispatches every event to each top-level addon through its own context manager and coroutine
    (a few µs each, on the single proxy thread, for every one of ~20 events a request raises); as children
    of one parent they cost one such dispatch plus an attribute lookup each. Measured: 8 top-level addons
    cost ~200 µs of proxy CPU per request more than this (docs/PERFORMANCE.md).
    """

    name = "clrk"

    def __init__(self) -> None:
        rt = Runtime()
        self.addons = [
            PolicyLoader(rt),
            ProxyAuth(rt),
            Providers(rt),
            EgressControl(rt),
            ProviderRouting(rt),
            Credentials(rt),
            Capture(rt),
            Recording(rt),
        ]


addons = [Clrk()]
