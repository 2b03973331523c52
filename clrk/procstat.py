"""What Linux's /proc says of a process's memory: for the recorder's store, which watches its own growth, and
for `clrk status`, which shows a gateway's processes."""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident(pid: int | str = "self") -> int | None:
    """Resident memory of process `pid` (this one by default), bytes; None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
