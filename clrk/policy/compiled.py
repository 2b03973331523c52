"""The runtime form of a policy: documents cross-checked, secrets resolved, rules indexed for matching.

`compile_policy` is the one place that reads the environment and secret files named by a policy, so a reload
re-reads them. The result is immutable and swapped as a whole on reload: a request sees one policy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from clrk.addresses import CidrTable, IPAddress, IPNetwork, parse_network
from clrk.attributes import SENSITIVE_HEADERS, SENSITIVE_QUERY_PARAMS
from clrk.cost import BUNDLED, POLICY, PriceBook, PriceOverride, flat_price
from clrk.hostnames import canonical_ip
from clrk.memo import remember
from clrk.policy import models as m
from clrk.policy.check import cross_reference_warnings
from clrk.policy.loader import PolicyError, SourcedDocument, load_documents
from clrk.providers import DEFAULT_HOSTS as DEFAULT_PROVIDER_HOSTS
from clrk.redact import DEFAULT as DEFAULT_REDACTOR
from clrk.redact import Redactor

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """An agent as the gateway knows it: its registry entry without the secret."""

    namespace: str
    name: str
    kind: str
    uid: str | None
    revision: str | None
    labels: Mapping[str, str]

    @property
    def username(self) -> str:
        return f"{self.namespace}.{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class AgentSelector:
    namespaces: frozenset[str]
    names: frozenset[str]
    labels: tuple[tuple[str, str], ...]

    def matches(self, agent: AgentIdentity) -> bool:
        if self.namespaces and agent.namespace not in self.namespaces:
            return False
        if self.names and agent.name not in self.names and agent.ref not in self.names:
            return False
        return all(agent.labels.get(k) == v for k, v in self.labels)

    @classmethod
    def of(cls, s: m.SourceAgents) -> AgentSelector:
        return cls(frozenset(s.namespaces), frozenset(s.names), tuple(sorted(s.match_labels.items())))


@dataclass(frozen=True, slots=True)
class HostRule:
    """An EgressRoute (allow) or EgressDenyPolicy (deny) ready for matching.

    A path prefix matches whole segments: `/v1/models` covers `/v1/models` and `/v1/models/x`, not
    `/v1/models-internal`; a prefix ending in '/' covers what lies below it. Deny rules compare methods and
    paths case-insensitively (some servers do, and a deny must hold for all of them); allow routes compare
    them exactly. On a rule limited by path, a path servers may read differently (`path_ambiguity`) is never
    allowed by a route and always denied by a deny rule."""

    ref: str  # "EgressRoute/<namespace>/<name>"
    name: str
    exact_hosts: frozenset[str]
    wildcard_suffixes: tuple[str, ...]  # ".example.com" for "*.example.com"
    any_host: bool
    ports: frozenset[int]  # empty = any port
    methods: frozenset[str]  # empty = any method (upper-case)
    paths: tuple[str, ...]  # prefixes as written; empty = any path
    agents: AgentSelector
    deny_status: int = 403
    deny_message: str | None = None
    deny: bool = False  # an EgressDenyPolicy: methods and paths compared case-insensitively
    namespace: str = "default"
    ip_cidrs: tuple[IPNetwork, ...] = ()  # IP-literal destinations the rule matches, beside its hostnames
    lead_cidrs: tuple[IPNetwork, ...] = ()  # EgressRoute: the private ranges its destinations may resolve to
    path_exact: frozenset[str] = field(init=False)  # the prefixes not ending in '/', matched whole
    path_below: tuple[str, ...] = field(init=False)  # every prefix with a trailing '/', matched as a prefix

    def __post_init__(self) -> None:
        paths = [p.lower() for p in self.paths] if self.deny else list(self.paths)
        object.__setattr__(self, "path_exact", frozenset(p for p in paths if not p.endswith("/")))
        object.__setattr__(self, "path_below", tuple(p if p.endswith("/") else p + "/" for p in paths))

    def matches_host(self, host: str, ips: tuple[IPAddress, ...] = ()) -> bool:
        """`ips`: the address an IP-literal `host` names and the IPv4 one it embeds (`clrk.addresses.views`)."""
        if self.any_host or host in self.exact_hosts or host.endswith(self.wildcard_suffixes):
            return True
        return bool(ips) and any(ip in net for net in self.ip_cidrs for ip in ips)

    def matches(self, agent: AgentIdentity, host: str, port: int, method: str | None, path: str | None,
                l4: bool = False, ambiguous: bool = False, ips: tuple[IPAddress, ...] = ()) -> bool:
        """Whether the rule covers this request. `l4`: only host, port and agent are known (a passthrough
        tunnel); methods and paths are then ignored — the caller decides what that means for its kind of rule.
        `ambiguous`: servers may read the path differently (see the class docstring). `ips`: see `matches_host`."""
        if not self.matches_host(host, ips):
            return False
        if self.ports and port not in self.ports:
            return False
        if not l4:
            if self.methods and (method is None or (method.upper() if self.deny else method) not in self.methods):
                return False
            if self.paths:
                if path is None:
                    return False
                if ambiguous:
                    return self.deny and self.agents.matches(agent)
                p = path.lower() if self.deny else path
                if p not in self.path_exact and not p.startswith(self.path_below):
                    return False
        return self.agents.matches(agent)


@dataclass(frozen=True, slots=True)
class McpNameRule:
    """Which names of one kind (tools, prompts, resource URIs) an MCPRoute lets through: deny globs win
    (compared without regard to case, as a deny must hold whatever the server makes of case); allow globs are
    exact; no allow list allows every name."""

    allow: tuple[str, ...] | None
    deny: tuple[str, ...]

    def allows(self, name: str) -> bool:
        folded = name.lower()
        if any(fnmatch.fnmatchcase(folded, d.lower()) for d in self.deny):
            return False
        return self.allow is None or any(fnmatch.fnmatchcase(name, a) for a in self.allow)


@dataclass(frozen=True, slots=True)
class McpRule:
    """An MCPRoute ready for matching: its servers as (host rule, path prefix) and what it lets through."""

    ref: str  # "MCPRoute/<namespace>/<name>"
    name: str
    namespace: str
    servers: tuple[tuple[HostRule, str], ...]  # (host and port, path prefix)
    agents: AgentSelector
    names: Mapping[str, McpNameRule]  # "tool" | "prompt" | "resource" -> rule
    capture_arguments: bool = True

    def server_for(self, host: str, port: int, path: str | None, ambiguous: bool) -> tuple[HostRule, str] | None:
        """The server entry whose host and port this request names, when its path is under the entry's prefix
        (or, `ambiguous`, may be: such a path is judged as the server's and refused)."""
        for hr, prefix in self.servers:
            if not hr.matches_host(host) or port not in hr.ports:
                continue
            if ambiguous and prefix != "/":
                return hr, prefix
            p = path or "/"
            if prefix == "/" or p == prefix.rstrip("/") or p.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                return hr, prefix
        return None

    def allows(self, kind: str, name: str) -> bool:
        return self.names[kind].allows(name)


@dataclass(frozen=True, slots=True)
class BackendTarget:
    """A Backend: where provider traffic of a route goes, and how its request is adjusted."""

    name: str
    schema: str
    host: str
    port: int
    model_rewrites: tuple[tuple[str, str], ...]
    ensure_stream_usage: bool

    def rewrite_model(self, model: str | None) -> str | None:
        """The model to send instead of `model` (first matching glob), or None to leave it."""
        if model is None:
            return None
        for pattern, target in self.model_rewrites:
            if fnmatch.fnmatchcase(model, pattern):
                return target if target != model else None
        return None


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    max_tokens_per_day: int | None  # None: a dollar limit only
    per_agent: bool
    reserve_tokens: int
    server_context_tokens: int | None = 128_000  # None: calls with input the provider holds are refused
    max_cost_per_day: float | None = None  # USD


@dataclass(frozen=True, slots=True)
class ProviderMatchRule:
    provider: str  # a provider (schema) name or a Backend name
    models: tuple[str, ...]  # globs; empty = any model
    endpoints: tuple[str, ...]  # paths or path globs; empty = any endpoint

    def matches(self, provider_names: tuple[str, ...], model: str | None, path: str) -> bool:
        if self.provider not in provider_names:
            return False
        if self.models and (model is None or not any(fnmatch.fnmatchcase(model, g) for g in self.models)):
            return False
        return not self.endpoints or any(fnmatch.fnmatchcase(path, e) for e in self.endpoints)


@dataclass(frozen=True, slots=True)
class ProviderRule:
    """One rule of an AIProviderRoute."""

    ref: str  # "AIProviderRoute/<namespace>/<name>#rules[<i>]"
    route_name: str
    route_namespace: str
    agents: AgentSelector
    matches: tuple[ProviderMatchRule, ...]
    backends: tuple[tuple[BackendTarget, int], ...]  # (backend, weight)
    budget: BudgetConfig | None
    # The TokenBudget pool: named by the route and what the rule matches, not by its position, so that
    # reordering or inserting rules keeps each pool's usage (and changing a rule's budget keeps it too).
    pool: str = field(init=False)
    # The backends a call may be sent to (weight > 0) and their weights, as `random.choices` takes them: worked
    # out once here instead of two list comprehensions per routed call.
    live_backends: tuple[BackendTarget, ...] = field(init=False, repr=False, compare=False)
    live_weights: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "live_backends", tuple(b for b, w in self.backends if w > 0))
        object.__setattr__(self, "live_weights", tuple(w for _, w in self.backends if w > 0))
        parts = []
        for mt in self.matches:
            part = mt.provider
            if mt.models:
                part += ":" + ",".join(mt.models)
            if mt.endpoints:
                part += " " + ",".join(mt.endpoints)
            parts.append(part)
        object.__setattr__(self, "pool", f"AIProviderRoute/{self.route_namespace}/{self.route_name}#{'|'.join(parts)}")


