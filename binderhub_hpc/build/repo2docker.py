"""Running repo2docker: the command line BinderHub would give it, plus ours.

The argv is BinderHub's (``BuildExecutor.get_r2d_cmd_options``: ``--ref``,
``--image``, ``--no-clean``, ``--no-run``, ``--json-logs``,
``--user-name=jovyan``, ``--user-id=1000``, ``--appendix``, extra args, the
repository last) with our container engine and, when needed, a repo2docker
config file written by us.

Egress-restricted build nodes
-----------------------------
repo2docker tries its content providers in order and the Dataverse provider
downloads the list of Dataverse installations from the internet before the Git
provider is reached, so a plain Git URL fails where there is no outbound
access. With ``egress_restricted`` we hand repo2docker a config file that
limits ``Repo2Docker.content_providers`` to ``Local`` and ``Git``. We chose
this over cloning the repository ourselves: repo2docker keeps doing the fetch
(and its credential handling through ``GIT_CREDENTIAL_ENV``, its labels with
the real repository URL and ref), and nothing else changes. Binder links to
Zenodo, Figshare, Dataverse ... then cannot build on such a site, which is
what restricted egress means anyway.

Proxies and private CAs
-----------------------
The proxy variables (``http_proxy``, ``https_proxy``, ``no_proxy`` and their
upper-case forms) are passed through to repo2docker, hence to git and podman;
``podman build`` hands them on to the build containers by default
(``--http-proxy=true``) without storing them in the image. A site CA bundle is
bind-mounted read-only into every build step (``podman build --volume``), so
apt, pip and conda verify the site's TLS-intercepting proxy; it is not part of
the image.

Nothing here goes through a shell: the argv is a list, strangers' strings
(repository URL, ref, appendix) are single arguments.
"""

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata as _metadata

from traitlets import Bool, Float, Integer, List, Unicode
from traitlets.config import LoggingConfigurable

PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
)


class BuildCancelled(Exception):
    """The build was asked to stop."""


class BuildTimeout(TimeoutError):
    """A step of the build ran longer than allowed."""


def repo2docker_version():
    try:
        return _metadata.version("jupyter-repo2docker")
    except _metadata.PackageNotFoundError:
        return "unknown"


def log_line(message, phase="building"):
    """A log line in repo2docker's --json-logs format."""
    return json.dumps({"phase": phase, "message": message})


def as_json_log(line):
    """repo2docker's own JSON lines pass (a missing phase becomes 'unknown');
    anything else is wrapped, as BinderHub's local build does."""
    line = line.rstrip("\n")
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if isinstance(data, dict):
        if "phase" in data and "message" in data:
            return line
        data.setdefault("phase", "unknown")
        data.setdefault("message", "")
        return json.dumps(data)
    return log_line(line + "\n", phase="unknown")


@dataclass
class Repo2DockerResult:
    returncode: int
    seconds: float
    argv: list = field(default_factory=list)
    failure: str = ""


