"""`python -m clrk.recorder`: started by the gateway, not by hand."""

import sys

from clrk.recorder.lock import HELD, lock_store, socket_argument

# Before importing the store and the exporters: a recorder that is not needed leaves at once.
_socket = socket_argument(sys.argv[1:])
if _socket is not None and lock_store(_socket) is None:
    sys.exit(HELD)

from clrk.recorder.service import main  # noqa: E402

sys.exit(main())
