"""``binderhub-hpc``: one command, one subcommand per task.

Each subcommand is a pair of functions in this module: ``add_<name>(sub)``
declares its arguments and ``cmd_<name>(args)`` runs it (returning an exit
code). ``SUBCOMMANDS`` is the dispatch table; add a row to add a command.
"""

import argparse
import json
import logging
import sys
import time


# --------------------------------------------------------------- devcluster
def add_devcluster(sub):
    p = sub.add_parser(
        "devcluster",
        help="single-node dev cluster (Slurm, munge, podman, service account)",
        description="Set up, inspect or stop the single-node dev cluster on this machine.",
    )
    p.add_argument("--state-dir", help="state directory (default: $BINDERHUB_HPC_DEVCLUSTER_DIR"
                   " or /var/lib/binderhub-hpc/devcluster)")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = dsub.add_parser("up", help="start (idempotent); also makes the base image")
    up.add_argument("--no-base-image", action="store_true",
                    help="do not make the local base image")
    up.add_argument("--timeout", type=float, default=60,
                    help="seconds to wait for the node to become idle")
    dsub.add_parser("down", help="stop the daemons the dev cluster started")
    st = dsub.add_parser("status", help="what runs")
    st.add_argument("--json", action="store_true")
    bi = dsub.add_parser("base-image", help="make the local test/demo base image")
    bi.add_argument("--force", action="store_true", help="rebuild even if present")
    bi.add_argument("--rootless", action="store_true",
                    help="also copy it into the service account's podman storage")
    dsub.add_parser("env", help="print the shell line for Slurm clients")


def cmd_devcluster(args):
    from ..dev.cluster import DevCluster, DevClusterError

    cluster = DevCluster(state_dir=args.state_dir)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            cluster.up(timeout=args.timeout)
            print(f"dev cluster up in {time.monotonic() - t0:.1f} s")
            if not args.no_base_image:
                t1 = time.monotonic()
                image = cluster.ensure_base_image()
                print(f"base image {image} ready in {time.monotonic() - t1:.1f} s")
            print(cluster.format_status())
        elif args.action == "down":
            stopped = cluster.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing (none were ours)"))
        elif args.action == "status":
            st = cluster.status()
            print(json.dumps(st, indent=2) if args.json else cluster.format_status(st))
            return 0 if all(d["pid"] for d in st["daemons"].values()) else 3
        elif args.action == "base-image":
            t0 = time.monotonic()
            image = cluster.ensure_base_image(rootless=args.rootless, force=args.force)
            print(f"base image {image} ready in {time.monotonic() - t0:.1f} s")
        elif args.action == "env":
            for k, v in cluster.env.items():
                print(f"export {k}={v}")
    except DevClusterError as e:
        print(f"binderhub-hpc devcluster {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------- bench
def add_bench(sub):
    p = sub.add_parser("bench", add_help=False, prefix_chars="\0",
                       help="run the benchmarks (python -m benchmarks; `bench --help` for options)")
    p.add_argument("bench_argv", nargs="*", help="options of python -m benchmarks")


def cmd_bench(args):
    import os

    # benchmarks/ lives beside the package in a source checkout
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(top, "benchmarks")) and top not in sys.path:
        sys.path.insert(0, top)
    from benchmarks.__main__ import main as bench_main

    return bench_main(args.bench_argv)


# ------------------------------------------------------------ dispatch table
# name -> (add_arguments, run). Planned: build, images, gc, launch, doctor,
# demo, bench.
SUBCOMMANDS = {
    "devcluster": (add_devcluster, cmd_devcluster),
    "bench": (add_bench, cmd_bench),
}

from .build import COMMANDS as _BUILD_COMMANDS  # noqa: E402  build, images, gc

SUBCOMMANDS.update(_BUILD_COMMANDS)

from .launch import COMMANDS as _LAUNCH_COMMANDS  # noqa: E402  launch

SUBCOMMANDS.update(_LAUNCH_COMMANDS)

from ..dev.demo import COMMANDS as _DEMO_COMMANDS  # noqa: E402  demo

SUBCOMMANDS.update(_DEMO_COMMANDS)

from ..health import COMMANDS as _DOCTOR_COMMANDS  # noqa: E402  doctor

SUBCOMMANDS.update(_DOCTOR_COMMANDS)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="binderhub-hpc",
        description="Binder on HPC: build SIF images, launch sessions through the batch scheduler.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
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
