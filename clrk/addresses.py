"""Where a destination leads: the addresses an allowed name resolves to (or an IP-literal destination) judged
against the ranges EgressDenyPolicy `cidrs` deny, the private networks `blockPrivateNetworks` refuses, and the
ranges EgressRoute `cidrs` open.

Pure and table-driven, in the manner of smokescreen's `classifyAddr`: the tables are built once per policy
(`clrk.policy.compiled`), and an address costs one dict probe per distinct prefix length of a table. An IPv6
address that embeds an IPv4 one (IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64 64:ff9b::/96, 6to4) is
judged as both: `::ffff:10.0.0.1`, `64:ff9b::a00:1` and `2002:a00:1::` all lead to 10.0.0.1.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clrk.policy.compiled import AgentIdentity, CompiledPolicy, GatewayConfig, HostRule

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What `blockPrivateNetworks` refuses: every range that leads into the gateway's own host or network rather
# than to the internet. Non-unicast ranges are here too: on Linux, connecting to 0.0.0.0 or :: reaches the host.
PRIVATE_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "RFC 1918 private"),
    ("100.64.0.0/10", "CGNAT shared"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, where cloud metadata services answer"),
    ("172.16.0.0/12", "RFC 1918 private"),
    ("192.168.0.0/16", "RFC 1918 private"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, incl. broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)

_NAT64_TOP = int(ipaddress.IPv6Address("64:ff9b::")) >> 32
_TRANSLATED_TOP = int(ipaddress.IPv6Address("::ffff:0:0:0")) >> 32


def parse_network(text: str) -> IPNetwork:
    """A CIDR range as written in a policy (`10.20.0.0/16`, `fd00::/8`, or one address); ValueError with a
    sentence saying what to write instead."""
    t = text.strip()
    try:
        return ipaddress.ip_network(t, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(t, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a CIDR range like 10.20.0.0/16 or fd00::/8 ({e})") from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for on the wire, if it embeds one: IPv4-mapped (::ffff:0:0/96),
    IPv4-compatible (::/96), IPv4-translated (::ffff:0:0:0/96), NAT64 (64:ff9b::/96) or 6to4 (2002::/16)."""
    n = int(ip)
    top = n >> 32
    if n < 2:  # :: and ::1 are themselves (unspecified, loopback), not IPv4-compatible addresses
        return None
    if top in (0xFFFF, 0, _TRANSLATED_TOP, _NAT64_TOP):
        return ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if n >> 112 == 0x2002:
        return ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)
    return None


