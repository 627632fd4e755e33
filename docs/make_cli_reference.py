"""Write docs/reference/cli.md: every command of the `binderhub-hpc` tool a
site installs, from its own argument parser (so the page cannot drift from
the code). The development commands of a checkout (devcluster, demo, bench:
the testing/ plug-in) are in the tutorial, not here.

    python3 docs/make_cli_reference.py            # rewrite the file
    python3 docs/make_cli_reference.py --check    # exit 1 if it is stale
"""

import argparse
import os
import sys
from pathlib import Path

from binderhub_hpc.cli import SUBCOMMANDS

OUT = Path(__file__).resolve().parent / "reference" / "cli.md"


def _parser(name):
    """The parser of one command, as `binderhub-hpc` builds it."""
    top = argparse.ArgumentParser(prog="binderhub-hpc")
    sub = top.add_subparsers(dest="command")
    add, _ = SUBCOMMANDS[name]
    add(sub)
    return sub.choices[name]


def render():
    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width
    parts = [
        "# Command-line reference\n",
        "`binderhub-hpc` is the one command of a site's install; each task is a",
        "subcommand. `-v` (`-vv`) before the subcommand gives more log output.",
        "This page is generated from the commands' own parsers",
        "(`docs/make_cli_reference.py`).\n",
    ]
    for name in SUBCOMMANDS:
        p = _parser(name)
        parts.append(f"## `binderhub-hpc {name}`\n")
        parts.append("```text")
        parts.append(p.format_help().rstrip())
        parts.append("```\n")
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 docs/make_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
