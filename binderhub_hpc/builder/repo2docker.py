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

Environment, scratch and credentials
------------------------------------
repo2docker gets an allowlisted environment
(:func:`~.environment.build_environment`), never BinderHub's own. Each build
has a private scratch directory (mode 0700, ``scratch_dir``) that is
repo2docker's ``TMPDIR``: its clone (BinderHub's ``--no-clean`` keeps it),
our config file and the git credentials file live there, and the whole
directory goes when the build ends; one a killed builder left is removed by
the next build on that host. Private repositories: see
:mod:`~.credentials`.

Nothing here goes through a shell: the argv is a list, strangers' strings
(repository URL, ref, appendix) are single arguments.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from pathlib import Path

from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import LoggingConfigurable

from ..proc import pid_alive
from .credentials import helper_environment, write_credentials
from .environment import PROXY_VARIABLES, build_environment  # noqa: F401  (re-exported)
from .guard import guarded
from .process import run_streaming
from .protocol import as_json_log

#: a build's scratch directory: bhpc-build-<host>-<pid>-<random>
SCRATCH_PREFIX = "bhpc-build-"


def repo2docker_version():
    try:
        return _metadata.version("jupyter-repo2docker")
    except _metadata.PackageNotFoundError:
        return "unknown"


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
        help="""How to run repo2docker (argv prefix). Default: the
        jupyter-repo2docker beside this Python (a site virtualenv's), else
        the one on PATH.""",
    ).tag(config=True)

    @default("command")
    def _default_command(self):
        beside = os.path.join(os.path.dirname(sys.executable), "jupyter-repo2docker")
        return [beside if os.access(beside, os.X_OK) else "jupyter-repo2docker"]

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

    env_keep = List(
        Unicode(),
        help="""Further names of BinderHub's environment a build may see, besides
        binderhub_hpc.builder.environment.ALLOWED (HOME, PATH, locale, podman's
        XDG_*/CONTAINERS_* ...) and the proxies. Nothing else reaches
        repo2docker, git, podman or a RUN step.""",
    ).tag(config=True)

    scratch_dir = Unicode(
        "",
        help="""Where builds make their private scratch directories (repo2docker's
        TMPDIR: the clone, podman's temporary files; removed after each build).
        A local disk of the build node; default: the system's temporary directory.""",
    ).tag(config=True)

    build_network = Unicode(
        "",
        help="""`podman build --network` for the RUN steps ('' podman's default:
        rootless, slirp4netns, which also reaches the build host's loopback
        through 10.0.2.2; 'none' cuts RUN steps off every network). Keeping
        builds off the cluster's addresses is the build node's firewall's
        job: see the README.""",
    ).tag(config=True)

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
        return self.egress_restricted or bool(self.ca_bundle) or bool(self.build_network)

    def config_text(self):
        """The repo2docker config file (Python, evaluated by repo2docker)."""
        lines = ["# written by binderhub-hpc for one build", "c = get_config()  # noqa"]
        if self.egress_restricted:
            lines.append("from repo2docker import contentproviders as _cp")
            names = ", ".join(f"_cp.{n}" for n in self.content_providers if n.isidentifier())
            lines.append(f"c.Repo2Docker.content_providers = [{names}]")
        args = []
        if self.ca_bundle:
            args += ["--volume", f"{self.ca_bundle}:{self.ca_bundle_target}:ro"]
        if self.build_network:
            args += [f"--network={self.build_network}"]
        if args:
            lines.append(f"c.PodmanEngine.extra_buildx_build_args = {args!r}")
        return "\n".join(lines) + "\n"

    def options(self, ref, image, appendix="", extra_args=(), labels=None):
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
        for k, v in (labels or {}).items():
            opts += ["--label", f"{k}={v}"]
        opts += ["--engine", self.engine]
        return opts

    def argv(self, repo_url, ref, image, appendix="", extra_args=(), config_file=None, labels=None):
        argv = list(self.command) + self.options(ref, image, appendix, extra_args, labels)
        if config_file:
            argv += ["--config", os.fspath(config_file)]
        # the repository comes last, so it can never be taken for an option
        # value or a command (see repo2docker#128); a leading '-' is refused.
        if repo_url.startswith("-"):
            raise ValueError(f"repository {repo_url!r} cannot start with '-'")
        return argv + [repo_url]

    def environment(self, base=None, extra=None):
        """repo2docker's environment: the allowlist, never BinderHub's own."""
        return build_environment(base, keep=self.env_keep, proxies=self.pass_proxy_env, extra=extra)

    # -- scratch ------------------------------------------------------------------

    def scratch_parent(self):
        return self.scratch_dir or tempfile.gettempdir()

    def make_scratch(self):
        """A new private scratch directory for one build (mode 0700)."""
        prefix = f"{SCRATCH_PREFIX}{socket.gethostname()}-{os.getpid()}-"
        return tempfile.mkdtemp(prefix=prefix, dir=self.scratch_parent())

    def remove_scratch(self, path):
        """Remove a scratch directory, also what podman wrote there as a
        subordinate uid (through ``podman unshare`` when rootless)."""
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path) and os.geteuid() != 0:
            subprocess.run(
                ["podman", "unshare", "rm", "-rf", "--", path],
                env=build_environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        if os.path.lexists(path):
            self.log.warning("Could not remove the build scratch directory %s", path)

    def remove_stale_scratch(self):
        """Remove scratch directories of builders of this host that are gone
        (killed before they could clean up). Returns how many."""
        parent = Path(self.scratch_parent())
        mine = f"{SCRATCH_PREFIX}{socket.gethostname()}-"
        removed = 0
        try:
            entries = list(parent.iterdir())
        except OSError:
            return 0
        for p in entries:
            if not p.name.startswith(mine):
                continue
            pid = p.name[len(mine) :].split("-", 1)[0]
            try:
                st = p.lstat()
            except OSError:
                continue
            if not pid.isdigit() or st.st_uid != os.geteuid() or not p.is_dir() or p.is_symlink():
                continue
            if pid_alive(int(pid)):
                continue
            self.log.info("Removing %s left by an interrupted build", p)
            self.remove_scratch(str(p))
            removed += 1
        return removed

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
        labels=None,
        cpus="",
        watch_factory=None,
    ):
        """Run repo2docker, calling ``on_log(json_line)`` for each output line.

        Returns a :class:`Repo2DockerResult`; raises BuildCancelled when
        `stop_event` is set, BuildTimeout after `timeout` seconds and
        BuildLimitExceeded when the watch `watch_factory(scratch_dir)` makes
        (a limits.Watchdog) finds a limit passed; the build's whole process
        tree is stopped in each case, and by the guard if this process dies.
        `cpus` binds the build to those CPUs ('0,1'; '' for all).
        """
        timeout = self.timeout if timeout is None else timeout
        scratch = self.make_scratch()
        try:
            tmp = os.path.join(scratch, "tmp")
            os.mkdir(tmp, 0o700)
            extra = {"TMPDIR": tmp}
            config_file = None
            if self.needs_config_file():
                config_file = os.path.join(scratch, "repo2docker_config.py")
                with open(config_file, "w") as f:
                    f.write(self.config_text())
            if git_credentials:
                extra.update(helper_environment(repo_url, write_credentials(git_credentials, scratch)))
            argv = self.argv(repo_url, ref, image, appendix, extra_args, config_file, labels)
            self.log.info("Running %s", argv)
            watch = watch_factory(scratch) if watch_factory is not None else None
            start = time.monotonic()
            rc = run_streaming(
                guarded(argv, grace=self.kill_grace, cpus=cpus),
                lambda line: on_log(as_json_log(line)),
                env=self.environment(extra=extra),
                stop_event=stop_event,
                timeout=timeout,
                kill_grace=self.kill_grace,
                what="repo2docker",
                watch=watch,
            )
        finally:
            self.remove_scratch(scratch)
        return Repo2DockerResult(rc, time.monotonic() - start, argv)
