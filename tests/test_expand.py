"""error.type from the error texts mitmproxy and asyncio produce (the recorder's classification)."""

import pytest

from clrk.recorder.expand import error_type


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
