from clrk.attributes import REDACTED, SENSITIVE_HEADERS, SENSITIVE_QUERY_PARAMS
from clrk.redact import headers_dict, redact_url


def test_sensitive_headers_are_redacted_and_repeats_joined():
    fields = [(b"Authorization", b"Bearer sk-1"), (b"Accept", b"a"), (b"accept", b"b"), (b"Set-Cookie", b"s=1"),
              (b"set-cookie", b"t=2"), (b"X-Goog-Api-Key", b"g"), (b"x-api-key", b"k"), (b"Cookie", b"c"),
              (b"Proxy-Authorization", b"Basic abc")]
    h = headers_dict(fields, SENSITIVE_HEADERS)
    assert h == {"authorization": REDACTED, "accept": "a, b", "set-cookie": REDACTED, "x-goog-api-key": REDACTED,
                 "x-api-key": REDACTED, "cookie": REDACTED, "proxy-authorization": REDACTED}


def test_query_secrets_and_userinfo_are_redacted():
    u = redact_url("https://user:pw@host/p?key=SECRET&x=1&API_KEY=s2&token=t#frag", SENSITIVE_QUERY_PARAMS)
    assert "SECRET" not in u and "s2" not in u and "pw" not in u and "=t#" not in u
    assert u.startswith("https://host/p?key=") and "&x=1&" in u and u.endswith("#frag")


def test_url_without_secrets_is_unchanged():
    u = "https://host/p?a=1&b=2"
    assert redact_url(u, SENSITIVE_QUERY_PARAMS) == u


def test_headers_and_urls_in_records_are_bounded():
    from clrk.redact import MAX_HEADER_VALUE, MAX_HEADERS_TOTAL, MAX_URL

    fields = [(b"X-Big", b"v" * 2_000_000), (b"Authorization", b"Bearer " + b"s" * 100_000)]
    fields += [(f"x-h{i}".encode(), b"w" * 4000) for i in range(40)]
    h = headers_dict(fields, SENSITIVE_HEADERS)
    assert h["x-big"].startswith("v" * MAX_HEADER_VALUE) and h["x-big"].endswith(f"[{2_000_000 - MAX_HEADER_VALUE} more characters not recorded]")
    assert h["authorization"] == REDACTED  # redacted whole, never cut into
    assert sum(len(k) + len(v) for k, v in h.items() if k != "(clrk)") <= MAX_HEADERS_TOTAL
    assert "header field(s) not recorded" in h["(clrk)"]
    # A repeated field joined past the bound is cut too.
    assert len(headers_dict([(b"a", b"x" * 6000), (b"a", b"y" * 6000)], frozenset())["a"]) < MAX_HEADER_VALUE + 64

    u = redact_url("https://h/p?" + "x=" + "1" * 100_000 + "&key=SECRET", SENSITIVE_QUERY_PARAMS)
    assert "SECRET" not in u and len(u) < MAX_URL + 64 and u.endswith("more characters not recorded]")
