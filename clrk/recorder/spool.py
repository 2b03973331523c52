"""The recorder's spool for a store that is a server (ClickHouse): records that could not be written wait
here on local disk as well as in memory, appended in the order received, so a recorder that stops or is
killed while the server is away loses none of them; the next recorder for the same store sends them first.
The file is removed once they are written. Records are msgpack maps, one after another."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgpack

log = logging.getLogger("clrk.recorder")


MAX_BYTES = 1 << 30  # past this the file takes no more: what does not fit waits in memory only


class Spool:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._full_logged = False

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, rows: Iterable[Mapping]) -> bool:
        """Appends `rows` (durably: fsynced); False when the file is at its bound and took none."""
        data = b"".join(msgpack.packb(dict(r), use_bin_type=True) for r in rows)
        if not data:
            return True
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size + len(data) > self.max_bytes:
            if not self._full_logged:
                log.error("spool %s is full (%d bytes): further records wait in memory only", self.path, size)
                self._full_logged = True
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def load(self) -> list[dict]:
        """The spooled records in the order they came; a torn last record (a crash mid-write) is left out."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out: list[dict] = []
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data)
        try:
            for row in unpacker:
                if isinstance(row, dict):
                    out.append(row)
        except Exception as e:  # a torn tail: what precedes it is whole
            log.warning("spool %s ends in a partial record (%s); %d whole records read", self.path, e, len(out))
        return out

    def clear(self) -> None:
        self._full_logged = False
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
