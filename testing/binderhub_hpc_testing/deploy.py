"""The deployment README's "Deploying on a cluster" describes, on the dev
cluster: the files of ``charts-free-config/`` as shipped, the services run
the way their systemd units run them.

- JupyterHub as the account ``jupyterhub`` (never root), the command, user,
  group, environment and environment files of ``systemd/jupyterhub.service``;
  it submits session jobs through ``sudo`` with ``sudoers/binderhub-hpc``,
  installed in ``/etc/sudoers.d`` once ``visudo -cf`` accepts it;
- BinderHub as the account ``binderhub`` (group ``binder-build``), what
  ``systemd/binderhub.service`` runs;
- nginx with ``nginx/binder.conf``: TLS (a throw-away self-signed
  certificate), websockets, event streams.

Where a unit names ``/etc/binderhub-hpc/<file>``, the file of this
checkout's ``charts-free-config/`` is used, unchanged; the dev cluster's
values (ports, state paths, the registry, the partition) are in one file
both services load last (``$BINDERHUB_HPC_EXTRA_CONFIG``), and the units'
environment files (``secrets.env``, ``binderhub-hpc.env``) are written in
a state directory of the deployment. On a multi-node dev cluster all three
services run on the hub node (its network namespace and address); sessions
run on the compute nodes.

Development tooling, as root on the dev cluster (systemd does not run
there): the tests use it (``tests/test_deployment.py``).
"""

import grp
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

from binderhub_hpc.scheduler.tags import DEFAULT_KEY_ENV

from .hub import EXTRA_CONFIG_ENV, deployment_dir, free_ports, hub_ports

#: where a site installs the sudoers file
SUDOERS_PATH = Path("/etc/sudoers.d/binderhub-hpc")
#: the site virtualenv the units run from
SITE_VENV = Path("/opt/binderhub-hpc")
#: the accounts README names
HUB_USER = "jupyterhub"
#: authenticated mode: the group whose members may log in and run sessions
USERS_GROUP = "binder-users"
#: where the units expect the deployment's files
ETC = "/etc/binderhub-hpc/"


class DeploymentError(RuntimeError):
    pass


def _run(argv, check=True, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([str(a) for a in argv], **kw)
    if check and p.returncode:
        raise DeploymentError(
            f"{shlex.join(map(str, argv))} exited {p.returncode}: {(p.stderr or p.stdout or '').strip()}"
        )
    return p


# -- systemd units -------------------------------------------------------------------


def read_unit(path):
    """The [Service] settings of a systemd unit: {key: [values]}."""
    settings = {}
    section = None
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def read_env_file(path):
    """KEY=value lines of a systemd EnvironmentFile."""
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip().strip('"')
    return env


class Unit:
    """What systemd would run for a unit of charts-free-config/systemd:
    the command, account, working directory and environment."""

    def __init__(self, name, env_files, state_dir, replace_exec=None):
        self.path = deployment_dir() / "systemd" / name
        s = read_unit(self.path)
        self.user = s["User"][0]
        self.group = s.get("Group", [self.user])[0]
        self.argv = shlex.split(s["ExecStart"][0].replace(ETC, str(deployment_dir()) + "/"))
        if replace_exec:
            self.argv[0] = replace_exec
        self.state_dir = Path(state_dir)
        pw = pwd.getpwnam(self.user)
        # what systemd sets for User=, then Environment=, then the
        # EnvironmentFile= files (which win over Environment=)
        env = {"HOME": pw.pw_dir, "USER": self.user, "LOGNAME": self.user, "SHELL": pw.pw_shell or "/bin/sh"}
        for assignment in s.get("Environment", []):
            key, value = assignment.split("=", 1)
            env[key] = value
        self.runtime_dir = None
        if "RuntimeDirectory" in s:
            # /run/<name>: the deployment's own, private to the account
            self.runtime_dir = self.state_dir / "run"
            for k, v in env.items():
                if v == "/run/" + s["RuntimeDirectory"][0]:
                    env[k] = str(self.runtime_dir)
        # StateDirectory= (/var/lib/<name>, the account's own, 0700) and the
        # WorkingDirectory= in it: the deployment's own
        self.workdir = self.state_dir / "state"
        for name in s.get("StateDirectory", []):
            for k, v in env.items():
                if v == "/var/lib/" + name:
                    env[k] = str(self.workdir)
        self.env_files = []
        for f in s.get("EnvironmentFile", []):
            optional = f.startswith("-")
            name = f.lstrip("-")
            local = env_files.get(name)
            if local is None:
                if optional:
                    continue
                raise DeploymentError(f"{self.path.name} needs {name}, which the deployment does not write")
            self.env_files.append(local)
            env.update(read_env_file(local))
        self.env = env

    def prepare(self):
        pw = pwd.getpwnam(self.user)
        gid = grp.getgrnam(self.group).gr_gid
        for d in filter(None, (self.workdir, self.runtime_dir)):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, pw.pw_uid, gid)
            os.chmod(d, 0o700)

    def popen_argv(self, host=None):
        """The command as the unit's account (all its groups, as systemd
        gives them), in the host's network namespace."""
        argv = ["setpriv", f"--reuid={self.user}", f"--regid={self.group}", "--init-groups", "--", *self.argv]
        return host.run_in(argv) if host else argv


