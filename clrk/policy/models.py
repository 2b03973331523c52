"""The policy contract as pydantic models: plain data, validated once at load.

Field names are snake_case in Python and camelCase in YAML (the aliases), so validation errors name the
field path exactly as the user wrote it. Unknown fields are errors: a typo in a security policy must not
silently widen it.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from clrk.addresses import parse_network
from clrk.hostnames import canonical_ip, norm_host
from clrk.redact import parse_json_path

API_VERSION = "clrk.apoxy.dev/v1alpha1"
PROVIDERS = ("openai", "anthropic", "google_genai")
DEFAULT_CAPTURE_TYPES = ["application/json", "application/x-ndjson", "text/event-stream"]

_HOSTNAME_RE = re.compile(r"^(\*|\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True,
                              use_attribute_docstrings=True)


class Metadata(Spec):
    name: str = Field(min_length=1, max_length=253)
    """The document's name: lower-case letters, digits, '-' and '.'; rules and records refer to it."""
    namespace: str = Field(default="default", min_length=1, max_length=253)
    """Groups documents and agents (an agent's proxy user name is `<namespace>.<name>`)."""
    labels: dict[str, str] = {}
    """Free key/value pairs; `sourceAgents.matchLabels` selects agents by them."""

    @field_validator("name", "namespace")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not _DNS_LABEL_RE.match(v):
            raise ValueError("must be lower-case letters, digits, '-' or '.', starting and ending alphanumeric")
        return v


def normalize_hostname(pattern: str) -> str:
    """A rule's hostname pattern, which must already be in the one form requests are judged in
    (`clrk.hostnames.norm_host`: lower-case, no trailing dot, A-labels, canonical IP literals); anything else
    is refused with the spelling to use, so that what a policy says is what it matches."""
    p = pattern.strip()
    prefix = "*." if p.startswith("*.") else ""
    body = p[len(prefix):]
    if body.startswith("[") and body.endswith("]") and not prefix:
        raise ValueError(f"{pattern!r}: write an IPv6 address without brackets ({norm_host(body)!r})")
    norm = norm_host(body) if body != "*" else body
    if not norm.isascii():
        raise ValueError(f"{pattern!r} is not a valid hostname (IDNA 2008 refuses it)")
    if norm != body or (prefix and canonical_ip(norm) is not None):
        if prefix and canonical_ip(norm) is not None:
            raise ValueError(f"{pattern!r}: a wildcard cannot stand before an IP address")
        raise ValueError(f"{pattern!r} is not in normal form: write {prefix + norm!r} (lower-case, no trailing dot, "
                         "IDNA 2008 A-labels, IP addresses in their canonical form)")
    return prefix + norm


Hostname = Annotated[str, Field(min_length=1, max_length=253)]


def _check_hostnames(values: list[str]) -> list[str]:
    out = []
    for raw in values:
        h = normalize_hostname(raw)
        if h != "*" and (len(h) > 253 or not _HOSTNAME_RE.match(h)) and canonical_ip(h) is None:
            raise ValueError(f"{raw!r} is not a hostname (exact, '*.suffix' or '*'; labels of at most 63 "
                             "characters, 253 in all)")
        out.append(h)
    return out


def _check_globs(values: list[str]) -> list[str]:
    for v in values:
        try:
            fnmatch.translate(v)
        except Exception as e:  # pragma: no cover - translate accepts nearly anything
            raise ValueError(f"{v!r} is not a glob") from e
    return values


# --------------------------------------------------------------------------- selectors and shared parts


class SourceAgents(Spec):
    """Which agents a rule applies to. Every non-empty field must match; an empty selector matches all."""

    namespaces: list[str] = []
    """Agents in any of these namespaces (empty: any namespace)."""
    names: list[str] = []  # "name" (any namespace) or "namespace/name"
    """Agents with any of these names: `name` (in any namespace) or `namespace/name` (empty: any name)."""
    match_labels: dict[str, str] = {}
    """Agents carrying every one of these labels (empty: any labels)."""


