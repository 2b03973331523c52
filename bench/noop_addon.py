"""The do-nothing addon of the contract's like-for-like throughput: `mitmdump -s bench/noop_addon.py` against
`mitmdump -s addons/clrk.py`. It has every traffic hook clrk's Gateway has, and is loaded the same way, with
the same imports (clrk's patches of mitmproxy included), so the difference is clrk's own work per request.
"""

import os
import sys

_repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _repo not in sys.path:
    sys.path.insert(0, _repo)

from clrk.proxy.gateway import TRAFFIC_HOOKS  # noqa: E402


class Noop:
    name = "clrk"


for _hook in TRAFFIC_HOOKS:
    setattr(Noop, _hook, lambda self, arg: None)

addons = [Noop()]
