"""Provider intelligence: which transactions are model calls, and what they cost.

One module per provider implements `ProviderParser` (clrk/providers/base.py), the translator of its API:
which call and model a request is, what to change in it (`RequestChanges`, values the proxy applies), what
usage and response model the response carried (`GenAiResult`). `REGISTRY` maps a provider name (also a
Backend's `schema.name`) to its parser. Adding a provider is its module and one line here.
"""

from __future__ import annotations

from collections.abc import Mapping

from clrk.memo import LIMIT, remember
from clrk.providers.anthropic import AnthropicParser
from clrk.providers.base import NO_CHANGES, GenAiResult, ProviderParser, RequestChanges
from clrk.providers.google_genai import GoogleGenAIParser
from clrk.providers.openai import OpenAIParser

REGISTRY: dict[str, type[ProviderParser]] = {
    OpenAIParser.name: OpenAIParser,
    AnthropicParser.name: AnthropicParser,
    GoogleGenAIParser.name: GoogleGenAIParser,
}

DEFAULT_HOSTS: dict[str, str] = {host: p.name for p in REGISTRY.values() for host in p.hosts}


_OPERATIONS: dict[tuple[str, str], tuple[str | None, str | None]] = {}  # (provider, path): operation, model
OPERATIONS_MAX = LIMIT  # bounded: clrk.memo


def parser_for(provider_hosts: Mapping[str, str], host: str, path: str) -> ProviderParser | None:
    """A fresh parser when `host` serves a provider API, else None. `path` may carry a query string."""
    name = provider_hosts.get(host)
    if name is None:
        return None
    cls = REGISTRY[name]
    path_only, _, query = path.partition("?")
    known = _OPERATIONS.get((name, path_only))
    if known is None:  # a pure function of the path, worked out once per distinct one
        known = remember(_OPERATIONS, (name, path_only), len(path_only), cls.operation(path_only) or (None, None))
    return cls(known[0], known[1], path_only, query)


__all__ = ["DEFAULT_HOSTS", "NO_CHANGES", "REGISTRY", "GenAiResult", "ProviderParser", "RequestChanges", "parser_for"]
