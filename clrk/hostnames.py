"""Hostnames and paths in the one form rules and requests are compared in."""

from __future__ import annotations

import ipaddress
import re
import socket


def canonical_ip(h: str) -> str | None:
    """The address an IP literal stands for, in its one canonical spelling, or None for a name. Every form
    the resolver accepts counts: 2130706433, 0x7f000001, 017700000001 and 127.1 are all 127.0.0.1, and
    ::ffff:127.0.0.1 is that IPv4 address too."""
    if ":" in h:
        try:
            ip6 = ipaddress.IPv6Address(h.split("%", 1)[0])
        except ValueError:
            return None
        return str(ip6.ipv4_mapped) if ip6.ipv4_mapped else str(ip6)
    if h and h[0].isdigit() and _IPV4_CHARS.issuperset(h):
        try:
            return socket.inet_ntoa(socket.inet_aton(h))
        except OSError:
            return None
    return None


_IPV4_CHARS = frozenset("0123456789abcdefx.")


def norm_host(host: str) -> str:
    """Lower-case, no trailing dot, IPv6 without brackets, IP literals canonical: the form rules are in."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h and (h[0].isdigit() or ":" in h):
        ip = canonical_ip(h)
        if ip is not None:
            return ip
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return h


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")


def normalize_path(path: str) -> str:
    """The path a server would act on (RFC 3986 §6.2.2): escapes of unreserved characters and of '/' decoded,
    dot segments resolved, repeated slashes collapsed. `/repos/../user/keys`, `/repos/%2e%2e/user/keys`
    and `//user/keys` are all `/user/keys`, so neither an allow nor a deny rule can be walked around."""
    p = path.split("?", 1)[0].split("#", 1)[0]
    if "%" in p:
        p = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if chr(int(m.group(1), 16)) in _UNRESERVED else m.group(0).upper(), p)
    if "//" in p:
        p = re.sub(r"/{2,}", "/", p)
    if "/." not in p and not p.startswith("."):
        return p or "/"
    out: list[str] = []
    for seg in p.split("/")[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    trailing = p.endswith(("/", "/.", "/.."))
    return "/" + "/".join(out) + ("/" if trailing and out else "")
