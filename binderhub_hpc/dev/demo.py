"""``binderhub-hpc demo``: BinderHub on the dev cluster, in one command.

Writes three config files into a state directory and starts JupyterHub with
upstream BinderHub as a managed service (the shape of BinderHub's own
``testing/local-binder-local-hub``), with our pieces plugged in:

- JupyterHub spawns sessions with
  :class:`~binderhub_hpc.spawner.spawner.SlurmBinderSpawner` on the dev
  cluster's Slurm, as the service account, in apptainer if present, else
  rootless podman;
- BinderHub builds with :class:`~binderhub_hpc.binderhub.SIFBuildExecutor`
  and looks images up with :class:`~binderhub_hpc.binderhub.SIFDockerRegistry`;
- both read ``binderhub_hpc_config.py`` (``c.SIFRegistry.root`` ...).

Nothing is built up front. The demo makes an example repository (a
Dockerfile on the dev cluster's local base image and a notebook) and prints
a Binder link to it: BinderHub's ``git`` provider takes it as a ``file://``
URL once ``file`` is among ``GitRepoProvider.allowed_protocols``.
``binderhub-hpc demo --stop`` stops what the demo started (the hub stops its
sessions' jobs, BinderHub and the proxy on its way out).
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote

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
        {"cell_type": "markdown", "metadata": {},
         "source": ["# Binder on HPC\n", "\n",
                    "This session runs as a batch job on the cluster, in an image "
                    "built by repo2docker and stored as a SIF file."]},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": ["import os, socket\n",
                    "print(socket.gethostname(), os.environ.get('SLURM_JOB_ID'))"]},
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid):
    try:
        # reap it if it is our child (when the demo runs in-process, as in
        # tests): a zombie still answers kill(pid, 0)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Demo:
    """One demo deployment, described by its state directory."""

    def __init__(self, state_dir=None, ip="127.0.0.1", port=8000, public_url=None,
                 registry_root=None, runtime=None, cluster=None):
        self.state_dir = Path(state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).absolute()
        self.ip = ip
        self.port = port
        self._public_url = public_url
        self.registry_root = Path(registry_root) if registry_root else self.state_dir / "registry"
        self.runtime = runtime
        self._cluster = cluster
        self.start_attempts = 3

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
        return self.state_dir / "jupyterhub.log"

    @property
    def example_repo(self):
        return self.state_dir / "example-repo"

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
            raise DemoError(f"${BINDERHUB_SOURCE_ENV}={src} is not a BinderHub checkout "
                            "(no binderhub/__init__.py)\n" + install_hint())
        env = dict(os.environ, **cls.binderhub_env())
        out = subprocess.run(
            [sys.executable, "-c", "import binderhub.app, binderhub; print(binderhub.__file__)"],
            env=env, capture_output=True, text=True,
        )
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["import failed"])[-1]
            raise DemoError(install_hint(last))
        return out.stdout.strip()

    # -- configuration --------------------------------------------------------------

    def _detect_runtime(self):
        from ..spawner.runtime import detect_runtime

        return self.runtime or detect_runtime()

    def write_configs(self, st):
        """The site config (ours), BinderHub's and JupyterHub's."""
        d = self.state_dir
        formats = ["sif", "oci-archive"] if st["runtime"] == "podman" else ["sif"]
        site = textwrap.dedent(f"""\
            # binderhub-hpc site configuration, read by BinderHub and JupyterHub
            # (written by `binderhub-hpc demo`)
            c.SIFRegistry.root = {str(self.registry_root)!r}
            # the podman runtime runs the OCI archive; apptainer the SIF
            c.SIFRegistry.formats = {formats!r}
            # the dev cluster's builds reach no Dataverse/Zenodo: Git and local only
            c.Repo2Docker.egress_restricted = True
            """)
        (d / "binderhub_hpc_config.py").write_text(site)

        binderhub = textwrap.dedent(f"""\
            # BinderHub as a JupyterHub managed service, without Kubernetes
            # (written by `binderhub-hpc demo`)
            import os

            c.BinderHub.builder_required = False
            c.BinderHub.use_registry = True
            c.BinderHub.image_prefix = {IMAGE_PREFIX!r}
            c.BinderHub.build_class = "binderhub_hpc.binderhub.SIFBuildExecutor"
            c.BinderHub.registry_class = "binderhub_hpc.binderhub.SIFDockerRegistry"
            c.BinderHub.launch_quota_class = "binderhub.quota.LaunchQuota"
            c.BinderHub.build_token_secret = {st["build_token_secret"]!r}
            c.BinderHub.base_url = os.environ["JUPYTERHUB_SERVICE_PREFIX"]
            c.BinderHub.hub_url = {st["hub_url"]!r}
            c.BinderHub.hub_url_local = "http://127.0.0.1:{st["port"]}/"
            c.BinderHub.about_message = "binderhub-hpc demo: Slurm jobs, SIF images"
            # the example repository is a local git repository (file:// URL)
            c.GitRepoProvider.allowed_protocols = {{"http", "https", "git", "ssh", "file"}}
            load_subconfig({str(d / "binderhub_hpc_config.py")!r})
            """)
        (d / "binderhub_config.py").write_text(binderhub)

        env = {"HOME": os.environ.get("HOME", "/root")}
        env.update(self.binderhub_env())
        service_cmd = [sys.executable, "-m", "binderhub", f"--config={d / 'binderhub_config.py'}",
                       f"--port={st['binder_port']}"]
        hub = textwrap.dedent(f"""\
            # JupyterHub with BinderHub as a managed service, sessions as Slurm
            # jobs (written by `binderhub-hpc demo`)
            c.JupyterHub.ip = {self.ip!r}
            c.JupyterHub.port = {st["port"]}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {st["hub_port"]}
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{st["proxy_api_port"]}"
            c.JupyterHub.db_url = "sqlite:///{d}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{d}/jupyterhub_cookie_secret"
            c.JupyterHub.pid_file = "{d}/jupyterhub.pid"
            c.JupyterHub.authenticator_class = "null"
            # demo: metrics readable without a token
            c.JupyterHub.authenticate_prometheus = False
            c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
            c.JupyterHub.cleanup_servers = True
            c.JupyterHub.services = [{{
                "name": "binder",
                "url": "http://127.0.0.1:{st["binder_port"]}",
                "command": {service_cmd!r},
                "environment": {env!r},
            }}]
            c.JupyterHub.load_roles = [{{
                "name": "binder", "services": ["binder"],
                "scopes": ["admin:users", "admin:servers", "read:users", "access:servers"],
            }}]
            c.JupyterHub.default_url = "/services/binder/"

            c.JupyterHub.spawner_class = "binderhub_hpc.spawner.spawner.SlurmBinderSpawner"
            c.SlurmBinderSpawner.container_runtime = {st["runtime"]!r}
            c.SlurmBinderSpawner.job_user = {self.cluster.service_user!r}
            c.SlurmBinderSpawner.exec_prefix = "runuser -u {{username}} --"
            c.SlurmBinderSpawner.host_python = "/usr/bin/python3"
            c.SlurmBinderSpawner.req_partition = "interactive"
            c.SlurmBinderSpawner.req_runtime = "01:00:00"
            c.SlurmBinderSpawner.queue_poll_interval = 1.0
            c.Spawner.start_timeout = 300
            c.Spawner.http_timeout = 120
            c.Spawner.poll_interval = 5
            load_subconfig({str(d / "binderhub_hpc_config.py")!r})
            """)
        (d / "jupyterhub_config.py").write_text(hub)

    def make_example_repo(self):
        """A git repository the dev cluster can build: Dockerfile + notebook."""
        repo = self.example_repo
        if (repo / ".git").is_dir():
            return repo
        make_repo(repo, self.cluster.base_image, message="Example repository for the binderhub-hpc demo",
                  files={"hello.ipynb": None,
                         "hello-hpc.ipynb": json.dumps(EXAMPLE_NOTEBOOK, indent=1) + "\n",
                         "README.md": "# binderhub-hpc demo repository\n"})
        return repo

    # -- links ----------------------------------------------------------------------

    def links(self, st=None):
        st = st or self.state()
        binder = st["hub_url"] + "services/binder/"
        repo_url = "file://" + str(self.example_repo)
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

    def running_pid(self):
        st = self.state()
        pid = st.get("pid")
        if pid and _pid_alive(pid) and str(self.state_dir / "jupyterhub_config.py") in _cmdline(pid):
            return pid
        return None

    def up(self, timeout=180, log=print):
        if os.geteuid() != 0:
            raise DemoError("the demo runs on the dev cluster and must be started as root")
        where = self.check_binderhub()
        bundle = Path(where).parent / "static" / "dist" / "bundle.js"
        if not bundle.is_file():
            log(f"Note: BinderHub's web UI is not built ({bundle} is missing; a source checkout "
                "needs its npm build, which `pip install` runs): the link's page will not "
                "work, the /build/ event stream API will.")
        if self.running_pid():
            log("The demo is already running.")
            return self.links()
        from .cluster import DevClusterError

        try:
            self.cluster.up()
            self.cluster.ensure_base_image()
        except DevClusterError as e:
            raise DemoError(f"dev cluster: {e}") from None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        self.registry_root.mkdir(parents=True, exist_ok=True)
        # compute jobs run as the service account and read the images
        os.chmod(self.registry_root, 0o755)
        st = {
            "port": self.port,
            "hub_port": _free_port(),
            "proxy_api_port": _free_port(),
            "binder_port": _free_port(),
            "runtime": self._detect_runtime(),
            "build_token_secret": secrets.token_hex(32),
        }
        st["hub_url"] = (self._public_url or f"http://{self.ip}:{self.port}").rstrip("/") + "/"
        self.make_example_repo()
        self.write_configs(st)

        env = dict(os.environ)
        env.update(self.cluster.env)
        links = self.links(st)
        # JupyterHub gives a managed service 10 s to answer (not configurable)
        # and exits otherwise; a cold BinderHub import on a loaded or NFS-backed
        # service node can take longer. A retry starts warm.
        for attempt in range(1, self.start_attempts + 1):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            logf = open(self.log_path, "ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.state_dir / "jupyterhub_config.py")],
                cwd=self.state_dir, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
            logf.close()
            st["pid"] = proc.pid
            self.state_file.write_text(json.dumps(st, indent=1) + "\n")
            try:
                self._wait_ready(proc, links, timeout)
                return links
            except DemoError:
                self.stop()
                with open(self.log_path, errors="replace") as f:
                    f.seek(offset)
                    slow = "Cannot connect to binder service" in f.read()
                if not (slow and attempt < self.start_attempts):
                    raise
                log("BinderHub did not answer within JupyterHub's 10 s for managed services "
                    f"(cold start); starting again ({attempt + 1}/{self.start_attempts})")
        return links

    def _wait_ready(self, proc, links, timeout):
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoError(f"JupyterHub exited ({proc.returncode}):\n{self.log_tail()}")
            try:
                r = requests.get(links["binder"] + "versions", timeout=5)
                if r.status_code == 200 and "builder_info" in r.json():
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise DemoError(f"BinderHub did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout=60):
        """Stop the hub (which stops its sessions, BinderHub and the proxy)."""
        stopped = []
        pid = self.running_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(f"jupyterhub (pid {pid})")
        # the proxy normally leaves with the hub; make sure ours did
        proxy_pid_file = self.state_dir / "jupyterhub-proxy.pid"
        st = self.state()
        try:
            ppid = int(proxy_pid_file.read_text().strip())
        except (OSError, ValueError):
            ppid = None
        if ppid and _pid_alive(ppid) and str(st.get("proxy_api_port", "-")) in _cmdline(ppid):
            os.kill(ppid, signal.SIGTERM)
            stopped.append(f"configurable-http-proxy (pid {ppid})")
        if st.get("pid"):
            st.pop("pid")
            self.state_file.write_text(json.dumps(st, indent=1) + "\n")
        return stopped

    def log_tail(self, n=60):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""
