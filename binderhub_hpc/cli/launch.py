"""``binderhub-hpc launch REPO [REF]``: a Binder link, from the command line.

The same steps as a click on a Binder badge, without BinderHub:

1. resolve the ref to a commit (``git rev-parse`` / ``git ls-remote``);
2. name the image as BinderHub would (:func:`binderhub_hpc.binderlink.image_name`);
3. build it through :class:`~binderhub_hpc.builder.pipeline.BuildPipeline`
   into the SIF registry unless it is there (progress printed);
4. through the JupyterHub REST API, as BinderHub's launcher does: create a
   temporary user, start its server with BinderHub's ``user_options``,
   follow the server's progress stream, print the server's URL with its
   token when it is ready.

Uses: pre-flight checks of a site (``--stop`` is a smoke test that leaves
nothing running), workshops, and the CI end-to-end test. The hub API token
comes from ``$JUPYTERHUB_API_TOKEN`` only (never a command-line value, which
``ps`` shows to every account); it needs the scopes BinderHub's service has
(``admin:users``, ``admin:servers``, ``read:users``).
"""

import json
import os
import sys
import threading
import time

import requests

from ..binderlink import RefError, image_name, normalize_repo, resolve_ref, temporary_username, user_options
from ..hubclient import TOKEN_ENV, HubClient, LaunchError, LaunchTimeout

DEFAULT_HUB_URL = "http://127.0.0.1:8000/"


# -- the launch ---------------------------------------------------------------------


def say(msg, out=None):
    out = out or sys.stdout
    out.write(msg if msg.endswith("\n") else msg + "\n")
    out.flush()


def build_image(cfg, repo_url, ref, image, stop=None, out=None):
    """Build `image` unless the registry has it; returns the BuildResult."""
    from ..builder.pipeline import LOG, BuildPipeline, BuildRequest

    # both runtimes run the SIF (podman through squashfuse); with
    # "oci-archive" in c.SIFRegistry.formats the pipeline publishes an OCI
    # archive beside it
    pipeline = BuildPipeline(config=cfg)

    def progress(kind, payload):
        if kind != LOG:
            return
        try:
            msg = json.loads(payload).get("message", "")
        except ValueError:
            msg = payload
        if msg.strip():
            say(msg, out)

    return pipeline.run(BuildRequest(repo_url, ref, image), progress, stop_event=stop)


def launch(hub, image, repo_url, ref, resolved_ref, *, launch_host, timeout, out=None):
    """Start a server for `image` as BinderHub would. Returns (user, url, options)."""
    name = temporary_username(repo_url)
    options = user_options(image, repo_url, ref, resolved_ref, launch_host)
    hub.create_user(name)
    say(f"Launching server for {name} with image {image}", out)
    deadline = time.monotonic() + timeout
    try:
        status = hub.start_server(name, options)
        if status == 202:
            for event in hub.progress(name, timeout=max(1.0, deadline - time.monotonic())):
                msg = event.get("message", "")
                if msg:
                    say(f"[{event.get('progress', '')}%] {msg}" if "progress" in event else msg, out)
                if event.get("failed"):
                    raise LaunchError(f"the launch failed: {msg or 'no reason given'}")
                if event.get("ready"):
                    break
                if time.monotonic() > deadline:
                    raise LaunchTimeout()
        server = hub.server(name)
        if not server or not server.get("ready"):
            raise LaunchError("the progress stream ended but the server is not ready")
    except LaunchTimeout:
        _cleanup(hub, name)
        raise LaunchError(f"the server did not become ready within {timeout:.0f} s (launch timeout)") from None
    except BaseException:
        _cleanup(hub, name)
        raise
    url = hub.hub_url + server["url"].lstrip("/")
    return name, url, options


def check_server(url, token, timeout=30):
    """HTTP status of the server's API with its token (or the error)."""
    try:
        r = requests.get(url + "api/status", headers={"Authorization": f"token {token}"}, timeout=timeout)
        return r.status_code
    except requests.RequestException as e:
        return f"{e.__class__.__name__}: {e}"


def _cleanup(hub, name):
    """After a failed launch, as BinderHub does: stop the server, drop the user."""
    try:
        hub.stop_server(name, timeout=60)
        hub.delete_user(name)
    except Exception:  # noqa: BLE001 - best effort; the original error matters
        pass


# -- the command --------------------------------------------------------------------


