"""A real JupyterHub (with configurable-http-proxy) in a subprocess, driven
through its REST API the way BinderHub's launcher drives it.

Development tooling beside :mod:`binderhub_hpc_testing.cluster`: the tests and the
benchmarks start their hubs with it. The hub gets a service token with the
scopes BinderHub needs and listens on loopback ports of its own.
"""

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import requests

from binderhub_hpc.scheduler.tags import DEFAULT_KEY_ENV

from .cluster.firewall import HUB_PORTS

#: the deployment configuration of this source checkout, which the dev hub,
#: the demo and the tests run with (only the dev cluster's values differ)
DEPLOYMENT_DIR = Path(__file__).resolve().parents[2] / "charts-free-config"
EXTRA_CONFIG_ENV = "BINDERHUB_HPC_EXTRA_CONFIG"


def deployment_dir():
    """charts-free-config/ of this checkout, or a clear error."""
    if not (DEPLOYMENT_DIR / "jupyterhub_config.py").is_file():
        raise RuntimeError(
            f"{DEPLOYMENT_DIR} is missing: the dev hub and the demo run the deployment "
            "configuration of a source checkout of binderhub-hpc"
        )
    return DEPLOYMENT_DIR


class PortTaken(RuntimeError):
    """A port picked as free was bound by someone else before the hub."""


def free_ports(n, candidates=None):
    """`n` distinct free loopback ports, from `candidates` (in that order)
    or else any the kernel gives, all held until every one is chosen
    (ports picked one by one can coincide once the first socket is closed)."""
    socks = []
    try:
        for port in [0] * n if candidates is None else candidates:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            if len(socks) == n:
                return [s.getsockname()[1] for s in socks]
        raise PortTaken(f"fewer than {n} free ports")
    finally:
        for s in socks:
            s.close()


def free_port():
    return free_ports(1)[0]


def hub_ports(n, host=None):
    """`n` distinct ports for hubs' APIs and proxies' public sides, from
    the dev cluster's HUB_PORTS (the only ports of the hub node compute
    nodes let sessions reach): free on this machine's loopback and not
    listened on in `host` (a network.Host: the hub node; None: here).
    Two hubs started at the same moment may still pick the same port:
    DevHub.start retries then, as with free_ports."""
    lo, hi = HUB_PORTS
    taken = _listening(host) if host is not None and host.netns else set()
    return free_ports(n, [p for p in random.sample(range(lo, hi + 1), hi - lo + 1) if p not in taken])


def _listening(host):
    """TCP ports something listens on in `host`'s network namespace."""
    out = subprocess.run(host.run_in(["ss", "-Hltn"]), capture_output=True, text=True, timeout=30, check=True).stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if len(line.split()) > 3}


