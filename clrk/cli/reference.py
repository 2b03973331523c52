"""Writes the generated reference docs: docs/CLI.md (every command and flag, from the parser; the options and
environment, from clrk.settings) and docs/POLICY-REFERENCE.md (from the policy models).

    python -m clrk.cli.reference          # rewrite them
    python -m clrk.cli.reference --check  # exit 1 if they differ from the code (tests/test_docs.py does this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clrk.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _help(p: argparse.ArgumentParser, a: argparse.Action) -> str:
    text = (a.help or "") % {"default": a.default, "prog": p.prog}
    if a.choices and not isinstance(a, argparse._SubParsersAction):
        text += f" (one of: {', '.join(map(str, a.choices))})"
    return " ".join(text.split()).replace("|", "\\|")


def _command(lines: list[str], name: str, p: argparse.ArgumentParser, summary: str) -> None:
    subs = _subcommands(p)
    lines += ["", f"## `{name}`", "", summary, "", "```", " ".join(p.format_usage().split()), "```"]
    if p.description and p.description != summary:
        lines += ["", " ".join(p.description.split())]
    rows = []
    for a in p._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        flag = ", ".join(a.option_strings) if a.option_strings else a.dest
        if a.option_strings and a.nargs != 0:
            flag += f" {a.metavar or a.dest.upper()}"
        rows.append(f"| `{flag}` | {_help(p, a)} |")
    if rows:
        lines += ["", "| argument | meaning |", "|---|---|", *rows]
    if p.epilog:
        lines += ["", " ".join(p.epilog.split())]
    helps = {}
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
    for sub, sp in subs.items():
        _command(lines, f"{name} {sub}", sp, helps.get(sub) or "")


def cli_markdown() -> str:
    from clrk.cli import build_parser

    p = build_parser(Settings.model_construct())  # the defaults, not this shell's CLRK_* variables
    lines = [
        "# Command line, options and environment",
        "",
        "<!-- Generated from clrk/cli/__init__.py and clrk/settings.py by `python -m clrk.cli.reference`; "
        "do not edit by hand. -->",
        "",
        "`clrk` is installed into `.venv/bin/` by `scripts/setup`. Every command that reads the store works while",
        "the gateway runs (it asks the gateway's recorder over its socket) and when none does (it opens the file",
        "read-only).",
        "",
        "```",
        " ".join(p.format_usage().split()),
        "```",
    ]
    helps = {}
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
    for name, sp in _subcommands(p).items():
        _command(lines, f"clrk {name}", sp, helps.get(name) or "")
    lines += [
        "",
        "## Options and environment",
        "",
        "The gateway process (`clrk run`, `mitmdump -s addons/clrk.py`) takes clrk's settings as mitmproxy options",
        "(`--set clrk_db=...`), whose defaults come from the environment; the `clrk` commands read the same",
        "variables for their defaults.",
        "",
        "| mitmproxy option | environment | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, f in Settings.model_fields.items():
        meaning = (f.description or "").removeprefix("clrk: ").split(" (env ")[0]
        lines.append(f"| `clrk_{name}` | `CLRK_{name.upper()}` | `{f.default}` | {meaning} |")
    lines += [
        "",
        "clrk also sets these mitmproxy options, whatever the command line or mitmproxy's config.yaml says:",
        "`connection_strategy=lazy` (no upstream contact before a decision), `flow_detail=0` (mitmproxy's own",
        "flow log would print unredacted URLs), `rawtcp=false` (no opaque relays on a terminating listener), and",
        "`confdir` = `clrk_certs` unless set (the CA's directory). Any other mitmproxy option can be given after",
        "`--` to `clrk run`, e.g. `tcp_timeout` (600 s) or `termlog_verbosity`.",
    ]
    return "\n".join(lines) + "\n"


def generated() -> dict[Path, str]:
    from clrk.policy.reference import markdown

    return {REPO / "docs" / "CLI.md": cli_markdown(), REPO / "docs" / "POLICY-REFERENCE.md": markdown()}


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for path, text in generated().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if check and stale:
        print("out of date (run python -m clrk.cli.reference): " + ", ".join(str(p.relative_to(REPO)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
