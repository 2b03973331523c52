"""One recorder per store: an exclusive lock on a file beside the recorder's socket, taken before the socket
or the store is touched — and, run as `python -m clrk.recorder`, before the heavy imports (DuckDB, Arrow, the
OTel SDK): the workers of `clrk run --workers N` may each start a recorder at once, and all but one exit
at once, quietly, with HELD."""

from __future__ import annotations

import fcntl
import os

HELD = 3  # exit status: another recorder holds this store (or the store cannot be opened); the proxy knows

_held: dict[str, int] = {}  # lock file -> its fd, kept open for the process's life


def lock_store(socket_path: str) -> int | None:
    """The lock that makes this process the one recorder of the store served on `socket_path`
    (`<socket>.lock`, never removed: removing it would let two recorders lock two files). Its fd, kept open
    for the process's life (the kernel releases the lock at exit, however it ends), or None when another
    process holds it. Taking it again in the same process returns the same fd."""
    path = socket_path + ".lock"
    if path in _held:
        return _held[path]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _held[path] = fd
    return fd


def socket_argument(argv: list[str]) -> str | None:
    """The `--socket PATH` (or `--socket=PATH`) of a recorder command line, read without argparse."""
    for i, a in enumerate(argv):
        if a == "--socket" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--socket="):
            return a.split("=", 1)[1]
    return None
