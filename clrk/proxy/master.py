"""The gateway process `clrk run` and `clrk dev` start: `python -O -m clrk.proxy [mitmdump options]`.

It is mitmdump — the same command line, options, master and default addons — with clrk's `Gateway` put in
the addon chain directly, where `mitmdump -s addons/clrk.py` would load it (right before the scripts
mitmproxy's ScriptLoader runs, so every hook runs in the same order as with `-s`, and before any other
`-s` script), at the same moment (once every option is final).
`mitmdump -s addons/clrk.py` keeps working; this entry is what the product runs, for two measured reasons
(docs/PERFORMANCE.md):

- A script's addons are reached through three more levels of mitmproxy's addon traversal (ScriptLoader →
  Script → the script module → its `addons`), walked by a nested generator for every hook of every
  request.
- `-O`: mitmproxy type-checks every HTTP message it builds (`MessageData.__post_init__`, under
  `if __debug__`) and checks event types on every protocol-layer call (`proxy.utils.expect`); both are
  written as debug checks, with the `-O` branch as the production one. clrk's own code keeps no check in
  an `assert`: every assert in it only narrows a type for the type checker.
"""

from __future__ import annotations

import sys

from mitmproxy import exceptions, hooks
from mitmproxy.tools import cmdline
from mitmproxy.tools import main as mitmproxy_main
from mitmproxy.tools.dump import DumpMaster

from clrk.proxy.gateway import Gateway
from clrk.proxy.hookplan import PlannedAddonManager


class GatewayMaster(DumpMaster):
    """mitmdump's master with `Gateway` registered as `mitmdump -s addons/clrk.py` would have it: once the
    command line and config.yaml are applied, sent a configure of every option, and placed where the first
    `-s` script sits — before ScriptLoader, so clrk's hooks still run before any user script's. Its events are
    dispatched from a plan (`clrk.proxy.hookplan`), not by searching all of mitmdump's addons for each."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        PlannedAddonManager.adopt(self.addons)

    def add_gateway(self) -> Gateway:
        addons = self.addons
        gateway = Gateway()
        addons.chain.insert(addons.chain.index(addons.get("scriptloader")), addons.register(gateway))
        addons.invoke_addon_sync(gateway, hooks.ConfigureHook(set(self.options.keys())))
        return gateway

    async def run(self) -> None:
        try:
            self.add_gateway()
        except exceptions.OptionsError as e:  # an invalid policy at start: say so and stop, as mitmdump does
            print(e, file=sys.stderr)
            sys.exit(1)
        await super().run()


def _filter_options(args) -> dict:
    """mitmdump's handling of a trailing flow filter (`mitmdump ... '~d example.com'`)."""
    if args.filter_args:
        f = " ".join(args.filter_args)
        return {"save_stream_filter": f, "readfile_filter": f, "dumper_filter": f}
    return {}


def main(argv: list[str] | None = None) -> None:
    mitmproxy_main.run(GatewayMaster, cmdline.mitmdump, sys.argv[1:] if argv is None else argv, _filter_options)


if __name__ == "__main__":
    main()
