"""The gateway process `clrk run` and `clrk dev` start: `python -O -m clrk.proxy [mitmdump options]`.

It is mitmdump — the same command line, options, master and default addons — with clrk's `Gateway` put in
the addon chain directly, where `mitmdump -s addons/clrk.py` would load it (`Gateway` then sits in the
same place, right after mitmproxy's ScriptLoader, so every hook runs in the same order as with `-s`).
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

from mitmproxy.tools import cmdline
from mitmproxy.tools import main as mitmproxy_main
from mitmproxy.tools.dump import DumpMaster

from clrk.mitmaddon import Gateway


class GatewayMaster(DumpMaster):
    """mitmdump's master with `Gateway` registered where ScriptLoader's scripts are traversed."""

    def __init__(self, options, **kwargs):
        super().__init__(options, **kwargs)
        addons = self.addons
        at = addons.chain.index(addons.get("scriptloader")) + 1
        addons.chain.insert(at, addons.register(Gateway()))


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
