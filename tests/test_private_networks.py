"""Names that lead inside are refused: a real gateway resolving through a test DNS server on loopback (its own
mount namespace and resolv.conf, see tests/harness/dns.py), with no hostAliases, so every name is resolved and
judged. Every answer the test DNS server gives is a loopback address, and IP literals are loopback ones:
whatever the gateway does, it can dial nothing but this machine. The other ranges are covered, without
sockets, in tests/test_addresses.py."""

from __future__ import annotations

import pytest

from clrk import attributes as A
from tests.harness.dns import DnsServer, resolver_wrapper
from tests.harness.gateway import (
    OTHER_TOKEN,
    Gateway,
    agent_docs,
    exchange,
    gateway_doc,
    status_of,
)
from tests.harness.util import new_invocation

RECORDS = {
    "allowed.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1", "127.0.0.2"],
    # Rebinding: the first lookup says 127.0.0.1, every later one 127.0.0.3.
    "llm-b.test": [["127.0.0.1"], ["127.0.0.3"]],
}
QTYPE_A = 1


@pytest.fixture(scope="module")
def dns():
    try:
        server = DnsServer.on_free_address(RECORDS)
    except OSError as e:
        pytest.skip(f"cannot bind a DNS server on loopback port 53: {e}")
    yield server
    server.close()


def start(workdir, dns: DnsServer, docs: list[dict]) -> Gateway:
    workdir.mkdir(parents=True, exist_ok=True)
    wrapper = resolver_wrapper(workdir, dns.host)
    if wrapper is None:
        pytest.skip("no mount namespace to give the gateway its own resolv.conf")
    return Gateway(workdir / "gw", docs, wrapper=wrapper).start()


@pytest.fixture(scope="module")
def default_gw(tmp_path_factory, pki, dns):
    """allow-all, no aliases, blockPrivateNetworks left at its default."""
    docs = [gateway_doc(aliases={}, ca_bundle=str(pki[0]), default="allow-all"), *agent_docs()]
    g = start(tmp_path_factory.mktemp("private-default"), dns, docs)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def route_gw(tmp_path_factory, pki, upstream, dns):
    """allow-all; an EgressRoute lets three names lead to loopback for team-a (llm-b.test to 127.0.0.1 only), and a
    deny policy takes 127.0.0.2 back."""
    docs = [gateway_doc(aliases={}, ca_bundle=str(pki[0]), default="allow-all"), *agent_docs(),
            {"kind": "EgressRoute", "metadata": {"name": "loopback-services"},
             "spec": {"hostnames": ["allowed.test", "other.test"], "ports": [upstream.port], "cidrs": ["127.0.0.0/8"],
                      "sourceAgents": {"namespaces": ["team-a"]}}},
            {"kind": "EgressRoute", "metadata": {"name": "llm-b"},
             "spec": {"hostnames": ["llm-b.test"], "ports": [upstream.port], "cidrs": ["127.0.0.1/32"]}},
            {"kind": "EgressDenyPolicy", "metadata": {"name": "not-two"}, "spec": {"cidrs": ["127.0.0.2/32"]}}]
    g = start(tmp_path_factory.mktemp("private-route"), dns, docs)
    yield g
    g.stop()


def test_a_name_that_resolves_to_loopback_is_refused_by_default_and_never_dialled(default_gw, dns, upstream):
    before, asked = upstream.connections, dns.asked.get(("allowed.test", QTYPE_A), 0)
    i = new_invocation()
    with default_gw.client() as c:
        r = c.get(f"https://allowed.test:{upstream.port}/json/private", headers={"clrk-invocation-id": i})
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    assert r.json()["error"].startswith("clrk: allowed.test is not allowed: it resolves to 127.0.0.1, in 127.0.0.0/8 (loopback)")
    rec = default_gw.wait_record(invocation=i)
    assert (rec[A.CLRK_DECISION], rec[A.ERROR_TYPE], rec[A.HTTP_RESPONSE_STATUS_CODE]) == ("allow", "policy_blocked", 502)
    assert dns.asked[("allowed.test", QTYPE_A)] == asked + 1  # resolved, through the test server, once
    assert upstream.connections == before
    assert (f"blocked allowed.test:{upstream.port}: it resolves to 127.0.0.1, in 127.0.0.0/8 (loopback), a private "
            "network (blockPrivateNetworks)") in default_gw.log()


