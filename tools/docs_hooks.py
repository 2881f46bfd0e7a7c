"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks``); run by ``make docs``.

* The command-line reference is generated from ``hap.cli.build_parser()`` at build time: the marker
  ``<!-- hap-cli-reference -->`` in ``docs/reference/cli.md`` becomes one section per subcommand (usage,
  description, every argument with its help), so the page cannot drift from the parser.
* Benchmark plots and pages stay where the benchmark scripts write them (``benchmarks/``); every file
  under ``benchmarks/`` that a page links to is added to the site at the same path, so a missing plot
  fails the strict build like any broken link.

``cli_reference()`` is plain Python: ``python tools/docs_hooks.py`` prints the generated Markdown.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- hap-cli-reference -->"
USAGE_WIDTH = "100"  # argparse wraps usage lines to $COLUMNS


def _text(value: str) -> str:
    """Help text as Markdown prose: HTML-escaped (edge names such as ``a4.h2<q>`` are not tags)."""
    return html.escape(" ".join(value.split()), quote=False).replace("*", "\\*")


def _flags(action: argparse.Action) -> str:
    """``--model MODEL`` / ``--bos, --no-bos`` / ``--method {eap,...}`` as one code span per spelling."""
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    takes_value = action.nargs != 0
    if action.metavar is not None:
        value = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        value = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        value = action.dest.upper()
    return ", ".join(f"`{flag} {value}`" if takes_value else f"`{flag}`" for flag in action.option_strings)


def _argument(action: argparse.Action) -> str:
    parts = [_flags(action)]
    details = []
    if action.help and action.help != argparse.SUPPRESS:
        details.append(_text(action.help % {"default": action.default} if "%(" in action.help else action.help))
    if action.required and action.option_strings:
        details.append("required")
    if action.nargs in ("+", "*"):
        details.append("one or more" if action.nargs == "+" else "any number")
    shown_default = action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
    if shown_default and "default" not in (action.help or ""):
        details.append(f"default `{action.default}`")
    return f"- {parts[0]}" + (f": {'; '.join(details)}" if details else "")


def _section(name: str, parser: argparse.ArgumentParser, summary: str | None) -> list[str]:
    lines = [f"## hap {name}" if name else "## hap", ""]
    if summary:
        lines += [f"*{_text(summary)}*", ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    if parser.description:
        lines += [_text(parser.description), ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if not actions:
            continue
        title = {"positional arguments": "Arguments", "options": "Options"}.get(group.title, group.title)
        lines += [f"**{_text(title or 'Options')}**", ""]
        lines += [_argument(action) for action in actions]
        lines.append("")
    return lines


def cli_reference() -> str:
    """Markdown for every ``hap`` subcommand, read from the parser the command line itself uses."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_WIDTH
    try:
        sys.path.insert(0, str(ROOT))
        from hap.cli import build_parser

        parser = build_parser()
        lines = _section("", parser, None)
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        summaries = {choice.dest: choice.help for choice in subparsers._choices_actions}
        for name, sub in subparsers.choices.items():
            lines += _section(name, sub, summaries.get(name))
        return "\n".join(lines)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        return markdown.replace(CLI_MARKER, cli_reference())
    return markdown


LINK = re.compile(r"\]\(([^)\s#]+)")


def on_files(files, config):
    """Add every file under ``benchmarks/`` that a page links to, at the same path in the site."""
    from mkdocs.structure.files import File

    docs = Path(config["docs_dir"])
    wanted: set[str] = set()
    for page in docs.rglob("*.md"):
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            uri = os.path.relpath(os.path.normpath(page.parent / target), docs)
            if uri.startswith("benchmarks" + os.sep) and not (docs / uri).exists():
                wanted.add(uri.replace(os.sep, "/"))
    for uri in sorted(wanted):
        source = ROOT / uri
        if source.is_file():  # a missing one stays missing: the strict build reports the broken link
            files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


if __name__ == "__main__":
    print(cli_reference())
