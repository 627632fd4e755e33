"""``binderhub-hpc demo``: BinderHub on the dev cluster, in one command
(:class:`binderhub_hpc_testing.demo.Demo`)."""

import sys
import time

from .demo import DEFAULT_STATE_DIR, STATE_DIR_ENV, Demo, DemoError


def add_demo(sub):
    p = sub.add_parser(
        "demo",
        help="run BinderHub + JupyterHub on the dev cluster and print a Binder link",
        description="Run the deployment of charts-free-config/ on the dev cluster: JupyterHub "
        "and BinderHub (an external hub service) with binderhub-hpc's builder, registry and Slurm "
        "spawner, only the dev cluster's values changed; print a Binder link to an example "
        "repository. Needs BinderHub installed (or $BINDERHUB_SOURCE).",
    )
    p.add_argument(
        "--state-dir", help=f"configs, logs, example repository (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})"
    )
    p.add_argument(
        "--ip",
        default=None,
        help="address the proxy listens on (default: the hub node's on a multi-node dev cluster, else 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=8000, help="public port (default 8000)")
    p.add_argument("--public-url", help="URL users reach the hub at (default http://IP:PORT/)")
    p.add_argument(
        "--runtime",
        choices=["apptainer", "singularity", "podman"],
        help="container runtime of the sessions (default: apptainer if present, else podman)",
    )
    p.add_argument("--stop", action="store_true", help="stop what the demo started")


def cmd_demo(args):
    demo = Demo(state_dir=args.state_dir, ip=args.ip, port=args.port, public_url=args.public_url, runtime=args.runtime)
    try:
        if args.stop:
            stopped = demo.stop()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
            return 0
        t0 = time.monotonic()
        links = demo.up()
    except DemoError as e:
        print(f"binderhub-hpc demo: {e}", file=sys.stderr)
        return 1
    st = demo.state()
    print(
        f"BinderHub is up at {links['binder']} ({time.monotonic() - t0:.1f} s; sessions run "
        f"in {st.get('runtime')} as Slurm jobs; logs in {demo.log_path})"
    )
    print(f"\nExample repository: {links['repo_url']}")
    print(f"Binder link:\n  {links['link']}")
    print(f"Markdown badge:\n  {links['badge']}")
    print(f"\nThe first click builds the image (progress as an event stream: {links['build_api']});")
    print(
        "later clicks launch at once. Stop with: binderhub-hpc demo --stop"
        + (f" --state-dir {demo.state_dir}" if args.state_dir else "")
    )
    return 0


COMMANDS = {"demo": (add_demo, cmd_demo)}
