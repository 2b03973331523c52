"""Reads policy YAML (a file or a directory of them) into validated documents.

Every error names the file, the line and column of the mistake (`file:line:column:`, as compilers do, so
editors jump there), the document (its 1-based position and, where readable, its kind and name) and the
field path, and says what to do. All errors of a load are reported together. Duplicate YAML keys are
errors: the second `hostnames:` in a document would otherwise silently replace the first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from clrk.policy.models import API_VERSION, Document


class PolicyError(Exception):
    """A policy that cannot be used; `problems` holds one sentence per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class SourcedDocument:
    """A validated document and where it came from (for error messages and rule names)."""

    doc: Document
    file: str
    index: int  # 1-based position in the file
    line: int = 0  # 1-based line where the document starts (0: not from a file)
    # The document's YAML, to say where a field was written; dropped once the policy is compiled.
    node: yaml.Node | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        """`file:line: document N (Kind name)`: how messages about this document begin."""
        at = f"{self.file}:{self.line}" if self.line else self.file
        return f"{at}: document {self.index} ({self.doc.kind} {self.doc.metadata.name})"

    def at(self, path: str) -> str:
        """`file:line:column: document N (Kind name): path`, the position of the field `path` (as written in
        YAML, e.g. `spec.rules[0].backendRefs[1].name`), or of the nearest part of it that was written."""
        if self.node is None:
            return f"{self.where}: {path}"
        loc = [int(i) if i else k for k, i in _PATH_PART.findall(path)]
        mark = _node_at(self.node, loc).start_mark
        return (f"{self.file}:{mark.line + 1}:{mark.column + 1}: document {self.index} "
                f"({self.doc.kind} {self.doc.metadata.name}): {path}")


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_ADAPTER: TypeAdapter[Document] = TypeAdapter(Document)


def policy_files(path: str | os.PathLike) -> list[Path]:
    """The YAML files a policy path stands for: the file itself, or every *.yaml/*.yml under a directory."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [
            f
            for f in p.rglob("*")
            if f.suffix in (".yaml", ".yml") and f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        ]
        return sorted(files)
    raise PolicyError([f"{path}: no such policy file or directory (set clrk_policies / CLRK_POLICIES)"])


def _format_loc(loc: Iterable) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


def _describe(raw: object) -> str:
    if isinstance(raw, dict):
        kind = raw.get("kind")
        name = raw.get("metadata", {}).get("name") if isinstance(raw.get("metadata"), dict) else None
        bits = [str(kind) if kind else None, str(name) if name else None]
        bits = [b for b in bits if b]
        if bits:
            return " (" + " ".join(bits) + ")"
    return ""


def _node_at(node: yaml.Node, loc: list) -> yaml.Node:
    """The deepest YAML node along a validation error's path (where the mistake was written)."""
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    child = v
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
    return node


def _validation_problems(file: str, index: int, raw: object, node: yaml.Node, err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        # The discriminated union adds the kind tag as the first path element; the user never wrote it.
        if loc and isinstance(raw, dict) and loc[0] == raw.get("kind"):
            loc = loc[1:]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = ["kind"]
        if e["type"] == "union_tag_invalid":
            msg = "unknown kind; expected one of EgressGateway, Agent, EgressRoute, EgressDenyPolicy, AIProviderRoute, Backend, CredentialInjectionPolicy, ModelPricing, MCPRoute"
        elif e["type"] == "union_tag_not_found":
            msg = "missing 'kind'"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against `clrk policy schema`)"
        elif e["type"] == "literal_error" and loc == ["apiVersion"]:
            msg = f"must be {API_VERSION}"
        mark = _node_at(node, loc).start_mark
        if e["type"] == "extra_forbidden" or (e["type"] == "missing" and len(loc) > 1):
            # The key itself for an unknown field; the mapping that lacks it for a missing one.
            parent = _node_at(node, loc[:-1])
            mark = next((k.start_mark for k, _ in getattr(parent, "value", []) if isinstance(k, yaml.ScalarNode)
                         and k.value == str(loc[-1])), parent.start_mark)
        problems.append(f"{file}:{mark.line + 1}:{mark.column + 1}: document {index}{_describe(raw)}: {_format_loc(loc)}: {msg}")
    return problems


def _read_yaml(name: str, text: str) -> tuple[list[tuple[yaml.Node, object]], str | None]:
    """Every document of `text` as (node, value), or the syntax error as `file:line:column: ...`."""
    out = []
    loader = None
    try:
        loader = _UniqueKeyLoader(text)
        while loader.check_node():
            node = loader.get_node()
            out.append((node, loader.construct_document(node)))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        context = f" ({e.context})" if getattr(e, "context", None) and getattr(e, "problem", None) else ""
        return [], f"{at}: invalid YAML: {getattr(e, 'problem', None) or e}{context}"
    finally:
        if loader is not None:
            loader.dispose()
    return out, None


def load_documents(path: str | os.PathLike) -> list[SourcedDocument]:
    """Parses and validates every document under `path`; raises PolicyError listing every problem."""
    docs: list[SourcedDocument] = []
    problems: list[str] = []
    for f in policy_files(path):
        name = str(f)
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{name}: cannot read: {e}")
            continue
        nodes, error = _read_yaml(name, text)
        if error:
            problems.append(error)
            continue
        index = 0
        for node, raw in nodes:
            if raw is None:  # an empty document between '---' separators
                continue
            index += 1
            line = node.start_mark.line + 1
            if not isinstance(raw, dict):
                problems.append(f"{name}:{line}: document {index}: expected a mapping with 'kind', 'metadata' and 'spec'")
                continue
            try:
                docs.append(SourcedDocument(_ADAPTER.validate_python(raw), name, index, line, node))
            except ValidationError as e:
                problems.extend(_validation_problems(name, index, raw, node, e))
    if problems:
        raise PolicyError(problems)
    return docs


def json_schema() -> dict:
    """The JSON Schema of one policy document (any kind), with YAML (camelCase) field names."""
    schema = _ADAPTER.json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "clrk policy document"
    return schema
