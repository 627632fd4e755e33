"""``binderhub-hpc bench``: the benchmarks of a source checkout
(``python -m benchmarks``)."""

import os
import sys


def add_bench(sub):
    p = sub.add_parser(
        "bench",
        add_help=False,
        prefix_chars="\0",
        help="run the benchmarks (python -m benchmarks; `bench --help` for options)",
    )
    p.add_argument("bench_argv", nargs="*", help="options of python -m benchmarks")


def cmd_bench(args):

    # benchmarks/ lives beside the package in a source checkout
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(top, "benchmarks")) and top not in sys.path:
        sys.path.insert(0, top)
    from benchmarks.__main__ import main as bench_main

    return bench_main(args.bench_argv)


COMMANDS = {"bench": (add_bench, cmd_bench)}
