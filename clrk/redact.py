"""Redaction of secrets before anything leaves the proxy: header values, URL query parameters and userinfo,
and the values of secret-looking members of captured JSON and form bodies.

What is sensitive (one `Redactor` per gateway, built when the policy is loaded):
  - a header, query parameter, form field or JSON member whose name contains one of SENSITIVE_WORDS (key,
    token, secret, auth, password, signature, credential, session, cookie), in any case: `x-auth-token`,
    `private-token`, `x-amz-security-token`, `X-Amz-Signature`, `X-Amz-Credential`, `client_secret`, ...;
  - the explicit names of `clrk.attributes` (headers; query parameters and form fields, among them OAuth's
    `code`), every injected credential's header or parameter name, and what the gateway's
    `captureBody.redact` adds (`headers`, `queryParams`, and `jsonPaths` for JSON bodies).
In JSON, every string under a sensitive name is replaced, also inside the arrays and objects under it;
numbers, booleans and null are kept (`max_tokens`, `input_tokens`, `promptTokenCount` stay readable). Names
themselves are kept. A JSON member is sensitive by its name's words or by a jsonPath; the explicit query
names (`code`, `sig`) apply to URLs and form bodies only (a JSON `"code"` is usually an error code), and the
usage breakdowns of model APIs (`prompt_tokens_details`, `promptTokensDetails`: counts and modality labels)
are judged without that suffix.

Where: the proxy applies it when it takes a transaction's snapshot (`clrk.proxy.transaction.snapshot`), so nothing
unredacted is handed to the recorder process; the recorder redacts headers and URLs again when it builds
the record (a second line).

Cost: each distinct name is judged once per Redactor, then it is one dict lookup. A body is scanned only when
the pre-check (`may_hold_json_secrets`: one search for "token", the usage counts of model APIs, `"..._tokens":
12`, passed over inside the regex engine; one Aho-Corasick search for the other words, then one search per word
only if any occurs) sees a quoted name with a sensitive word followed by a string, array
or object, or the gateway has jsonPaths; it is rebuilt only when something is replaced. docs/PERFORMANCE.md
has the numbers.

Limits. The body scanner reads tokens (strings and brackets), not a parse tree, so JSON cut at maxBytes,
NDJSON and SSE `data:` lines are covered as well as whole documents: a string cut off at the end of the
capture is replaced whole if it sits under a sensitive name. Text that is not JSON is only searched for
`"name": value` pairs; a string is never read across a line break, so a stray quote cannot hide more than the
rest of its line. Not covered: multipart bodies, JSON in encodings other than UTF-8 (UTF-16/32), secrets
under names without a sensitive word (add them with `captureBody.redact`), secrets in free text, and a name
whose sensitive word itself is spelled with `\\u` escapes (`"\\u0074oken"`: no serializer writes ASCII
letters that way; the scanner decodes such names, but the pre-check does not look for them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import quote, unquote_plus

import ahocorasick_rs

from clrk import escape
from clrk.attributes import REDACTED, SENSITIVE_HEADERS, SENSITIVE_QUERY_PARAMS, SENSITIVE_WORDS
from clrk.memo import remember

MAX_HEADER_VALUE = 8 * 1024  # characters of one header value kept in a record
MAX_HEADERS_TOTAL = 64 * 1024  # characters of all of one side's header names and values kept in a record
MAX_URL = 16 * 1024  # characters of url.full kept in a record
CACHE_MAX = 4096  # names remembered per Redactor and kind; past it the cache starts over (hostile name floods)
CACHE_NAME_MAX = 256  # longer names are judged every time, not remembered

REDACTED_BYTES = REDACTED.encode()
_REDACTED_JSON = b'"' + REDACTED_BYTES + b'"'
_REDACTED_QUERY = quote(REDACTED)

_WORDS_RE = re.compile("|".join(SENSITIVE_WORDS))
_WORDS_BYTES = tuple(w.encode() for w in SENSITIVE_WORDS)
_VALUE_AFTER_NAME = re.compile(rb'\s*:\s*["\[{]')  # after a name's closing quote: a string, array or object follows
_OTHER_WORDS = tuple(w for w in _WORDS_BYTES if w != b"token")
# "token" where the pre-check would look further, in C: not where the name it sits in ends in letters, digits or
# underscores and is followed by a value that is no string, array or object (`"max_tokens": 5`, `"tokenCount":
# 3`: every usage count of a model API), nor where it ends a usage breakdown's name (`prompt_tokens_details"`).
# Either way the look further could only say no (`_VALUE_AFTER_NAME` needs `"`, `[` or `{` after the colon).
_TOKEN_WORD = re.compile(rb'token(?![a-z0-9_]*"\s*:\s*[^\s"\[{]|s_?details")').search
_COUNTS_TAILS = (b"s_details", b"sdetails")
# The other eight words are looked for together first (Aho-Corasick in Rust: leftmost-first matching lets it
# use its SIMD prefilter, ≈ 0.15 µs over a 280 B body where eight finds cost ≈ 1 µs, and ≈ 40x less over large
# ones). It only says whether any of them occurs: where one does, the finds below look as they always did.
_ANY_OTHER_WORD = ahocorasick_rs.BytesAhoCorasick(list(_OTHER_WORDS),
                                                  matchkind=ahocorasick_rs.MATCHKIND_LEFTMOST_FIRST).find_matches_as_indexes
# It lists every match it finds: a large body is searched in pieces (overlapping by a word's length less one,
# so no word is lost at a cut), so that a hostile one full of words makes lists of a few thousand at most.
_PIECE = 8 * 1024
_PIECE_OVERLAP = max(len(w) for w in _OTHER_WORDS) - 1
# Usage breakdowns of model APIs (prompt_tokens_details, promptTokensDetails, ...) hold counts and modality
# labels, not secrets: JSON names are judged without this suffix, so they stay readable and cost no scan.
_COUNTS_SUFFIXES = ("tokens_details", "tokensdetails")
_STR = rb'"[^"\\\n]*(?:\\.[^"\\\n]*)*'
_REST_OF_STRING = re.compile(_STR[1:])  # up to a string's closing quote (or the line break or end it never reaches)
# Tokens of the body scanner: a whole string (a member name when a colon follows), a string cut off by the
# end of the line or of the capture, a bracket, a comma. Numbers, literals and whitespace are skipped.
_TOKEN = re.compile(rb"(" + _STR + rb'")(\s*:)?|' + _STR + rb"\\?(?=\n|\Z)|[{}\[\],]")
_PAIR = re.compile(r"(?:^|(?<=[&;]))([^&;=]*)=([^&;]*)")

_QUOTE, _COMMA, _OBJ, _OBJ_END, _ARR_END = 0x22, 0x2C, 0x7B, 0x7D, 0x5D
_FORM_TYPE = "application/x-www-form-urlencoded"


def sensitive_json_name(name: str) -> bool:
    """Whether a JSON member name makes the strings under it secret: a sensitive word, outside the suffix of
    a model API's usage breakdown (`prompt_tokens_details` is not sensitive, `access_token_details` is)."""
    n = name.lower()
    if n.endswith(_COUNTS_SUFFIXES):
        n = n[: -len(_COUNTS_SUFFIXES[0])] if n.endswith(_COUNTS_SUFFIXES[0]) else n[: -len(_COUNTS_SUFFIXES[1])]
    return _WORDS_RE.search(n) is not None


