"""`python -O -m clrk.proxy [mitmdump options]`: the gateway process `clrk run` and `clrk dev` start
(`clrk.launch`). See `clrk.proxy.master`."""

from clrk.proxy.master import main

main()
