"""``binderhub-hpc``: one command, one subcommand per task.

Each subcommand lives in a module of this package as a pair of functions:
``add_<name>(sub)`` declares its arguments and ``cmd_<name>(args)`` runs it
(returning an exit code); the module's ``COMMANDS`` maps names to the pair.
``SUBCOMMANDS`` gathers them; add a module to add a command.
"""

import argparse
import logging

from . import bench, build, demo, devcluster, doctor, launch

SUBCOMMANDS = {}
for _module in (build, launch, doctor, devcluster, demo, bench):
    SUBCOMMANDS.update(_module.COMMANDS)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="binderhub-hpc",
        description="Binder on HPC: build SIF images, launch sessions through the batch scheduler.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _, run = SUBCOMMANDS[args.command]
    return run(args) or 0
