"""The top-level members of a JSON object, found without building the document.

A provider call's body can be 32 MiB of messages while the gateway needs a handful of small members (model,
stream, max tokens, n...). `members` walks the body with one regular expression that consumes each string in
C and stops at brackets, so the Python loop runs once per string or bracket, never per byte, and builds only
a dict of spans; small members are then parsed alone and large ones stand as `Elided`. The walk is bounded:
past `MAX_TOKENS` strings and brackets the body is "not readable within bounds" (None), like a body that is
not JSON at all. The same spans let a rewrite (`splice`) change one member and leave every other byte as the
agent sent it.
"""

from __future__ import annotations

import json
import re

MAX_TOKENS = 256 * 1024  # strings and brackets walked per body: ~0.2 s on the proxy's thread at worst
SMALL_MEMBER = 64 * 1024  # members up to this size are parsed; larger ones are Elided

_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_SCALAR = re.compile(rb"-?[0-9][0-9.eE+-]*|true|false|null|NaN|-?Infinity")  # what json.loads reads
_WS = re.compile(rb"[ \t\r\n]*")
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


class Elided:
    """A member too large to parse: what it is (`kind`, the first byte: `[`, `{` or `"`), its size, and for
    an array how many strings, arrays or objects it holds at its top (its scalars are not counted)."""

    __slots__ = ("kind", "size", "count")

    def __init__(self, kind: str, size: int, count: int):
        self.kind, self.size, self.count = kind, size, count

    def __repr__(self) -> str:
        return f"Elided({self.kind!r}, {self.size} bytes)"


class _TooComplex(Exception):
    pass


def members(body: bytes, max_tokens: int = MAX_TOKENS) -> dict[str, tuple[int, int, int]] | None:
    """{key: (start, end, top-level count)} of the object's members, or None when `body` is not one JSON
    object (or needs more than `max_tokens` strings and brackets to walk). Repeated keys: the last wins, as
    in `json.loads`."""
    budget = [max_tokens]
    n = len(body)
    pos = _WS.match(body, 0).end()
    if pos >= n or body[pos] != 0x7B:
        return None
    pos = _WS.match(body, pos + 1).end()
    out: dict[str, tuple[int, int, int]] = {}
    try:
        if pos < n and body[pos] == 0x7D:
            pos += 1
        else:
            while True:
                m = _STRING.match(body, pos)
                if m is None or m.end() - pos > 1024:
                    return None
                key = json.loads(body[pos:m.end()])
                pos = _WS.match(body, m.end()).end()
                if pos >= n or body[pos] != 0x3A:
                    return None
                start = pos = _WS.match(body, pos + 1).end()
                if pos >= n:
                    return None
                c, count = body[pos], 0
                if c == 0x22:
                    m = _STRING.match(body, pos)
                    if m is None:
                        return None
                    end = m.end()
                elif c in _OPEN:
                    end, count = _container(body, pos, budget)
                else:
                    m = _SCALAR.match(body, pos)
                    if m is None:
                        return None
                    end = m.end()
                out[key] = (start, end, count)
                pos = _WS.match(body, end).end()
                if pos < n and body[pos] == 0x2C:
                    pos = _WS.match(body, pos + 1).end()
                    continue
                if pos < n and body[pos] == 0x7D:
                    pos += 1
                    break
                return None
    except (_TooComplex, ValueError):
        return None
    return out if _WS.match(body, pos).end() == n else None


def _container(body: bytes, pos: int, budget: list[int]) -> tuple[int, int]:
    """(end, how many strings/arrays/objects sit directly inside) of the array or object opening at `pos`."""
    depth = count = 0
    left = budget[0]
    for m in _TOKEN.finditer(body, pos):
        left -= 1
        if left < 0:
            raise _TooComplex
        c = body[m.start()]
        if depth == 1 and c not in _CLOSE:
            count += 1
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                budget[0] = left
                return m.end(), count
    raise ValueError("unterminated")


def shallow_doc(body: bytes, spans: dict[str, tuple[int, int, int]], loads) -> dict:
    """The object with its small members parsed (by `loads`) and its large ones `Elided`."""
    doc: dict = {}
    for key, (a, b, count) in spans.items():
        doc[key] = loads(body[a:b]) if b - a <= SMALL_MEMBER else Elided(chr(body[a]), b - a, count)
    return doc


def splice(body: bytes, spans: dict[str, tuple[int, int, int]], edits: dict[str, object]) -> bytes:
    """`body` with the members in `edits` set to their new values (new members first in the object); every
    other byte stays as it was."""
    pieces, last = [], 0
    for key, (a, b, _) in sorted(((k, spans[k]) for k in edits if k in spans), key=lambda kv: kv[1][0]):
        pieces += [body[last:a], _encode(edits[key])]
        last = b
    pieces.append(body[last:])
    out = b"".join(pieces)
    added = [k for k in edits if k not in spans]
    if added:
        brace = out.index(b"{") + 1
        new = b",".join(_encode(k) + b":" + _encode(edits[k]) for k in added)
        out = out[:brace] + new + (b"," if spans else b"") + out[brace:]
    return out


def _encode(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