class SecretRef(Spec):
    env: str | None = None
    """Read the secret from this environment variable of the gateway process."""
    file: str | None = None
    """Read the secret from this file (relative to the policy file), re-read when it changes; surrounding whitespace is dropped."""

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of 'env' or 'file'")
        return self


# --------------------------------------------------------------------------- EgressGateway


class ListenerTLS(Spec):
    mode: Literal["Terminate", "Passthrough"] = "Terminate"
    """Terminate: the gateway terminates TLS with its CA and judges every request; Passthrough: the agent's TLS session goes end to end, judged at L4 on the CONNECT target (host, port, agent) only."""


class Listener(Spec):
    name: str = Field(min_length=1)
    """The listener's name (for people: the gateway goes by its port)."""
    address: str = "127.0.0.1"
    """The local IP address it binds: 127.0.0.1 (this machine only) unless the policy says otherwise — 0.0.0.0 or :: for every interface."""
    port: int = Field(ge=1, le=65535)
    """The TCP port agents connect to (`HTTPS_PROXY=http://...@host:port`)."""
    protocol: Literal["TLS", "HTTP"] = "TLS"
    """Informational: every listener is an HTTP proxy that agents reach with CONNECT for HTTPS (and plain requests for HTTP); the value does not change how it listens."""
    tls: ListenerTLS = ListenerTLS()
    """How TLS is handled on this listener."""

    @field_validator("address")
    @classmethod
    def _ip_address(cls, v: str) -> str:
        ip = canonical_ip(v.strip().strip("[]"))
        if ip is None or v.strip().strip("[]") != ip:
            raise ValueError(f"{v!r} is not an IP address in its usual spelling: write e.g. 127.0.0.1 (this machine "
                             "only), 0.0.0.0 (every IPv4 interface), :: (every interface) or one interface's address")
        return ip


_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_name(v: str) -> str:
    if not _HEADER_NAME_RE.match(v.strip()):
        raise ValueError(f"{v!r} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)")
    return v.strip().lower()


def _query_name(v: str) -> str:
    if not v.strip():
        raise ValueError("a query parameter name may not be empty")
    return v.strip()


def _json_path(v: str) -> str:
    parse_json_path(v)  # raises ValueError saying what is wrong and what is supported
    return v.strip()


class Redact(Spec):
    """Names and JSON paths a gateway redacts on top of the defaults (clrk.redact); never fewer."""

    headers: list[Annotated[str, AfterValidator(_header_name)]] = []
    """Header names whose values are replaced by [REDACTED] in records (any case)."""
    query_params: list[Annotated[str, AfterValidator(_query_name)]] = []
    """Query parameter (and form field) names whose values are redacted."""
    json_paths: list[Annotated[str, AfterValidator(_json_path)]] = []
    """JSON paths into request and response bodies whose values are redacted: `$`, `.name`, `['name']`, `[*]` or `.*`, `[N]`."""


class CaptureBody(Spec):
    max_bytes: int = Field(default=65536, ge=0, le=64 * 1024 * 1024)
    """At most this many bytes of each request and response body are stored (0: none); usage is still read from the whole body."""
    include_content_types: list[str] = DEFAULT_CAPTURE_TYPES
    """Media types whose bodies are captured (`type/*` for a whole type); other bodies are counted, not stored."""
    redact: Redact = Redact()
    """Names and JSON paths redacted on top of the built-in ones (which cannot be turned off)."""

    @field_validator("include_content_types")
    @classmethod
    def _media_types(cls, v: list[str]) -> list[str]:
        out = []
        for t in v:
            t = t.strip().lower()
            if "/" not in t:
                raise ValueError(f"{t!r} is not a media type like 'application/json' or 'text/*'")
            out.append(t)
        return out


