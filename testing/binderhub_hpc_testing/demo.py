"""``binderhub-hpc demo``: BinderHub on the dev cluster, in one command.

Runs the deployment as ``charts-free-config/`` describes it, unchanged:
JupyterHub (``jupyterhub_config.py``, which starts the proxy and the idle
culler) and upstream BinderHub as an external hub service
(``binderhub_config.py``, the command ``systemd/binderhub.service`` runs),
both reading ``binderhub_hpc_config.py``. Only the dev cluster's values
differ: ports, state paths, the registry, the partition and the example
repository's ``file://`` protocol, in one file both load last
(``$BINDERHUB_HPC_EXTRA_CONFIG``).

Nothing is built up front. The demo makes an example repository (a
Dockerfile on the dev cluster's local base image and a notebook) and prints
a Binder link to it. ``binderhub-hpc demo --stop`` stops what the demo
started (the hub stops its sessions' jobs and the proxy on its way out).

On a multi-node dev cluster the demo is laid out as a site is: JupyterHub,
the proxy and BinderHub run on the hub node (its network namespace, its
address), sessions on the compute nodes, and builds on the build node as
the build account: BinderHub submits each build as a job on partition
``build`` (``SlurmBatchRunner``, ``sbatch --uid`` since BinderHub runs as
root here), which runs ``/opt/binderhub-hpc/bin/binderhub-hpc build`` with
rootless podman. The example repository is served over HTTP from the head
node (``binderhub_hpc_testing.gitserver``), as a site's git server would serve
it: the build account may not read a repository root owns.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote

from binderhub_hpc.proc import cmdline, pid_alive
from binderhub_hpc.scheduler.tags import DEFAULT_KEY_ENV

from .hub import EXTRA_CONFIG_ENV, deployment_dir, free_ports, hub_ports
from .repo import make_repo

#: the BinderHub commit this demo was checked with (BinderHub has no usable
#: PyPI release; install it from git)
BINDERHUB_COMMIT = "b9fad995d5529e487c25a9f0795f4fe150a96f25"
BINDERHUB_SOURCE_ENV = "BINDERHUB_SOURCE"
STATE_DIR_ENV = "BINDERHUB_HPC_DEMO_DIR"
DEFAULT_STATE_DIR = "/var/lib/binderhub-hpc/demo"
IMAGE_PREFIX = "binderhub-hpc/binder-"

EXAMPLE_NOTEBOOK = {
    "cells": [
        {
            "cell_type": "markdown",
            "metadata": {},
            "source": [
                "# Binder on HPC\n",
                "\n",
                "This session runs as a batch job on the cluster, in an image "
                "built by repo2docker and stored as a SIF file.",
            ],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": [
                "import os, socket, time\n",
                "print('node:', socket.gethostname())\n",
                "print('Slurm job:', os.environ.get('SLURM_JOB_ID'), 'in', os.environ.get('SLURM_JOB_PARTITION'))\n",
                "print('limits:', os.environ.get('CPU_LIMIT'), 'CPUs,', "
                "int(os.environ.get('MEM_LIMIT') or 0) // 2**20, 'MiB')\n",
                "end = int(os.environ.get('BINDER_JOB_END_TIME') or 0)\n",
                "print('session ends:', time.ctime(end) if end else 'no walltime')",
            ],
        },
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


class DemoError(RuntimeError):
    pass


def install_hint(error=""):
    why = f" ({error})" if error else ""
    return textwrap.dedent(f"""\
        BinderHub is not importable{why}.
        Install it from its git repository (its PyPI releases are too old), e.g.
            pip install "git+https://github.com/jupyterhub/binderhub@{BINDERHUB_COMMIT}"
        or use a local checkout whose dependencies (kubernetes, ...) are installed:
            {BINDERHUB_SOURCE_ENV}=/path/to/binderhub binderhub-hpc demo""")


class Demo:
    """One demo deployment, described by its state directory."""

    def __init__(
        self,
        state_dir=None,
        ip=None,
        port=8000,
        public_url=None,
        registry_root=None,
        runtime=None,
        cluster=None,
        compute_root=None,
    ):
        self.state_dir = Path(state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).absolute()
        self._ip = ip
        self.port = port
        self._public_url = public_url
        self._registry_root = Path(registry_root) if registry_root else None
        self._compute_root = compute_root
        self.runtime = runtime
        self._cluster = cluster
        self._procs = []

    @property
    def multi(self):
        """Hub, build and compute nodes of their own (the cluster's topology)."""
        return self.cluster.multi

    @property
    def host(self):
        """Where the hub, the proxy and BinderHub run (None: this machine)."""
        return self.cluster.hub_host if self.multi else None

    @property
    def ip(self):
        """The address the proxy, the hub and BinderHub listen on."""
        return self._ip or (self.host.address if self.host else "127.0.0.1")

    @property
    def registry_root(self):
        if self._registry_root is None:
            if self.multi:
                # the build account writes it, compute nodes see it at compute_root
                root, self._compute_root = self.cluster.site_registry("demo")
                self._registry_root = Path(root)
            else:
                self._registry_root = self.state_dir / "registry"
        return self._registry_root

    @property
    def compute_root(self):
        """Where compute nodes see the registry ('' where it is the same path)."""
        self.registry_root  # noqa: B018 - a site registry sets _compute_root when made
        return self._compute_root or ""

    # -- places -------------------------------------------------------------------

    @property
    def cluster(self):
        if self._cluster is None:
            from .cluster import DevCluster

            self._cluster = DevCluster()
        return self._cluster

    @property
    def state_file(self):
        return self.state_dir / "demo.json"

    @property
    def log_path(self):
        return self.state_dir / "demo.log"

    @property
    def repos_dir(self):
        """What the demo's git server serves (multi-node)."""
        return self.state_dir / "repos"

    @property
    def example_repo(self):
        return (self.repos_dir if self.multi else self.state_dir) / "example-repo"

    @property
    def build_config_path(self):
        """The config file the build node's `binderhub-hpc build` reads."""
        return self.state_dir / "build_config.py"

    def state(self):
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    # -- checks -------------------------------------------------------------------

    @staticmethod
    def binderhub_env():
        """Environment additions that make BinderHub importable (BINDERHUB_SOURCE)."""
        src = os.environ.get(BINDERHUB_SOURCE_ENV)
        if not src:
            return {}
        path = os.path.abspath(src)
        old = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": path + (os.pathsep + old if old else "")}

    @classmethod
    def check_binderhub(cls):
        """Raise DemoError with install instructions unless BinderHub imports."""
        src = os.environ.get(BINDERHUB_SOURCE_ENV)
        if src and not os.path.isfile(os.path.join(src, "binderhub", "__init__.py")):
            raise DemoError(
                f"${BINDERHUB_SOURCE_ENV}={src} is not a BinderHub checkout "
                "(no binderhub/__init__.py)\n" + install_hint()
            )
        env = dict(os.environ, **cls.binderhub_env())
        out = subprocess.run(
            [sys.executable, "-c", "import binderhub.app, binderhub; print(binderhub.__file__)"],
            env=env,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["import failed"])[-1]
            raise DemoError(install_hint(last))
        return out.stdout.strip()

    # -- configuration --------------------------------------------------------------

    def _detect_runtime(self):
        from binderhub_hpc.spawner.runtime import detect_runtime

        return self.runtime or detect_runtime()

    @property
    def config_path(self):
        return self.state_dir / "dev_config.py"

    def write_config(self, st):
        """The dev cluster's values over the deployment's configuration."""
        d = self.state_dir
        hub_ip = self.host.address if self.host else "127.0.0.1"
        text = textwrap.dedent(f"""\
            # The dev cluster's values over charts-free-config/ (written by
            # `binderhub-hpc demo`; JupyterHub and BinderHub both load it last).
            # -- the site
            c.SIFRegistry.root = {str(self.registry_root)!r}
            c.SIFRegistry.compute_root = {self.compute_root!r}
            # -- JupyterHub
            c.JupyterHub.bind_url = "http://{self.ip}:{st["port"]}/"
            c.JupyterHub.hub_bind_url = "http://{hub_ip}:{st["hub_port"]}"
            c.JupyterHub.hub_connect_ip = "{hub_ip}"
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{st["proxy_api_port"]}"
            c.JupyterHub.db_url = "sqlite:///{d}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{d}/jupyterhub_cookie_secret"
            c.JupyterHub.pid_file = "{d}/jupyterhub.pid"
            c.JupyterHub.cleanup_servers = True
            # demo: metrics readable without a token
            c.JupyterHub.authenticate_prometheus = False
            c.BinderBatchMixin.container_runtime = {st["runtime"]!r}
            c.BinderBatchMixin.job_dir = {str(self.cluster.jobs_dir)!r}
            c.BinderBatchMixin.req_partition = "interactive"
            c.BinderBatchMixin.req_runtime = "01:00:00"
            c.BinderBatchMixin.queue_poll_interval = 1.0
            c.Spawner.start_timeout = 300
            c.Spawner.poll_interval = 5
            # -- BinderHub
            c.BinderHub.hub_url = {st["hub_url"]!r}
            c.BinderHub.hub_url_local = "http://{self.ip}:{st["port"]}/"
            c.BinderHub.about_message = "binderhub-hpc demo: Slurm jobs, SIF images"
            c.HealthChecks.partition = "interactive"
            # the example repository is a local git repository (file:// URL)
            # or, on a multi-node cluster, served by the head node (http)
            c.GitRepoProvider.allowed_protocols = {{"http", "https", "git", "ssh", "file"}}
            """)
        if self.multi:
            cluster = self.cluster
            text += textwrap.dedent(f"""\
                # -- builds: a job on the build node, as the build account
                c.SIFBuildExecutor.runner_class = "binderhub_hpc.builder.runners.SlurmBatchRunner"
                c.SlurmBatchRunner.partition = "build"
                c.SlurmBatchRunner.job_user = {cluster.build_user!r}
                c.SlurmBatchRunner.cli = [{str(cluster.site_venv / "bin" / "binderhub-hpc")!r}]
                c.SlurmBatchRunner.remote_config = {str(self.build_config_path)!r}
                """)
            # what the build node's CLI reads: the site's settings, the demo's registry
            self.build_config_path.write_text(
                textwrap.dedent(f"""\
                # The demo's site settings for `binderhub-hpc build` on the build
                # node (written by `binderhub-hpc demo`)
                load_subconfig({str(deployment_dir() / "binderhub_hpc_config.py")!r})
                c.SIFRegistry.root = {str(self.registry_root)!r}
                c.SIFRegistry.compute_root = {self.compute_root!r}
                """)
            )
            os.chmod(self.build_config_path, 0o644)
        self.config_path.write_text(text)

    def environment(self, st):
        """What both services get, as their systemd units would give it."""
        env = dict(os.environ)
        env.update(self.cluster.env)
        env.update(self.binderhub_env())
        env[EXTRA_CONFIG_ENV] = str(self.config_path)
        env["BINDERHUB_API_TOKEN"] = st["api_token"]
        # the quota tags' key, which both services need (secrets.env)
        env[DEFAULT_KEY_ENV] = st["job_tag_key"]
        env["BINDERHUB_HPC_PUBLIC_URL"] = st["hub_url"]
        env["BINDERHUB_HPC_BINDER_PORT"] = str(st["binder_port"])
        return env

    def make_example_repo(self):
        """A git repository the dev cluster can build: Dockerfile + notebook."""
        repo = self.example_repo
        repo.parent.mkdir(parents=True, exist_ok=True)
        if (repo / ".git").is_dir():
            return repo
        make_repo(
            repo,
            self.cluster.base_image,
            message="Example repository for the binderhub-hpc demo",
            files={
                "hello.ipynb": None,
                "hello-hpc.ipynb": json.dumps(EXAMPLE_NOTEBOOK, indent=1) + "\n",
                "README.md": "# binderhub-hpc demo repository\n",
            },
        )
        return repo

    # -- links ----------------------------------------------------------------------

    def links(self, st=None):
        st = st or self.state()
        binder = st["hub_url"] + "services/binder/"
        repo_url = st.get("repo_url") or "file://" + str(self.example_repo)
        spec = f"{quote(repo_url, safe='')}/HEAD"
        link = f"{binder}v2/git/{spec}"
        return {
            "hub": st["hub_url"],
            "binder": binder,
            "repo_url": repo_url,
            "link": link,
            "build_api": f"{binder}build/git/{spec}",
            "badge": f"[![Binder]({binder}badge_logo.svg)]({link})",
        }

    # -- lifecycle --------------------------------------------------------------------

    def running_pids(self):
        """{service: pid} of what the demo started and still runs."""
        st = self.state()
        marks = {
            "jupyterhub": str(deployment_dir() / "jupyterhub_config.py"),
            "binderhub": str(deployment_dir() / "binderhub_config.py"),
            "gitserver": f"binderhub_hpc_testing.gitserver {self.repos_dir} ",
        }
        running = {}
        for name, mark in marks.items():
            pid = st.get("pids", {}).get(name)
            if pid and pid_alive(pid) and mark in cmdline(pid):
                running[name] = pid
        return running

    def up(self, timeout=180, log=print):
        if os.geteuid() != 0:
            raise DemoError("the demo runs on the dev cluster and must be started as root")
        where = self.check_binderhub()
        bundle = Path(where).parent / "static" / "dist" / "bundle.js"
        if not bundle.is_file():
            log(
                f"Note: BinderHub's web UI is not built ({bundle} is missing; a source checkout "
                "needs its npm build, which `pip install` runs): the link's page will not "
                "work, the /build/ event stream API will."
            )
        if self.running_pids():
            log("The demo is already running.")
            return self.links()
        from .cluster import DevClusterError

        try:
            deployment_dir()
            self.cluster.up()
            self.cluster.ensure_base_image()
            if self.multi:
                self.cluster.ensure_build_image()
        except (DevClusterError, RuntimeError) as e:
            raise DemoError(f"dev cluster: {e}") from None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        if self.multi and self.cluster.as_build_user(["test", "-r", str(self.state_dir)], check=False).returncode:
            raise DemoError(
                f"the build account {self.cluster.build_user} cannot read {self.state_dir} "
                "(the build node reads the demo's build config there): choose a --state-dir "
                "every account can reach"
            )
        self.registry_root.mkdir(parents=True, exist_ok=True)
        if not self.multi:
            # compute jobs run as the service account and read the images
            os.chmod(self.registry_root, 0o755)
        # the hub's API from the ports compute nodes let sessions reach,
        # BinderHub's and the proxy's API from outside them
        (hub_port,) = hub_ports(1, self.host)
        proxy_api_port, binder_port = free_ports(2)
        st = {
            "port": self.port,
            "hub_port": hub_port,
            "proxy_api_port": proxy_api_port,
            "binder_port": binder_port,
            "runtime": self._detect_runtime(),
            "api_token": secrets.token_hex(32),
            "job_tag_key": secrets.token_hex(32),
            "pids": {},
        }
        st["hub_url"] = (self._public_url or f"http://{self.ip}:{self.port}").rstrip("/") + "/"
        self.make_example_repo()
        self.write_config(st)
        env = self.environment(st)
        try:
            if self.multi:
                st["repo_url"] = self._start_git_server(st)
            links = self.links(st)
            self._start(
                "jupyterhub",
                [sys.executable, "-m", "jupyterhub", "-f", str(deployment_dir() / "jupyterhub_config.py")],
                env,
                st,
            )
            self._wait_for(links["hub"] + "hub/api/", "JupyterHub", timeout)
            # as systemd/binderhub.service runs it: an external hub service
            binder_env = dict(env, JUPYTERHUB_SERVICE_PREFIX="/services/binder/")
            self._start(
                "binderhub",
                [sys.executable, "-m", "binderhub", f"--config={deployment_dir() / 'binderhub_config.py'}"],
                binder_env,
                st,
            )
            self._wait_for(links["binder"] + "versions", "BinderHub", timeout, ok=lambda r: "builder_info" in r.json())
        except BaseException:
            self.stop()
            raise
        return links

    def _start_git_server(self, st):
        """Serve the example repository from the head node; its URL."""
        from .gitserver import GitServer

        lo, hi = self.cluster.SITE_GIT_PORTS
        server = GitServer(self.repos_dir, self.cluster.host("head").address, range(lo, hi + 1)).start()
        self._procs.append(server.proc)
        st["pids"]["gitserver"] = server.proc.pid
        self.state_file.write_text(json.dumps(st, indent=1) + "\n")
        return server.url(self.example_repo.name)

    def _start(self, name, argv, env, st):
        if self.host:  # the hub node's network: its address, as the hub node's services
            argv = self.host.run_in(argv)
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(
                argv,
                cwd=self.state_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        st["pids"][name] = proc.pid
        self.state_file.write_text(json.dumps(st, indent=1) + "\n")

    def _wait_for(self, url, what, timeout, ok=lambda r: True):
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise DemoError(f"{' '.join(proc.args[:6])} exited ({proc.returncode}):\n{self.log_tail()}")
            try:
                r = requests.get(url, timeout=5)
                if r.status_code == 200 and ok(r):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise DemoError(f"{what} did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout=60):
        """Stop BinderHub, then the hub (which stops its sessions and the proxy)."""
        stopped = []
        for name, pid in sorted(self.running_pids().items(), reverse=False):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(f"{name} (pid {pid})")
        # the proxy normally leaves with the hub; make sure ours did
        proxy_pid_file = self.state_dir / "jupyterhub-proxy.pid"
        st = self.state()
        try:
            ppid = int(proxy_pid_file.read_text().strip())
        except (OSError, ValueError):
            ppid = None
        if ppid and pid_alive(ppid) and str(st.get("proxy_api_port", "-")) in cmdline(ppid):
            os.kill(ppid, signal.SIGTERM)
            stopped.append(f"configurable-http-proxy (pid {ppid})")
        for proc in self._procs:
            if proc.poll() is None:
                proc.wait(5)
        self._procs = []
        if st.get("pids"):
            st["pids"] = {}
            self.state_file.write_text(json.dumps(st, indent=1) + "\n")
        return stopped

    def log_tail(self, n=60):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""
