"""Hostnames and paths in the one form rules and requests are compared in."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

import idna

from clrk.memo import LIMIT, LONGEST, remember


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
    """The one form every host name is compared in, rules and requests alike: lower-case, no trailing dot,
    IPv6 without brackets, IP literals canonical, internationalised names as IDNA 2008 A-labels (UTS #46
    mapping, non-transitional: `straße.de` is `xn--strae-oqa.de`, not `strasse.de` as IDNA 2003 had it).
    A name IDNA refuses is kept lower-cased: it matches no rule (rules are refused unless in this form)."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h and (h[0].isdigit() or ":" in h):
        ip = canonical_ip(h)
        if ip is not None:
            return ip
    if not h.isascii():
        try:
            h = idna.encode(h, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            pass
    return h


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What servers read differently, lower-cased (escapes are compared lower-cased): a separator that is not '/',
# an escaped separator or escape character (decoded once by some servers, twice by others, never by more),
# parameters, a NUL.
_AMBIGUOUS = (("\\", "a backslash"), (";", "a ';' parameter"), ("%2f", "an encoded '/'"), ("%5c", "an encoded '\\'"),
              ("%25", "an encoded '%'"), ("%00", "an encoded NUL"), ("//", "an empty segment ('//')"))


def normalize_path(path: str) -> str:
    """The path without query or fragment, escapes of unreserved characters decoded (RFC 3986 §6.2.2.2:
    `%7E` is `~` to every server) and dot segments resolved (§5.2.4). This is the form path rules are matched
    in; whether a server could read the path otherwise is `path_ambiguity`'s question."""
    p = path.split("?", 1)[0].split("#", 1)[0]
    if "%" in p:
        p = _ESCAPE.sub(_unescape_unreserved, p)
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


_SLASHES = re.compile(r"/{2,}")
_LOOSE: dict[str, str] = {}  # path -> its loose reading (clrk.memo: bounded; asked once per provider call)


def loose_path(path: str) -> str:
    """The most forgiving reading a server may take of `path` (escapes decoded, dot segments resolved, repeated
    slashes collapsed): for questions answered fail-closed, such as "might the provider see a batch endpoint?"."""
    known = _LOOSE.get(path)
    if known is None:
        known = remember(_LOOSE, path, len(path), _SLASHES.sub("/", normalize_path(path)))
    return known


def _unescape_unreserved(m: re.Match) -> str:
    c = chr(int(m.group(1), 16))
    return c if c in _UNRESERVED else m.group(0).upper()


def path_ambiguity(path: str) -> str | None:
    """Why servers may disagree on which resource `path` names, or None. Rules limited by path refuse such
    requests (an allow route does not allow them, a deny rule denies them) rather than guess one reading:
    dot segments (also escaped), '//', backslashes, ';' parameters, escaped '/', '\\', '%' or NUL, and
    anything but a path ('*', an absolute URL)."""
    p = path.split("?", 1)[0].split("#", 1)[0]
    if not p.startswith("/"):
        return "it is not an absolute path"
    low = p.lower()
    for needle, what in _AMBIGUOUS:
        if needle in low:
            return f"it contains {what}"
    if "%" in p:
        p = _ESCAPE.sub(_unescape_unreserved, p)
    if "/." in p and any(seg in (".", "..") for seg in p.split("/")):
        return "it contains a dot segment ('.' or '..')"
    if not p.isascii() or not p.isprintable():
        return "it contains bytes that are not printable ASCII"
    return None


_PATHS: dict[str, tuple[str, str | None]] = {}  # path_facts of the paths seen (clrk.memo: bounded)
PATHS_MAX, PATH_CACHED_MAX = LIMIT, LONGEST


def path_facts(path: str) -> tuple[str, str | None]:
    """(`normalize_path`, `path_ambiguity`) of a request target, worked out once per distinct path (neither
    reads the query, so it is left out of the key; the memory is bounded, `clrk.memo`)."""
    p = path.partition("?")[0]
    known = _PATHS.get(p)
    if known is None:
        known = remember(_PATHS, p, len(p), (normalize_path(p), path_ambiguity(p)))
    return known


_NOT_IN_HOST = re.compile(r"[/@?#\\ \t]")


def _authority(text: str, default_port: int) -> tuple[str, int] | None:
    """(host in normal form, port) of a Host value or :authority, or None when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:  # no port, or the colon was inside an IPv6 literal
        host, port = text, ""
    if port:
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
            return None
    if not host or _NOT_IN_HOST.search(host):
        return None
    return norm_host(host), int(port) if port else default_port


def request_target(dst: str, default_port: int, authority: str, hosts: Sequence[str], path: str,
                   method: str) -> tuple[str | None, int | None, str | None]:
    """The destination a request names inside, and why it is not one clear destination (else None).

    Every name counts: the authority of an absolute-form request line or HTTP/2 `:authority`, and each Host
    field; they must agree with one another (the caller then compares them with the connection's target).
    A request naming no host, carrying several Host fields, or whose target is not a path (an absolute URL
    in `:path`, a network-path reference `//host/...`) is refused rather than guessed at: an upstream or a
    CDN in front of it may read a different name than the gateway judged."""
    if len(hosts) > 1:
        return None, None, f"the request carries {len(hosts)} Host headers"
    if not path.startswith("/"):
        if not (path == "*" and method == "OPTIONS"):
            return None, None, f"the request target {path[:200]!r} is not a path"
    elif path.startswith("//"):
        return None, None, f"the request path {path[:200]!r} begins with '//' (a reference to another host)"
    if not authority and hosts:  # the usual HTTP/1.1 request: one Host field (no list of names to compare)
        claim = _claim(hosts[0], dst, default_port)
        if claim is None:
            return None, None, f"{hosts[0][:200]!r} is not a host name"
        return claim[0], claim[1], None
    names = [authority, *hosts] if authority else list(hosts)
    if not names:
        return None, None, "the request names no host (it has no Host header)"
    first: tuple[str, int] | None = None
    for name in names:
        claim = _claim(name, dst, default_port)
        if claim is None:
            return None, None, f"{name[:200]!r} is not a host name"
        if first is None:
            first = claim
        elif claim != first:
            return None, None, f"the request names two hosts: {names[0][:200]} and {name[:200]}"
    assert first is not None
    return first[0], first[1], None


_CLAIMS: dict[tuple[str, str, int], tuple] = {}  # _claim's answers, () for None (clrk.memo: bounded)


def _claim(name: str, dst: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) a Host value or authority names, or None when it is not one: worked out once per distinct
    (name, destination, default port), the same few on every request of a tunnel."""
    if name == dst:
        return dst, default_port
    key = (name, dst, default_port)
    known = _CLAIMS.get(key)
    if known is None:
        known = remember(_CLAIMS, key, len(name) + len(dst), _claim_of(name, dst, default_port) or ())
    return known or None


def _claim_of(name: str, dst: str, default_port: int) -> tuple[str, int] | None:
    if name.startswith(dst) and name[len(dst)] == ":" and (p := name[len(dst) + 1:]).isdigit() and p.isascii() \
            and len(p) <= 5 and 0 < int(p) < 65536:
        return dst, int(p)  # the usual "host:port", without parsing
    return _authority(name, default_port)