def _any_other_word(low: bytes | bytearray) -> bool:
    """Whether any sensitive word other than "token" occurs in `low`."""
    n = len(low)
    if n <= _PIECE:
        return bool(_ANY_OTHER_WORD(low))
    with memoryview(low) as view:
        start = 0
        while start < n:
            if _ANY_OTHER_WORD(view[start:start + _PIECE]):
                return True
            start += _PIECE - _PIECE_OVERLAP
    return False


def may_hold_json_secrets(data: bytes | bytearray) -> bool:
    """The cheap pre-check before a body is scanned: whether a sensitive word sits in a quoted name followed by
    a string, array or object. Per word, a search over the lower-cased bytes, and per string that holds a
    word, one regex match to its closing quote and a look at what follows (each string is looked at once per
    word, however often the word repeats in it). May say yes for nothing (the scan then finds nothing);
    never says no for a plainly spelled name (one whose sensitive word is not written with \\u escapes)."""
    low = data.lower()
    n = len(low)
    end_of_string = _REST_OF_STRING.match
    value_after = _VALUE_AFTER_NAME.match
    # "token" by a regex that passes over the names it could never flag (`"prompt_tokens": 12`), from the
    # first occurrence a find sees (a find costs less than the regex over a body without the word)
    i = low.find(b"token")
    m = _TOKEN_WORD(low, i) if i != -1 else None
    while m is not None:
        i = m.start()
        q = end_of_string(low, i).end()  # the closing quote of the string the word is in, if it is in one
        if q >= n:
            break  # no quote after it: nothing can follow as a value
        if low[q] == _QUOTE and value_after(low, q + 1) is not None and low[i + 5:q] not in _COUNTS_TAILS:
            return True
        m = _TOKEN_WORD(low, q + 1)  # every other occurrence in this string has the same ending
    if not _any_other_word(low):
        return False
    find = low.find
    for w in _OTHER_WORDS:
        i = find(w)
        while i != -1:
            q = end_of_string(low, i).end()
            if q >= n:
                break
            if low[q] == _QUOTE and value_after(low, q + 1) is not None:
                return True
            i = find(w, q + 1)
    return False