class OtlpMetrics(Spec):
    """Metrics over OTLP/HTTP (`/v1/metrics` beside traces and logs), pushed every `intervalSeconds`."""

    enabled: bool = True
    """Push metrics to the endpoint's /v1/metrics (when the gateway has an endpoint)."""
    interval_seconds: float = Field(default=60.0, ge=1.0, le=3600.0)
    """How often they are pushed, in seconds (1 to 3600)."""


SAMPLING_CLASSES = ("denied", "error", "budget")


class Sampling(Spec):
    """Which transactions' spans and log records are exported, decided on the finished record in the recorder
    (the store keeps every record; metrics count every transaction)."""

    ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of ordinary transactions exported, decided by trace id (a whole trace is kept or dropped)."""
    always_keep: list[Literal["denied", "error", "budget"]] = list(SAMPLING_CLASSES)
    """Classes exported whatever the ratio: denials, errors, budget refusals; [] for none."""
    keep_agents: list[str] = []
    """Globs over `namespace/name` of agents whose transactions are always exported."""
    keep_rules: list[str] = []
    """Globs over `clrk.decision.rule` (e.g. `AIProviderRoute/team-a/*`) always exported."""
    parent_based: bool = False
    """Follow the sampled flag of the agent's `traceparent` (when it sent one) instead of the ratio."""

    @field_validator("keep_agents", "keep_rules")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        return _check_globs([g.strip() for g in v])


class Otlp(Spec):
    endpoint: str = ""
    """OTLP/HTTP base URL (clrk appends /v1/traces and /v1/logs); empty: records go to the store only."""
    headers: dict[str, str] = {}
    """HTTP headers sent with every export, e.g. an API key; `${VAR}` is replaced by the environment variable VAR."""
    capture_body: CaptureBody = CaptureBody()
    """What of each body the records (store and OTLP) keep."""
    metrics: OtlpMetrics = OtlpMetrics()
    """Metrics pushed to the endpoint's /v1/metrics (docs/METRICS.md)."""
    sampling: Sampling = Sampling()
    """Which transactions' spans and logs are exported; the store keeps every record."""

    @field_validator("endpoint")
    @classmethod
    def _base_url(cls, v: str) -> str:
        v = v.strip()
        if v and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// base URL (clrk appends /v1/traces and /v1/logs)")
        if re.search(r"/v1/(traces|logs)/?$", v):
            raise ValueError("is a base URL: leave out /v1/traces or /v1/logs, clrk appends them")
        return v.rstrip("/")


class UpstreamTLS(Spec):
    ca_bundle: str | None = None
    """A PEM file of CA certificates trusted for upstream TLS in addition to the default store (relative to the policy file)."""
    host_aliases: dict[str, str] = {}
    """`host: 'address:port'`: connect there for this host, keeping its SNI, Host header and certificate check; the target is the operator's own and not judged by blockPrivateNetworks."""

    @field_validator("host_aliases")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for host, target in v.items():
            h = normalize_hostname(host)
            m = re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$", target.strip())
            if not m or not 0 < int(m.group(2)) < 65536:
                raise ValueError(f"{host}: {target!r} must be 'host:port'")
            dial = m.group(1)
            if not dial.startswith("["):
                # A name the resolver cannot even encode (a label over 63 characters) would hang the
                # connection inside mitmproxy instead of failing it: refuse it here, with its name.
                try:
                    (checked,) = _check_hostnames([dial])
                except ValueError as e:
                    raise ValueError(f"{host}: {e}") from None
                if "*" in checked:
                    raise ValueError(f"{host}: {target!r} must name one host, not a wildcard")
            out[h] = target.strip()
        return out


class PrometheusEndpoint(Spec):
    """A scrape endpoint (`http://address:port/metrics`) served by the recorder process."""

    address: str = "127.0.0.1"
    """The local IP address the scrape endpoint binds (0.0.0.0 for every interface)."""
    port: int = Field(ge=1, le=65535)
    """Its TCP port; not a listener's, nor another gateway's."""

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        ip = canonical_ip(v.strip().strip("[]"))
        if ip is None:
            raise ValueError(f"{v!r} is not an IP address to listen on (e.g. 127.0.0.1, or 0.0.0.0 for every interface)")
        return ip


