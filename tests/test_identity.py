"""Proxy authentication in-process: fixed reasons and answers that never echo what the client sent, and the
throttle on repeated failures (delays, window, the bound on answers held back, the bounded table)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow, tutils

from clrk import identity as I
from clrk.identity import AuthThrottle, authenticate
from clrk.proxy.gateway import Gateway
from clrk.proxy.transaction import METADATA_KEY
from tests.harness.gateway import basic
from tests.harness.util import compile_policy


def _policy():
    docs = [{"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {}},
            {"kind": "Agent", "metadata": {"name": "bot", "namespace": "team-a"},
             "spec": {"credentials": {"tokenSha256": hashlib.sha256(b"tok").hexdigest()}}},
            {"kind": "EgressRoute", "metadata": {"name": "ok"}, "spec": {"hostnames": ["example.com"]}}]
    return compile_policy(*docs)


POLICY = _policy()


REASONS = {I.AUTH_MISSING, I.AUTH_NOT_BASIC, I.AUTH_MALFORMED, I.AUTH_UNKNOWN_AGENT, I.AUTH_WRONG_TOKEN}


@pytest.mark.parametrize("header,reason,answer", [
    (None, I.AUTH_MISSING, None),
    ("Bearer xyz", I.AUTH_NOT_BASIC, None),
    ("Basic !!!", I.AUTH_MALFORMED, None),
    (basic("team-a.bot", "nope"), I.AUTH_WRONG_TOKEN, I.AUTH_FAILED),
    (basic("team-a.nobody", "tok"), I.AUTH_UNKNOWN_AGENT, I.AUTH_FAILED),
    (basic("sk-live-123456", "tok"), I.AUTH_UNKNOWN_AGENT, I.AUTH_FAILED),
])
def test_failures_are_fixed_phrases(header, reason, answer):
    r = authenticate(POLICY, header)
    assert (r.agent, r.failure, r.answer) == (None, reason, answer)


@given(user=st.text(max_size=40).filter(lambda u: ":" not in u), token=st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_nothing_the_client_sends_is_echoed(user, token):
    r = authenticate(POLICY, basic(user, token))
    if r.agent is None:
        assert r.failure in REASONS and r.answer in (None, I.AUTH_FAILED)


# --------------------------------------------------------------------------- the throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _delay(pending) -> float | None:
    """The seconds an awaitable from `failed` would wait (it is `asyncio.sleep(delay)`), closed unawaited."""
    if pending is None:
        return None
    delay = pending.cr_frame.f_locals["delay"]
    pending.close()
    return delay


def test_delays_start_after_the_free_failures_double_and_are_capped():
    t = AuthThrottle(clock=Clock())
    assert [_delay(t.failed("10.0.0.1")) for _ in range(10)] == [None] * 5 + [0.25, 0.5, 1.0, 2.0, 2.0]
    assert _delay(t.failed("10.0.0.2")) is None  # another source starts afresh


def test_failures_are_forgotten_after_a_quiet_window():
    clock = Clock()
    t = AuthThrottle(clock=clock)
    for _ in range(6):
        _delay(t.failed("10.0.0.1"))
    clock.now += 59
    assert _delay(t.failed("10.0.0.1")) == 0.5  # still counting: the window is since the last failure
    clock.now += 61
    assert _delay(t.failed("10.0.0.1")) is None
    clock.now += 61
    _delay(t.failed("10.0.0.9"))
    assert list(t.sources) == ["10.0.0.9"]  # expired sources leave the table


def test_a_source_with_enough_answers_held_is_saturated_until_they_go_out():
    clock = Clock()
    t = AuthThrottle(clock=clock)
    for _ in range(5):
        _delay(t.failed("10.0.0.1"))
    for _ in range(7):
        _delay(t.failed("10.0.0.1"))
        assert not t.saturated("10.0.0.1")
    _delay(t.failed("10.0.0.1"))
    assert t.saturated("10.0.0.1") and not t.saturated("10.0.0.2")
    clock.now += 2.01
    assert not t.saturated("10.0.0.1")


def test_the_table_is_bounded():
    t = AuthThrottle(max_sources=100, clock=Clock())
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t.sources) == 100 and "10.0.3.231" in t.sources  # the most recent kept


@pytest.mark.parametrize("peer,key", [
    (("10.1.2.3", 5), "10.1.2.3"),
    (("::ffff:10.1.2.3", 5, 0, 0), "10.1.2.3"),
    (("2001:db8:1:2:aaaa::1", 5, 0, 0), bytes.fromhex("20010db800010002")),
    (("2001:db8:1:2:bbbb::9", 5, 0, 0), bytes.fromhex("20010db800010002")),  # same /64, same source
    (("fe80::1%eth0", 5, 0, 2), bytes.fromhex("fe80000000000000")),
    (None, ""),
])
def test_sources_are_ipv4_addresses_or_ipv6_slash_64s(peer, key):
    assert AuthThrottle.source(peer) == key


def _connect_flow(peer: str, header: str | None):
    f = tflow.tflow()
    f.request = tutils.treq(method=b"CONNECT", scheme=b"", host="example.com", port=443, path=b"", authority=b"example.com:443")
    f.client_conn.peername = (peer, 40000)
    if header is not None:
        f.request.headers["proxy-authorization"] = header
    return f


async def _gather(pending) -> None:
    await asyncio.gather(*pending)


def _fast_gateway() -> Gateway:
    """A Gateway whose throttle sleeps a millisecond but believes the answers it holds are out 2 s later."""
    g = Gateway()
    g.rt.policy = POLICY
    g.rt.auth_throttle = AuthThrottle(base=0.001, max_delay=0.001, clock=Clock())
    return g


def test_a_saturated_source_gets_429_unchecked_and_others_are_untouched():
    g = _fast_gateway()
    wrong, right = basic("team-a.bot", "guess"), basic("team-a.bot", "tok")
    flows = [_connect_flow("10.9.9.9", wrong) for _ in range(13)]
    pending = [g.http_connect(f) for f in flows]
    assert pending[:5] == [None] * 5 and all(p is not None for p in pending[5:])  # 8 answers held back
    assert all(f.response.status_code == 407 for f in flows)
    # Even the right token is not checked now: parallel guesses cannot go faster than the held answers.
    f = _connect_flow("10.9.9.9", right)
    assert g.http_connect(f) is None
    assert f.response.status_code == 429 and f.client_conn.id not in g.rt.tunnels
    assert "too many failed proxy authentications" in json.loads(f.response.content)["error"]
    # Another address is served as ever, rightly or wrongly.
    f = _connect_flow("10.9.9.8", right)
    assert g.http_connect(f) is None and f.response is None and f.client_conn.id in g.rt.tunnels
    f = _connect_flow("10.9.9.8", wrong)
    assert g.http_connect(f) is None and f.response.status_code == 407
    # Requests without credentials are never counted nor held (clients that wait for the 407 challenge).
    for _ in range(10):
        f = _connect_flow("10.9.9.7", None)
        assert g.http_connect(f) is None and f.response.status_code == 407
    assert "10.9.9.7" not in g.rt.auth_throttle.sources
    asyncio.run(_gather(pending[5:]))


def test_plain_http_failures_are_held_back_too():
    g = _fast_gateway()
    results = []
    for _ in range(6):
        f = tflow.tflow()
        f.request.host, f.request.port, f.request.scheme = "example.com", 80, "http"
        f.request.headers["proxy-authorization"] = basic("team-a.nobody", "x")
        f.client_conn.peername = ("10.8.8.8", 1)
        results.append(g.requestheaders(f))
    assert results[:5] == [None] * 5 and results[5] is not None
    assert METADATA_KEY in f.metadata and f.response is None  # the decision waits for the hold...
    asyncio.run(_gather(results[5:]))
    assert f.response.status_code == 407  # ...and is the same 407 after it
    assert json.loads(f.response.content) == {"error": f"clrk: {I.AUTH_FAILED}"}
