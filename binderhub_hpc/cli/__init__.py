"""``binderhub-hpc``: one command, one subcommand per task.

Each subcommand lives in a module of this package as a pair of functions:
``add_<name>(sub)`` declares its arguments and ``cmd_<name>(args)`` runs it
(returning an exit code); the module's ``COMMANDS`` maps names to the pair.
``SUBCOMMANDS`` gathers them; add a module to add a command.

Other packages add commands through the entry point group
``binderhub_hpc.commands``: each entry point names a module with its own
``COMMANDS``. A source checkout's development tooling (``devcluster``,
``demo``, ``bench``: the ``testing/`` package, which a site's install does
not carry) plugs in that way.
"""

import argparse
import logging
from importlib.metadata import entry_points

from . import build, doctor, launch

PLUGIN_GROUP = "binderhub_hpc.commands"

SUBCOMMANDS = {}
for _module in (build, launch, doctor):
    SUBCOMMANDS.update(_module.COMMANDS)


def _plugins():
    """Commands of installed plug-ins; one that cannot be imported is left
    out (the command is then unknown, as it is without the plug-in)."""
    commands = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            commands.update(ep.load().COMMANDS)
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the tool
            logging.getLogger(__name__).debug("plug-in %s left out: %s", ep.name, e)
    return commands


def make_parser():
    parser = argparse.ArgumentParser(
        prog="binderhub-hpc",
        description="Binder on HPC: build SIF images, launch sessions through the batch scheduler.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in all_commands().values():
        add(sub)
    return parser


def all_commands():
    return {**SUBCOMMANDS, **_plugins()}


def main(argv=None):
    args = make_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _, run = all_commands()[args.command]
    return run(args) or 0