class Metrics(Spec):
    prometheus: PrometheusEndpoint | None = None
    """A Prometheus scrape endpoint with the same instruments as the OTLP metrics (none by default)."""


class BudgetStore(Spec):
    on_unavailable: Literal["failClosed", "failOpen"] = "failClosed"
    """When the shared budget store (clrk_budget_store) cannot be reached: failClosed refuses budgeted calls (503 `clrk: budget store unavailable`); failOpen admits them on this gateway's own ledger until the store is back."""


class EgressGatewaySpec(Spec):
    default_policy: Literal["deny-all", "allow-all"] = "deny-all"
    """What happens to a request no rule allows or denies: deny-all (403) or allow-all."""
    listeners: list[Listener] = []
    """The ports the gateway listens on (none: `clrk run` uses 8080)."""
    otlp: Otlp = Otlp()
    """Where records are exported as OTLP spans and logs, and what of the bodies they keep."""
    metrics: Metrics = Metrics()
    """Metrics served for scraping (Prometheus)."""
    budget_store: BudgetStore = BudgetStore()
    """What budgeted calls do while a shared budget store is unreachable (only with clrk_budget_store set)."""
    upstream_tls: UpstreamTLS = Field(default=UpstreamTLS(), alias="upstreamTLS")
    """How the gateway connects to upstreams."""
    invocation_header: str = Field(default="clrk-invocation-id", min_length=1)
    """The request header whose value becomes the record's `invocation.id` (removed before forwarding)."""
    # Resolved addresses (and IP-literal destinations) in loopback, private, link-local, CGNAT and unique-local
    # ranges are refused unless an EgressRoute's cidrs allow them or the host is in upstreamTLS.hostAliases.
    block_private_networks: bool = True
    """Refuse destinations that are, or resolve to, loopback, private, link-local (cloud metadata), CGNAT, unique-local and reserved addresses, unless an EgressRoute's cidrs allow the range or the host is in hostAliases."""
    # A client connection with no traffic either way for this long is closed (mitmproxy's tcp_timeout, 600 s
    # unless set; it also bounds how long an upstream may stay silent before answering).
    idle_timeout_seconds: int | None = Field(default=None, ge=1, le=86400)
    """Close a client connection with no traffic either way for this long; also bounds how long an upstream may stay silent before answering (default: mitmproxy's tcp_timeout, 600 s)."""