# -- the site's part: accounts, sudoers, job directories ---------------------------------


def ensure_group(name, system=True):
    try:
        grp.getgrnam(name)
    except KeyError:
        _run(["groupadd", *(["--system"] if system else []), name])


def ensure_hub_account(authenticated=False):
    """The hub's account `jupyterhub` (home /var/lib/jupyterhub, no login);
    in authenticated mode a member of group shadow, which PAM's password
    check as a non-root account needs."""
    try:
        pwd.getpwnam(HUB_USER)
    except KeyError:
        _run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--home-dir",
                "/var/lib/jupyterhub",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "JupyterHub (binderhub-hpc)",
                HUB_USER,
            ]
        )
    if authenticated and HUB_USER not in grp.getgrnam("shadow").gr_mem:
        _run(["usermod", "--append", "--groups", "shadow", HUB_USER])


def install_sudoers(dest=SUDOERS_PATH):
    """sudoers/binderhub-hpc into /etc/sudoers.d, once `visudo -cf` accepts it."""
    src = deployment_dir() / "sudoers" / "binderhub-hpc"
    _run(["visudo", "-cf", src])
    text = src.read_text()
    if not (dest.exists() and dest.read_text() == text):
        tmp = dest.with_name(".binderhub-hpc.tmp")
        _run(["install", "-o", "root", "-g", "root", "-m", "0440", src, tmp])
        os.replace(tmp, dest)
    return dest


def job_dir_of(job_dir, account):
    return Path(job_dir.replace("{username}", account))


def ensure_job_dir(job_dir, account):
    """The account's job directory (README: `<account>`, mode 0700)."""
    d = job_dir_of(job_dir, account)
    if not d.parent.is_dir():
        d.parent.mkdir(mode=0o755, parents=True)
    d.mkdir(exist_ok=True)
    pw = pwd.getpwnam(account)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    os.chmod(d, 0o700)
    return d


def add_user(name, password, groups=(USERS_GROUP,)):
    """A cluster account with a password (authenticated Binder's users)."""
    for g in groups:
        ensure_group(g)
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run(
            [
                "useradd",
                "--create-home",
                "--shell",
                "/bin/bash",
                "--user-group",
                *(["--groups", ",".join(groups)] if groups else []),
                name,
            ]
        )
    # the password on chpasswd's standard input, never on a command line
    _run(["chpasswd"], input=f"{name}:{password}\n")
    return pwd.getpwnam(name)


def remove_user(name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    _run(["pkill", "-KILL", "-u", name], check=False)
    _run(["userdel", "--remove", name], check=False)


# -- nginx ------------------------------------------------------------------------------


def self_signed_cert(directory, address):
    """A throw-away certificate for `address` (an IP address or name)."""
    directory = Path(directory)
    cert, key = directory / "binder.pem", directory / "binder.key"
    san = f"IP:{address}" if re.fullmatch(r"[\d.]+", address) else f"DNS:{address}"
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={address}",
            "-addext",
            f"subjectAltName={san}",
            "-keyout",
            key,
            "-out",
            cert,
        ]
    )
    os.chmod(key, 0o600)
    return cert, key