@dataclass(frozen=True, slots=True)
class Injection:
    """A credential the gateway sets on the upstream request (the agent never holds it)."""

    policy: str
    type: str  # "Header" | "QueryParam"
    field: str
    prefix: str
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    max_bytes: int
    exact_types: frozenset[str]
    type_prefixes: tuple[str, ...]  # "text/" for "text/*"
    # Answers of `wants` per content type (asked for every body; a few types recur): bounded (clrk.memo), and a
    # reload builds new configs with memories of their own (`replace()` too: the field is not copied).
    _seen: dict[str | None, bool] = field(default_factory=dict, init=False, compare=False, repr=False)

    def wants(self, content_type: str | None) -> bool:
        hit = self._seen.get(content_type)
        if hit is not None:
            return hit
        return remember(self._seen, content_type, len(content_type) if content_type else 0, self._judge(content_type))

    def _judge(self, content_type: str | None) -> bool:
        if not content_type or self.max_bytes == 0:
            return False
        media = content_type.split(";", 1)[0].strip().lower()
        return media in self.exact_types or (bool(self.type_prefixes) and media.startswith(self.type_prefixes))


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """A port an EgressGateway listens on, on one local address."""

    gateway: str
    name: str
    address: str
    port: int
    passthrough: bool

    @property
    def mode(self) -> str:
        """mitmproxy's mode spec that opens it (`regular@127.0.0.1:8080`; an IPv6 address unbracketed)."""
        return f"regular@{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """One EgressGateway: its listeners, export target, capture bounds and upstream TLS settings."""

    name: str
    namespace: str
    default_allow: bool
    ports: frozenset[int]
    otlp_endpoint: str
    otlp_headers: Mapping[str, str]
    capture: CaptureConfig
    host_aliases: Mapping[str, tuple[str, int]]
    ca_bundle: str | None
    invocation_header: str
    passthrough_ports: frozenset[int] = frozenset()  # listeners in TLS Passthrough mode
    block_private: bool = True  # blockPrivateNetworks
    idle_timeout: int | None = None  # idleTimeoutSeconds (None: mitmproxy's tcp_timeout as set)
    budget_fail_open: bool = False  # budgetStore.onUnavailable: failOpen (a local ledger while Redis is away)
    # What the recorder's exporter does for it beyond endpoint and headers: metrics, sampling, Prometheus
    # (plain data, sent to the recorder as is: `clrk.recorder.export.GatewayExport` reads it).
    telemetry: Mapping[str, Any] = field(default_factory=dict, compare=False)
    listeners: tuple[ListenerConfig, ...] = ()
    # What its records redact: the defaults, every injected credential name, its captureBody.redact.
    redactor: Redactor = field(default=DEFAULT_REDACTOR, compare=False, repr=False)


@dataclass(frozen=True)
class CompiledPolicy:
    gateways: tuple[GatewayConfig, ...]
    agents: Mapping[str, tuple[AgentIdentity, bytes]]  # username -> (identity, sha256 of token)
    deny_rules: tuple[HostRule, ...]
    routes: tuple[HostRule, ...]
    documents: tuple[SourcedDocument, ...] = field(repr=False)
    # Every range a deny rule names (its cidrs, and its IP-literal hostnames as one-address ranges): judged on
    # each address a destination resolves to.
    deny_cidrs: CidrTable[HostRule] = field(default_factory=CidrTable)
    cidr_routes: tuple[HostRule, ...] = ()  # EgressRoutes that let their destinations lead to private ranges
    referenced_files: tuple[str, ...] = ()  # secret files and CA bundles the policy reads: watched for changes
    provider_hosts: Mapping[str, str] = field(default_factory=dict)  # host -> provider (parser) name
    # host -> the names an AIProviderRoute `provider:` matches it by (its provider, if a provider's own
    # host; the Backends whose upstream it is)
    provider_names_by_host: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    provider_rules: tuple[ProviderRule, ...] = ()
    mcp_rules: tuple[McpRule, ...] = ()
    # Every host an MCPRoute names exactly, the suffixes of its `*.suffix` ones, and whether one says `*`: what
    # `mcp_host` looks up, the one question ordinary traffic pays for.
    mcp_hosts: frozenset[str] = frozenset()
    mcp_suffixes: tuple[str, ...] = ()
    mcp_any_host: bool = False
    # (target kind, target name) -> injections; namespaces checked by `injections_for`
    injections: Mapping[tuple[str, str], tuple[tuple[str | None, Injection], ...]] = field(default_factory=dict, repr=False)
    # Every name any gateway of this policy redacts beyond SENSITIVE_WORDS (what the recorder redacts again).
    redact_headers: frozenset[str] = SENSITIVE_HEADERS
    redact_query: frozenset[str] = SENSITIVE_QUERY_PARAMS
    # For a transaction no gateway owns: every name any gateway redacts.
    redactor: Redactor = field(default=DEFAULT_REDACTOR, compare=False, repr=False)
    # What model calls cost: the ModelPricing entries, then the bundled price data (clrk.cost).
    pricing: PriceBook = field(default=BUNDLED, compare=False, repr=False)
    # References that lead nowhere (clrk.policy.check): the policy is in force with them, the gateway logs them.
    warnings: tuple[str, ...] = ()
    # Answers worked out from this policy alone, per agent or per injection target (`provider_rules_for`,
    # `injections_for`), for the request path to look up instead of working out again. They live on the policy,
    # so a reload (a new policy, never an edited one) starts with none; `replace()` makes a fresh memory too.
    _agent_rules: dict[int, tuple[AgentIdentity, tuple[ProviderRule, ...]]] = field(
        init=False, default_factory=dict, compare=False, repr=False)
    _injections: dict[tuple[str, str, str], tuple[Injection, ...]] = field(
        init=False, default_factory=dict, compare=False, repr=False)
    # What an agent's provider call of one shape (provider, its names, model, path...) gets from the
    # AIProviderRoute rules: `clrk.decision` reads and fills it (Decisions are never changed once made).
    provider_answers: dict[tuple, tuple[AgentIdentity, Any]] = field(
        init=False, default_factory=dict, compare=False, repr=False)

    def gateway_for_port(self, port: int | None) -> GatewayConfig | None:
        """The gateway listening on `port`; with a single gateway, that one for every port."""
        if len(self.gateways) == 1:
            return self.gateways[0]
        for g in self.gateways:
            if port in g.ports:
                return g
        return None

    def mcp_host(self, host: str) -> bool:
        """Whether an MCPRoute names a server on `host` (any port, any path)."""
        return host in self.mcp_hosts or self.mcp_any_host or (bool(self.mcp_suffixes) and host.endswith(self.mcp_suffixes))

    def agent_still_valid(self, username: str, digest: bytes) -> AgentIdentity | None:
        """The agent an open tunnel authenticated as, under this policy: None when it is gone or its token
        changed (a revocation reaches open connections too)."""
        entry = self.agents.get(username)
        return entry[0] if entry is not None and entry[1] == digest else None

    def provider_rules_for(self, agent: AgentIdentity) -> tuple[ProviderRule, ...]:
        """The AIProviderRoute rules whose agent selector takes `agent`, in policy order: worked out once per
        agent (a provider call asks on its headers and again on its body). Keyed by identity, the agent kept
        with the answer (so its id cannot be reused while remembered); bounded (`clrk.memo`)."""
        hit = self._agent_rules.get(id(agent))
        if hit is not None and hit[0] is agent:
            return hit[1]
        rules = tuple(r for r in self.provider_rules if r.agents.matches(agent))
        return remember(self._agent_rules, id(agent), 0, (agent, rules))[1]

    def injections_for(self, kind: str, name: str, namespace: str) -> tuple[Injection, ...]:
        key = (kind, name, namespace)
        known = self._injections.get(key)
        if known is None:
            entries = self.injections.get((kind, name))
            known = tuple(inj for ns, inj in entries if ns is None or ns == namespace) if entries else ()
            # Keys are names the policy declares (the caller passes a rule's or gateway's own), so few and short.
            remember(self._injections, key, 0, known)
        return known

    def listener_ports(self) -> list[int]:
        return sorted({p for g in self.gateways for p in g.ports})

    @cached_property
    def listeners(self) -> tuple[ListenerConfig, ...]:
        """Every listener the policy declares, by port."""
        return tuple(sorted((li for g in self.gateways for li in g.listeners), key=lambda li: li.port))

    @cached_property
    def passthrough_ports(self) -> frozenset[int]:
        return frozenset(p for g in self.gateways for p in g.passthrough_ports)


def _expand_vars(value: str, where: str, problems: list[str], env: Mapping[str, str]) -> str:
    def sub(mt: re.Match) -> str:
        var = mt.group(1)
        if var not in env:
            problems.append(f"{where}: environment variable {var} is not set (export it before starting clrk)")
            return ""
        return env[var]

    return _VAR_RE.sub(sub, value)


def read_secret(ref: m.SecretRef, base: Path, where: str, problems: list[str], env: Mapping[str, str],
                files: list[str] | None = None) -> str | None:
    """Reads a secret named by {env: VAR} or {file: path} (relative to the policy file); None on error.
    A file's path is added to `files` (what the reload watcher watches)."""
    if ref.env is not None:
        if ref.env not in env or env[ref.env] == "":
            problems.append(f"{where}: environment variable {ref.env} is not set or empty")
            return None
        return env[ref.env]
    path = Path(ref.file)  # type: ignore[arg-type]
    if not path.is_absolute():
        path = base / path
    if files is not None:
        files.append(str(path))
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        problems.append(f"{where}: cannot read secret file {path}: {e.strerror or e}")
        return None
    if not value:
        problems.append(f"{where}: secret file {path} is empty")
        return None
    return value