class EgressGateway(Spec):
    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["EgressGateway"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: EgressGatewaySpec = EgressGatewaySpec()
    """What the document says."""


# --------------------------------------------------------------------------- Agent


class TokenFrom(SecretRef):
    pass


class AgentCredentials(Spec):
    token_sha256: str | None = None
    """The sha256 of the agent's token, in hex (`printf %s \"$TOKEN\" | sha256sum`); the token itself is never in the policy."""
    token_from: TokenFrom | None = None
    """Read the token itself from an environment variable or a file (hashed at load, re-read on reload)."""

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be the 64 hex characters of sha256(token), e.g. `printf %s TOKEN | sha256sum`")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _exactly_one(self) -> AgentCredentials:
        if (self.token_sha256 is None) == (self.token_from is None):
            raise ValueError("set exactly one of 'tokenSha256' or 'tokenFrom'")
        return self


class AgentSpec(Spec):
    kind: str = "Agent"
    """What kind of agent this is (free text, recorded as `agent.kind`)."""
    uid: str | None = None
    """A stable id of the agent (recorded as `agent.uid`)."""
    revision: str | None = None
    """The agent's version or revision (recorded as `agent.revision`)."""
    credentials: AgentCredentials
    """How the agent proves who it is: the token in its proxy credentials."""


class Agent(Spec):
    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["Agent"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: AgentSpec
    """What the document says."""

    @field_validator("metadata")
    @classmethod
    def _no_dot_in_name(cls, m: Metadata) -> Metadata:
        # The proxy user name is "<namespace>.<name>"; a dot in the name would make it ambiguous.
        if "." in m.name:
            raise ValueError("an Agent name may not contain '.' (proxy user names are '<namespace>.<name>')")
        return m


# --------------------------------------------------------------------------- EgressRoute / EgressDenyPolicy


class _HostRuleSpec(Spec):
    hostnames: list[Hostname] = []
    """Destination host names: exact (`api.github.com`), `*.suffix` (sub-domains only, not the suffix itself) or `*`; in normal form (lower-case, IDNA 2008 A-labels, canonical IP addresses)."""
    cidrs: list[str] = []  # address ranges; see EgressRoute and EgressDenyPolicy for what each makes of them
    """Address ranges. EgressRoute: with hostnames, the private ranges those names may resolve to; alone, IP-literal destinations inside them. EgressDenyPolicy: destinations that are or resolve to an address inside them."""
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = []
    """Destination ports (empty: any port)."""
    methods: list[str] = []
    """HTTP methods, upper case (empty: any method)."""
    paths: list[str] = []
    """Path prefixes matching whole segments (`/v1/models` covers `/v1/models/x`, not `/v1/models-internal`); the query is never part of the match (empty: any path)."""
    source_agents: SourceAgents = SourceAgents()
    """Which agents the rule applies to (empty: every agent)."""

    @field_validator("hostnames")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return _check_hostnames(v)

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        return [str(parse_network(c)) for c in v]

    @model_validator(mode="after")
    def _some_destination(self) -> _HostRuleSpec:
        if not self.hostnames and not self.cidrs:
            raise ValueError("set hostnames, cidrs or both: a rule needs at least one destination")
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = []
        for m in v:
            if not re.fullmatch(r"[A-Za-z]+", m):
                raise ValueError(f"{m!r} is not an HTTP method")
            out.append(m.upper())
        return out

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"{p!r} must be a path prefix starting with '/'")
        return v


class EgressRouteSpec(_HostRuleSpec):
    """An allow rule. `cidrs` beside `hostnames`: the private ranges those names may resolve to (the gateway's
    blockPrivateNetworks refuses the others); `cidrs` alone: IP-literal destinations inside them."""

    ports: list[Annotated[int, Field(ge=1, le=65535)]] = [443]
    """Destination ports (default 443)."""


class EgressRoute(Spec):
    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["EgressRoute"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: EgressRouteSpec
    """What the document says."""


class DenyResponse(Spec):
    status_code: int = Field(default=403, ge=400, le=599)
    """The HTTP status of the denial (400-599)."""
    message: str | None = None
    """Said in the answer as `{\"error\": \"clrk: <message>\"}` (default: the reason of the decision)."""


class EgressDenyPolicySpec(_HostRuleSpec):
    """A deny rule; it overrides any allow. `cidrs`: a destination that is, or resolves to, an address inside
    one of them is denied, whatever EgressRoute cidrs say (judged on the connection: ports and sourceAgents
    apply; methods and paths cannot, so a rule limited to them denies the connection anyway)."""

    deny_response: DenyResponse = DenyResponse()
    """The answer a denied request gets."""


class EgressDenyPolicy(Spec):
    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["EgressDenyPolicy"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: EgressDenyPolicySpec
    """What the document says."""


# --------------------------------------------------------------------------- AIProviderRoute


class ProviderMatch(Spec):
    provider: str
    """openai, anthropic, google_genai, or the name of a Backend (its calls, whichever host they went to)."""
    models: list[str] = []
    """Model name globs (`gpt-4o*`) the request's model must match (empty: any model; a call naming none matches only then)."""
    endpoints: list[str] = []
    """Request path globs (`/v1/chat/completions`) (empty: any endpoint)."""

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        return _check_globs(v)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        for e in v:
            if not e.startswith("/"):
                raise ValueError(f"{e!r} must be a path starting with '/'")
        return v


class BackendRef(Spec):
    name: str
    """The Backend serving the rule's calls."""
    weight: int = Field(default=1, ge=0, le=1_000_000)
    """The share of calls this Backend gets among the rule's backendRefs (0: none)."""


# Far above any real budget, and keeps every count the record carries within its 64-bit columns.
MAX_BUDGET_TOKENS = 10**15
MAX_BUDGET_USD = 1e12  # likewise for dollars (and finite)


class TokenBudget(Spec):
    """A day's tokens for a rule's calls: each call is admitted only if its estimate fits in what is left."""

    max_tokens_per_day: int | None = Field(default=None, gt=0, le=MAX_BUDGET_TOKENS, description=(
        "Tokens (input + output) the pool may use per UTC day."))
    max_cost_per_day: float | None = Field(default=None, gt=0, le=MAX_BUDGET_USD, description=(
        "US dollars the pool may spend per UTC day, at the prices of gen_ai.usage.cost (ModelPricing, else the "
        "bundled price data); a call to a model with no known price is refused."))
    scope: Literal["Route", "Agent"] = Field(
        default="Route", description="Route: one pool for every agent the rule serves; Agent: a pool per agent.")
    # Held at admission for a request that names no max output tokens (settled to the real usage after).
    reserve_tokens: int = Field(default=1024, ge=1, le=MAX_BUDGET_TOKENS, description=(
        "Output tokens reserved per choice for a call that names no max output tokens (until its usage is known)."))
    # A body of a few bytes may bill a whole conversation the provider keeps: its input cannot be estimated.
    server_context: Literal["Reserve", "Refuse"] = Field(default="Reserve", description=(
        "Calls whose input the provider holds (OpenAI previous_response_id, conversation, a stored prompt, an "
        "Assistants thread run; Gemini cachedContent): Reserve admits them with serverContextTokens of input "
        "reserved, Refuse answers 403."))
    server_context_tokens: int = Field(default=128_000, ge=1, le=MAX_BUDGET_TOKENS, description=(
        "Input tokens reserved for held context under serverContext: Reserve (an Assistants run's "
        "max_prompt_tokens replaces it)."))

    @model_validator(mode="after")
    def _server_context(self) -> TokenBudget:
        if self.max_tokens_per_day is None and self.max_cost_per_day is None:
            raise ValueError("a TokenBudget needs maxTokensPerDay, maxCostPerDay (USD), or both")
        if self.server_context == "Refuse" and "server_context_tokens" in self.model_fields_set:
            raise ValueError("serverContextTokens is what serverContext: Reserve reserves; with Refuse, leave it out")
        return self


class RouteFilter(Spec):
    type: Literal["TokenBudget"]
    """The filter's kind."""
    token_budget: TokenBudget | None = None
    """The daily token budget (for type TokenBudget)."""

    @model_validator(mode="after")
    def _config(self) -> RouteFilter:
        if self.type == "TokenBudget" and self.token_budget is None:
            raise ValueError("a TokenBudget filter needs 'tokenBudget: {maxTokensPerDay: N}' (or maxCostPerDay: USD)")
        return self


class ProviderRule(Spec):
    matches: list[ProviderMatch] = Field(min_length=1)
    """The calls this rule allows: any one of these matches."""
    backend_refs: list[BackendRef] = []
    """Where the calls go instead of the host they named, weighted (empty: where the agent sent them)."""
    filters: list[RouteFilter] = []
    """What else applies to the calls, e.g. a TokenBudget."""


class AIProviderRouteSpec(Spec):
    source_agents: SourceAgents = SourceAgents()
    """Which agents the route serves (empty: every agent)."""
    rules: list[ProviderRule] = Field(min_length=1)
    """Rules of every AIProviderRoute serving the agent are checked in the order written (files in name order); the first whose matches fit the call allows it, with its backends and filters."""


class AIProviderRoute(Spec):
    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["AIProviderRoute"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: AIProviderRouteSpec
    """What the document says."""


# --------------------------------------------------------------------------- Backend


class BackendSchema(Spec):
    name: Literal["openai", "anthropic", "google_genai"]
    """The API the backend speaks: openai, anthropic or google_genai (how its calls are read and recorded)."""


class BackendUpstream(Spec):
    host: str
    """The backend's host name (one host, no wildcard)."""
    port: int = Field(default=443, ge=1, le=65535)
    """The backend's TLS port."""

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        (h,) = _check_hostnames([v])
        if "*" in h:
            raise ValueError("a backend upstream is one host, not a wildcard")
        return h


class ModelRewrite(Spec):
    from_: str = Field(alias="from")
    """A model name glob; the first rewrite whose glob matches the requested model applies."""
    to: str = Field(min_length=1)
    """The model sent to the backend instead (the record keeps both)."""


class BodyMutation(Spec):
    ensure_stream_usage: bool = False
    """Ask for usage in streamed OpenAI calls (`stream_options.include_usage`), so records and budgets see their tokens."""


class BackendSpec(Spec):
    schema_: BackendSchema = Field(alias="schema")
    """The API the backend speaks."""
    upstream: BackendUpstream
    """Where the backend is."""
    model_rewrites: list[ModelRewrite] = []
    """Model names to replace before the call is sent, in order."""
    body_mutation: BodyMutation = BodyMutation()
    """Changes made to the request body."""


class Backend(Spec):
    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["Backend"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: BackendSpec
    """What the document says."""


# --------------------------------------------------------------------------- MCPRoute


class McpServer(Spec):
    hostname: Hostname
    """The server's host name: exact or `*.suffix`, in normal form (as EgressRoute hostnames)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 443
    """The server's port (default 443)."""
    path: str = "/"
    """The MCP endpoint's path prefix, matching whole segments (`/mcp` covers `/mcp` and `/mcp/x`; default `/`: the whole host)."""

    @field_validator("hostname")
    @classmethod
    def _host(cls, v: str) -> str:
        return _check_hostnames([v])[0]

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must be a path prefix starting with '/'")
        return v


class McpNames(Spec):
    allow: list[str] | None = None
    """Globs of the names (resources: URIs) agents may use; unset: every name. An empty list allows none."""
    deny: list[str] = []
    """Globs of the names refused even if `allow` matches them (deny wins; compared without regard to case)."""

    @field_validator("allow", "deny")
    @classmethod
    def _globs(cls, v: list[str] | None) -> list[str] | None:
        return _check_globs(v) if v is not None else v


class MCPRouteSpec(Spec):
    servers: list[McpServer] = Field(min_length=1)
    """The MCP servers (host, port, endpoint path prefix) this route governs."""
    source_agents: SourceAgents = SourceAgents()
    """Which agents may use these servers (empty: every agent)."""
    tools: McpNames = McpNames()
    """Which tools agents may call (`tools/call`) and see (`tools/list` is filtered to them)."""
    prompts: McpNames = McpNames()
    """Which prompts agents may get (`prompts/get`) and see (`prompts/list` is filtered)."""
    resources: McpNames = McpNames()
    """Which resources (by URI) agents may read or subscribe to and see (`resources/list` is filtered)."""
    capture_arguments: bool = True
    """Record each call's arguments and result (bounded and redacted like bodies); false: names and outcomes only."""


class MCPRoute(Spec):
    """Allows agents to use MCP servers, and per server which tools, prompts and resources."""

    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["MCPRoute"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: MCPRouteSpec
    """What the document says."""


# --------------------------------------------------------------------------- CredentialInjectionPolicy


class TargetRef(Spec):
    kind: Literal["AIProviderRoute", "EgressRoute", "MCPRoute", "EgressGateway"]
    """The kind of document the credential goes with: an AIProviderRoute, EgressRoute or MCPRoute (calls it allows), or an EgressGateway (provider calls through it that no route credential covers)."""
    name: str
    """That document's name."""
    namespace: str | None = None
    """That document's namespace (empty: the name in any namespace)."""


class InjectionTarget(Spec):
    type: Literal["Header", "QueryParam"]
    """Header or QueryParam."""
    name: str = Field(min_length=1)
    """The header or query parameter set (overwriting what the agent sent); redacted in every record."""
    prefix: str = ""
    """Put before the secret, e.g. `Bearer `."""


class CredentialInjectionPolicySpec(Spec):
    target_refs: list[TargetRef] = Field(min_length=1)
    """The routes or gateways whose allowed calls carry the credential."""
    target: InjectionTarget
    """Where in the request the credential goes."""
    secret_ref: SecretRef
    """Where the gateway reads the credential (never the agent)."""


class CredentialInjectionPolicy(Spec):
    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["CredentialInjectionPolicy"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: CredentialInjectionPolicySpec
    """What the document says."""


# --------------------------------------------------------------------------- ModelPricing

MAX_PRICE_PER_MTOK = 1_000_000.0  # USD per million tokens: far above any real price, and finite


def _price(v: float | None) -> float | None:
    if v is not None and not (0 <= v <= MAX_PRICE_PER_MTOK):
        raise ValueError(f"a price is USD per million tokens, from 0 to {MAX_PRICE_PER_MTOK:g}")
    return v


Price = Annotated[float, AfterValidator(_price)]


class ModelPriceEntry(Spec):
    """The price of the models one glob matches, in USD per million tokens."""

    provider: str = Field(min_length=1, description=(
        "The provider whose calls this price applies to: openai (also every Backend with schema openai), anthropic, "
        "google_genai, or * for any."))
    model: str = Field(min_length=1, description=(
        "A glob on the model that answered (else the one asked for), e.g. gpt-4o* or llama-3.1-*; matched without "
        "regard to case."))
    input_per_m_tok: Price = Field(alias="inputPerMTok", description="Input tokens not read from or written to a cache.")
    output_per_m_tok: Price = Field(alias="outputPerMTok", description="Output tokens (reasoning included, unless reasoningPerMTok).")
    cached_input_per_m_tok: Price | None = Field(default=None, alias="cachedInputPerMTok", description=(
        "Input tokens read from the provider's cache (default: inputPerMTok)."))
    cache_write_per_m_tok: Price | None = Field(default=None, alias="cacheWritePerMTok", description=(
        "Input tokens written to the provider's cache (default: inputPerMTok)."))
    reasoning_per_m_tok: Price | None = Field(default=None, alias="reasoningPerMTok", description=(
        "Reasoning (thinking) output tokens (default: outputPerMTok)."))

    @field_validator("provider")
    @classmethod
    def _provider(cls, v: str) -> str:
        if v != "*" and v not in PROVIDERS:
            raise ValueError(f"{v!r} is not a provider: one of {', '.join(PROVIDERS)}, or *")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        _check_globs([v])
        return v.lower()


class ModelPricingSpec(Spec):
    models: list[ModelPriceEntry] = Field(min_length=1)
    """Prices by provider and model glob; the first entry that matches a call wins."""


class ModelPricing(Spec):
    """Prices that override or add to the bundled price data (USD); the first entry that matches wins."""

    api_version: Literal["clrk.apoxy.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """Always clrk.apoxy.dev/v1alpha1."""
    kind: Literal["ModelPricing"]
    """The document's kind."""
    metadata: Metadata
    """Name, namespace and labels."""
    spec: ModelPricingSpec
    """What the document says."""


Document = Annotated[
    EgressGateway
    | Agent
    | EgressRoute
    | EgressDenyPolicy
    | AIProviderRoute
    | Backend
    | CredentialInjectionPolicy
    | ModelPricing
    | MCPRoute,
    Field(discriminator="kind"),
]
KINDS = (
    EgressGateway,
    Agent,
    EgressRoute,
    EgressDenyPolicy,
    AIProviderRoute,
    Backend,
    CredentialInjectionPolicy,
    ModelPricing,
    MCPRoute,
)