def views(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The address, then the IPv4 address it embeds (if any): what a range is compared against."""
    if ip.version == 6:
        v4 = embedded_ipv4(ip)  # type: ignore[arg-type]
        if v4 is not None:
            return (ip, v4)
    return (ip,)


def literal(host: str) -> IPAddress | None:
    """The address a normalised destination (see `clrk.hostnames.norm_host`) names, or None for a name."""
    # Canonical IPv4 literals start and end with a digit; a name's last label never is all digits.
    if not host or (":" not in host and not (host[0].isdigit() and host[-1].isdigit())):
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolved(address: str) -> IPAddress:
    """An address as getaddrinfo gives it (an IPv6 one may carry a %zone)."""
    return ipaddress.ip_address(address.split("%", 1)[0])


def dial_form(ip: IPAddress) -> str:
    """How to dial an address: an IPv4-mapped one as the IPv4 address it is."""
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        return str(ip.ipv4_mapped)  # type: ignore[union-attr]
    return str(ip)


class CidrTable[T]:
    """Ranges and what each stands for, looked up by address: one dict probe per distinct prefix length."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, entries: Iterable[tuple[IPNetwork, T]] = ()):
        v4: dict[int, dict[int, list[tuple[IPNetwork, T]]]] = {}
        v6: dict[int, dict[int, list[tuple[IPNetwork, T]]]] = {}
        for net, value in entries:
            shift = net.max_prefixlen - net.prefixlen
            by_shift = (v4 if net.version == 4 else v6).setdefault(shift, {})
            by_shift.setdefault(int(net.network_address) >> shift, []).append((net, value))
        # Most specific first, so the first match is the narrowest range.
        self._v4 = tuple((s, {k: tuple(v) for k, v in d.items()}) for s, d in sorted(v4.items()))
        self._v6 = tuple((s, {k: tuple(v) for k, v in d.items()}) for s, d in sorted(v6.items()))

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def lookup(self, ip: IPAddress) -> list[tuple[IPNetwork, T]]:
        """Every (range, value) whose range holds `ip`, narrowest first."""
        n = int(ip)
        out: list[tuple[IPNetwork, T]] = []
        for shift, keyed in self._v4 if ip.version == 4 else self._v6:
            hit = keyed.get(n >> shift)
            if hit is not None:
                out.extend(hit)
        return out


PRIVATE: CidrTable[str] = CidrTable((ipaddress.ip_network(n), label) for n, label in PRIVATE_NETWORKS)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an address may not be dialled: the address (and the IPv4 one it embeds, if that is what matched),
    the range it is in, and the rule that refuses that range."""

    address: IPAddress
    matched: IPAddress  # the address or the IPv4 address it embeds
    network: IPNetwork
    rule: str  # "EgressDenyPolicy/<ns>/<name>" or "EgressGateway/<name>/blockPrivateNetworks"
    label: str | None = None  # what kind of private network, for blockPrivateNetworks

    @property
    def where(self) -> str:
        """'127.0.0.1' or '::ffff:a00:1 (10.0.0.1)'."""
        return str(self.address) if self.matched == self.address else f"{self.address} ({self.matched})"

    @property
    def why(self) -> str:
        """The rest of a sentence that starts with the destination, e.g. 'it resolves to 127.0.0.1, ...'."""
        if self.label is None:
            return f"denied by {self.rule} ({self.network})"
        return (f"in {self.network} ({self.label}), a private network (blockPrivateNetworks); an EgressRoute "
                f"with cidrs: [{self.network}] for this destination allows it")


def denied(policy: CompiledPolicy, agent: AgentIdentity | None, port: int,
           addresses: Sequence[IPAddress]) -> Refusal | None:
    """The first address inside an EgressDenyPolicy's cidrs that applies to this agent and port. Methods and
    paths cannot apply: a connection carries whatever requests follow, so a rule limited to them still denies."""
    table = policy.deny_cidrs
    if not table:
        return None
    for ip in addresses:
        for v in views(ip):
            for net, rule in table.lookup(v):
                if (not rule.ports or port in rule.ports) and (agent is None or rule.agents.matches(agent)):
                    return Refusal(ip, v, net, rule.ref)
    return None


def private(policy: CompiledPolicy, gateway: GatewayConfig, agent: AgentIdentity | None, host: str, port: int,
            addresses: Sequence[IPAddress]) -> Refusal | None:
    """The first address in a private network that no EgressRoute `cidrs` opens for this destination and
    agent; None when `blockPrivateNetworks` is off or every address is public or opened."""
    if not gateway.block_private:
        return None
    openings: tuple[IPNetwork, ...] | None = None
    for ip in addresses:
        for v in views(ip):
            hit = PRIVATE.lookup(v)
            if not hit:
                continue
            if openings is None:
                openings = opened(policy, agent, host, port)
            if not any(v in net for net in openings):
                net, label = hit[0]
                return Refusal(ip, v, net, f"EgressGateway/{gateway.name}/blockPrivateNetworks", label)
    return None


def opened(policy: CompiledPolicy, agent: AgentIdentity | None, host: str, port: int) -> tuple[IPNetwork, ...]:
    """The private ranges EgressRoutes let this destination lead to for this agent: the `cidrs` of every route
    that matches it by hostname (or, for an IP literal, by its own cidrs) on this port."""
    if agent is None or not policy.cidr_routes:
        return ()
    lit = literal(host)
    ips = views(lit) if lit is not None else ()
    rules: Iterable[HostRule] = policy.cidr_routes
    matching = [r for r in rules if r.matches(agent, host, port, None, None, l4=True, ips=ips)]
    return tuple(net for r in matching for net in r.lead_cidrs)


def refusal(policy: CompiledPolicy, gateway: GatewayConfig, agent: AgentIdentity | None, host: str, port: int,
            addresses: Sequence[IPAddress]) -> Refusal | None:
    """Why `host` may not be dialled at `addresses` (all its resolved answers, or the literal itself) for this
    agent, or None when every one of them may. Deny cidrs first: they beat any EgressRoute cidrs."""
    return denied(policy, agent, port, addresses) or private(policy, gateway, agent, host, port, addresses)
