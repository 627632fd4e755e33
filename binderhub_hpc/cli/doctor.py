"""``binderhub-hpc doctor``: check a whole deployment and say in plain
words what is wrong (the checks live in :mod:`binderhub_hpc.health`)."""

import json
from dataclasses import asdict

from ..config import load_config_files
from ..health import FAIL, OK, WARN, Deployment, run_checks


def add_doctor(sub):
    p = sub.add_parser(
        "doctor",
        help="check a deployment and say what is wrong",
        description=__doc__.split("\n\n")[0] + " Exit code 1 when a check fails.",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="traitlets config file (jupyterhub_config.py, binderhub_config.py); repeatable",
    )
    p.add_argument("--scheduler", choices=["slurm", "pbs"])
    p.add_argument("--partition", help="partition (PBS: queue) sessions are submitted to")
    p.add_argument("--runtime", choices=["apptainer", "singularity", "podman"])
    p.add_argument("--image", help="an image (registry name or file) the runtime must be able to run")
    p.add_argument("--registry-root", help="c.SIFRegistry.root")
    p.add_argument("--build-user", help="account builds run as (default: this one)")
    p.add_argument("--job-user", help="account session jobs run as (default: the spawner's job_user)")
    p.add_argument("--python", help="python on compute nodes (default: the spawner's host_python)")
    p.add_argument("--hub-url", help="JupyterHub's URL, e.g. https://binder.example.org/")
    p.add_argument("--hub-api-url", help="the hub's API URL as compute nodes reach it")
    p.add_argument(
        "--binderhub",
        help="BinderHub's address as compute nodes would reach it, host:port, which the "
        "compute-node test job must not reach (default: the hub's host, c.BinderHub.port "
        "or the hub's 'binder' service's port)",
    )
    p.add_argument(
        "--token",
        help="hub API token; prefer the JUPYTERHUB_API_TOKEN environment "
        "variable (a command line is visible to every user)",
    )
    p.add_argument("--no-job", action="store_true", help="do not submit the compute-node test job")
    p.add_argument("--job-timeout", type=float, default=120, help="seconds for the test job")
    p.add_argument("--json", action="store_true", help="results as JSON")


_MARK = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL"}


def cmd_doctor(args):
    dep = Deployment(
        load_config_files(args.config),
        scheduler=args.scheduler,
        partition=args.partition,
        runtime=args.runtime,
        image=args.image,
        registry_root=args.registry_root,
        build_user=args.build_user,
        job_user=args.job_user,
        python=args.python,
        hub_url=args.hub_url,
        hub_api_url=args.hub_api_url,
        token=args.token,
        binderhub=args.binderhub,
        job_timeout=args.job_timeout,
    )
    results = []
    for name, fn in dep.checks(job=not args.no_job):
        (r,) = run_checks([(name, fn)])
        results.append(r)
        if not args.json:
            print(f"[{_MARK[r.status]}] {r.name}: {r.message}", flush=True)
    failed = [r for r in results if r.status == FAIL]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        warned = sum(r.status == WARN for r in results)
        print(f"\n{len(results) - len(failed) - warned} ok, {warned} warning(s), {len(failed)} failure(s).")
    return 1 if failed else 0


COMMANDS = {"doctor": (add_doctor, cmd_doctor)}
