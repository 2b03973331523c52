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
