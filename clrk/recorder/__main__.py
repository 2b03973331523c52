"""`python -m clrk.recorder`: started by the gateway, not by hand."""

import sys

from clrk.recorder.service import main

sys.exit(main())
