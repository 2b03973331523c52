"""The package layout follows the processes (docs/ARCHITECTURE.md): `clrk/proxy` runs in the gateway process,
`clrk/recorder` in the recorder process, `clrk/cli` in the command line; the rest is shared and pure. Read
from the source with `ast` (nothing is imported): no import cycles among clrk's modules, no mitmproxy in
the shared parts, nothing outside the proxy and the CLI reaching into them, and the proxy knowing nothing
of the recorder's internals (it speaks to it through `clrk.wire` only)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "clrk"

# What clrk.proxy may import from clrk.recorder (none: records and queries go over clrk.wire).
PROXY_USES_OF_RECORDER: frozenset[str] = frozenset()

# Import edges that exist for the type checker only (under `if TYPE_CHECKING:`), left out of the cycle check.
# clrk.addresses annotates with the compiled policy's types, while clrk.policy builds its tables from
# clrk.addresses at load: breaking it would mean protocols for four types, for no runtime gain.
TYPE_ONLY_EDGES: frozenset[tuple[str, str]] = frozenset({("clrk.addresses", "clrk.policy.compiled")})


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The clrk modules `name` imports anywhere in its source (functions and TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from clrk.x import y`: y is a module when clrk.x.y is one, else a name in clrk.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t.startswith("clrk") and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def _side(name: str) -> str:
    for side in ("clrk.proxy", "clrk.recorder", "clrk.cli"):
        if name == side or name.startswith(side + "."):
            return side
    return "shared"


def test_the_layout_is_read():
    assert {"clrk.proxy.gateway", "clrk.proxy.runtime", "clrk.proxy.transaction", "clrk.recorder.service", "clrk.cli",
            "clrk.decision", "clrk.attributes"} <= MODULES.keys()
    assert "clrk.proxy.runtime" in GRAPH["clrk.proxy.gateway"] or any(
        "clrk.proxy.runtime" in GRAPH[m] for m in GRAPH["clrk.proxy.gateway"])


def test_type_only_edges_are_still_there():
    for a, b in TYPE_ONLY_EDGES:
        assert b in GRAPH[a], f"{a} no longer imports {b}: drop the exception"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if (name, dep) in TYPE_ONLY_EDGES:
                continue
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_shared_parts_do_not_import_mitmproxy():
    offenders = {n for n, p in MODULES.items() if _side(n) == "shared" and "mitmproxy" in _third_party(p)}
    assert offenders == set()


def test_recorder_and_shared_parts_do_not_import_the_proxy_or_the_cli():
    offenders = {(n, d) for n, deps in GRAPH.items() if _side(n) in ("shared", "clrk.recorder")
                 for d in deps if _side(d) in ("clrk.proxy", "clrk.cli")}
    assert offenders == set()


def test_proxy_uses_only_what_it_needs_of_the_recorder():
    used = {d for n, deps in GRAPH.items() if _side(n) == "clrk.proxy" for d in deps if _side(d) == "clrk.recorder"}
    assert used <= PROXY_USES_OF_RECORDER


def test_the_proxy_does_not_import_the_cli():
    offenders = {(n, d) for n, deps in GRAPH.items() if _side(n) == "clrk.proxy" for d in deps if _side(d) == "clrk.cli"}
    assert offenders == set()