class Repo2Docker(LoggingConfigurable):
    """Build an image from a repository with repo2docker on podman."""

    command = List(
        Unicode(),
        ["jupyter-repo2docker"],
        help="How to run repo2docker (argv prefix).",
    ).tag(config=True)

    engine = Unicode(
        "podman-hpc",
        help="repo2docker container engine (entry point name); podman-hpc is ours.",
    ).tag(config=True)

    user_name = Unicode("jovyan", help="--user-name, as BinderHub sets it.").tag(config=True)
    user_id = Integer(1000, help="--user-id, as BinderHub sets it.").tag(config=True)

    extra_args = List(
        Unicode(),
        help="Extra repo2docker arguments (BuildExecutor.repo2docker_extra_args adds to these).",
    ).tag(config=True)

    timeout = Float(3600, help="Seconds before repo2docker is killed.").tag(config=True)

    egress_restricted = Bool(
        False,
        help="""The build node has no general internet access: limit
        repo2docker's content providers to `content_providers` so nothing is
        asked of Dataverse, Zenodo, ... before Git.""",
    ).tag(config=True)

    content_providers = List(
        Unicode(),
        ["Local", "Git"],
        help="Content providers (names in repo2docker.contentproviders) when egress_restricted.",
    ).tag(config=True)

    pass_proxy_env = Bool(True, help="Pass http(s)_proxy/no_proxy through.").tag(config=True)

    ca_bundle = Unicode(
        "",
        help="Host path of a CA bundle mounted read-only into build steps (empty: none).",
    ).tag(config=True)

    ca_bundle_target = Unicode(
        "/etc/ssl/certs/ca-certificates.crt",
        help="Where the CA bundle appears inside build steps.",
    ).tag(config=True)

    kill_grace = Float(5, help="Seconds between SIGTERM and SIGKILL on stop.").tag(config=True)

    # -- the command line ---------------------------------------------------------

    def needs_config_file(self):
        return self.egress_restricted or bool(self.ca_bundle)

    def config_text(self):
        """The repo2docker config file (Python, evaluated by repo2docker)."""
        lines = ["# written by binderhub-hpc for one build", "c = get_config()  # noqa"]
        if self.egress_restricted:
            lines.append("from repo2docker import contentproviders as _cp")
            names = ", ".join(f"_cp.{n}" for n in self.content_providers if n.isidentifier())
            lines.append(f"c.Repo2Docker.content_providers = [{names}]")
        if self.ca_bundle:
            mount = f"{self.ca_bundle}:{self.ca_bundle_target}:ro"
            lines.append(
                f"c.PodmanEngine.extra_buildx_build_args = ['--volume', {mount!r}]"
            )
        return "\n".join(lines) + "\n"

    def options(self, ref, image, appendix="", extra_args=()):
        """repo2docker options, in BinderHub's order, before our own."""
        opts = [
            f"--ref={ref}",
            f"--image={image}",
            "--no-clean",
            "--no-run",
            "--json-logs",
            f"--user-name={self.user_name}",
            f"--user-id={self.user_id}",
        ]
        if appendix:
            opts += ["--appendix", appendix]
        opts += list(self.extra_args) + list(extra_args)
        opts += ["--engine", self.engine]
        return opts

    def argv(self, repo_url, ref, image, appendix="", extra_args=(), config_file=None):
        argv = list(self.command) + self.options(ref, image, appendix, extra_args)
        if config_file:
            argv += ["--config", os.fspath(config_file)]
        # the repository comes last, so it can never be taken for an option
        # value or a command (see repo2docker#128); a leading '-' is refused.
        if repo_url.startswith("-"):
            raise ValueError(f"repository {repo_url!r} cannot start with '-'")
        return argv + [repo_url]

    def environment(self, git_credentials="", base=None):
        base = os.environ if base is None else base
        env = {k: v for k, v in base.items() if k not in PROXY_VARIABLES}
        if self.pass_proxy_env:
            env.update({k: base[k] for k in PROXY_VARIABLES if k in base})
        env.pop("GIT_CREDENTIAL_ENV", None)
        if git_credentials:
            env["GIT_CREDENTIAL_ENV"] = git_credentials
        # git must never ask a terminal for a password in a service
        env["GIT_TERMINAL_PROMPT"] = "0"
        return env

    # -- running ------------------------------------------------------------------

    def run(
        self,
        repo_url,
        ref,
        image,
        on_log,
        *,
        appendix="",
        extra_args=(),
        git_credentials="",
        stop_event=None,
        timeout=None,
    ):
        """Run repo2docker, calling ``on_log(json_line)`` for each output line.

        Returns a :class:`Repo2DockerResult`; raises BuildCancelled when
        `stop_event` is set and BuildTimeout after `timeout` seconds (the
        process group is killed in both cases).
        """
        timeout = self.timeout if timeout is None else timeout
        with tempfile.TemporaryDirectory(prefix="bhpc-r2d-") as tmp:
            config_file = None
            if self.needs_config_file():
                config_file = os.path.join(tmp, "repo2docker_config.py")
                with open(config_file, "w") as f:
                    f.write(self.config_text())
            argv = self.argv(repo_url, ref, image, appendix, extra_args, config_file)
            self.log.info("Running %s", argv)
            start = time.monotonic()
            rc = run_streaming(
                argv,
                lambda line: on_log(as_json_log(line)),
                env=self.environment(git_credentials),
                stop_event=stop_event,
                timeout=timeout,
                kill_grace=self.kill_grace,
                what="repo2docker",
            )
        return Repo2DockerResult(rc, time.monotonic() - start, argv)


def _kill_group(proc, grace):
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # the leader is gone; make sure no member of its group lingers
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def run_streaming(argv, on_line, *, env=None, stop_event=None, timeout=None,
                  kill_grace=5, what="command", cwd=None, stdin=None):
    """Run argv in its own process group, feeding each output line to on_line.

    Stdout and stderr are merged. Returns the exit code; on stop or timeout
    the whole process group is killed and BuildCancelled / BuildTimeout raised.
    """
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    if stdin is not None:
        try:
            proc.stdin.write(stdin.encode() if isinstance(stdin, str) else stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    lines = queue.Queue()

    def reader():
        try:
            for raw in proc.stdout:
                lines.put(raw.decode("utf-8", "replace"))
        finally:
            lines.put(None)

    t = threading.Thread(target=reader, daemon=True, name=f"{what}-output")
    t.start()
    deadline = None if not timeout else time.monotonic() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                on_line(line)
            if stop_event is not None and stop_event.is_set():
                _kill_group(proc, kill_grace)
                raise BuildCancelled(f"{what} stopped on request")
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(proc, kill_grace)
                raise BuildTimeout(f"{what} timed out after {timeout:.0f} s")
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            _kill_group(proc, 0.5)
        raise
    finally:
        t.join(1)
        proc.stdout.close()
