"""Redaction of secrets before anything leaves the proxy: headers, URL query parameters and userinfo.

Applied once, when the record is built, so that every output downstream (DuckDB, OTLP, logs, CLI, TUI)
only ever sees redacted values.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

from clrk.attributes import REDACTED


def headers_dict(fields: Iterable[tuple[bytes, bytes]], sensitive: frozenset[str]) -> dict[str, str]:
    """Headers as {lower-case name: value}, repeated fields joined with ", ", sensitive values redacted."""
    out: dict[str, str] = {}
    for raw_name, raw_value in fields:
        name = raw_name.decode("latin-1").lower()
        value = REDACTED if name in sensitive else raw_value.decode("latin-1")
        if name in out:
            if name in sensitive:
                continue
            out[name] = f"{out[name]}, {value}"
        else:
            out[name] = value
    return out


def redact_url(url: str, sensitive_params: frozenset[str]) -> str:
    """The URL with userinfo removed and the values of sensitive query parameters replaced."""
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