# --------------------------------------------------------------------------- JSON paths

JsonPath = tuple[str | int | None, ...]  # member name, array index, or None for any member or element

_SEGMENT = re.compile(r"""\.\*|\[\*\]|\.([^.\[\]'"*\s]+)|\[(\d{1,9})\]|\['([^'\\]*)'\]|\["([^"\\]*)"\]""")


def parse_json_path(text: str) -> JsonPath:
    """The selectors of a JSONPath of the supported subset: `$` (the whole body), `.name`, `['name']`,
    `[*]` or `.*` (any member or element), `[N]` (the element at index N). Raises ValueError saying what
    is wrong and what is supported."""
    supported = "supported: $, .name, ['name'], [*] or .*, [N] (e.g. $.credentials.* or $.items[*].secretValue)"
    p = text.strip()
    if not p.startswith("$"):
        raise ValueError(f"{text!r} must start with '$' (the whole body); {supported}")
    out: list[str | int | None] = []
    i = 1
    while i < len(p):
        if p.startswith("..", i):
            raise ValueError(f"{text!r}: recursive descent ('..') is not supported (a name with a sensitive word "
                             f"is redacted at any depth already); spell the path out; {supported}")
        m = _SEGMENT.match(p, i)
        if m is None:
            raise ValueError(f"{text!r}: cannot read {p[i:]!r}; {supported}")
        name, index, q1, q2 = m.groups()
        if index is not None:
            out.append(int(index))
        elif name is not None or q1 is not None or q2 is not None:
            out.append(name if name is not None else q1 if q1 is not None else q2)
        else:
            out.append(None)
        i = m.end()
    return tuple(out)


def _step(paths: tuple[JsonPath, ...], states: tuple, key: str | int) -> tuple[bool, tuple]:
    """Advances partial path matches over one member name (str) or array index (int): (a path ends here,
    the partial matches that go on below it)."""
    full = False
    out = []
    for i, pos in states:
        sel = paths[i][pos]
        if sel is None or sel == key:
            if pos + 1 == len(paths[i]):
                full = True
            else:
                out.append((i, pos + 1))
    return full, tuple(out)


def _json_name(raw: bytes) -> str | None:
    """A member name token (with its quotes) as text; None when its escapes are not valid JSON."""
    inner = raw[1:-1]
    if b"\\" not in inner:
        return inner.decode("utf-8", "replace")
    try:
        return json.loads(raw)
    except ValueError:
        return None


