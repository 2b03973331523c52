"""mitmdump entry point: `mitmdump -s addons/clrk.py` from the repo root, with the clrk package installed."""

import os
import sys

# mitmproxy puts this file's directory first on sys.path, where "clrk" would name this very file, not
# the package: take it off before importing the package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
if getattr(sys.modules.get("clrk"), "__file__", None) == os.path.abspath(__file__):
    del sys.modules["clrk"]

from clrk.proxy.gateway import addons  # noqa: E402,F401  (mitmproxy reads the module-level `addons` list)
