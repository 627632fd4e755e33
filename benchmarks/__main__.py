"""Run the benchmarks and print one table: ``python -m benchmarks``.

    python -m benchmarks [--only launch[,other]] [--json out.json] [--quick]

Also ``binderhub-hpc bench``. The cluster benchmarks (launch, concurrent,
build, convert, dedup) run as root on the dev cluster, which they start if
needed. Results go to benchmarks/results/latest.json unless --json says
otherwise.
"""

import argparse
import importlib
import os
import sys
import time
import traceback

from .common import format_table, write_json

#: name -> module; a module provides run(args) -> list[Row] and may provide
#: add_arguments(parser). Add new benchmarks here.
BENCHMARKS = {
    "launch": "benchmarks.launch",
    "concurrent": "benchmarks.concurrent",
    "scale": "benchmarks.scale",
    "registry": "benchmarks.registry_lookup",
    "build": "benchmarks.build",
    "convert": "benchmarks.convert",
    "cold": "benchmarks.cold",
    "dedup": "benchmarks.dedup",
}


DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest.json")


def _load(names):
    return {name: importlib.import_module(BENCHMARKS[name]) for name in names}


def _source():
    """The commit measured, and which package files differed from it."""
    import subprocess

    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        p = subprocess.run(["git", "-C", top, *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "--", "binderhub_hpc").splitlines(),
    }


def main(argv=None):
    # two passes: the benchmarks chosen add their own options (and --help
    # must show them)
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help=f"run only these benchmarks (of: {', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=DEFAULT_JSON,
        help="write the results as JSON to PATH (default: %(default)s; '' for none)",
    )
    parser.add_argument("--no-notes", action="store_true", help="leave the note column out of the table")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not figures")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    known, _ = parser.parse_known_args(argv)
    if known.list:
        for name, mod in BENCHMARKS.items():
            print(f"{name:12} {mod}")
        return 0
    names = list(BENCHMARKS)
    if known.only:
        names = [n.strip() for arg in known.only for n in arg.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    modules = _load(names)
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    for mod in modules.values():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(parser)
    args = parser.parse_args(argv)

    rows = []
    timings = {}
    errors = {}
    for name, mod in modules.items():
        t0 = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            rows.extend(mod.run(args))
        except Exception as e:  # noqa: BLE001 - one failed benchmark must not hide the others
            traceback.print_exc()
            errors[name] = f"{e.__class__.__name__}: {e}"
            print(f"{name} FAILED: {errors[name]}", file=sys.stderr)
        timings[name] = round(time.monotonic() - t0, 2)
    print(format_table(rows, notes=not args.no_notes))
    for name, err in errors.items():
        print(f"{name}: FAILED ({err.splitlines()[0][:200]})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(
            rows,
            args.json,
            argv=sys.argv[1:] if argv is None else list(argv),
            wall_s=timings,
            quick=args.quick,
            errors=errors,
            source=_source(),
        )
        print(f"results written to {args.json}", file=sys.stderr)
    if errors:
        return 2
    if args.check and any(r.met is False for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
