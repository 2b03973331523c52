"""The policy reference (docs/POLICY-REFERENCE.md), generated from the models: every kind, every field as
written in YAML, its type, default and description (the fields' docstrings, which `clrk policy schema` carries
as `description` too). `python -m clrk.cli.reference` writes it; tests/test_docs.py keeps it in step."""

from __future__ import annotations

import types
import typing
from typing import Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from clrk.policy import models as m

# The `spec` of each kind and what the kind is for (its own words when the spec class has no docstring).
PURPOSE = {
    "EgressGateway": "The gateway itself: its listeners, default policy, OTLP export, body capture and upstream TLS. "
                     "A policy has one (or several, each with its own listeners).",
    "Agent": "Who may use the gateway: an agent authenticates as `<namespace>.<name>` with its token in the proxy "
             "credentials (`HTTPS_PROXY=http://<namespace>.<name>:<token>@host:port`).",
    "EgressRoute": "An allow rule: which agents may reach which hosts, ports, methods and paths.",
    "EgressDenyPolicy": "A deny rule: it overrides every allow, including AIProviderRoutes.",
    "AIProviderRoute": "Allows calls to model providers by provider, model and endpoint (judged once the request body "
                       "names the model), sends them to Backends, and holds them to token budgets.",
    "Backend": "Where an AIProviderRoute sends calls: a host speaking a provider's API, with model rewrites.",
    "CredentialInjectionPolicy": "A provider key (or any credential) the gateway adds to the calls a route or gateway "
                                 "allows, so agents never hold it; redacted in every record.",
    "MCPRoute": "Allows agents to use MCP servers (host, port, endpoint path) and, per server, which tools, prompts "
                "and resources; a refused `tools/call` is answered by the gateway, listings are filtered (docs/MCP.md).",
    "ModelPricing": "Prices (USD per million tokens) that override or add to the bundled price data, for "
                    "`gen_ai.usage.cost` and dollar budgets (docs/COST.md).",
}


def _type(t: object) -> str:
    origin = get_origin(t)
    if origin is typing.Annotated:
        return _type(get_args(t)[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(t))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        return " \\| ".join(_type(a) for a in args)
    if origin is list:
        return f"list of {_type(get_args(t)[0])}"
    if origin is dict:
        k, v = get_args(t)
        return f"map of {_type(k)} to {_type(v)}"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "object"
    return {str: "string", int: "integer", bool: "boolean", float: "number"}.get(t, str(t))  # type: ignore[call-overload]


def _model(t: object) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list, or optional), to describe its fields below it."""
    origin = get_origin(t)
    if origin is typing.Annotated:
        return _model(get_args(t)[0])
    if origin in (typing.Union, types.UnionType, list):
        for a in get_args(t):
            if (found := _model(a)) is not None:
                return found
        return None
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _default(f: FieldInfo) -> str:
    if f.is_required():
        return "required"
    d = f.default
    if d is PydanticUndefined or d is None:
        return ""
    if d == "":
        return '`""`'
    if isinstance(d, BaseModel):
        return ""
    if isinstance(d, bool):
        return f"`{str(d).lower()}`"
    if isinstance(d, list | dict) and not d:
        return ""
    if isinstance(d, list):
        return "`[" + ", ".join(map(str, d)) + "]`"
    return f"`{d}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        key = prefix + (f.alias or name)
        sub = _model(f.annotation)
        is_list = get_origin(f.annotation) is list
        desc = " ".join((f.description or "").split()).replace("|", "\\|")
        out.append(f"| `{key}` | {_type(f.annotation)} | {_default(f)} | {desc} |")
        if sub is not None:
            out += _rows(sub, key + ("[]." if is_list else "."))
    return out


def _doc(cls: type[BaseModel]) -> str:
    return " ".join((cls.__doc__ or "").split())


def markdown() -> str:
    lines = [
        "# Policy reference",
        "",
        "<!-- Generated from clrk/policy/models.py by `python -m clrk.cli.reference`; do not edit by hand. -->",
        "",
        "A policy is one YAML file or a directory of them (`*.yaml`, `*.yml`), each holding documents separated by",
        "`---`. Every document has `apiVersion: clrk.apoxy.dev/v1alpha1` (the default), a `kind`, `metadata` and",
        "(except where said) a `spec`. Unknown fields are errors. `clrk policy check` validates a policy,",
        "`clrk policy schema` prints this contract as JSON Schema, and docs/POLICY.md says how rules match.",
        "",
        "Every document's top level (the `spec` of each kind follows):",
        "",
        "| field | type | default | description |",
        "|---|---|---|---|",
        "| `apiVersion` | string | `clrk.apoxy.dev/v1alpha1` | The contract's version; the only one there is. |",
        "| `kind` | string | required | One of the kinds below. |",
        *_rows(m.Metadata, "metadata."),
        "| `spec` | object | | What the document says, by kind (below). |",
    ]
    for kind in m.KINDS:
        name = kind.model_fields["kind"].annotation.__args__[0]  # type: ignore[union-attr]
        spec = kind.model_fields["spec"]
        spec_model = _model(spec.annotation)
        assert spec_model is not None
        lines += ["", f"## {name}", "", PURPOSE[name]]
        if _doc(spec_model) and spec_model is not m.Spec:
            lines += ["", _doc(spec_model)]
        lines += ["", "| field | type | default | description |", "|---|---|---|---|", *_rows(spec_model, "spec.")]
    return "\n".join(lines) + "\n"
