"""The addon list mitmproxy loads (`mitmdump -s addons/clrk.py`, or `clrk run`), in data-path order."""

from clrk.addons import Capture, EgressControl, PolicyLoader, Providers, ProxyAuth, Recording
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
]