# --------------------------------------------------------------------------- the Redactor


class Redactor:
    """What one gateway redacts: names by SENSITIVE_WORDS and explicit sets, JSON members by jsonPaths.
    Judgements are cached per distinct name as it appears on the wire."""

    __slots__ = ("header_names", "query_names", "json_paths", "_h", "_safe_h", "_q", "_k", "_root_states", "_root_full")

    def __init__(self, headers: Iterable[str] = (), query_params: Iterable[str] = (), json_paths: Iterable[str] = ()):
        self.header_names = frozenset(SENSITIVE_HEADERS | {h.strip().lower() for h in headers})
        self.query_names = frozenset(SENSITIVE_QUERY_PARAMS | {q.strip().lower() for q in query_params})
        self.json_paths = tuple(parse_json_path(p) for p in json_paths)
        self._h: dict[bytes | str, bool] = {}
        self._safe_h: set[bytes | str] = set()  # the names in _h judged not sensitive: `fields`' one test per field
        self._q: dict[str, bool] = {}
        self._k: dict[bytes, bool] = {}
        self._root_states = tuple((i, 0) for i, p in enumerate(self.json_paths) if p)
        self._root_full = any(not p for p in self.json_paths)

    # ---- names

    def header(self, name: bytes | str) -> bool:
        """Whether a header's value is redacted; `name` as sent (bytes or text, any case)."""
        s = self._h.get(name)
        if s is None:
            n = (name.decode("latin-1") if isinstance(name, bytes) else name).strip().lower()
            s = n in self.header_names or _WORDS_RE.search(n) is not None
            if len(self._h) >= CACHE_MAX:
                self._safe_h.clear()  # starts over with _h (`_remember`): never a name _h does not hold
            _remember(self._h, name, s)
            if not s and len(name) <= CACHE_NAME_MAX:
                self._safe_h.add(name)
        return s

    def query_param(self, name: str) -> bool:
        """Whether a query parameter's or form field's value is redacted; `name` as sent (percent-encoded)."""
        s = self._q.get(name)
        if s is None:
            n = unquote_plus(name).strip().lower()
            s = n in self.query_names or _WORDS_RE.search(n) is not None
            _remember(self._q, name, s)
        return s

    def _json_member(self, raw: bytes) -> bool:
        s = self._k.get(raw)
        if s is None:
            name = _json_name(raw)
            s = name is None or sensitive_json_name(name)  # undecodable: assume the worst
            _remember(self._k, raw, s)
        return s

    # ---- the parts of a transaction

    def fields(self, fields):
        """Header fields [(name, value), ...] with sensitive values replaced; the same object when none is."""
        safe = self._safe_h
        for name, _ in fields:  # most header blocks: every name judged before, none sensitive
            if name not in safe:
                break
        else:
            return fields
        header = self.header
        i = 0
        for name, _ in fields:
            if header(name):
                break
            i += 1
        else:
            return fields
        out = list(fields[:i])
        for name, value in fields[i:]:
            out.append((name, REDACTED_BYTES) if header(name) else (name, value))
        return out

    def path(self, path: str) -> str:
        """A request target (path and query) with sensitive query values replaced."""
        q = path.find("?")
        if q == -1:
            return path
        frag = path.find("#", q)
        query = path[q + 1:] if frag == -1 else path[q + 1:frag]
        red = _redact_pairs(query, self.query_param)
        if red is query:
            return path
        return path[: q + 1] + red + ("" if frag == -1 else path[frag:])

    def body(self, data: bytes | None, content_type: str | None) -> bytes | None:
        """A captured body with the values of sensitive JSON members (or form fields) replaced; the same
        object when nothing is."""
        if not data:
            return data
        # (len first: most content types are shorter than this one, and need no slice and lower-cased copy)
        if content_type is not None and len(content_type) >= 33 and content_type[:33].lower() == _FORM_TYPE:
            text = data.decode("latin-1")
            red = _redact_pairs(text, self.query_param)
            return data if red is text else red.encode("latin-1")
        if self.json_paths or may_hold_json_secrets(data):
            return self.json(data)
        return data

    def json(self, data: bytes) -> bytes:
        """Scans JSON text (whole, cut off, or several documents as in NDJSON or SSE) and replaces every string
        under a sensitive member name or a jsonPath. No pre-check: `body` does that."""
        paths = self.json_paths
        spans: list[tuple[int, int]] = []
        # One frame per open container: [is object, all sensitive, path states, next member sensitive,
        # next member's path states, array index]
        stack: list[list] = []
        loose = False  # a sensitive `"name":` outside any object (text that is not JSON) names the next value
        for m in _TOKEN.finditer(data):
            if m.group(2) is not None:  # a member name
                if not stack:
                    loose = self._json_member(m.group(1))
                else:
                    f = stack[-1]
                    raw = m.group(1)
                    sens = f[1] or self._json_member(raw)
                    states: tuple = ()
                    if f[2]:
                        name = _json_name(raw)
                        if name is not None:
                            full, states = _step(paths, f[2], name)
                            sens = sens or full
                    f[3], f[4] = sens, states
                continue
            start = m.start()
            c = data[start]
            if c == _COMMA:
                if stack and not stack[-1][0]:
                    stack[-1][5] += 1
                continue
            if c == _OBJ_END or c == _ARR_END:
                if stack:
                    stack.pop()
                continue
            # A value: a string (whole or cut off), or an object or array opening.
            if not stack:
                sens, states = self._root_full or loose, self._root_states
                loose = False
            else:
                f = stack[-1]
                if f[0]:
                    sens, states = f[3], f[4]
                else:
                    sens, states = f[1], ()
                    if f[2]:
                        full, states = _step(paths, f[2], f[5])
                        sens = sens or full
            if c == _QUOTE:
                if sens:
                    spans.append((start, m.end()))
            else:
                stack.append([c == _OBJ, sens, states, sens, (), 0])
        if not spans:
            return data
        out = []
        last = 0
        for a, b in spans:
            out.append(data[last:a])
            out.append(_REDACTED_JSON)
            last = b
        out.append(data[last:])
        return b"".join(out)


