"""Where a destination leads (`clrk.addresses`): the pure classifier behind EgressDenyPolicy `cidrs`,
`blockPrivateNetworks` and EgressRoute `cidrs`, and the decisions on IP-literal destinations. Tables of cases,
no sockets: nothing here is ever dialled."""

from __future__ import annotations

import ipaddress

import pytest

from clrk.addresses import CidrTable, embedded_ipv4, parse_network, refusal
from clrk.hostnames import norm_host
from clrk.policy import PolicyError, load_policy
from tests.harness.util import compile_policy as policy
from tests.test_decision import AGENT, OTHER, agent, run

ALLOW_ALL = {"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {"defaultPolicy": "allow-all"}}
PRIVATE_RULE = "EgressGateway/gw/blockPrivateNetworks"


def route(name, hostnames=(), cidrs=(), **spec):
    return {"kind": "EgressRoute", "metadata": {"name": name},
            "spec": {"hostnames": list(hostnames), "cidrs": list(cidrs), **spec}}


def deny(name, hostnames=(), cidrs=(), **spec):
    return {"kind": "EgressDenyPolicy", "metadata": {"name": name},
            "spec": {"hostnames": list(hostnames), "cidrs": list(cidrs), **spec}}


def judge(p, *addresses, host="svc.example", port=443, user="team-a.bot"):
    ips = [ipaddress.ip_address(a) for a in addresses]
    return refusal(p, p.gateways[0], agent(p, user), host, port, ips)


# ------------------------------------------------------------------------------------------- blockPrivateNetworks

PRIVATE_ADDRESSES = [
    ("127.0.0.1", "127.0.0.0/8"), ("127.255.255.254", "127.0.0.0/8"), ("::1", "::1/128"),
    ("10.0.0.1", "10.0.0.0/8"), ("10.255.255.255", "10.0.0.0/8"),
    ("172.16.0.1", "172.16.0.0/12"), ("172.31.255.255", "172.16.0.0/12"),
    ("192.168.0.1", "192.168.0.0/16"), ("192.168.255.255", "192.168.0.0/16"),
    ("169.254.169.254", "169.254.0.0/16"), ("169.254.0.1", "169.254.0.0/16"), ("fe80::1", "fe80::/10"),
    ("100.64.0.1", "100.64.0.0/10"), ("100.127.255.255", "100.64.0.0/10"),
    ("fc00::1", "fc00::/7"), ("fd12:3456::1", "fc00::/7"),
    ("0.0.0.0", "0.0.0.0/8"), ("0.1.2.3", "0.0.0.0/8"), ("::", "::/128"),
    ("224.0.0.1", "224.0.0.0/4"), ("255.255.255.255", "240.0.0.0/4"), ("ff02::1", "ff00::/8"),
    ("64:ff9b:1::a", "64:ff9b:1::/48"), ("fec0::1", "fec0::/10"),
]

# IPv6 forms that carry an IPv4 address to the wire: judged as that address too.
EMBEDDED = [
    ("::ffff:127.0.0.1", "127.0.0.1", "127.0.0.0/8"),       # IPv4-mapped
    ("::ffff:10.1.2.3", "10.1.2.3", "10.0.0.0/8"),
    ("::ffff:169.254.169.254", "169.254.169.254", "169.254.0.0/16"),
    ("::10.1.2.3", "10.1.2.3", "10.0.0.0/8"),               # IPv4-compatible
    ("::127.0.0.1", "127.0.0.1", "127.0.0.0/8"),
    ("::ffff:0:192.168.1.1", "192.168.1.1", "192.168.0.0/16"),  # IPv4-translated (SIIT)
    ("64:ff9b::10.1.2.3", "10.1.2.3", "10.0.0.0/8"),        # NAT64
    ("64:ff9b::a9fe:a9fe", "169.254.169.254", "169.254.0.0/16"),
    ("64:ff9b::7f00:1", "127.0.0.1", "127.0.0.0/8"),
    ("2002:a01:203::1", "10.1.2.3", "10.0.0.0/8"),          # 6to4
    ("2002:7f00:1::", "127.0.0.1", "127.0.0.0/8"),
    ("2002:6440:1::", "100.64.0.1", "100.64.0.0/10"),
]

PUBLIC = ["8.8.8.8", "1.1.1.1", "140.82.112.6", "172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0",
          "169.253.255.255", "11.0.0.0", "2606:4700:4700::1111", "2a00:1450:4001::200e", "::ffff:8.8.8.8",
          "64:ff9b::808:808", "2002:808:808::1", "fbff:ffff::1", "fe00::1"]


@pytest.mark.parametrize("address,network", PRIVATE_ADDRESSES)
def test_every_private_range_is_refused_by_default(address, network):
    r = judge(policy(ALLOW_ALL, AGENT), address)
    assert r is not None and (r.address, str(r.network), r.rule) == (ipaddress.ip_address(address), network, PRIVATE_RULE)
    assert "blockPrivateNetworks" in r.why and network in r.why


@pytest.mark.parametrize("address,v4,network", EMBEDDED)
def test_ipv6_forms_embedding_a_private_ipv4_address_are_refused_as_it(address, v4, network):
    assert embedded_ipv4(ipaddress.IPv6Address(address)) == ipaddress.IPv4Address(v4)
    r = judge(policy(ALLOW_ALL, AGENT), address)
    assert r is not None and str(r.matched) == v4 and str(r.network) == network
    assert f"({v4})" in r.where


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert judge(policy(ALLOW_ALL, AGENT), address) is None


def test_one_private_answer_among_public_ones_refuses_the_name():
    r = judge(policy(ALLOW_ALL, AGENT), "8.8.8.8", "2606:4700::1", "10.9.8.7")
    assert r is not None and str(r.address) == "10.9.8.7"


def test_block_private_networks_can_be_switched_off_but_deny_cidrs_still_apply():
    gw = {**ALLOW_ALL, "spec": {"defaultPolicy": "allow-all", "blockPrivateNetworks": False}}
    p = policy(gw, AGENT, deny("meta", cidrs=["169.254.169.254/32"]))
    assert judge(p, "10.0.0.1", "127.0.0.1") is None
    assert judge(p, "169.254.169.254").rule == "EgressDenyPolicy/default/meta"


# ------------------------------------------------------------------------------------------- EgressRoute cidrs

def test_a_route_opens_its_private_ranges_to_its_own_hostnames_only():
    r = route("db", ["db.internal.example", "*.svc.example"], ["10.20.30.0/24", "fd00:1::/32"])
    p = policy(ALLOW_ALL, AGENT, r)
    assert judge(p, "10.20.30.40", host="db.internal.example") is None
    assert judge(p, "fd00:1::5", "10.20.30.1", host="api.svc.example") is None
    assert judge(p, "::ffff:10.20.30.40", host="db.internal.example") is None  # the same address, mapped
    # Outside the route's ranges, or another name leading to them: refused.
    assert judge(p, "10.20.31.1", host="db.internal.example").rule == PRIVATE_RULE
    assert judge(p, "10.20.30.40", "127.0.0.1", host="db.internal.example").rule == PRIVATE_RULE
    assert judge(p, "10.20.30.40", host="other.example").rule == PRIVATE_RULE


def test_a_route_opens_ranges_only_on_its_ports_and_for_its_agents():
    r = route("db", ["db.internal.example"], ["10.0.0.0/8"], ports=[5432], sourceAgents={"namespaces": ["team-a"]})
    p = policy(ALLOW_ALL, AGENT, OTHER, r)
    assert judge(p, "10.1.1.1", host="db.internal.example", port=5432) is None
    assert judge(p, "10.1.1.1", host="db.internal.example", port=443).rule == PRIVATE_RULE
    assert judge(p, "10.1.1.1", host="db.internal.example", port=5432, user="team-b.bot").rule == PRIVATE_RULE


def test_a_route_that_names_an_address_opens_that_address():
    p = policy(ALLOW_ALL, AGENT, route("one", ["10.0.0.5"]))
    assert judge(p, "10.0.0.5", host="10.0.0.5") is None
    assert judge(p, "10.0.0.6", host="10.0.0.6").rule == PRIVATE_RULE


def test_loopback_and_unspecified_ipv6_are_themselves_not_ipv4_compatible_forms():
    assert embedded_ipv4(ipaddress.IPv6Address("::1")) is None and embedded_ipv4(ipaddress.IPv6Address("::")) is None
    p = policy(ALLOW_ALL, AGENT, route("lo", ["localhost"], ["127.0.0.0/8", "::1/128"]))
    assert judge(p, "127.0.0.1", "::1", host="localhost") is None


def test_deny_cidrs_beat_route_cidrs():
    p = policy(ALLOW_ALL, AGENT, route("lo", ["svc.example"], ["127.0.0.0/8"]), deny("two", cidrs=["127.0.0.2/32"]))
    assert judge(p, "127.0.0.1") is None
    r = judge(p, "127.0.0.1", "127.0.0.2")
    assert (str(r.address), r.rule) == ("127.0.0.2", "EgressDenyPolicy/default/two")
    assert r.why == "denied by EgressDenyPolicy/default/two (127.0.0.2/32)"


# ------------------------------------------------------------------------------------------- EgressDenyPolicy cidrs

def test_deny_cidrs_apply_to_public_addresses_embedded_forms_and_their_agents_and_ports():
    dn = deny("corp", cidrs=["203.0.113.0/24", "2001:db8::/32"], ports=[443], sourceAgents={"namespaces": ["team-a"]})
    p = policy(ALLOW_ALL, AGENT, OTHER, dn)
    for address in ("203.0.113.9", "::ffff:203.0.113.9", "64:ff9b::203.0.113.9", "2002:cb00:7109::", "2001:db8::1"):
        assert judge(p, "8.8.8.8", address).rule == "EgressDenyPolicy/default/corp", address
    assert judge(p, "203.0.113.9", user="team-b.bot") is None
    assert judge(p, "203.0.113.9", port=8443) is None
    assert judge(p, "203.0.114.1") is None


def test_a_deny_rule_that_names_an_address_denies_every_name_and_spelling_that_leads_there():
    p = policy(ALLOW_ALL, AGENT, deny("lo", ["127.0.0.1", "::1"]))
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"):
        assert judge(p, address).rule == "EgressDenyPolicy/default/lo", address


def test_deny_cidrs_limited_to_methods_still_deny_the_connection():
    p = policy(ALLOW_ALL, AGENT, deny("posts", cidrs=["198.51.100.0/24"], methods=["POST"]))
    assert judge(p, "198.51.100.7").rule == "EgressDenyPolicy/default/posts"


# ------------------------------------------------------------------------------------------- IP-literal destinations

@pytest.mark.parametrize("spelling", ["127.0.0.1", "2130706433", "0x7f000001", "127.1", "::ffff:127.0.0.1", "10.1.2.3",
                                      "169.254.169.254", "0xa9fea9fe", "::1", "fd00::1", "100.64.0.1", "0.0.0.0",
                                      "64:ff9b::a9fe:a9fe", "2002:a00:1::"])
def test_an_ip_literal_destination_in_a_private_network_is_denied_without_dns(spelling):
    d = run(policy(ALLOW_ALL, AGENT), norm_host(spelling))
    assert not d.allow and d.rule == PRIVATE_RULE and d.status == 403, d
    assert "blockPrivateNetworks" in d.reason and "EgressRoute with cidrs" in d.reason


def test_a_public_ip_literal_is_not_a_private_network():
    assert run(policy(ALLOW_ALL, AGENT), "140.82.112.6").allow


def test_a_cidr_only_route_allows_literals_inside_under_deny_all():
    gw = {"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {}}
    p = policy(gw, AGENT, route("lan", cidrs=["10.20.0.0/16"]))
    assert run(p, "10.20.1.2").rule == "EgressRoute/default/lan"
    assert judge(p, "10.20.1.2", host="10.20.1.2") is None
    assert run(p, "10.21.0.1").rule == "EgressGateway/gw/blockPrivateNetworks"
    assert run(p, "8.8.8.8").rule == "EgressGateway/gw/defaultPolicy"  # public, but no route allows it
    assert not run(p, "db.example").allow  # a cidr-only route matches no name


def test_a_route_with_hostnames_does_not_allow_its_cidrs_as_literals():
    gw = {"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {}}
    p = policy(gw, AGENT, route("db", ["db.internal.example"], ["10.20.0.0/16"]))
    assert run(p, "db.internal.example").allow
    d = run(p, "10.20.1.2")
    assert not d.allow and d.rule == "EgressGateway/gw/blockPrivateNetworks"


def test_deny_cidrs_deny_an_ip_literal_by_the_deny_rule_with_its_status():
    dn = deny("lab", cidrs=["203.0.113.0/24"], denyResponse={"statusCode": 451, "message": "lab is off limits"})
    p = policy(ALLOW_ALL, AGENT, route("lan", cidrs=["203.0.113.0/24"]), dn)
    d = run(p, "203.0.113.5")
    assert (d.allow, d.rule, d.status, d.reason) == (False, "EgressDenyPolicy/default/lab", 451, "lab is off limits")
    assert not run(p, norm_host("64:ff9b::cb00:7105")).allow  # NAT64 spelling of the same address


def test_an_aliased_ip_literal_is_the_operators_choice():
    aliases = {"hostAliases": {"10.0.0.9": "127.0.0.1:9443"}}
    gw = {**ALLOW_ALL, "spec": {"defaultPolicy": "allow-all", "upstreamTLS": aliases}}
    assert run(policy(gw, AGENT), "10.0.0.9").allow


# ------------------------------------------------------------------------------------------- the table, and loading

def test_cidr_table_finds_every_range_narrowest_first():
    t = CidrTable([(parse_network(n), v) for n, v in (("10.0.0.0/8", "a"), ("10.1.0.0/16", "b"), ("10.1.2.3/32", "c"),
                                                      ("10.2.0.0/16", "d"), ("::/0", "v6"))])
    assert [v for _, v in t.lookup(ipaddress.ip_address("10.1.2.3"))] == ["c", "b", "a"]
    assert [v for _, v in t.lookup(ipaddress.ip_address("10.3.0.0"))] == ["a"]
    assert t.lookup(ipaddress.ip_address("11.0.0.0")) == []
    assert [v for _, v in t.lookup(ipaddress.ip_address("::1"))] == ["v6"]
    assert not CidrTable() and t


@pytest.mark.parametrize("cidrs,fragment", [
    (["10.0.0.1/8"], "spec.cidrs: '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
    (["fd00::1/8"], "spec.cidrs: 'fd00::1/8' has host bits set; did you mean fd00::/8?"),
    (["10.0.0.0/33"], "spec.cidrs: '10.0.0.0/33' is not a CIDR range like 10.20.0.0/16"),
    (["db.internal"], "spec.cidrs: 'db.internal' is not a CIDR range"),
])
def test_bad_cidrs_are_load_errors_naming_file_document_field_and_fix(tmp_path, cidrs, fragment):
    f = tmp_path / "p.yaml"
    f.write_text(f"kind: EgressGateway\nmetadata: {{name: g}}\n---\nkind: EgressDenyPolicy\nmetadata: {{name: d}}\n"
                 f"spec: {{cidrs: {cidrs}}}\n")
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert f"{f}:6:15: document 2 (EgressDenyPolicy d): {fragment}" in str(e.value)


def test_a_rule_without_hostnames_or_cidrs_is_a_load_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("kind: EgressGateway\nmetadata: {name: g}\n---\n"
                 "kind: EgressRoute\nmetadata: {name: r}\nspec: {ports: [443]}\n")
    with pytest.raises(PolicyError, match=r"document 2 \(EgressRoute r\): spec: set hostnames, cidrs or both"):
        load_policy(f)
