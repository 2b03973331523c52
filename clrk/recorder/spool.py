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


class Spool:
    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, rows: Iterable[Mapping]) -> None:
        data = b"".join(msgpack.packb(dict(r), use_bin_type=True) for r in rows)
        if not data:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

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
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
