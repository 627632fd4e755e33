"""``binderhub-hpc devcluster``: the dev cluster on this machine
(:class:`binderhub_hpc.dev.cluster.DevCluster`)."""

import json
import sys
import time


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
    up.add_argument("--nodes", type=int, default=None,
                    help="hosts besides this machine: a hub node, a build node and NODES-2 compute "
                         "nodes, each a network namespace on a private bridge (e.g. 4); 1: a single "
                         "node (the default, or what runs now)")
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

    cluster = DevCluster(state_dir=args.state_dir, nodes=getattr(args, "nodes", None))
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


COMMANDS = {"devcluster": (add_devcluster, cmd_devcluster)}
