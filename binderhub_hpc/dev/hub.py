"""A real JupyterHub (with configurable-http-proxy) in a subprocess, driven
through its REST API the way BinderHub's launcher drives it.

Development tooling beside :mod:`binderhub_hpc.dev.cluster`: the tests and the
benchmarks start their hubs with it. The hub gets a service token with the
scopes BinderHub needs and listens on loopback ports of its own.
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

import requests


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevHub:
    """One JupyterHub in its own process session (the proxy lives there too).

    `extra_config`: config lines appended to the base config (spawner
    choice and settings). `cleanup_servers`: whether stopping the hub stops
    the servers (False lets a test restart the hub under running jobs).
    """

    start_timeout = 180
    http_timeout = 120

    def __init__(self, workdir, extra_config="", env=None, cleanup_servers=False):
        self.dir = Path(workdir)
        self.port, self.hub_port, self.api_port = free_port(), free_port(), free_port()
        self.token = secrets.token_hex(16)
        self.extra_config = extra_config
        self.env = env or {}
        self.cleanup_servers = cleanup_servers
        self.proc = None
        self._log = None
        self.log_path = self.dir / "jupyterhub.log"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self):
        return self.url + "/hub/api"

    def config_text(self):
        return textwrap.dedent(
            f"""
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {self.port}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {self.hub_port}
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
            c.ConfigurableHTTPProxy.should_start = True
            c.JupyterHub.db_url = "sqlite:///{self.dir}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{self.dir}/cookie_secret"
            c.JupyterHub.pid_file = "{self.dir}/jupyterhub.pid"
            c.JupyterHub.cleanup_servers = {self.cleanup_servers!r}
            c.JupyterHub.authenticator_class = "null"
            c.JupyterHub.allow_named_servers = True
            c.JupyterHub.named_server_limit_per_user = 0
            c.JupyterHub.concurrent_spawn_limit = 0
            c.JupyterHub.active_server_limit = 0
            c.JupyterHub.services = [{{"name": "binder", "api_token": "{self.token}"}}]
            c.JupyterHub.load_roles = [{{
                "name": "binder", "services": ["binder"],
                "scopes": ["admin:users", "admin:servers", "read:metrics", "access:servers", "read:users"],
            }}]
            c.JupyterHub.authenticate_prometheus = False
            # BinderHub posts the start request, then follows the progress stream
            c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
            c.JupyterHub.spawner_class = "binderhub_hpc.spawner.spawner.SlurmBinderSpawner"
            c.Spawner.poll_interval = 2
            c.Spawner.start_timeout = {self.start_timeout}
            c.Spawner.http_timeout = {self.http_timeout}
            c.Spawner.startup_poll_interval = 0.25
            """
        ) + textwrap.dedent(self.extra_config)

    def start(self, timeout=60):
        cfg = self.dir / "jupyterhub_config.py"
        cfg.write_text(self.config_text())
        env = dict(os.environ)
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(cfg), "--debug"],
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
                raise RuntimeError("jupyterhub exited:\n" + self.log_tail())
            try:
                if requests.get(self.api, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("jupyterhub did not come up:\n" + self.log_tail())

    def stop(self):
        """Stop the hub and the proxy, which lives in the hub's session.
        Jobs outlive it unless `cleanup_servers` is set."""
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


def spawner_config(registry_root, partition="interactive", interval=1.0, extra="",
                   formats=("oci-archive",), job_user="binder"):
    """Config lines for our Slurm spawner on the dev cluster: rootless podman
    jobs of the service account, submitted from a hub running as root."""
    return textwrap.dedent(
        f"""
        c.SIFRegistry.root = {str(registry_root)!r}
        c.SIFRegistry.formats = {list(formats)!r}
        c.SlurmBinderSpawner.container_runtime = "podman"
        c.SlurmBinderSpawner.job_user = {job_user!r}
        c.SlurmBinderSpawner.exec_prefix = "runuser -u {{username}} --"
        c.SlurmBinderSpawner.host_python = "/usr/bin/python3"
        c.SlurmBinderSpawner.req_partition = {partition!r}
        c.SlurmBinderSpawner.req_runtime = "00:30:00"
        c.SlurmBinderSpawner.queue_poll_interval = {interval!r}
        """
    ) + textwrap.dedent(extra)