def add_launch(sub):
    from .build import _add_common

    p = sub.add_parser(
        "launch",
        help="build (if needed) and launch a repository, as a Binder link would",
        description="Resolve REF, build REPO into the SIF registry if missing, start a "
        "server through the JupyterHub REST API with BinderHub's launch options, and "
        "print its URL. The hub API token is read from $JUPYTERHUB_API_TOKEN.",
    )
    p.add_argument("repo", help="repository URL or local git checkout")
    p.add_argument("ref", nargs="?", default="HEAD", help="branch, tag or commit (default HEAD)")
    p.add_argument(
        "--hub-url",
        help="public URL of JupyterHub (default: $JUPYTERHUB_URL, c.BinderHub.hub_url, or " + DEFAULT_HUB_URL + ")",
    )
    p.add_argument("--hub-api-url", help="hub API URL if not <hub-url>/hub/api")
    p.add_argument(
        "--image-prefix",
        default=None,
        help="BinderHub's image_prefix (default: c.BinderHub.image_prefix or 'binderhub-hpc/binder-')",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds for the server to become ready (BinderHub's launch_timeout; default 600)",
    )
    p.add_argument("--build-timeout", type=float, help="seconds for the build")
    p.add_argument("--no-build", action="store_true", help="fail instead of building a missing image")
    p.add_argument(
        "--stop",
        action="store_true",
        help="stop the server (and remove the temporary user) once it is ready: a smoke test",
    )
    _add_common(p)


def cmd_launch(args):
    import signal

    from ..registry import SIFRegistry
    from .build import load_config

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        print(
            f"binderhub-hpc launch: set ${TOKEN_ENV} to a hub API token with BinderHub's scopes "
            "(admin:users, admin:servers, read:users)",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(args)
    bh = cfg.BinderHub if "BinderHub" in cfg else {}
    hub_url = args.hub_url or os.environ.get("JUPYTERHUB_URL") or bh.get("hub_url") or DEFAULT_HUB_URL
    prefix = args.image_prefix
    if prefix is None:
        prefix = bh.get("image_prefix", "binderhub-hpc/binder-")
    t0 = time.monotonic()
    try:
        repo_url = normalize_repo(args.repo)
        try:
            resolved = resolve_ref(repo_url, args.ref)
        except RefError as e:
            raise LaunchError(str(e)) from None
        image = image_name(repo_url, resolved, prefix)
        hub = HubClient(hub_url, token, api_url=args.hub_api_url)
        hub.check()  # before a long build: fail now if the hub is unreachable

        registry = SIFRegistry(config=cfg)
        if registry.exists(image):
            say(f"Found built image {image}; skipping the build")
        elif args.no_build:
            raise LaunchError(f"image {image} is not in the registry at {registry.root} (--no-build)")
        else:
            say(f"Building {repo_url} at {resolved} as {image}")
            stop = threading.Event()
            handlers = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                if args.build_timeout:
                    cfg.BuildPipeline.build_timeout = args.build_timeout
                result = build_image(cfg, repo_url, resolved, image, stop=stop)
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
            if not result.ok:
                raise LaunchError(f"build {result.outcome}: {result.error}")
            say(f"Build {result.outcome} in {time.monotonic() - t0:.1f} s: {result.path}")
        missing = [f for f in registry.formats if not registry.lookup(image, f)]
        if missing:
            raise LaunchError(f"image {image} lacks the format(s) {', '.join(missing)}")

        t1 = time.monotonic()
        name, url, options = launch(
            hub,
            image,
            repo_url,
            args.ref,
            resolved,
            launch_host=hub.hub_url,
            timeout=args.timeout,
        )
        say(f"Server ready in {time.monotonic() - t1:.1f} s ({time.monotonic() - t0:.1f} s in all)")
        say(f"{url}?token={options['token']}")
        answer = check_server(url, options["token"])
        if answer != 200:
            msg = f"the server does not answer at {url} ({answer})"
            if args.stop:
                hub.stop_server(name)
                hub.delete_user(name)
                raise LaunchError(msg)
            print(f"binderhub-hpc launch: warning: {msg}", file=sys.stderr)
        if args.stop:
            hub.stop_server(name)
            hub.delete_user(name)
            say(f"Server answered (HTTP 200); stopped the server of {name}")
    except LaunchError as e:
        print(f"binderhub-hpc launch: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("binderhub-hpc launch: interrupted", file=sys.stderr)
        return 130
    return 0


COMMANDS = {"launch": (add_launch, cmd_launch)}
