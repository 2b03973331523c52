"""The like-for-like baseline of the throughput bench: mitmdump started exactly as the clrk gateway is
(`python -O`, the master of `clrk.proxy.master`, the addon registered where `Gateway` is), with a do-nothing
addon in Gateway's place that has every traffic hook Gateway has. clrk against this is clrk's own cost, with
the start-up, the interpreter flags and the price of being an addon the same on both sides.

    python -O bench/noop_proxy.py [mitmdump options]
"""

from __future__ import annotations

import sys

from mitmproxy import hooks
from mitmproxy.tools import cmdline
from mitmproxy.tools import main as mitmproxy_main

from clrk.proxy import master
from clrk.proxy.gateway import TRAFFIC_HOOKS


class Noop:
    name = "clrk"


for _hook in TRAFFIC_HOOKS:
    setattr(Noop, _hook, lambda self, arg: None)


class NoopMaster(master.GatewayMaster):
    def add_gateway(self):  # type: ignore[override]
        addons = self.addons
        noop = Noop()
        addons.chain.insert(addons.chain.index(addons.get("scriptloader")), addons.register(noop))
        addons.invoke_addon_sync(noop, hooks.ConfigureHook(set(self.options.keys())))
        return noop


if __name__ == "__main__":
    mitmproxy_main.run(NoopMaster, cmdline.mitmdump, sys.argv[1:], master._filter_options)