def get_without_sni(gw: Gateway, target: str, invocation: str) -> bytes:
    """CONNECT by hand to an IP literal, TLS without a server name (as clients do for addresses), one request."""
    return exchange(gw, f"GET /json/literal HTTP/1.1\r\nHost: {target}\r\nclrk-invocation-id: {invocation}\r\n"
                        "Connection: close\r\n\r\n".encode(), target=target, sni=None)


@pytest.mark.parametrize("spelling", ["127.0.0.1", "[::ffff:127.0.0.1]", "2130706433", "[::1]"])
def test_an_ip_literal_connect_to_loopback_is_refused_by_default(default_gw, upstream, spelling):
    before = upstream.connections
    i = new_invocation()
    out = get_without_sni(default_gw, f"{spelling}:{upstream.port}", i)
    assert status_of(out) == 403, out[:300]
    assert b"blockPrivateNetworks" in out
    rec = default_gw.wait_record(invocation=i)
    assert (rec[A.CLRK_DECISION], rec[A.CLRK_DECISION_RULE]) == ("deny", "EgressGateway/test-gw/blockPrivateNetworks")
    assert upstream.connections == before


def test_an_egress_route_with_cidrs_lets_its_name_reach_loopback_resolved_once_per_connection(route_gw, dns, upstream):
    before, asked = upstream.connections, dns.asked.get(("allowed.test", QTYPE_A), 0)
    with route_gw.client() as c:
        statuses = [c.get(f"https://allowed.test:{upstream.port}/json/opened-{n}").status_code for n in range(3)]
    assert statuses == [200, 200, 200]
    assert {f"/json/opened-{n}" for n in range(3)} <= {r.path for r in upstream.requests}
    # Three requests on one upstream connection: one lookup, made by the gateway (none by mitmproxy).
    assert upstream.connections == before + 1
    assert dns.asked[("allowed.test", QTYPE_A)] == asked + 1


def test_route_cidrs_open_only_for_the_routes_agents(route_gw, upstream):
    before = upstream.connections
    i = new_invocation()
    with route_gw.client("team-b.reviewer", OTHER_TOKEN) as c:
        r = c.get(f"https://allowed.test:{upstream.port}/json/not-for-b", headers={"clrk-invocation-id": i})
    assert r.status_code == 502
    assert route_gw.wait_record(invocation=i)[A.ERROR_TYPE] == "policy_blocked"
    assert upstream.connections == before


def test_deny_cidrs_beat_the_route_and_one_denied_answer_refuses_the_whole_name(route_gw, upstream):
    """other.test resolves to 127.0.0.1 (the upstream, opened by the route) and 127.0.0.2 (denied)."""
    before = upstream.connections
    i = new_invocation()
    with route_gw.client() as c:
        r = c.get(f"https://other.test:{upstream.port}/json/two", headers={"clrk-invocation-id": i})
    assert r.status_code == 502
    rec = route_gw.wait_record(invocation=i)
    assert (rec[A.CLRK_DECISION], rec[A.ERROR_TYPE]) == ("allow", "policy_blocked")
    assert upstream.connections == before
    assert (f"blocked other.test:{upstream.port}: it resolves to 127.0.0.2, denied by EgressDenyPolicy/default/not-two "
            "(127.0.0.2/32)") in route_gw.log()


def test_the_address_checked_is_the_address_dialled(route_gw, dns, upstream):
    """llm-b.test answers 127.0.0.1 once and 127.0.0.3 (not opened, and nothing listens there) ever after: had
    anything looked the name up again to dial it, the request could not have reached the upstream."""
    i = new_invocation()
    with route_gw.client() as c:
        r = c.get(f"https://llm-b.test:{upstream.port}/json/rebind", headers={"clrk-invocation-id": i})
    assert r.status_code == 200, r.text
    assert "/json/rebind" in {r.path for r in upstream.requests}
    assert dns.asked[("llm-b.test", QTYPE_A)] == 1
    # A new connection is resolved again, and judged on the new answer.
    j = new_invocation()
    with route_gw.client() as c:
        r = c.get(f"https://llm-b.test:{upstream.port}/json/rebind-2", headers={"clrk-invocation-id": j})
    assert r.status_code == 502
    assert route_gw.wait_record(invocation=j)[A.ERROR_TYPE] == "policy_blocked"
    assert "it resolves to 127.0.0.3, in 127.0.0.0/8 (loopback)" in route_gw.log()
