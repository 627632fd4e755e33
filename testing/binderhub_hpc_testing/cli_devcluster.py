"""``binderhub-hpc devcluster``: the dev cluster on this machine
(:class:`binderhub_hpc_testing.cluster.DevCluster` for Slurm,
:class:`binderhub_hpc_testing.pbs.PBSDevCluster` for an installed OpenPBS)."""

import json
import sys
import time


def _scheduler_args(parser, default, choices=("slurm", "pbs")):
    parser.add_argument("--scheduler", choices=choices, default=default, help=f"which scheduler (default: {default})")
    parser.add_argument(
        "--pbs-prefix",
        help="the OpenPBS installation (default: $PBS_EXEC, qsub on PATH, else the newest of /opt/pbs, /opt/pbs-*)",
    )


def add_devcluster(sub):
    p = sub.add_parser(
        "devcluster",
        help="the dev cluster (Slurm or OpenPBS, munge, podman, service and build accounts)",
        description="Set up, inspect or stop the dev cluster on this machine.",
    )
    p.add_argument(
        "--state-dir",
        help="state directory (default: $BINDERHUB_HPC_DEVCLUSTER_DIR or /var/lib/binderhub-hpc/devcluster)",
    )
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = dsub.add_parser("up", help="start (idempotent); also makes the base image")
    _scheduler_args(up, "slurm")
    up.add_argument("--no-base-image", action="store_true", help="do not make the local base image")
    up.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="Slurm: hosts besides this machine: a hub node, a build node and NODES-2 "
        "compute nodes, each a network namespace on a private bridge; 1: this machine "
        "alone (default: what runs now, else 4)",
    )
    up.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for the node to become idle (Slurm: 60, PBS: 120)"
    )
    down = dsub.add_parser(
        "down",
        help="stop the daemons the dev cluster started (both schedulers "
        "unless --scheduler), and remove what it made for PBS",
    )
    _scheduler_args(down, None)
    st = dsub.add_parser("status", help="what runs")
    _scheduler_args(st, "slurm")
    st.add_argument("--json", action="store_true")
    bi = dsub.add_parser("base-image", help="make the local test/demo base image")
    bi.add_argument("--force", action="store_true", help="rebuild even if present")
    bi.add_argument("--rootless", action="store_true", help="also copy it into the service account's podman storage")
    env = dsub.add_parser("env", help="print the shell lines for the scheduler's clients")
    _scheduler_args(env, "slurm")


def _pbs(args):
    from .pbs import PBSDevCluster

    return PBSDevCluster(prefix=getattr(args, "pbs_prefix", None), state_dir=args.state_dir)


def cmd_devcluster(args):
    from .cluster import DevCluster, DevClusterError

    cluster = DevCluster(state_dir=args.state_dir, nodes=getattr(args, "nodes", None))
    scheduler = getattr(args, "scheduler", None)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            if scheduler == "pbs":
                target = _pbs(args)
                target.up(timeout=args.timeout or 120)
            else:
                target = cluster
                cluster.up(timeout=args.timeout or 60)
            print(f"dev cluster ({scheduler}) up in {time.monotonic() - t0:.1f} s")
            if not args.no_base_image:
                t1 = time.monotonic()
                image = cluster.ensure_base_image()
                print(f"base image {image} ready in {time.monotonic() - t1:.1f} s")
            print(target.format_status())
        elif args.action == "down":
            stopped = []
            if scheduler in (None, "slurm"):
                stopped += cluster.down()
            if scheduler in (None, "pbs"):
                stopped += _pbs(args).down()
            print("stopped or removed: " + (", ".join(stopped) if stopped else "nothing (none were ours)"))
        elif args.action == "status":
            target = _pbs(args) if scheduler == "pbs" else cluster
            st = target.status()
            print(json.dumps(st, indent=2) if args.json else target.format_status(st))
            if scheduler == "pbs":
                return 0 if target.is_up() else 3
            return 0 if all(d["pid"] for d in st["daemons"].values()) else 3
        elif args.action == "base-image":
            t0 = time.monotonic()
            image = cluster.ensure_base_image(rootless=args.rootless, force=args.force)
            print(f"base image {image} ready in {time.monotonic() - t0:.1f} s")
        elif args.action == "env":
            if scheduler == "pbs":
                pbs = _pbs(args)
                for k, v in pbs.env.items():
                    print(f"export {k}={v}")
                print(f'export PATH="{pbs.bin("qsub").rsplit("/", 1)[0]}:$PATH"')
            else:
                for k, v in cluster.env.items():
                    print(f"export {k}={v}")
    except DevClusterError as e:
        print(f"binderhub-hpc devcluster {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"devcluster": (add_devcluster, cmd_devcluster)}
