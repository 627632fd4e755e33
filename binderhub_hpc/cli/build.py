"""``binderhub-hpc build | images | gc``: the pipeline and registry by hand.

``build`` runs exactly the pipeline BinderHub runs (same registry, same image
names), e.g. to pre-build a workshop's repository the night before. The
image name is computed as BinderHub computes it (``image_prefix`` + safe
build slug of the repository + ``:`` + resolved ref), so a later click on
the Binder link finds the image.

Configuration is a traitlets Python file, as for JupyterHub and BinderHub
(``c.SIFRegistry.root = "/shared/binder/registry"``), given with
``--config``; ``--registry-root`` is a shortcut for that one setting.
"""

import json
import os
import pwd
import re
import shutil
import signal
import socket
import sys
import threading
import time
from datetime import datetime

from ..binderlink import RefError, image_name, resolve_ref
from ..builder.limits import parse_size
from ..config import load_config_files

SHA1 = re.compile(r"^[0-9a-f]{40}$")


# -- configuration --------------------------------------------------------------------


def load_config(args):
    cfg = load_config_files([args.config] if getattr(args, "config", None) else [])
    if getattr(args, "registry_root", None):
        cfg.SIFRegistry.root = args.registry_root
    return cfg


def _add_common(p):
    p.add_argument("--config", help="traitlets config file (Python), e.g. c.SIFRegistry.root = ...")
    p.add_argument("--registry-root", help="shortcut for c.SIFRegistry.root")


def format_size(n):
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


# -- build --------------------------------------------------------------------------


def add_build(sub):
    p = sub.add_parser(
        "build",
        help="build a repository into the SIF registry (as BinderHub would)",
        description="Build REPO at REF into the SIF registry with the same pipeline and image names as BinderHub.",
    )
    p.add_argument("repo", help="repository URL or local git checkout")
    p.add_argument("ref", nargs="?", default="HEAD", help="branch, tag or commit (default HEAD)")
    p.add_argument("--image", help="image name (default: computed like BinderHub)")
    p.add_argument(
        "--image-prefix",
        default=None,
        help="BinderHub's image_prefix (default: c.BinderHub.image_prefix or 'binderhub-hpc/binder-')",
    )
    p.add_argument(
        "--json-logs", action="store_true", help="print repo2docker-style JSON log lines (for remote runners)"
    )
    p.add_argument(
        "--git-credentials-stdin", action="store_true", help="read git credentials (git-credential format) from stdin"
    )
    p.add_argument(
        "--result-key-stdin",
        action="store_true",
        help="read a key (hex) from stdin's first line, before any credentials, and sign the result line "
        "with it (remote runners: they accept only a result signed with the key they gave)",
    )
    p.add_argument(
        "--stop-with-parent",
        action="store_true",
        help="stop the build when the parent process ends (a remote runner's ssh session closed, its job step gone)",
    )
    p.add_argument("--timeout", type=float, help="build timeout in seconds")
    _add_common(p)


def _stop_with_parent(signum):
    """Have the kernel send `signum` when our parent ends (ssh session, job step)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    libc.prctl(1, int(signum), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the prctl
        os.kill(os.getpid(), signum)


def _read_stdin(args):
    """(result key, git credentials) from stdin, which is then replaced by
    /dev/null: no process this one starts inherits them (a job's stdin is a
    file, which a child could read again from its start)."""
    key = sys.stdin.readline().strip() if args.result_key_stdin else ""
    creds = sys.stdin.read() if args.git_credentials_stdin else ""
    if args.result_key_stdin or args.git_credentials_stdin:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    return key, creds


def _undumpable():
    """No other process of this account may read this one's memory (the
    result key) through ptrace or /proc/PID/mem (PR_SET_DUMPABLE 0); the
    programs it starts are not affected."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE


def cmd_build(args):
    from ..builder.credentials import CredentialsError, credential_environment
    from ..builder.environment import build_environment
    from ..builder.pipeline import BuildPipeline, BuildRequest, BuildResult
    from ..builder.protocol import FAILED, LOG, RESULT_KEY, log_line, result_line

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if args.stop_with_parent:
        _stop_with_parent(signal.SIGTERM)

    # first of all: the key (kept in memory only) and the credentials
    key, creds = _read_stdin(args)
    if args.result_key_stdin:
        if not args.json_logs or not RESULT_KEY.fullmatch(key):
            print("binderhub-hpc build: --result-key-stdin needs --json-logs and a hex key on stdin", file=sys.stderr)
            return 2
        _undumpable()
    cfg = load_config(args)
    try:
        # a branch of a private repository needs the credentials already
        with credential_environment(args.repo, creds if not SHA1.match(args.ref or "") else "") as extra:
            ref = resolve_ref(args.repo, args.ref, env=build_environment(extra=extra))
    except (RefError, CredentialsError) as e:
        if key:
            # the runner says why, once, from the signed result
            failed = BuildResult("failure", args.image or "", error=str(e))
            print(result_line(failed, key), flush=True)
        else:
            print(f"binderhub-hpc build: {e}", file=sys.stderr)
        return 2
    prefix = args.image_prefix
    if prefix is None:
        prefix = (
            cfg.BinderHub.get("image_prefix", "binderhub-hpc/binder-")
            if "BinderHub" in cfg
            else "binderhub-hpc/binder-"
        )
    image = args.image or image_name(args.repo, ref, prefix)
    pipeline = BuildPipeline(config=cfg)
    if args.timeout:
        pipeline.build_timeout = args.timeout

    def progress(kind, payload):
        if kind != LOG or progress.gone:
            return
        try:
            if args.json_logs:
                if key and json.loads(payload).get("phase") == FAILED:
                    return  # the signed result carries the reason; the runner says it
                print(payload, flush=True)
            else:
                try:
                    msg = json.loads(payload).get("message", "")
                except ValueError:
                    msg = payload
                sys.stdout.write(msg if msg.endswith("\n") else msg + "\n")
                sys.stdout.flush()
        except BrokenPipeError:
            # whoever read our log (ssh, a runner) is gone: stop the build
            progress.gone = True
            stop.set()

    progress.gone = False
    if not args.json_logs:
        print(f"Building {args.repo} at {ref} as {image}", flush=True)
    else:
        who = pwd.getpwuid(os.getuid()).pw_name
        progress(LOG, log_line(f"Building on {socket.gethostname()} as {who}\n"))
    t0 = time.monotonic()
    request = BuildRequest(args.repo, ref, image, git_credentials=creds)
    result = pipeline.run(request, progress, stop_event=stop)
    if progress.gone:
        pass
    elif args.json_logs:
        print(result_line(result, key), flush=True)
    else:
        print(f"{result.outcome}: {result.path or result.error} ({time.monotonic() - t0:.1f} s)")
    return {"success": 0, "cached": 0, "cancelled": 130, "timeout": 124}.get(result.outcome, 1)