def _server_rule(ref: str, name: str, namespace: str, host: str, port: int) -> HostRule:
    """One MCPRoute server's host and port, matched as an EgressRoute hostname is."""
    exact = frozenset() if host == "*" or host.startswith("*.") else frozenset({host})
    return HostRule(ref=ref, name=name, exact_hosts=exact, wildcard_suffixes=(host[1:],) if host.startswith("*.") else (),
                    any_host=host == "*", ports=frozenset({port}), methods=frozenset(), paths=(),
                    agents=AgentSelector(frozenset(), frozenset(), ()), namespace=namespace)


def _host_rule(sd: SourcedDocument, spec: m._HostRuleSpec, deny: m.DenyResponse | None) -> HostRule:
    doc = sd.doc
    exact, suffixes, any_host = set(), [], False
    for h in spec.hostnames:
        if h == "*":
            any_host = True
        elif h.startswith("*."):
            suffixes.append(h[1:])
        else:
            exact.add(h)
    cidrs = tuple(parse_network(c) for c in spec.cidrs)
    # A rule that names an address names the one-address range too: its NAT64 or 6to4 spellings, its DNS names.
    named_ips = tuple(parse_network(h) for h in sorted(exact) if canonical_ip(h) is not None)
    if deny is not None:
        ip_cidrs, lead_cidrs = cidrs + named_ips, ()
    else:
        # With hostnames, a route's cidrs only say where those names may lead: not a licence to dial the range.
        ip_cidrs, lead_cidrs = (cidrs if not spec.hostnames else ()), cidrs + named_ips
    return HostRule(
        ref=f"{doc.kind}/{doc.metadata.namespace}/{doc.metadata.name}",
        name=doc.metadata.name,
        exact_hosts=frozenset(exact),
        wildcard_suffixes=tuple(suffixes),
        any_host=any_host,
        ports=frozenset(spec.ports),
        methods=frozenset(spec.methods),
        paths=tuple(spec.paths),
        agents=AgentSelector.of(spec.source_agents),
        deny_status=deny.status_code if deny else 403,
        deny_message=deny.message if deny else None,
        deny=deny is not None,
        namespace=doc.metadata.namespace,
        ip_cidrs=ip_cidrs,
        lead_cidrs=lead_cidrs,
    )


