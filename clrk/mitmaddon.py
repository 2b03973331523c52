"""The addon list mitmproxy loads (`mitmdump -s addons/clrk.py`, or `clrk run`)."""

from clrk.addons import Capture, EgressControl, PolicyLoader, Providers, ProxyAuth, Recording, Runtime

_runtime = Runtime()

addons = [
    PolicyLoader(_runtime),
    ProxyAuth(_runtime),
    EgressControl(_runtime),
    Providers(_runtime),
    Capture(_runtime),
    Recording(_runtime),
]