class DevHub:
    """One JupyterHub in its own process session (the proxy lives there too),
    running ``charts-free-config/jupyterhub_config.py`` as shipped, with the
    dev cluster's values in a file it loads last ($BINDERHUB_HPC_EXTRA_CONFIG).

    `extra_config`: config lines appended to the dev values (spawner choice
    and settings). `cleanup_servers`: whether stopping the hub stops the
    servers (False lets a test restart the hub under running jobs).
    """

    start_timeout = 180
    http_timeout = 120
    #: a stand-in answers at BinderHub's port (the deployment's external
    #: `binder` service): JupyterHub waits 30 s at every start for an
    #: external service that does not answer, and these hubs run no BinderHub
    binderhub_placeholder = True
    #: starts retried when a port chosen as free was taken meanwhile
    start_attempts = 3

    def __init__(self, workdir, extra_config="", env=None, cleanup_servers=False, host=None):
        self.dir = Path(workdir)
        #: the dev cluster's hub node (a network.Host), or None: this machine
        self.host = host
        self.address = host.address if host else "127.0.0.1"
        self._pick_ports()
        self.token = secrets.token_hex(16)
        #: the quota tags' key (secrets.env's BINDERHUB_HPC_JOB_TAG_KEY): the
        #: hub tags its session jobs with it; a quota counting them needs it too
        self.tag_key = secrets.token_hex(32)
        self.extra_config = extra_config
        self.env = env or {}
        self.cleanup_servers = cleanup_servers
        self.proc = None
        self._placeholder = None
        self._log = None
        self.log_path = self.dir / "jupyterhub.log"

    def _pick_ports(self):
        # what sessions reach from HUB_PORTS, the rest (BinderHub's port,
        # the proxy's API) from outside it: compute nodes refuse those
        self.port, self.hub_port = hub_ports(2, self.host)
        self.api_port, self.binder_port = free_ports(2)

    @property
    def url(self):
        return f"http://{self.address}:{self.port}"

    @property
    def api(self):
        return self.url + "/hub/api"

    @property
    def config_path(self):
        return self.dir / "dev_config.py"

    def config_text(self):
        """The dev cluster's values; everything else is the deployment's."""
        return textwrap.dedent(
            f"""
            # the dev cluster's values over charts-free-config/ (written by DevHub)
            c.JupyterHub.bind_url = "http://{self.address}:{self.port}/"
            c.JupyterHub.hub_bind_url = "http://{self.address}:{self.hub_port}"
            c.JupyterHub.hub_connect_ip = "{self.address}"
            c.ConfigurableHTTPProxy.api_url = "http://{self.address}:{self.api_port}"
            c.ConfigurableHTTPProxy.should_start = True
            c.JupyterHub.db_url = "sqlite:///{self.dir}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{self.dir}/cookie_secret"
            c.JupyterHub.pid_file = "{self.dir}/jupyterhub.pid"
            c.JupyterHub.cleanup_servers = {self.cleanup_servers!r}
            # tests start many servers at once, some named
            c.JupyterHub.allow_named_servers = True
            c.JupyterHub.named_server_limit_per_user = 0
            c.JupyterHub.concurrent_spawn_limit = 0
            c.JupyterHub.active_server_limit = 0
            c.JupyterHub.authenticate_prometheus = False
            c.Spawner.poll_interval = 2
            c.Spawner.start_timeout = {self.start_timeout}
            c.Spawner.http_timeout = {self.http_timeout}
            c.Spawner.startup_poll_interval = 0.25
            """
        ) + textwrap.dedent(self.extra_config)

    def start(self, timeout=60):
        for attempt in range(1, self.start_attempts + 1):
            try:
                return self._start(timeout)
            except PortTaken:
                if attempt == self.start_attempts:
                    raise
                self._pick_ports()

    @property
    def deployment_config(self):
        """The configuration file the hub runs (as a site's systemd unit names it)."""
        return str(deployment_dir() / "jupyterhub_config.py")

    def config_env(self):
        """The environment that file needs, as the hub gets it (the site's
        secrets.env and binderhub-hpc.env); give it to the command-line
        tools that read the same file."""
        return {
            EXTRA_CONFIG_ENV: str(self.config_path),
            "BINDERHUB_API_TOKEN": self.token,
            DEFAULT_KEY_ENV: self.tag_key,
            "BINDERHUB_HPC_PUBLIC_URL": self.env.get("BINDERHUB_HPC_PUBLIC_URL", self.url + "/"),
            "BINDERHUB_HPC_BINDER_PORT": self.env.get("BINDERHUB_HPC_BINDER_PORT", str(self.binder_port)),
        }

    def _start(self, timeout):
        self.config_path.write_text(self.config_text())
        env = dict(os.environ)
        env.update(self.env)
        env.update(self.config_env())
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        if self.binderhub_placeholder:
            self._start_placeholder()
        argv = [sys.executable, "-m", "jupyterhub", "-f", self.deployment_config, "--debug"]
        self.proc = subprocess.Popen(
            self.host.run_in(argv) if self.host else argv,
            cwd=self.dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_tail()
                self.stop()
                if "Address already in use" in self._log_since(offset):
                    raise PortTaken(log)
                raise RuntimeError("jupyterhub exited:\n" + log)
            try:
                if requests.get(self.api, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("jupyterhub did not come up:\n" + self.log_tail())

    def _start_placeholder(self):
        """An empty HTTP server at BinderHub's port on the hub's host, as the
        account nobody (any answer will do: JupyterHub only waits for one).
        On the hub node it listens on every interface, as BinderHub does
        (charts-free-config: nginx is the way in, a firewall the rest), so
        what a session can reach of it is what it could reach of BinderHub;
        on this machine, on loopback only."""
        empty = self.dir / "binderhub-placeholder"
        empty.mkdir(exist_ok=True)
        bind = "0.0.0.0" if self.host and self.host.netns else "127.0.0.1"
        argv = ["/usr/bin/python3", "-m", "http.server", "--bind", bind, str(self.binder_port)]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]
        self._stop_placeholder()
        self._placeholder = subprocess.Popen(
            self.host.run_in(argv) if self.host else argv,
            cwd=empty,
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _stop_placeholder(self):
        if self._placeholder is None:
            return
        if self._placeholder.poll() is None:
            self._placeholder.terminate()
            try:
                self._placeholder.wait(10)
            except subprocess.TimeoutExpired:
                self._placeholder.kill()
                self._placeholder.wait()
        self._placeholder = None

    def _log_since(self, offset):
        try:
            with open(self.log_path, errors="replace") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return ""

    def stop(self):
        """Stop the hub and the proxy, which lives in the hub's session.
        Jobs outlive it unless `cleanup_servers` is set."""
        self._stop_placeholder()
        if not self.proc:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log:
            self._log.close()
            self._log = None

    def log_tail(self, n=80):
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    # -- REST, as BinderHub's launcher uses it ----------------------------------

    def request(self, method, path, **kw):
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"token {self.token}"
        kw.setdefault("timeout", 60)
        return requests.request(method, self.api + path, headers=headers, **kw)

    def create_user(self, name):
        r = self.request("POST", f"/users/{name}")
        if r.status_code not in (201, 409):
            raise RuntimeError(f"creating user {name}: {r.status_code} {r.text}")
        return name

    @staticmethod
    def server_path(user, server=""):
        return f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"

    def start_server(self, user, options=None, server=""):
        return self.request("POST", self.server_path(user, server), data=json.dumps(options or {}))

    def stop_server(self, user, server=""):
        return self.request("DELETE", self.server_path(user, server))

    def user(self, name):
        r = self.request("GET", f"/users/{name}")
        r.raise_for_status()
        return r.json()

    def progress(self, user, server="", timeout=600, events=None):
        """The server's progress events until ready or failed; appended to
        `events` as they arrive, for a watcher in another thread."""
        events = [] if events is None else events
        with requests.get(
            self.api + self.server_path(user, server) + "/progress",
            headers={"Authorization": f"token {self.token}"},
            stream=True,
            timeout=timeout,
        ) as r:
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    ev = json.loads(line[5:])
                    events.append(ev)
                    if ev.get("ready") or ev.get("failed"):
                        break
        return events


def spawner_config(
    registry_root,
    partition="interactive",
    interval=1.0,
    extra="",
    formats=("sif",),
    runtime="apptainer",
    compute_root="",
    pbs=None,
):
    """The dev cluster's values for the deployment's spawner: its registry
    (and where compute nodes see it), partition (PBS: queue), job directory
    and runtime (jobs of the service account, submitted through the
    deployment's `sudo -E -u binder`). `pbs`: a
    :class:`binderhub_hpc_testing.pbs.PBSDevCluster` to run the sessions on
    instead of Slurm."""
    where = "req_queue" if pbs is not None else "req_partition"
    return (
        textwrap.dedent(
            f"""
        c.SIFRegistry.root = {str(registry_root)!r}
        c.SIFRegistry.compute_root = {str(compute_root or "")!r}
        c.SIFRegistry.formats = {list(formats)!r}
        c.BinderBatchMixin.container_runtime = {runtime!r}
        c.BinderBatchMixin.job_dir = "/var/lib/binderhub-hpc/jobs"
        c.BinderBatchMixin.{where} = {partition!r}
        c.BinderBatchMixin.req_runtime = "00:30:00"
        c.BinderBatchMixin.queue_poll_interval = {interval!r}
        """
        )
        + (textwrap.dedent(pbs.spawner_config()) if pbs is not None else "")
        + textwrap.dedent(extra)
    )
