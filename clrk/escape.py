r"""How records carry text that is not clean UTF-8, and how they are printed to a terminal.

Stored: one lossless escape. Every text field of a record is valid UTF-8. Where the bytes behind a field
are not (the URL path, the method, header names and values, the invocation id, as the agent or the upstream
sent them), each byte outside a valid UTF-8 sequence is written `\xNN` (two lower-case hex digits) and, in
that field only, each backslash is written `\\`. The record names such fields in `clrk.record.escaped`
(`request.headers` / `response.headers` for every name and value of that side), so the original bytes are
`unescape(value)` for a listed field and `value.encode()` for any other.

Text the proxy holds as a Python str that UTF-8 cannot encode is first turned back into bytes (`to_bytes`):
U+DC80..U+DCFF as the byte they stand for (mitmproxy and Python decode undecodable bytes that way,
"surrogateescape"), any other lone surrogate (a JSON "\ud800" escape in a body) as its 3-byte form
("surrogatepass"); then it is escaped as above. A model named "\ud800" is recorded as `\xed\xa0\x80`.

Bodies keep their own scheme: UTF-8 text, or base64 for both sides when either is not (`clrk.body.b64`).
NUL and other control characters are valid UTF-8 and stored as they are.

Printed: `printable` (table lines) and `json_line` (JSON lines) make sure no record can start a new line,
move the cursor or send an escape sequence to a terminal: C0 controls (newlines included), DEL, C1 controls
(U+009B is a CSI on its own), the Unicode line and paragraph separators and the bidirectional overrides and
isolates are shown as `\xNN` (below U+0080) or `\uNNNN`. JSON output stays valid JSON with the same values.
"""

from __future__ import annotations

import codecs
import json
import re


def _surrogates(exc: UnicodeError) -> tuple[bytes, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start:exc.end]:
        cp = ord(ch)
        # An undecodable byte Python decoded with surrogateescape goes back to being that byte.
        out += bytes((cp - 0xDC00,)) if 0xDC80 <= cp <= 0xDCFF else ch.encode("utf-8", "surrogatepass")
    return bytes(out), exc.end


codecs.register_error("clrk.surrogates", _surrogates)


def to_bytes(s: str) -> bytes:
    """The bytes a str stands for: UTF-8, its surrogates as described in the module docstring."""
    return s.encode("utf-8", "clrk.surrogates")


def text(data: bytes | bytearray | memoryview | str, force: bool = False) -> tuple[str, bool]:
    """(the stored text of `data`, whether it had to be escaped). `force` escapes (backslashes doubled) even
    valid UTF-8: every piece of a field is escaped alike once one piece needs it."""
    if isinstance(data, str):
        if not force:
            return data, False
        data = data.encode()
    elif not force:
        try:
            return str(data, "utf-8"), False
        except UnicodeDecodeError:
            pass
    # Backslash is ASCII, never inside a multi-byte sequence: doubling it first keeps `\xNN` unambiguous.
    return bytes(data).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace"), True


_UNESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def unescape(value: str) -> bytes:
    """The original bytes of a field listed in `clrk.record.escaped` (the inverse of `text`)."""
    out = bytearray()
    pos = 0
    for m in _UNESCAPE.finditer(value):
        out += value[pos:m.start()].encode()
        g = m.group(1)
        out += b"\\" if g == "\\" else bytes((int(g[1:], 16),))
        pos = m.end()
    out += value[pos:].encode()
    return bytes(out)


# --------------------------------------------------------------------------- terminal

_UNSAFE = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
           *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_PRINTABLE = {cp: (f"\\x{cp:02x}" if cp < 0x80 else f"\\u{cp:04x}") for cp in _UNSAFE}
_BLOCK = {cp: v for cp, v in _PRINTABLE.items() if cp not in (0x09, 0x0A)}
# In JSON, json.dumps already escapes C0; the rest (and any stray surrogate) become \u escapes of the same value.
_JSON_SAFE = {cp: f"\\u{cp:04x}" for cp in [*_UNSAFE[0x20:], *range(0xD800, 0xE000)]}


def printable(s: str) -> str:
    """`s` with every character that could break a line or drive a terminal shown as an escape."""
    return s.translate(_PRINTABLE)


def printable_block(s: str) -> str:
    """Like `printable`, but keeps newlines and tabs: for a body shown as a block of its own."""
    return s.translate(_BLOCK)


def json_line(obj) -> str:
    """One JSON object on one line, terminal-safe, readable (non-ASCII text stays as it is)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).translate(_JSON_SAFE)
