"""The proxy process: mitmproxy with clrk's `Gateway` addon (`python -O -m clrk.proxy`, or
`mitmdump -s addons/clrk.py`). Importing this package imports nothing: the CLI reads `clrk.proxy.budget`'s
day arithmetic without loading mitmproxy."""
