"""Incremental `text/event-stream` parsing (WHATWG HTML §9.2.6) for bytes split anywhere.

Lines end in CRLF, LF or CR (a CR at the end of a chunk waits to see whether LF follows); `:` lines are
comments; several `data:` lines join with LF; a blank line dispatches the event (none if it has no data).
A line longer than MAX_LINE is dropped and counted, so a hostile stream cannot grow memory without bound.
"""

from __future__ import annotations

import re

MAX_LINE = 4 * 1024 * 1024
_EOL = re.compile(rb"\r\n|\r|\n")


class SseParser:
    __slots__ = ("_buf", "_event", "_data", "_discarding", "dropped_lines", "events")

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[str] = []
        self._discarding = False
        self.dropped_lines = 0
        self.events = 0

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """Returns the (event type, data) pairs completed by this chunk; type "" means the default, message."""
        buf = self._buf + chunk if self._buf else chunk
        out: list[tuple[str, str]] = []
        pos = 0
        n = len(buf)
        for m in _EOL.finditer(buf):
            if m.group() == b"\r" and m.end() == n:
                break  # may be the first half of CRLF: wait for the next chunk
            line = buf[pos : m.start()]
            pos = m.end()
            if self._discarding:
                self._discarding = False
                continue
            self._line(line, out)
        rest = buf[pos:]
        if len(rest) > MAX_LINE:
            self._discarding = True
            self.dropped_lines += 1
            rest = b""
        self._buf = rest
        return out

    def _line(self, line: bytes, out: list[tuple[str, str]]) -> None:
        if not line:
            if self._data:
                out.append((self._event, "\n".join(self._data)))
                self.events += 1
            self._event = ""
            self._data = []
            return
        if line[0] == 0x3A:  # ":" comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        # "id" and "retry" do not matter to the gateway.
