"""error.type from the error texts mitmproxy and asyncio produce (the recorder's classification); records built
with hosts, URLs, methods and headers from memory are the records built afresh."""

import random

import pytest

from clrk import attributes as A
from clrk import redact
from clrk.recorder import expand as E
from clrk.recorder.expand import error_type
from clrk.redact import Redactor
from tests.test_otlp_wire import raw


@pytest.mark.parametrize("message,expected", [
    ("[Errno 111] Connect call failed ('127.0.0.1', 40000)", "connection_refused"),
    ("Connection refused", "connection_refused"),
    ("[Errno 113] Connect call failed ('10.0.0.9', 443)", "host_unreachable"),
    ("[Errno 101] Network is unreachable", "host_unreachable"),
    ("[Errno -2] Name or service not known", "dns_error"),
    ("[Errno -3] Temporary failure in name resolution", "dns_error"),
    ("timeout: the upstream did not answer within 600 s (tcp_timeout)", "timeout"),
    ("TLS handshake failed: certificate verify failed", "tls_error"),
    ("Client disconnected.", "client_disconnected"),
    ("server closed connection", "upstream_reset"),
    ("peer closed connection without sending complete message body (incomplete chunked read)", "upstream_reset"),
    ("clrk: connection to 10.0.0.1:443 is not allowed by policy", "policy_blocked"),
    ("Received invalid header name: b'x-\\x80' from client, refusing to prevent request smuggling attacks. "
     "Disable the validate_inbound_headers option to skip this security check.", "invalid_request"),
    ("Invalid request scheme: ftp", "invalid_request"),
    ("something else entirely", "upstream_error"),
])
def test_error_type(message, expected):
    assert error_type(message) == expected


# --------------------------------------------------------------------------- records built from memory

def _forget() -> None:
    for memory in (E._HOSTS, E._URLS, redact._NAMES, redact._VALUES):
        memory.clear()


def _outcome(r, red):
    try:
        return E.expand(r, red)
    except Exception as e:  # noqa: BLE001 - the same failure (and text: it becomes clrk.record.incomplete) each way
        return type(e), str(e)


def test_a_record_from_memory_is_the_record_built_afresh():
    """Hosts, URLs, methods and headers taken from memory give the record a first sight builds, to the value,
    escapes listed alike: wire-like and hostile hosts, ports, schemes, paths and methods, two redactors (one
    redacts `page`), CONNECT without a path."""
    rng = random.Random(5)
    hosts = ["api.github.com", "API.GitHub.com.", "[::1]", "127.000.0.1", "straße.de", "::ffff:10.0.0.1", "", None,
             b"bytes.example", "a" * 300]
    ports = [443, 80, 8443, True, "443", None]
    schemes = ["https", "http", None, "", b"https"]
    paths = [b"/repos?per_page=10&token=s3cret", b"/v1/chat/completions", "/p?page=2&x=1", b"/\xff\xfe?a=b",
             b"/a\\b", "/caf\u00e9", b"", ["/x"], 5, b"/" + b"q" * 600, b"/x?Page=3#frag?page=4"]
    methods = [b"GET", b"get", b"POST", "GET", b"CONNECT", "CONNECT", b"G\xffT", b"PaTcH", bytearray(b"PUT")]
    reds = [Redactor(), Redactor(query_params=["page"])]
    escaped_urls = 0
    for i in range(2500):
        if i % 400 == 0:
            _forget()
        r = raw(host=rng.choice(hosts), port=rng.choice(ports), scheme=rng.choice(schemes), path=rng.choice(paths),
                method=rng.choice(methods))
        if rng.random() < 0.05:
            del r["path"]
        red = rng.choice(reds)
        warm = [_outcome(r, red) for _ in range(2)]
        _forget()
        cold = _outcome(r, red)
        assert warm[0] == warm[1] == cold, r
        if isinstance(cold, dict) and A.URL_FULL in cold.get(A.CLRK_RECORD_ESCAPED, ()):
            escaped_urls += 1
    assert escaped_urls > 20
    assert len(E._URLS) <= 1024 and len(E._HOSTS) <= 1024


def test_the_url_memory_tells_redactors_apart_and_keeps_no_escaped_path():
    _forget()
    plain, strict = Redactor(), Redactor(query_params=["page"])
    r = raw(path=b"/list?page=2")
    assert E.expand(r, plain)[A.URL_FULL] == "https://api.github.com/list?page=2"
    assert E.expand(r, strict)[A.URL_FULL] == f"https://api.github.com/list?page={redact._REDACTED_QUERY}"
    assert E.expand(r, plain)[A.URL_FULL] == "https://api.github.com/list?page=2"
    odd = raw(path=b"/\xff")
    for _ in range(2):
        rec = E.expand(odd, plain)
        assert rec[A.URL_FULL] == "https://api.github.com/\\xff" and A.URL_FULL in rec[A.CLRK_RECORD_ESCAPED]
    assert not any(k[-1] == b"/\xff" for k in E._URLS)