def compile_documents(docs: list[SourcedDocument], env: Mapping[str, str] | None = None) -> CompiledPolicy:
    """Cross-checks documents and resolves their secrets; raises PolicyError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    seen: dict[tuple[str, str, str], SourcedDocument] = {}
    for sd in docs:
        key = (sd.doc.kind, sd.doc.metadata.namespace, sd.doc.metadata.name)
        if key in seen:
            first = seen[key]
            problems.append(
                f"{sd.where}: duplicate of {first.file}:{first.line} document {first.index}"
            )
        seen[key] = sd

    by_kind: dict[str, list[SourcedDocument]] = {}
    for sd in docs:
        by_kind.setdefault(sd.doc.kind, []).append(sd)
    names = {k: {sd.doc.metadata.name for sd in v} for k, v in by_kind.items()}

    gateways: list[GatewayConfig] = []
    redacts: list[m.Redact] = []  # each gateway's captureBody.redact, made into its Redactor once injections are known
    referenced: list[str] = []
    port_owner: dict[int, str] = {}
    prometheus_owner: dict[int, str] = {}
    for sd in by_kind.get("EgressGateway", []):
        g: m.EgressGateway = sd.doc  # type: ignore[assignment]
        base = Path(sd.file).parent
        headers = {}
        for k, v in g.spec.otlp.headers.items():
            expanded = _expand_vars(v, sd.at(f"spec.otlp.headers.{k}"), problems, env)
            headers[k] = expanded
        aliases = {}
        for host, target in g.spec.upstream_tls.host_aliases.items():
            h, _, p = target.rpartition(":")
            aliases[host] = (h.strip("[]"), int(p))
        ca = g.spec.upstream_tls.ca_bundle
        if ca is not None:
            ca_path = Path(ca) if Path(ca).is_absolute() else (base / ca)
            if not ca_path.is_file():
                # Relative to the policy file first, then to the working directory (the repo root).
                if Path(ca).is_file():
                    ca_path = Path(ca)
                else:
                    problems.append(f"{sd.at('spec.upstreamTLS.caBundle')}: {ca} is not a readable PEM file")
            ca = str(ca_path.resolve())
            referenced.append(ca)
        ports = []
        for n, li in enumerate(g.spec.listeners):
            if li.port in port_owner or li.port in prometheus_owner:
                problems.append(f"{sd.at(f'spec.listeners[{n}].port')}: port {li.port} is already used by EgressGateway "
                                f"{port_owner.get(li.port) or prometheus_owner[li.port]}")
            port_owner[li.port] = g.metadata.name
            ports.append(li.port)
        prom = g.spec.metrics.prometheus
        if prom is not None:
            if prom.port in port_owner or prom.port in prometheus_owner:
                owner = port_owner.get(prom.port) or prometheus_owner[prom.port]
                problems.append(f"{sd.at('spec.metrics.prometheus.port')}: port {prom.port} is already used by "
                                f"EgressGateway {owner}")
            prometheus_owner[prom.port] = g.metadata.name
        types = g.spec.otlp.capture_body.include_content_types
        redacts.append(g.spec.otlp.capture_body.redact)
        gateways.append(
            GatewayConfig(
                name=g.metadata.name,
                namespace=g.metadata.namespace,
                default_allow=g.spec.default_policy == "allow-all",
                ports=frozenset(ports),
                otlp_endpoint=g.spec.otlp.endpoint,
                otlp_headers=headers,
                capture=CaptureConfig(
                    max_bytes=g.spec.otlp.capture_body.max_bytes,
                    exact_types=frozenset(t for t in types if not t.endswith("/*")),
                    type_prefixes=tuple(t[:-1] for t in types if t.endswith("/*")),
                ),
                host_aliases=aliases,
                ca_bundle=ca,
                invocation_header=g.spec.invocation_header.lower(),
                passthrough_ports=frozenset(li.port for li in g.spec.listeners if li.tls.mode == "Passthrough"),
                block_private=g.spec.block_private_networks,
                idle_timeout=g.spec.idle_timeout_seconds,
                budget_fail_open=g.spec.budget_store.on_unavailable == "failOpen",
                telemetry={
                    "metrics": g.spec.otlp.metrics.interval_seconds if g.spec.otlp.metrics.enabled else None,
                    "sampling": g.spec.otlp.sampling.model_dump(by_alias=False),
                    "prometheus": [prom.address, prom.port] if prom is not None else None,
                },
                listeners=tuple(ListenerConfig(g.metadata.name, li.name, li.address, li.port, li.tls.mode == "Passthrough")
                                for li in g.spec.listeners),
            )
        )
    if not gateways:
        problems.append("no EgressGateway document found: a policy needs one (see policies/gateway.yaml)")
    elif len(gateways) > 1 and any(not g.ports for g in gateways):
        problems.append("with several EgressGateways, each needs listeners: the port tells which gateway a request uses")

    agents: dict[str, tuple[AgentIdentity, bytes]] = {}
    for sd in by_kind.get("Agent", []):
        a: m.Agent = sd.doc  # type: ignore[assignment]
        creds = a.spec.credentials
        if creds.token_sha256:
            digest = bytes.fromhex(creds.token_sha256)
        else:
            token = read_secret(creds.token_from, Path(sd.file).parent, sd.at("spec.credentials.tokenFrom"), problems, env, referenced)  # type: ignore[arg-type]
            if token is None:
                continue
            digest = hashlib.sha256(token.encode()).digest()
        ident = AgentIdentity(
            namespace=a.metadata.namespace,
            name=a.metadata.name,
            kind=a.spec.kind,
            uid=a.spec.uid,
            revision=a.spec.revision,
            labels=dict(a.metadata.labels),
        )
        agents[ident.username] = (ident, digest)

    deny_rules = tuple(
        _host_rule(sd, sd.doc.spec, sd.doc.spec.deny_response)  # type: ignore[union-attr]
        for sd in by_kind.get("EgressDenyPolicy", [])
    )
    routes = tuple(_host_rule(sd, sd.doc.spec, None) for sd in by_kind.get("EgressRoute", []))  # type: ignore[union-attr]

    backends: dict[str, BackendTarget] = {}
    provider_names_by_host: dict[str, tuple[str, ...]] = {h: (p,) for h, p in DEFAULT_PROVIDER_HOSTS.items()}
    provider_hosts = dict(DEFAULT_PROVIDER_HOSTS)
    for sd in by_kind.get("Backend", []):
        b: m.Backend = sd.doc  # type: ignore[assignment]
        backends[b.metadata.name] = BackendTarget(
            name=b.metadata.name,
            schema=b.spec.schema_.name,
            host=b.spec.upstream.host,
            port=b.spec.upstream.port,
            model_rewrites=tuple((r.from_, r.to) for r in b.spec.model_rewrites),
            ensure_stream_usage=b.spec.body_mutation.ensure_stream_usage,
        )
        provider_hosts[b.spec.upstream.host] = b.spec.schema_.name
        host = b.spec.upstream.host
        provider_names_by_host[host] = provider_names_by_host.get(host, ()) + (b.metadata.name,)

    provider_rules: list[ProviderRule] = []
    for sd in by_kind.get("AIProviderRoute", []):
        r: m.AIProviderRoute = sd.doc  # type: ignore[assignment]
        for i, rule in enumerate(r.spec.rules):
            for j, match in enumerate(rule.matches):
                if match.provider not in m.PROVIDERS and match.provider not in backends:
                    problems.append(
                        f"{sd.at(f'spec.rules[{i}].matches[{j}].provider')}: {match.provider!r} is neither a provider "
                        f"({', '.join(m.PROVIDERS)}) nor the name of a Backend"
                    )
            targets = []
            for j, ref in enumerate(rule.backend_refs):
                if ref.name not in backends:
                    problems.append(f"{sd.at(f'spec.rules[{i}].backendRefs[{j}].name')}: no Backend named {ref.name!r}")
                else:
                    targets.append((backends[ref.name], ref.weight))
            if targets and not any(w for _, w in targets):
                problems.append(f"{sd.at(f'spec.rules[{i}].backendRefs')}: every weight is 0, nothing could serve this rule")
            budget = None
            for f in rule.filters:
                if f.type == "TokenBudget" and f.token_budget is not None:
                    tb = f.token_budget
                    budget = BudgetConfig(tb.max_tokens_per_day, tb.scope == "Agent", tb.reserve_tokens,
                                          tb.server_context_tokens if tb.server_context == "Reserve" else None,
                                          tb.max_cost_per_day)
            provider_rules.append(
                ProviderRule(
                    ref=f"AIProviderRoute/{r.metadata.namespace}/{r.metadata.name}#rules[{i}]",
                    route_name=r.metadata.name,
                    route_namespace=r.metadata.namespace,
                    agents=AgentSelector.of(r.spec.source_agents),
                    matches=tuple(ProviderMatchRule(mt.provider, tuple(mt.models), tuple(mt.endpoints)) for mt in rule.matches),
                    backends=tuple(targets),
                    budget=budget,
                )
            )

    mcp_rules = []
    for sd in by_kind.get("MCPRoute", []):
        mr: m.MCPRoute = sd.doc  # type: ignore[assignment]
        ref = f"MCPRoute/{mr.metadata.namespace}/{mr.metadata.name}"
        servers = tuple(
            (_server_rule(ref, mr.metadata.name, mr.metadata.namespace, srv.hostname, srv.port), srv.path)
            for srv in mr.spec.servers)
        judged = {kind: McpNameRule(tuple(n.allow) if n.allow is not None else None, tuple(n.deny))
                 for kind, n in (("tool", mr.spec.tools), ("prompt", mr.spec.prompts), ("resource", mr.spec.resources))}
        mcp_rules.append(McpRule(ref, mr.metadata.name, mr.metadata.namespace, servers,
                                 AgentSelector.of(mr.spec.source_agents), judged, mr.spec.capture_arguments))

    redact_headers = set(SENSITIVE_HEADERS)
    redact_query = set(SENSITIVE_QUERY_PARAMS)
    injections: dict[tuple[str, str], tuple[tuple[str | None, Injection], ...]] = {}
    for sd in by_kind.get("CredentialInjectionPolicy", []):
        c: m.CredentialInjectionPolicy = sd.doc  # type: ignore[assignment]
        for j, ref in enumerate(c.spec.target_refs):
            if ref.name not in names.get(ref.kind, set()):
                problems.append(f"{sd.at(f'spec.targetRefs[{j}].name')}: no {ref.kind} named {ref.name!r}")
        (redact_headers if c.spec.target.type == "Header" else redact_query).add(c.spec.target.name.lower())
        secret = read_secret(c.spec.secret_ref, Path(sd.file).parent, sd.at("spec.secretRef"), problems, env, referenced)
        if secret is None:
            continue
        inj = Injection(c.metadata.name, c.spec.target.type, c.spec.target.name, c.spec.target.prefix, secret)
        for ref in c.spec.target_refs:
            key = (ref.kind, ref.name)
            injections[key] = injections.get(key, ()) + ((ref.namespace, inj),)

    overrides = []
    for sd in by_kind.get("ModelPricing", []):
        mp: m.ModelPricing = sd.doc  # type: ignore[assignment]
        for e in mp.spec.models:
            price = flat_price(POLICY, e.input_per_m_tok, e.output_per_m_tok, e.cached_input_per_m_tok,
                               e.cache_write_per_m_tok, e.reasoning_per_m_tok)
            overrides.append(PriceOverride(e.provider, e.model, price))

    if problems:
        raise PolicyError(problems)
    gateways = [
        replace(g, redactor=Redactor(redact_headers | set(r.headers), redact_query | set(r.query_params), r.json_paths))
        for g, r in zip(gateways, redacts, strict=True)
    ]
    for r in redacts:
        redact_headers.update(r.headers)
        redact_query.update(q.lower() for q in r.query_params)
    return CompiledPolicy(
        gateways=tuple(gateways),
        agents=agents,
        deny_rules=deny_rules,
        routes=routes,
        documents=tuple(replace(sd, node=None) for sd in docs),  # the YAML was for messages only
        deny_cidrs=CidrTable((net, rule) for rule in deny_rules for net in rule.ip_cidrs),
        cidr_routes=tuple(r for r in routes if r.lead_cidrs),
        referenced_files=tuple(dict.fromkeys(referenced)),
        provider_hosts=provider_hosts,
        provider_names_by_host=provider_names_by_host,
        provider_rules=tuple(provider_rules),
        mcp_rules=tuple(mcp_rules),
        mcp_hosts=frozenset(h for r in mcp_rules for hr, _ in r.servers for h in hr.exact_hosts),
        mcp_suffixes=tuple(s for r in mcp_rules for hr, _ in r.servers for s in hr.wildcard_suffixes),
        mcp_any_host=any(hr.any_host for r in mcp_rules for hr, _ in r.servers),
        injections=injections,
        redact_headers=frozenset(redact_headers),
        redact_query=frozenset(redact_query),
        redactor=Redactor(redact_headers, redact_query),
        pricing=PriceBook(overrides) if overrides else BUNDLED,
        warnings=tuple(cross_reference_warnings(docs)),
    )


def load_policy(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> CompiledPolicy:
    """Loads, validates and compiles the policy at `path` (a file or directory)."""
    return compile_documents(load_documents(path), env)