# -- images ---------------------------------------------------------------------------


def add_images(sub):
    p = sub.add_parser("images", help="list the images of the SIF registry")
    p.add_argument("--json", action="store_true")
    _add_common(p)


def _ts(t):
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"


def cmd_images(args):
    from ..registry import SIFRegistry

    registry = SIFRegistry(config=load_config(args))
    records = registry.images()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "image": r.image,
                        "path": str(r.path),
                        "size": r.size,
                        "created": r.created,
                        "last_used": r.last_used,
                    }
                    for r in records
                ],
                indent=1,
            )
        )
        return 0
    rows = [("IMAGE", "SIZE", "CREATED", "LAST USED")]
    rows += [(r.image, format_size(r.size), _ts(r.created), _ts(r.last_used)) for r in reversed(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    total = sum(r.size for r in records)
    print(f"{len(records)} images, {format_size(total)}")
    return 0


# -- gc -------------------------------------------------------------------------------


def add_gc(sub):
    p = sub.add_parser("gc", help="evict least recently used images, remove stale temporaries")
    p.add_argument("--max-size", help="size quota, e.g. 500G (default: c.SIFRegistry.max_size)")
    p.add_argument("--keep", action="append", default=[], metavar="IMAGE", help="never evict IMAGE (repeatable)")
    p.add_argument(
        "--grace-period",
        type=float,
        metavar="SECONDS",
        help="never evict an image used or published this recently (default: c.SIFRegistry.grace_period)",
    )
    p.add_argument("--stale-after", type=float, default=3600, help="remove temporaries older than this many seconds")
    p.add_argument(
        "--no-podman",
        action="store_true",
        help="leave podman alone (by default gc also removes podman images of this "
        "registry's builds whose SIF is published, and working containers older than "
        "--stale-after and the build timeout, which killed builders left; run it "
        "as the build account on the build node)",
    )
    p.add_argument(
        "--hub-url",
        help="JupyterHub to ask which images its servers use: running, "
        "starting or queued (token from $JUPYTERHUB_API_TOKEN; needs the scopes "
        "list:users, read:servers, admin:server_state)",
    )
    _add_common(p)


def cmd_gc(args):
    from ..hubclient import TOKEN_ENV, HubClient, HubError
    from ..registry import SIFRegistry

    registry = SIFRegistry(config=load_config(args))
    keep = set(args.keep)
    if args.hub_url:
        try:
            in_use = HubClient(args.hub_url, os.environ.get(TOKEN_ENV, "")).images_in_use()
        except HubError as e:
            # evicting blind could remove the image a queued session is about to run
            print(
                f"binderhub-hpc gc: cannot ask {args.hub_url} which images sessions use: {e}; nothing evicted",
                file=sys.stderr,
            )
            return 1
        # the hub account cannot write the registry: the last use of a
        # session's image is recorded here, by the registry's owner
        for image in in_use:
            if registry.exists(image):
                registry.touch(image)
        keep |= in_use
    removed = registry.remove_stale_temporaries(args.stale_after)
    if not args.no_podman and shutil.which("podman"):
        from ..builder.pipeline import BuildPipeline

        pipeline = BuildPipeline(config=load_config(args), registry=registry)
        for name in pipeline.remove_leftover_images():
            print(f"removed podman image {name} (its SIF is published)")
        # no living build is older than the build timeout
        n = pipeline.remove_stale_working_containers(max(args.stale_after, pipeline.build_timeout))
        if n:
            print(f"removed {n} working containers of killed builds")
    max_size = parse_size(args.max_size) if args.max_size else None
    evicted = registry.evict(max_size, in_use=keep, grace_period=args.grace_period)
    for r in evicted:
        print(f"evicted {r.image} ({format_size(r.size)}, last used {_ts(r.last_used)})")
    print(
        f"{len(evicted)} images evicted, {removed} stale temporaries removed, {format_size(registry.total_size())} left"
    )
    return 0


COMMANDS = {
    "build": (add_build, cmd_build),
    "images": (add_images, cmd_images),
    "gc": (add_gc, cmd_gc),
}
