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
