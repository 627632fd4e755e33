"""A real JupyterHub (with configurable-http-proxy) for tests, in a subprocess.

The hub gets a service token with BinderHub's scopes, and talks to the dev
cluster's Slurm through our spawner. Tests drive it through the REST API the
way BinderHub's launcher does.
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

import requests


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    def __init__(self, workdir, extra_config="", env=None):
        self.workdir = workdir
        self.port = free_port()
        self.hub_port = free_port()
        self.api_port = free_port()
        self.token = secrets.token_hex(16)
        self.extra_config = extra_config
        self.env = env or {}
        self.proc = None
        self.log_path = os.path.join(workdir, "jupyterhub.log")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self):
        return self.url + "/hub/api"

    def write_config(self):
        cfg = textwrap.dedent(
            f"""
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {self.port}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {self.hub_port}
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
            c.ConfigurableHTTPProxy.should_start = True
            c.JupyterHub.db_url = "sqlite:///{self.workdir}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{self.workdir}/cookie_secret"
            c.JupyterHub.pid_file = "{self.workdir}/jupyterhub.pid"
            c.JupyterHub.cleanup_servers = False
            c.JupyterHub.authenticator_class = "null"
            c.JupyterHub.allow_named_servers = True
            c.JupyterHub.services = [{{"name": "binder", "api_token": "{self.token}"}}]
            c.JupyterHub.load_roles = [{{
                "name": "binder", "services": ["binder"],
                "scopes": ["admin:users", "admin:servers", "read:metrics", "access:servers", "read:users"],
            }}]
            c.JupyterHub.authenticate_prometheus = False
            c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
            c.JupyterHub.spawner_class = "binderhub_hpc.launch.spawner.SlurmBinderSpawner"
            c.Spawner.poll_interval = 2
            c.Spawner.start_timeout = 180
            c.Spawner.http_timeout = 120
            c.Spawner.startup_poll_interval = 0.25
            """
        ) + textwrap.dedent(self.extra_config)
        path = os.path.join(self.workdir, "jupyterhub_config.py")
        with open(path, "w") as f:
            f.write(cfg)
        return path

    def start(self, timeout=60):
        cfg = self.write_config()
        env = dict(os.environ)
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", cfg, "--debug"],
            cwd=self.workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("jupyterhub exited:\n" + self.log_tail())
            try:
                r = requests.get(self.api, timeout=2)
                if r.status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError("jupyterhub did not come up:\n" + self.log_tail())

    def stop(self, kill_proxy=True):
        """Stop the hub; with kill_proxy=False the proxy keeps running
        (like a hub restart in production)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if kill_proxy:
            subprocess.run(["pkill", "-f", f"configurable-http-proxy.*{self.api_port}"], check=False)

    def log_tail(self, n=80):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    # -- REST, as BinderHub's launcher uses it ----------------------------------

    def request(self, method, path, **kw):
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"token {self.token}"
        return requests.request(method, self.api + path, headers=headers, timeout=30, **kw)

    def create_user(self, name):
        r = self.request("POST", f"/users/{name}")
        assert r.status_code in (201, 409), r.text
        return name

    def start_server(self, name, user_options):
        return self.request("POST", f"/users/{name}/server", data=json.dumps(user_options))

    def progress(self, name, timeout=240, events=None):
        """Events of the server's progress stream until it ends (appended
        to `events` as they arrive, for a watcher in another thread)."""
        events = [] if events is None else events
        with requests.get(
            self.api + f"/users/{name}/server/progress",
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

    def user(self, name):
        r = self.request("GET", f"/users/{name}")
        r.raise_for_status()
        return r.json()

    def wait_for(self, predicate, timeout=120, interval=0.5, what="condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}; hub log:\n{self.log_tail()}")

    def server_ready(self, name):
        u = self.user(name)
        s = u.get("servers", {}).get("")
        return s if s and s.get("ready") else None

    def stop_server(self, name):
        return self.request("DELETE", f"/users/{name}/server")