def nginx_site_config(*, http_port, https_port, server_name, cert, key, proxy_port, binder_port):
    """nginx/binder.conf with the values a site edits, and only those:
    ports, server name, certificate, the hub's proxy and BinderHub ports.
    Every one must be found where the file has it (so the file tested is
    the file shipped)."""
    text = (deployment_dir() / "nginx" / "binder.conf").read_text()
    edits = [
        (r"(?m)^(\s*listen\s+(?:\[::\]:)?)80;", rf"\g<1>{http_port};", 2),
        (r"(?m)^(\s*listen\s+(?:\[::\]:)?)443( ssl)", rf"\g<1>{https_port}\2", 2),
        (r"server_name binder\.example\.org;", f"server_name {server_name};", 2),
        (r"ssl_certificate\s+\S+;", f"ssl_certificate     {cert};", 1),
        (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", 1),
        (r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{proxy_port};", 1),
        (r"server 127\.0\.0\.1:8585;", f"server 127.0.0.1:{binder_port};", 1),
    ]
    for pattern, repl, count in edits:
        text, n = re.subn(pattern, repl, text)
        if n != count:
            raise DeploymentError(f"nginx/binder.conf: expected {count} of {pattern!r}, found {n}")
    return text


def nginx_main_config(directory, site_conf):
    """A main nginx.conf (what Debian's /etc/nginx/nginx.conf is) that
    includes the site file inside its http block, state in `directory`."""
    d = Path(directory)
    return textwrap.dedent(f"""\
        user www-data;
        worker_processes 1;
        pid {d}/nginx.pid;
        error_log {d}/error.log info;
        events {{ worker_connections 512; }}
        http {{
            access_log {d}/access.log;
            client_body_temp_path {d}/tmp/body;
            proxy_temp_path {d}/tmp/proxy;
            include {site_conf};
        }}
        """)


# -- the deployment -----------------------------------------------------------------------


class Deployment:
    """One deployment on the dev cluster `cluster` (a DevCluster that is up).

    `authenticated`: BINDERHUB_HPC_AUTHENTICATED=1 (PAM, users' own jobs).
    `dev_config`: the dev cluster's values (registry, partition, ...), put
    in the file both services load last, after the deployment's own (ports,
    state paths). `binderhub_python`: the Python that runs BinderHub (the
    unit's /opt/binderhub-hpc/bin/python when it imports binderhub).
    """

    def __init__(self, cluster, state_dir, authenticated=False, dev_config="", binderhub_python=None):
        self.cluster = cluster
        self.dir = Path(state_dir)
        self.authenticated = authenticated
        self.dev_config = dev_config
        self.binderhub_python = binderhub_python
        self.host = cluster.hub_host if cluster.multi else None
        self.address = cluster.hub_address
        # what sessions reach (the hub's API, nginx's public port) from the
        # ports compute nodes let them reach; the rest from outside them
        self.hub_port, self.https_port = hub_ports(2, self.host)
        self.proxy_port, self.proxy_api_port, self.binder_port, self.http_port = free_ports(4)
        self.token = secrets.token_hex(32)
        #: the quota tags' key, in secrets.env beside the token
        self.tag_key = secrets.token_hex(32)
        self.procs = {}
        self.idle_timeout = None

    # -- places and URLs
    @property
    def public_url(self):
        return f"https://{self.address}:{self.https_port}/"

    @property
    def ca_cert(self):
        return self.dir / "nginx" / "binder.pem"

    @property
    def extra_config_path(self):
        return self.dir / "dev_config.py"

    @property
    def secrets_env(self):
        return self.dir / "secrets.env"

    @property
    def site_env(self):
        return self.dir / "binderhub-hpc.env"

    def log_path(self, name):
        return self.dir / f"{name}.log"

    def log_tail(self, name, n=60):
        try:
            return "".join(self.log_path(name).read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    # -- files
    def config_text(self):
        text = textwrap.dedent(f"""\
            # The dev cluster's values over charts-free-config/ (written by
            # binderhub_hpc_testing.deploy; JupyterHub and BinderHub load it last)
            c.JupyterHub.bind_url = "http://127.0.0.1:{self.proxy_port}/"
            c.JupyterHub.hub_bind_url = "http://0.0.0.0:{self.hub_port}"
            c.JupyterHub.hub_connect_ip = "{self.address}"
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
            c.JupyterHub.db_url = "sqlite:///{self.dir / "hub" / "state" / "jupyterhub.sqlite"}"
            c.JupyterHub.cookie_secret_file = "{self.dir / "hub" / "state" / "jupyterhub_cookie_secret"}"
            c.BinderHub.hub_url_local = "http://127.0.0.1:{self.proxy_port}/"
            """)
        return text + textwrap.dedent(self.dev_config)

    def write_files(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.extra_config_path.write_text(self.config_text())
        os.chmod(self.extra_config_path, 0o644)
        # secrets.env: root, 0600 (systemd reads it before dropping privileges)
        fd = os.open(self.secrets_env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"BINDERHUB_API_TOKEN={self.token}\n")
            f.write(f"{DEFAULT_KEY_ENV}={self.tag_key}\n")
        site = {
            "BINDERHUB_HPC_PUBLIC_URL": self.public_url,
            "BINDERHUB_HPC_BINDER_PORT": str(self.binder_port),
            "SLURM_CONF": str(self.cluster.slurm_conf),
            EXTRA_CONFIG_ENV: str(self.extra_config_path),
            # the hub's API on this deployment's port (the unit names 8081)
            "JUPYTERHUB_API_URL": f"http://127.0.0.1:{self.hub_port}/hub/api",
        }
        if self.authenticated:
            site["BINDERHUB_HPC_AUTHENTICATED"] = "1"
        if self.idle_timeout:
            site["BINDERHUB_HPC_IDLE_TIMEOUT"] = str(int(self.idle_timeout))
        self.site_env.write_text("".join(f"{k}={v}\n" for k, v in site.items()))
        os.chmod(self.site_env, 0o644)

    def unit(self, name, replace_exec=None):
        files = {
            "/etc/binderhub-hpc/secrets.env": self.secrets_env,
            "/etc/binderhub-hpc/binderhub-hpc.env": self.site_env,
        }
        return Unit(name, files, self.dir / name.split(".")[0].replace("jupyterhub", "hub"), replace_exec)

    # -- lifecycle
    def setup_site(self):
        """What the site's admin does once: the hub's account, the sudoers file."""
        if not (SITE_VENV / "bin" / "jupyterhub").exists():
            raise DeploymentError(
                f"{SITE_VENV} has no jupyterhub: `binderhub-hpc devcluster up --nodes N` "
                "makes the site virtualenv the units run"
            )
        ensure_hub_account(self.authenticated)
        config = deployment_dir() / "jupyterhub_config.py"
        if _run(
            ["setpriv", f"--reuid={HUB_USER}", f"--regid={HUB_USER}", "--init-groups", "--", "test", "-r", config],
            check=False,
        ).returncode:
            raise DeploymentError(
                f"the account {HUB_USER} cannot read {config}: the deployment runs this "
                "checkout's files, so it must be where every account can read it"
            )
        if self.authenticated:
            ensure_group(USERS_GROUP)
        install_sudoers()

    def start(self, binderhub=False, timeout=120):
        self.setup_site()
        self.write_files()
        try:
            # as systemd starts them: BinderHub right after the hub (which
            # waits for its external service up to 30 s before it serves)
            if binderhub:
                self.start_hub(timeout, wait=False)
                self.start_binderhub(timeout)
                self._wait("jupyterhub", self._hub_up, timeout)
            else:
                # without BinderHub, a placeholder answers (404) at its port:
                # the hub waits up to 30 s for an external service at every start
                self.start_placeholder()
                self.start_hub(timeout)
            self.start_nginx(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _popen(self, name, argv, env, cwd, user=None):
        log = open(self.log_path(name), "ab")
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def _wait(self, name, ok, timeout):
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentError(f"{name} exited ({proc.returncode}):\n{self.log_tail(name)}")
            if ok():
                return
            time.sleep(0.3)
        raise DeploymentError(f"{name} did not come up in {timeout} s:\n{self.log_tail(name)}")

    def in_host(self, argv):
        return self.host.run_in(argv) if self.host else list(argv)

    def _http_ok(self, url):
        p = subprocess.run(
            self.in_host(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url]),
            capture_output=True,
            text=True,
        )
        return p.stdout.strip() == "200"

    def _hub_up(self):
        return self._http_ok(f"http://127.0.0.1:{self.proxy_port}/hub/api/")

    def start_hub(self, timeout=120, wait=True):
        """systemd/jupyterhub.service: /opt/binderhub-hpc/bin/jupyterhub as `jupyterhub`."""
        unit = self.unit("jupyterhub.service")
        if unit.user != HUB_USER:
            raise DeploymentError(f"{unit.path} runs the hub as {unit.user!r}, not {HUB_USER!r}")
        unit.prepare()
        self.hub_unit = unit
        env = dict(unit.env)
        env.update(self._checkout_env(env))
        self._popen("jupyterhub", unit.popen_argv(self.host), env, unit.workdir)
        if wait:
            self._wait("jupyterhub", self._hub_up, timeout)

    def start_placeholder(self):
        empty = self.dir / "placeholder"
        empty.mkdir(exist_ok=True)
        argv = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            str(self.binder_port),
        ]
        self._popen("placeholder", self.in_host(argv), {"PATH": "/usr/bin:/bin"}, empty)

    def start_binderhub(self, timeout=120):
        """systemd/binderhub.service: `python -m binderhub` as `binderhub`."""
        unit = self.unit("binderhub.service", replace_exec=self.binderhub_python)
        unit.prepare()
        env = dict(unit.env)
        env.update(self._checkout_env(env))
        self._popen("binderhub", unit.popen_argv(self.host), env, unit.workdir)
        self._wait(
            "binderhub", lambda: self._http_ok(f"http://127.0.0.1:{self.binder_port}/services/binder/versions"), timeout
        )

    @staticmethod
    def _checkout_env(env):
        """This checkout's binderhub_hpc first (the site venv's editable
        install may be another checkout's)."""
        import binderhub_hpc

        checkout = str(Path(binderhub_hpc.__file__).resolve().parents[1])
        old = env.get("PYTHONPATH")
        return {"PYTHONPATH": checkout + (os.pathsep + old if old else "")}

    def start_nginx(self, timeout=30):
        d = self.dir / "nginx"
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        www = pwd.getpwnam("www-data")
        for sub in ("body", "proxy"):
            (d / "tmp" / sub).mkdir(exist_ok=True)
            os.chown(d / "tmp" / sub, www.pw_uid, www.pw_gid)
        cert, key = self_signed_cert(d, self.address)
        site = d / "binder.conf"
        site.write_text(
            nginx_site_config(
                http_port=self.http_port,
                https_port=self.https_port,
                server_name=self.address,
                cert=cert,
                key=key,
                proxy_port=self.proxy_port,
                binder_port=self.binder_port,
            )
        )
        main = d / "nginx.conf"
        main.write_text(nginx_main_config(d, site))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        _run(self.in_host([nginx, "-t", "-q", "-e", d / "error.log", "-c", main]))
        self._popen(
            "nginx",
            self.in_host([nginx, "-e", str(d / "error.log"), "-c", str(main), "-g", "daemon off;"]),
            {"PATH": "/usr/sbin:/usr/bin:/bin"},
            d,
        )
        self._wait("nginx", self._curl_ok, timeout)

    def _curl_ok(self):
        """The hub answers through nginx, over TLS, from outside the hub node."""
        p = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                "--cacert",
                str(self.ca_cert),
                self.public_url + "hub/api/",
            ],
            capture_output=True,
            text=True,
        )
        return p.stdout.strip() == "200"

    def restart_hub(self, timeout=120):
        """Stop the hub (sessions' jobs go on: cleanup_servers is off) and
        start it again with the current dev values."""
        self._stop("jupyterhub")
        self.write_files()
        self.start_hub(timeout)

    def _stop(self, name, timeout=60):
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        # whatever the service left in its process session (the proxy, the culler)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self):
        for name in ("nginx", "binderhub", "jupyterhub", "placeholder"):
            self._stop(name)
