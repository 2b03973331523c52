"""The documentation users read stays in step with the code, and the repository stands alone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from clrk import attributes as A

REPO = Path(__file__).resolve().parents[1]


def test_every_record_field_is_documented_with_its_type():
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([A-Z\[\]]+) \|", (REPO / "docs" / "RECORDS.md").read_text(), re.M))
    assert rows == A.COLUMNS  # the same names, the same types, nothing extra


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        path = REPO / name
        if name.startswith(".ci/") or name == "tests/test_docs.py" or not path.is_file() or path.suffix in (".svg", ".png"):
            continue
        if re.search(r"PRODUCT\.md|\.\./shared", path.read_text(errors="replace")):
            hits.append(name)
    assert hits == [], f"these files point at documents a user of the repository does not have: {hits}"


def test_generated_references_match_the_code():
    """docs/CLI.md and docs/POLICY-REFERENCE.md are what `python -m clrk.cli.reference` makes of the code now."""
    from clrk.cli.reference import generated

    for path, text in generated().items():
        assert path.read_text() == text, f"{path.name} is out of date: run python -m clrk.cli.reference"


def test_the_references_cover_every_command_flag_and_policy_field():
    import argparse

    from clrk.cli import build_parser
    from clrk.policy import json_schema

    cli = (REPO / "docs" / "CLI.md").read_text()
    commands = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    for name, sub in commands.items():
        assert f"## `clrk {name}`" in cli
        for a in sub._actions:
            if a.help != argparse.SUPPRESS and a.option_strings and a.option_strings != ["-h", "--help"]:
                assert f"`{a.option_strings[-1]}" in cli.split(f"## `clrk {name}`")[1], (name, a.option_strings)
    policy = (REPO / "docs" / "POLICY-REFERENCE.md").read_text()
    schema = json_schema()
    for model, spec in schema["$defs"].items():
        for field, prop in spec.get("properties", {}).items():
            assert prop.get("description"), f"{model}.{field} has no description (a docstring under the field)"
            assert f".{field}`" in policy or f"`{field}`" in policy, (model, field)