def _remember(cache: dict, key, value: bool) -> None:
    if len(key) > CACHE_NAME_MAX:
        return  # judged again next time: a cache of hostile 60 KB names would hold gigabytes
    if len(cache) >= CACHE_MAX:
        cache.clear()
    cache[key] = value


def _redact_pairs(query: str, sensitive: Callable[[str], bool]) -> str:
    """`name=value` pairs separated by & or ; with sensitive values replaced; the same object when none is."""
    if "=" not in query:
        return query
    changed = False

    def repl(m: re.Match) -> str:
        nonlocal changed
        if sensitive(m.group(1)):
            changed = True
            return f"{m.group(1)}={_REDACTED_QUERY}"
        return m.group(0)

    out = _PAIR.sub(repl, query)
    return out if changed else query


DEFAULT = Redactor()  # the defaults alone: for a transaction no gateway owns


# --------------------------------------------------------------------------- record building (recorder)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…[{len(text) - limit} more characters not recorded]"


def headers_dict(fields: Iterable[tuple[bytes, bytes]], redactor: Redactor) -> dict[str, str]:
    """Headers as {lower-case name: value} (see `decode_headers`)."""
    return decode_headers(fields, redactor)[0]


class _NeedsEscape(Exception):
    pass


def decode_headers(fields: Iterable[tuple[bytes, bytes]], redactor: Redactor) -> tuple[dict[str, str], bool]:
    """(headers as {lower-case name: value}, whether they were escaped). Repeated fields are joined with ", ",
    sensitive values redacted. Names and values are UTF-8; if any is not, every name and value of this side is
    escaped (`clrk.escape`). Bounded like the bodies: a value past MAX_HEADER_VALUE is cut, and past
    MAX_HEADERS_TOTAL in all the remaining headers are left out (an agent's 2 MB header must not become a 2 MB
    record)."""
    if type(fields) is list:
        try:
            return _headers(_known_headers(fields, redactor)), False
        except _Unusual:
            pass  # decoded the general way below, from the start
    fields = [(bytes(k), bytes(v)) for k, v in fields]
    try:
        return _headers(_decoded_headers(fields, redactor, False)), False
    except _NeedsEscape:
        return _headers(_decoded_headers(fields, redactor, True)), True


