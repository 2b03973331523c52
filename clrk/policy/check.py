"""Warnings about a valid policy: references that lead nowhere, so the rule holding them can never apply.

A typo in `sourceAgents` (`team-q` for `team-a`) makes a route no agent can use or a deny no agent is held
to; a CredentialInjectionPolicy whose target names a namespace the target is not in injects nothing. The
policy is still valid (nothing is wider than written), so these are warnings: `clrk policy check` prints them
and fails on them with `--strict`, and the gateway logs them at every load (docs/POLICY.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from clrk.policy import models as m
from clrk.policy.loader import SourcedDocument


def _agents(docs: Iterable[SourcedDocument]) -> list[m.Agent]:
    return [sd.doc for sd in docs if isinstance(sd.doc, m.Agent)]


def _selector_warnings(sd: SourcedDocument, field: str, sel: m.SourceAgents, agents: list[m.Agent]) -> list[str]:
    out = []
    namespaces = {a.metadata.namespace for a in agents}
    for i, ns in enumerate(sel.namespaces):
        if ns not in namespaces:
            out.append(f"{sd.at(f'{field}.namespaces[{i}]')}: no Agent is in namespace {ns!r}")
    refs = {f"{a.metadata.namespace}/{a.metadata.name}" for a in agents}
    names = {a.metadata.name for a in agents}
    for i, n in enumerate(sel.names):
        if n not in (refs if "/" in n else names):
            out.append(f"{sd.at(f'{field}.names[{i}]')}: no Agent is named {n!r}"
                       + ("" if "/" in n else " (in any namespace)"))
    for k, v in sel.match_labels.items():
        if not any(a.metadata.labels.get(k) == v for a in agents):
            out.append(f"{sd.at(f'{field}.matchLabels.{k}')}: no Agent has the label {k}={v}")
    if not out and (sel.namespaces or sel.names or sel.match_labels):
        def matches(a: m.Agent) -> bool:
            return ((not sel.namespaces or a.metadata.namespace in sel.namespaces)
                    and (not sel.names or a.metadata.name in sel.names
                         or f"{a.metadata.namespace}/{a.metadata.name}" in sel.names)
                    and all(a.metadata.labels.get(k) == v for k, v in sel.match_labels.items()))
        if not any(matches(a) for a in agents):
            out.append(f"{sd.at(field)}: no Agent matches namespaces, names and matchLabels together, so the "
                       "rule applies to no agent")
    return out


def cross_reference_warnings(docs: list[SourcedDocument]) -> list[str]:
    """One sentence per reference that leads nowhere, each beginning `file:line:column: document N (Kind name): field`."""
    agents = _agents(docs)
    out: list[str] = []
    for sd in docs:
        doc = sd.doc
        if isinstance(doc, m.EgressRoute | m.EgressDenyPolicy | m.AIProviderRoute | m.MCPRoute):
            out += _selector_warnings(sd, "spec.sourceAgents", doc.spec.source_agents, agents)
        elif isinstance(doc, m.CredentialInjectionPolicy):
            for j, ref in enumerate(doc.spec.target_refs):
                if ref.namespace is None:
                    continue
                if not any(other.doc.kind == ref.kind and other.doc.metadata.name == ref.name
                           and other.doc.metadata.namespace == ref.namespace for other in docs):
                    out.append(f"{sd.at(f'spec.targetRefs[{j}].namespace')}: no {ref.kind} named {ref.name!r} in namespace "
                               f"{ref.namespace!r} (nothing is injected for this target)")
    return out
