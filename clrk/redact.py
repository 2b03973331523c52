"""Redaction of secrets before anything leaves the proxy: headers, URL query parameters and userinfo.

Applied once, when the record is built, so that every output downstream (DuckDB, OTLP, logs, CLI, TUI)
only ever sees redacted values.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

from clrk import escape
from clrk.attributes import REDACTED

MAX_HEADER_VALUE = 8 * 1024  # characters of one header value kept in a record
MAX_HEADERS_TOTAL = 64 * 1024  # characters of all of one side's header names and values kept in a record
MAX_URL = 16 * 1024  # characters of url.full kept in a record


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…[{len(text) - limit} more characters not recorded]"


def headers_dict(fields: Iterable[tuple[bytes, bytes]], sensitive: frozenset[str]) -> dict[str, str]:
    """Headers as {lower-case name: value} (see `decode_headers`)."""
    return decode_headers(fields, sensitive)[0]


class _NeedsEscape(Exception):
    pass


def decode_headers(fields: Iterable[tuple[bytes, bytes]], sensitive: frozenset[str]) -> tuple[dict[str, str], bool]:
    """(headers as {lower-case name: value}, whether they were escaped). Repeated fields are joined with ", ",
    sensitive values redacted. Names and values are UTF-8; if any is not, every name and value of this side is
    escaped (`clrk.escape`). Bounded like the bodies: a value past MAX_HEADER_VALUE is cut, and past
    MAX_HEADERS_TOTAL in all the remaining headers are left out (an agent's 2 MB header must not become a 2 MB
    record)."""
    fields = [(bytes(k), bytes(v)) for k, v in fields]
    try:
        return _headers(fields, sensitive, False), False
    except _NeedsEscape:
        return _headers(fields, sensitive, True), True


def _decode(data: bytes, force: bool) -> str:
    s, escaped = escape.text(data, force)
    if escaped and not force:
        raise _NeedsEscape
    return s


def _headers(fields: list[tuple[bytes, bytes]], sensitive: frozenset[str], force: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    total = 0
    left_out = 0
    for raw_name, raw_value in fields:
        name = _cut(_decode(raw_name.lower(), force), 256)
        value = REDACTED if name in sensitive else _cut(_decode(raw_value, force), MAX_HEADER_VALUE)
        if total + len(name) + len(value) > MAX_HEADERS_TOTAL:
            left_out += 1
            continue
        if name in out:
            if name in sensitive:
                continue
            value = _cut(f"{out[name]}, {value}", MAX_HEADER_VALUE)
            total -= len(out[name])
        total += len(name) + len(value)
        out[name] = value
    if left_out:
        out["(clrk)"] = f"{left_out} more header field(s) not recorded: over {MAX_HEADERS_TOTAL} characters in all"
    return out


def redact_url(url: str, sensitive_params: frozenset[str]) -> str:
    """The URL with userinfo removed and the values of sensitive query parameters replaced (then bounded)."""
    return _cut(_redact_url(url, sensitive_params), MAX_URL)


def _redact_url(url: str, sensitive_params: frozenset[str]) -> str:
    scheme_sep = url.find("://")
    if scheme_sep != -1:
        auth_start = scheme_sep + 3
        auth_end = len(url)
        for ch in "/?#":
            i = url.find(ch, auth_start)
            if i != -1:
                auth_end = min(auth_end, i)
        at = url.rfind("@", auth_start, auth_end)
        if at != -1:
            url = url[:auth_start] + url[at + 1 :]
    q = url.find("?")
    if q == -1:
        return url
    frag = url.find("#", q)
    query = url[q + 1 : frag if frag != -1 else len(url)]
    if not query:
        return url
    parts = []
    changed = False
    for item in query.split("&"):
        name, sep, _ = item.partition("=")
        if unquote(name).lower() in sensitive_params:
            parts.append(f"{name}={quote(REDACTED)}")
            changed = True
        else:
            parts.append(item)
    if not changed:
        return url
    return url[: q + 1] + "&".join(parts) + (url[frag:] if frag != -1 else "")