class _Unusual(Exception):
    pass


# Header names and values as decoded (UTF-8, names lower-cased, both cut as `_headers` cuts them), by their wire
# bytes: most repeat from record to record (content-type, host, user-agent, accept). Bounded (`clrk.memo`):
# short ones only, and the memory starts over past its limit, so a flood of distinct values holds < 1 MB.
_NAMES: dict[bytes, str] = {}
_VALUES: dict[bytes, str] = {}


def _known_headers(fields: list, redactor: Redactor) -> Iterator[tuple[str, bool, str]]:
    """`_decoded_headers(fields, redactor, False)` for fields that are [name bytes, value bytes] pairs of UTF-8,
    with the decodings from memory; raises _Unusual for anything else (a pair of another shape or type, a byte
    UTF-8 does not take), which the general way then decodes from the start."""
    names, values = _NAMES, _VALUES
    header = redactor.header
    for pair in fields:
        if (type(pair) is not list and type(pair) is not tuple) or len(pair) != 2:
            raise _Unusual
        raw_name, raw_value = pair
        if type(raw_name) is not bytes or type(raw_value) is not bytes:
            raise _Unusual
        name = names.get(raw_name)
        if name is None:
            text, escaped = escape.text(raw_name.lower())
            if escaped:
                raise _Unusual
            name = remember(names, raw_name, len(raw_name), _cut(text, 256), limit=1024, longest=128)
        sensitive = header(raw_name)
        if sensitive:
            value = REDACTED
        else:
            value = values.get(raw_value)
            if value is None:
                text, escaped = escape.text(raw_value)
                if escaped:
                    raise _Unusual
                value = remember(values, raw_value, len(raw_value), _cut(text, MAX_HEADER_VALUE), limit=2048,
                                 longest=256)
        yield name, sensitive, value


def _decode(data: bytes, force: bool) -> str:
    s, escaped = escape.text(data, force)
    if escaped and not force:
        raise _NeedsEscape
    return s


def _decoded_headers(fields: list[tuple[bytes, bytes]], redactor: Redactor, force: bool) -> Iterator[tuple[str, bool, str]]:
    for raw_name, raw_value in fields:
        sensitive = redactor.header(raw_name)
        yield (_cut(_decode(raw_name.lower(), force), 256), sensitive,
               REDACTED if sensitive else _cut(_decode(raw_value, force), MAX_HEADER_VALUE))


def _headers(decoded: Iterable[tuple[str, bool, str]]) -> dict[str, str]:
    """One side's headers from (name, sensitive, value) of each field, bounded: repeated names joined (a
    sensitive one's repeats dropped), past MAX_HEADERS_TOTAL characters in all the rest left out."""
    out: dict[str, str] = {}
    total = 0
    left_out = 0
    for name, sensitive, value in decoded:
        if total + len(name) + len(value) > MAX_HEADERS_TOTAL:
            left_out += 1
            continue
        if name in out:
            if sensitive:
                continue
            value = _cut(f"{out[name]}, {value}", MAX_HEADER_VALUE)
            total -= len(out[name])
        total += len(name) + len(value)
        out[name] = value
    if left_out:
        out["(clrk)"] = f"{left_out} more header field(s) not recorded: over {MAX_HEADERS_TOTAL} characters in all"
    return out


def redact_url(url: str, redactor: Redactor) -> str:
    """The URL with userinfo removed and the values of sensitive query parameters replaced (then bounded)."""
    return _cut(_redact_url(url, redactor), MAX_URL)


def _redact_url(url: str, redactor: Redactor) -> str:
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
    return redactor.path(url)

