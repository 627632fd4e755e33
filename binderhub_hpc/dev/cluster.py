"""A single-node development cluster on one Debian machine.

``DevCluster.up()`` turns the machine it runs on into a small HPC site:

- a non-root service account (``binder``) that submits all session jobs,
  with subordinate uid/gid ranges so it can run rootless podman;
- the shared directories: the SIF registry root and the jobs directory;
- munge, slurmctld and slurmd (Debian's ``slurm-wlm``) with a generated
  ``slurm.conf`` under the state directory (``/etc/slurm`` is left alone),
  partitions ``interactive`` (default, oversubscribed like a Jupyter
  partition), ``batch`` (exclusive cores) and ``bench`` (oversubscribed
  64-fold, for concurrent-launch benchmarks);
- podman configured so it works here (runc, cgroupfs, no default ulimits),
  as root and rootless as the service account.

``ensure_base_image()`` makes the test/demo base image locally, without any
registry pull: debootstrap of Debian bookworm, ``podman import``, then a short
Containerfile that adds Python, a venv with JupyterHub's single-user server
and the ``jovyan`` user.

Everything is idempotent; ``down()`` stops only the daemons this class
started (recorded in ``<state>/started/``) and never removes packages.
"""

import grp
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

from ..proc import cmdline, pid_alive
from . import network

log = logging.getLogger("binderhub_hpc.dev.cluster")

DEFAULT_ROOT = "/var/lib/binderhub-hpc"
STATE_DIR_ENV = "BINDERHUB_HPC_DEVCLUSTER_DIR"
CONTAINERS_CONF = "/etc/containers/containers.conf"
CONTAINERS_CONF_MARKER = "# written by binderhub-hpc devcluster"
BASE_IMAGE = "localhost/binderhub-hpc-base:bookworm"
ROOTFS_IMAGE = "localhost/binderhub-hpc-rootfs:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

BASE_CONTAINERFILE = """\
FROM {rootfs}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
RUN apt-get update -qq \\
 && apt-get install -y -qq --no-install-recommends \\
      python3 python3-venv ca-certificates git \\
 && apt-get clean \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
# system site packages on, so `pip install --user` works in sessions as
# it does in repo2docker's images
RUN python3 -m venv --system-site-packages /opt/venv \\
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -q \\
      --cert /run/host-ca.crt "jupyterhub=={jupyterhub_major}.*" jupyter_server notebook \\
 && /opt/venv/bin/python -m compileall -q /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN useradd --create-home --home-dir /home/jovyan --uid 1000 --user-group \\
      --shell /bin/bash jovyan
USER jovyan
ENV HOME=/home/jovyan USER=jovyan
WORKDIR /home/jovyan
LABEL {major_label}="{jupyterhub_major}" {revision_label}="{revision}"
"""
#: the image label that says which JupyterHub major the single-user server
#: in the base image belongs to (it must match the hub's)
MAJOR_LABEL = "org.binderhub-hpc.jupyterhub-major"
#: and which version of BASE_CONTAINERFILE made it: bump it with the file
REVISION_LABEL = "org.binderhub-hpc.base-revision"
BASE_REVISION = "2"


def hub_major():
    """The major version of the JupyterHub installed beside us."""
    from importlib.metadata import version

    return int(version("jupyterhub").split(".")[0])


class DevClusterError(RuntimeError):
    pass


def _run(cmd, check=True, env=None, capture=True, timeout=None, cwd=None, input=None):
    log.debug("run: %s", " ".join(map(str, cmd)))
    p = subprocess.run(
        [str(c) for c in cmd],
        env=env,
        cwd=cwd,
        input=input,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        stdin=subprocess.DEVNULL if input is None else None,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise DevClusterError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout or ''}")
    return p


def _read_pid(path):
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pgrep_exact(name):
    """pids of processes whose executable name is exactly ``name``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if comm == name and pid_alive(int(d.name)):
            pids.append(int(d.name))
    return sorted(pids)


def _tail(path, n=30):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e})"
    return "\n".join(lines[-n:])


class DevCluster:
    """The single-node dev cluster. Attributes are plain and documented.

    - ``root``: top of the shared tree (``/var/lib/binderhub-hpc``)
    - ``state_dir``: slurm.conf, spool, logs, pidfiles, caches
    - ``registry_dir``: the SIF registry root (root-owned, world-readable,
      group ``binder-build`` may write)
    - ``jobs_dir``: job logs and scratch (owned by the service account, 0700)
    - ``service_user`` / ``service_home``: the account that runs all jobs
    - ``build_user`` / ``build_home``: the build account (group
      ``binder-build``: writes the registry), rootless podman on the build
      node with node-local storage; ``site_venv`` is binderhub-hpc for it
    - ``node_name``, ``partitions``, ``slurmctld_port``, ``slurmd_port``
    - ``base_image``: the local test/demo image name
    """

    build_group = "binder-build"
    partitions = ("interactive", "batch", "bench")
    #: the site's virtualenv (Debian's python3) with this checkout and
    #: repo2docker: what build jobs and the SSH runner call on the build node
    #: (the path charts-free-config's systemd units use)
    site_venv = Path("/opt/binderhub-hpc")

    def __init__(
        self,
        state_dir=None,
        root=DEFAULT_ROOT,
        service_user="binder",
        build_user="binderhub",
        slurmctld_port=None,
        slurmd_port=None,
        base_image=BASE_IMAGE,
        nodes=None,
        subnet="10.213.0.0/24",
    ):
        self.root = Path(root)
        self.state_dir = Path(state_dir or os.environ.get(STATE_DIR_ENV) or self.root / "devcluster")
        self.registry_dir = self.root / "registry"
        self.jobs_dir = self.root / "jobs"
        self.service_user = service_user
        self.service_home = self.root / service_user
        self.build_user = build_user
        self.build_home = self.root / build_user
        self.base_image = base_image
        self.node_name = socket.gethostname().split(".")[0]
        # the topology and ports: what was asked, else what runs
        # (topology.json), else one node on the default ports
        saved = self._saved_topology()
        self.slurmctld_port = int(slurmctld_port or saved.get("slurmctld_port") or 16817)
        self.slurmd_port = int(slurmd_port or saved.get("slurmd_port") or 16818)
        self.nodes = int(nodes or saved.get("nodes") or 1)
        self.subnet = saved.get("subnet", subnet) if nodes is None else subnet
        self.hosts, self._prefixlen = network.plan(self.nodes, self.subnet) if self.multi else ([], 0)

    # ---------------------------------------------------------------- topology
    @property
    def multi(self):
        """Hub, build node and compute nodes as hosts of their own."""
        return self.nodes >= 3

    def _saved_topology(self):
        try:
            return json.loads((self.state_dir / "topology.json").read_text())
        except (OSError, ValueError):
            return {}

    def host(self, name):
        return next(h for h in self.hosts if h.name == name)

    @property
    def hub_host(self):
        """Where the hub, the proxy and BinderHub run (None: this machine)."""
        return self.host("hub") if self.multi else None

    @property
    def build_host(self):
        return self.host("build") if self.multi else None

    @property
    def compute_hosts(self):
        return [h for h in self.hosts if h.role == "compute"]

    @property
    def slurm_nodes(self):
        """Slurm node names: the build node and the compute nodes, or this machine."""
        if not self.multi:
            return [self.node_name]
        return [h.name for h in self.hosts if h.role in ("build", "compute")]

    @property
    def compute_nodes(self):
        return [h.name for h in self.compute_hosts] if self.multi else [self.node_name]

    @property
    def hub_address(self):
        """The address the hub listens on and compute nodes reach it at."""
        return self.hub_host.address if self.multi else "127.0.0.1"

    def node_dir(self, node):
        """A node's local disk (its /tmp and /var/tmp), on this machine."""
        return self.root / "nodes" / node

    def host_path(self, node, path):
        """Where a path on `node` (its /tmp, /var/tmp) lives on this machine."""
        if not self.multi:
            return Path(path)
        for local in ("/tmp", "/var/tmp"):
            if path == local or path.startswith(local + "/"):
                return self.node_dir(node) / local.strip("/").replace("/", "-") / path[len(local) + 1 :]
        return Path(path)

    def site_registry(self, name):
        """(root, compute_root) of a registry of its own inside the cluster's
        registry directory, for a demo or a test: builds write it at `root`,
        compute nodes read it at `compute_root` ('' where that is the same).
        Group binder-build may write it, every account may read it."""
        root = self.registry_dir / "sites" / name
        root.mkdir(parents=True, exist_ok=True)
        bgid = grp.getgrnam(self.build_group).gr_gid
        for d in (root.parent, root):
            os.chown(d, 0, bgid)
            os.chmod(d, 0o2775)
        compute = str(self.compute_registry / "sites" / name) if self.multi else ""
        return root, compute

    @property
    def compute_registry(self):
        """The registry's path on compute nodes (another mount: compute_root)."""
        return Path("/mnt/binder-registry") if self.multi else self.registry_dir

    # ------------------------------------------------------------------ paths
    @property
    def slurm_conf(self):
        return self.state_dir / "slurm.conf"

    @property
    def env(self):
        """Environment additions for Slurm clients (sbatch, squeue, ...)."""
        return {"SLURM_CONF": str(self.slurm_conf)}

    def full_env(self, **extra):
        env = dict(os.environ)
        env.update(self.env)
        env.update(extra)
        return env

    @property
    def _started_dir(self):
        return self.state_dir / "started"

    @property
    def _run_dir(self):
        return self.state_dir / "run"

    @property
    def _log_dir(self):
        return self.state_dir / "log"

    def _slurmd(self, node):
        """The daemon name of a node's slurmd (one per node in a multi-node cluster)."""
        return f"slurmd@{node}" if self.multi else "slurmd"

    def daemon_names(self):
        return ["munged", "slurmctld"] + [self._slurmd(n) for n in self.slurm_nodes]

    def _pidfile(self, name):
        if name == "munged":
            return Path("/run/munge/munged.pid")
        exe, _, node = name.partition("@")
        return self._run_dir / (f"{exe}-{node}.pid" if node else f"{exe}.pid")

    def _logfile(self, name):
        if name == "munged":
            return Path("/var/log/munge/munged.log")
        exe, _, node = name.partition("@")
        return self._log_dir / (f"{exe}-{node}.log" if node else f"{exe}.log")

    def _running_pid(self, name):
        """pid of the running daemon: munged is one per machine; the Slurm
        daemons are ours only if they run with our slurm.conf (and, for a
        node's slurmd, its node name)."""
        exe, _, node = name.partition("@")

        def ours(p):
            if exe == "munged":
                return True
            cmd = cmdline(p)
            return str(self.slurm_conf) in cmd and (not node or cmd.endswith(f" -N {node}"))

        pid = _read_pid(self._pidfile(name))
        if pid and pid_alive(pid) and exe in cmdline(pid) and ours(pid):
            return pid
        pids = [p for p in _pgrep_exact(exe) if ours(p)]
        return pids[0] if pids else None

    def _mark_started(self, name, pid):
        self._started_dir.mkdir(parents=True, exist_ok=True)
        (self._started_dir / name).write_text(f"{pid}\n")

    def _started_by_us(self, name):
        return _read_pid(self._started_dir / name)

    @property
    def service_uid(self):
        return pwd.getpwnam(self.service_user).pw_uid

    @property
    def build_uid(self):
        return pwd.getpwnam(self.build_user).pw_uid

    @property
    def build_node(self):
        """The Slurm node builds run on (partition ``build``; this machine
        on a single node)."""
        return self.build_host.name if self.multi else self.node_name

    def account_env(self, user=None):
        """Environment an account needs for Slurm and rootless podman (the
        service account unless `user` names another)."""
        user = user or self.service_user
        pw = pwd.getpwnam(user)
        return {
            "SLURM_CONF": str(self.slurm_conf),
            "HOME": pw.pw_dir,
            "USER": user,
            "LOGNAME": user,
            "XDG_RUNTIME_DIR": f"/run/user/{pw.pw_uid}",
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        }

    @property
    def service_env(self):
        """Environment the service account needs for Slurm and rootless podman."""
        return self.account_env(self.service_user)

    def _user_argv(self, cmd, user=None):
        user = user or self.service_user
        argv = ["runuser", "-u", user, "--", "env", "-i"]
        return argv + [f"{k}={v}" for k, v in self.account_env(user).items()] + list(cmd)

    def _service_user_argv(self, cmd):
        return self._user_argv(cmd, self.service_user)

    def as_service_user(self, cmd, **kw):
        """Run ``cmd`` as the service account, with its environment, from its home."""
        kw.setdefault("cwd", str(self.service_home))
        return _run(self._service_user_argv(cmd), **kw)

    def node_argv(self, node, argv):
        """`argv` entered into `node`'s namespaces (network, hostname,
        mounts: those of its slurmd); unchanged on a single node."""
        if not self.multi:
            return list(argv)
        pid = self._running_pid(self._slurmd(node))
        if not pid:
            raise DevClusterError(f"node {node} runs no slurmd")
        return ["nsenter", f"--target={pid}", "--net", "--uts", "--mount", *argv]

    def on_node(self, node, cmd, user=False, **kw):
        """Run ``cmd`` on a Slurm node as a job there would see it (its
        network, hostname and mounts), as root, as the service account
        (`user` True) or as the account `user` names. On a single node: here."""
        account = self.service_user if user is True else (user or None)
        argv = self.node_argv(node, self._user_argv(cmd, account) if account else cmd)
        kw.setdefault("cwd", str(pwd.getpwnam(account).pw_dir) if account else str(self.service_home))
        kw.setdefault("check", False)
        return _run(argv, **kw)

    def as_build_user(self, cmd, **kw):
        """Run ``cmd`` on the build node as the build account, as a build job would."""
        kw.setdefault("check", True)
        return self.on_node(self.build_node, cmd, user=self.build_user, **kw)

    # -------------------------------------------------------------- lifecycle
    def up(self, timeout=60):
        t0 = time.monotonic()
        self._require_root()
        self._ensure_accounts()
        self._ensure_dirs()
        self._leave_old_topology()
        if self.multi:
            self._ensure_network()
        self._ensure_munge()
        self._ensure_slurm(timeout=timeout)
        self._ensure_podman()
        if self.multi:
            self._ensure_build_node()
        log.info("dev cluster up in %.1f s", time.monotonic() - t0)
        return self

    def _leave_old_topology(self):
        """Switching between one node and several: stop what the other
        topology started (its slurmds, its hosts)."""
        saved = self._saved_topology()
        if int(saved.get("nodes") or 1) == self.nodes and saved.get("subnet", self.subnet) == self.subnet:
            return
        old = DevCluster(
            state_dir=self.state_dir,
            root=self.root,
            service_user=self.service_user,
            slurmctld_port=self.slurmctld_port,
            slurmd_port=self.slurmd_port,
            nodes=int(saved.get("nodes") or 1),
            subnet=saved.get("subnet", self.subnet),
        )
        log.info("switching from %d node(s) to %d", old.nodes, self.nodes)
        old.down(keep_munge=True)
        (self.state_dir / "topology.json").unlink(missing_ok=True)

    def _ensure_network(self):
        head = self.host("head")
        network.ensure_bridge(head, self._prefixlen)
        for h in self.hosts:
            if h.netns:
                network.ensure_netns(h, self._prefixlen)
        network.write_hosts(self.hosts)
        for h in self.hosts:
            if h.role in ("build", "compute"):
                for d in ("tmp", "var-tmp"):
                    p = self.node_dir(h.name) / d
                    p.mkdir(parents=True, exist_ok=True)
                    os.chmod(p, 0o1777)
        self.compute_registry.mkdir(parents=True, exist_ok=True)
        self._write_if_changed(
            self.state_dir / "topology.json",
            json.dumps(
                {
                    "nodes": self.nodes,
                    "subnet": self.subnet,
                    "slurmctld_port": self.slurmctld_port,
                    "slurmd_port": self.slurmd_port,
                }
            )
            + "\n",
        )
        for d in (self.compute_registry,):
            os.chmod(d, 0o755)

    def ensure_site(self):
        """What every scheduler of the dev cluster needs, without Slurm: the
        service account, the shared directories and podman (the PBS dev
        cluster, :mod:`binderhub_hpc.dev.pbs`, builds on it)."""
        self._require_root()
        self._ensure_accounts()
        self._ensure_dirs()
        self._ensure_podman()
        return self

    def down(self, keep_munge=False):
        stopped = []
        if self._stop_sshd():
            stopped.append("sshd@build")
        for name in reversed(self.daemon_names()):
            if keep_munge and name == "munged":
                continue
            pid = self._started_by_us(name)
            if pid is None:
                continue
            running = self._running_pid(name)
            exe = name.partition("@")[0]
            targets = {p for p in (pid, running) if p and pid_alive(p) and exe in cmdline(p)}
            for p in targets:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(pid_alive(p) for p in targets):
                time.sleep(0.2)
            for p in targets:
                if pid_alive(p):
                    os.kill(p, signal.SIGKILL)
            (self._started_dir / name).unlink(missing_ok=True)
            stopped.append(name)
        if self.multi:
            # the hosts: their namespaces (and with them every mount made in
            # them), the bridge, the names
            for h in self.hosts:
                network.remove_netns(h)
            network.remove_bridge()
            network.remove_hosts()
            stopped.append("network namespaces " + ", ".join(h.name for h in self.hosts if h.netns))
        return stopped

    def status(self):
        """A dict describing what runs; ``format_status()`` renders it."""
        st = {
            "state_dir": str(self.state_dir),
            "node": self.node_name,
            "daemons": {},
            "hosts": [{"name": h.name, "address": h.address, "role": h.role} for h in self.hosts],
        }
        for name in self.daemon_names():
            pid = self._running_pid(name)
            st["daemons"][name] = {
                "pid": pid,
                "started_by_devcluster": bool(pid and self._started_by_us(name) == pid),
            }
        st["sinfo"] = None
        if self.slurm_conf.exists() and st["daemons"]["slurmctld"]["pid"]:
            p = _run(["sinfo", "-o", "%P %a %D %T %C %N"], check=False, env=self.full_env(), timeout=20)
            st["sinfo"] = p.stdout.strip()
        if self.multi:
            st["sshd"] = {
                "pid": self._sshd_pid(),
                "address": f"{self.build_host.address}:22",
                "started_by_devcluster": bool(self._started_by_us("sshd@build")),
            }
        st["podman_root"] = self._podman_ok(rootless=False)
        try:
            st["podman_rootless"] = self._podman_ok(rootless=True)
        except KeyError:
            st["podman_rootless"] = False
        st["env"] = f"export SLURM_CONF={self.slurm_conf}"
        return st

    def format_status(self, st=None):
        st = st or self.status()
        out = [f"state dir: {st['state_dir']}"]
        if st.get("hosts"):
            out.append("hosts: " + ", ".join(f"{h['name']} {h['address']} ({h['role']})" for h in st["hosts"]))
        else:
            out.append(f"node: {st['node']}")
        for name, d in st["daemons"].items():
            if d["pid"]:
                who = "started by devcluster" if d["started_by_devcluster"] else "not ours"
                out.append(f"{name}: running, pid {d['pid']} ({who})")
            else:
                out.append(f"{name}: not running")
        if st.get("sshd"):
            d = st["sshd"]
            out.append(
                f"sshd@build: running, pid {d['pid']} on {d['address']}" if d["pid"] else "sshd@build: not running"
            )
        if st["sinfo"]:
            out.append("sinfo:")
            out += ["  " + line for line in st["sinfo"].splitlines()]
        out.append(f"podman (root): {'ok' if st['podman_root'] else 'NOT working'}")
        out.append(f"podman (rootless, {self.service_user}): {'ok' if st['podman_rootless'] else 'NOT working'}")
        out.append(st["env"])
        return "\n".join(out)

    def is_up(self):
        st = self.status()
        return all(d["pid"] for d in st["daemons"].values()) and bool(st["sinfo"])

    # ----------------------------------------------------------------- steps
    @staticmethod
    def _require_root():
        if os.geteuid() != 0:
            raise DevClusterError("the dev cluster must be set up as root")

    def _ensure_accounts(self):
        try:
            grp.getgrnam(self.build_group)
        except KeyError:
            _run(["groupadd", "--system", self.build_group])
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        # jobs of anonymous users; builds, as a site's BinderHub account
        # (primary group binder-build: it writes the registry)
        self._ensure_account(self.service_user, self.service_home, ["--user-group"], "binderhub-hpc service account")
        self._ensure_account(
            self.build_user, self.build_home, ["--gid", self.build_group], "binderhub-hpc build account"
        )
        # sshd without PAM refuses a locked account ('!'): '*' has no
        # password either, and lets a key in
        shadow = _run(["getent", "shadow", self.build_user], check=False).stdout
        if shadow.split(":")[1:2] == ["!"]:
            _run(["usermod", "-p", "*", self.build_user])

    def _ensure_account(self, user, home, group_args, comment):
        try:
            pwd.getpwnam(user)
        except KeyError:
            _run(
                [
                    "useradd",
                    "--system",
                    "--create-home",
                    "--home-dir",
                    home,
                    "--shell",
                    "/bin/bash",
                    *group_args,
                    "--comment",
                    comment,
                    user,
                ]
            )
        pw = pwd.getpwnam(user)
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o750)
        # subordinate ids for rootless podman: a 65536 range not used by anyone
        for path in ("/etc/subuid", "/etc/subgid"):
            self._ensure_subid(Path(path), user)
        # a runtime dir, as pam_systemd would make at login (no systemd here)
        rd = Path(f"/run/user/{pw.pw_uid}")
        rd.parent.mkdir(mode=0o755, exist_ok=True)
        rd.mkdir(mode=0o700, exist_ok=True)
        os.chown(rd, pw.pw_uid, pw.pw_gid)
        os.chmod(rd, 0o700)

    @staticmethod
    def subid_range(user, path="/etc/subuid"):
        """(first, count) of `user`'s subordinate ids, or None."""
        for line in Path(path).read_text().splitlines():
            parts = line.split(":")
            if len(parts) == 3 and parts[0] == user:
                return int(parts[1]), int(parts[2])
        return None

    def _ensure_subid(self, path, user=None):
        user = user or self.service_user
        lines = path.read_text().splitlines() if path.exists() else []
        if any(line.split(":")[0] == user for line in lines):
            return
        top = 100000
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                top = max(top, int(parts[1]) + int(parts[2]))
        with path.open("a") as f:
            f.write(f"{user}:{top}:65536\n")

    def _ensure_dirs(self):
        uid = self.service_uid
        gid = pwd.getpwnam(self.service_user).pw_gid
        bgid = grp.getgrnam(self.build_group).gr_gid
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        # registry: root-owned, world-readable; builds (root, or accounts in the
        # build group) write; jobs (the service account) only read.
        self.registry_dir.mkdir(exist_ok=True)
        os.chown(self.registry_dir, 0, bgid)
        os.chmod(self.registry_dir, 0o2775)
        self.jobs_dir.mkdir(exist_ok=True)
        os.chown(self.jobs_dir, uid, gid)
        os.chmod(self.jobs_dir, 0o700)
        # state dir: readable by all (clients read slurm.conf), spool private
        for d in (self.state_dir, self._run_dir, self._log_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        for d in (self.state_dir / "slurmctld", self._started_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        # slurmd's spool: job scripts there are executed as the job's user, so
        # it must stay traversable (slurmd itself keeps per-job dirs private)
        spool = self.state_dir / "slurmd"
        spool.mkdir(exist_ok=True)
        os.chmod(spool, 0o755)

    def _ensure_munge(self):
        key = Path("/etc/munge/munge.key")
        munge_pw = pwd.getpwnam("munge")
        if not key.exists():
            if shutil.which("mungekey"):
                _run(["mungekey", "--create", "--keyfile", key])
            else:
                key.write_bytes(os.urandom(1024))
        os.chown(key, munge_pw.pw_uid, munge_pw.pw_gid)
        os.chmod(key, 0o600)
        for d, mode in (("/run/munge", 0o755), ("/var/log/munge", 0o700), ("/var/lib/munge", 0o711)):
            Path(d).mkdir(parents=True, exist_ok=True)
            os.chown(d, munge_pw.pw_uid, munge_pw.pw_gid)
            os.chmod(d, mode)
        if self._running_pid("munged"):
            return
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        pid = self._wait_pid("munged", 10)
        self._mark_started("munged", pid)
        # a round trip proves the key and socket work
        _run(["sh", "-c", "munge -n | unmunge >/dev/null"], timeout=10)

    def _wait_pid(self, name, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._running_pid(name)
            if pid:
                return pid
            time.sleep(0.1)
        raise DevClusterError(
            f"{name} did not start within {timeout} s; log {self._logfile(name)}:\n" + _tail(self._logfile(name))
        )

    # slurm -----------------------------------------------------------------
    def _node_resources(self):
        cpus = os.cpu_count() or 1
        mem_kb = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
        mem_mb = mem_kb // 1024
        # leave room for the OS and the hub
        real = max(256, mem_mb - max(512, mem_mb // 10))
        return cpus, real

    def slurm_conf_text(self):
        cpus, mem = self._node_resources()
        s = self.state_dir
        if self.multi:
            head = self.host("head")
            # slurmctld checks that it runs on the host named here: this
            # machine's name, at its bridge address
            ctld = f"SlurmctldHost={self.node_name}({head.address})"
            per_node = "-%n"
            nodes = "\n".join(
                f"NodeName={h.name} NodeAddr={h.address} CPUs={cpus} RealMemory={mem} State=UNKNOWN"
                for h in self.hosts
                if h.role in ("build", "compute")
            )
            compute = ",".join(self.compute_nodes)
            partitions = ["PartitionName=build Nodes=build Default=NO OverSubscribe=FORCE:4 MaxTime=INFINITE State=UP"]
            # a node that stops answering is down in 20 s, not 5 min
            slurmd_timeout = 20
        else:
            ctld = f"SlurmctldHost={self.node_name}"
            per_node = ""
            nodes = f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN"
            compute = self.node_name
            partitions = []
            slurmd_timeout = 300
        partitions = [
            f"PartitionName=interactive Nodes={compute} Default=YES OverSubscribe=FORCE:8 MaxTime=INFINITE State=UP",
            f"PartitionName=batch Nodes={compute} Default=NO OverSubscribe=NO MaxTime=INFINITE State=UP",
            f"PartitionName=bench Nodes={compute} Default=NO OverSubscribe=FORCE:64 MaxTime=INFINITE State=UP",
        ] + partitions
        return (
            textwrap.dedent(
                f"""\
            # binderhub-hpc dev cluster; generated by
            # `binderhub-hpc devcluster up`: edits are overwritten.
            ClusterName=binderhpc
            {ctld}
            AuthType=auth/munge
            CredType=cred/munge
            SlurmUser=root
            SlurmdUser=root
            SlurmctldPort={self.slurmctld_port}
            SlurmdPort={self.slurmd_port}
            StateSaveLocation={s}/slurmctld
            SlurmdSpoolDir={s}/slurmd{per_node}
            SlurmctldPidFile={s}/run/slurmctld.pid
            SlurmdPidFile={s}/run/slurmd{per_node}.pid
            SlurmctldLogFile={s}/log/slurmctld.log
            SlurmdLogFile={s}/log/slurmd{per_node}.log
            SlurmctldDebug=info
            SlurmdDebug=info
            MpiDefault=none
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SwitchType=switch/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            SchedulerType=sched/backfill
            # batch_sched_delay=0: start a session's job when it is submitted
            # (Slurm's default may hold batch jobs back for up to 3 s)
            SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000,batch_sched_delay=0
            PriorityType=priority/basic
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/none
            ReturnToService=2
            MinJobAge=300
            InactiveLimit=0
            KillWait=5
            Waittime=0
            SlurmctldTimeout=60
            SlurmdTimeout={slurmd_timeout}
            MessageTimeout=10
            """
            )
            + nodes
            + "\n"
            + "\n".join(partitions)
            + "\n"
        )

    def _write_if_changed(self, path, text, mode=0o644):
        path = Path(path)
        if path.exists() and path.read_text() == text:
            return False
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        return True

    def _ensure_slurm(self, timeout=60):
        changed = self._write_if_changed(self.slurm_conf, self.slurm_conf_text())
        # task/none and proctrack/linuxproc use no cgroups; an empty file keeps
        # slurmd from looking for /etc/slurm/cgroup.conf.
        self._write_if_changed(self.state_dir / "cgroup.conf", "# no cgroup plugins in use\n")
        env = self.full_env()
        for name in self.daemon_names()[1:]:
            pid = self._running_pid(name)
            if pid and changed:
                log.info("slurm.conf changed: restarting %s", name)
                os.kill(pid, signal.SIGTERM)
                self._wait_gone(pid, 20)
                pid = None
            if not pid:
                _run(self._daemon_argv(name), env=env, timeout=30)
                pid = self._wait_pid(name, 15)
                self._mark_started(name, pid)
        for node in self.slurm_nodes:
            self._wait_node_idle(node, timeout)

    def _daemon_argv(self, name):
        exe, _, node = name.partition("@")
        argv = [exe, "-f", str(self.slurm_conf)]
        if not node:
            return argv
        # a node of its own: its network, its hostname, its local disks and
        # /run/user, and on compute nodes the registry at another path
        host = self.host(node)
        uid, gid = self.service_uid, pwd.getpwnam(self.service_user).pw_gid
        setup = [
            'hostname "$BHPC_NODE"',
            f"mount --bind {self.node_dir(node) / 'tmp'} /tmp",
            f"mount --bind {self.node_dir(node) / 'var-tmp'} /var/tmp",
            "mount -t tmpfs -o mode=755 bhpc-run /run/user",
            f"mkdir -m 700 /run/user/{uid} && chown {uid}:{gid} /run/user/{uid}",
        ]
        if host.role == "build":
            # the build account's runtime dir, as a login on a real node makes it
            setup.append(self._runtime_dir_sh(self.build_user))
        if host.role == "compute":
            setup += [
                f"mount --bind {self.registry_dir} {self.compute_registry}",
                # the path build nodes use is not there: a job that used it
                # instead of compute_root would fail
                f"mount -t tmpfs -o size=1m,mode=755 bhpc-hidden {self.registry_dir}",
            ]
        script = " && ".join(setup) + ' && exec "$@"'
        return [
            "nsenter",
            f"--net={host.netns_path}",
            "unshare",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "env",
            f"BHPC_NODE={node}",
            "sh",
            "-c",
            script,
            "bhpc-node",
            *argv,
            "-N",
            node,
        ]

    @staticmethod
    def _wait_gone(pid, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def node_state(self, node=None):
        p = _run(
            ["sinfo", "-h", "-N", "-n", node or self.node_name, "-o", "%T"],
            check=False,
            env=self.full_env(),
            timeout=20,
        )
        if p.returncode != 0:
            return None
        states = set(p.stdout.split())
        return states.pop() if len(states) == 1 else ",".join(sorted(states)) or None

    def _wait_node_idle(self, node, timeout):
        deadline = time.monotonic() + timeout
        resumed = False
        state = None
        while time.monotonic() < deadline:
            state = self.node_state(node)
            if state:
                base = state.rstrip("*~#!%$@^-")
                if base in ("idle", "mixed", "allocated", "completing"):
                    return state
                if not resumed and base in ("down", "drained", "draining", "drain", "fail"):
                    _run(
                        ["scontrol", "update", f"nodename={node}", "state=resume"],
                        check=False,
                        env=self.full_env(),
                        timeout=20,
                    )
                    resumed = True
            time.sleep(0.5)
        raise DevClusterError(
            f"node {node} not idle after {timeout} s (state {state!r}).\n"
            f"--- slurmctld log ---\n{_tail(self._logfile('slurmctld'))}\n"
            f"--- slurmd log ---\n{_tail(self._logfile(self._slurmd(node)))}"
        )

    # the build node ------------------------------------------------------
    @staticmethod
    def _runtime_dir_sh(user):
        pw = pwd.getpwnam(user)
        d = f"/run/user/{pw.pw_uid}"
        return f"mkdir -p -m 700 {d} && chown {pw.pw_uid}:{pw.pw_gid} {d} && chmod 700 {d}"

    def _ensure_build_node(self):
        """What a site's build node has: the build account's runtime dir and
        node-local rootless podman storage, binderhub-hpc in the site's
        virtualenv, an sshd for the SSH runner, and a firewall that keeps the
        build account (and so every RUN step) off the cluster's addresses."""
        p = self.on_node(self.build_node, ["sh", "-c", self._runtime_dir_sh(self.build_user)])
        if p.returncode:
            raise DevClusterError(f"runtime dir of {self.build_user} on {self.build_node}: {p.stdout}")
        self._ensure_rootless_storage(self.build_user, graphroot=self.build_graphroot)
        self._ensure_build_firewall()
        self.ensure_site_venv()
        self._ensure_sshd()

    @property
    def build_graphroot(self):
        """The build account's podman storage: on the build node's local disk
        (its /var/tmp), as rootless overlay storage cannot live on NFS."""
        return f"/var/tmp/{self.build_user}-containers/storage"

    # the build node's firewall, as a site would set it: the build account's
    # traffic (its own uid and its subordinate uids, i.e. every process of a
    # RUN step, whether it runs behind slirp4netns or on the host network)
    # to the cluster network and to the node's own loopback is refused,
    # except DNS and the services a site lets builds use (here: an internal
    # git server on the head node, SITE_GIT_PORTS); the outside world is not
    # touched (the dev cluster has none)
    FIREWALL_CHAIN = "BHPC-BUILD-EGRESS"
    #: ports of the head node the build account may reach, as a site allows
    #: its internal git server (the private-repository tests serve git there)
    SITE_GIT_PORTS = (18418, 18427)

    @staticmethod
    def _nameservers():
        try:
            lines = Path("/etc/resolv.conf").read_text().splitlines()
        except OSError:
            return []
        return [
            p[1] for p in (line.split() for line in lines) if len(p) > 1 and p[0] == "nameserver" and ":" not in p[1]
        ]

    def build_firewall_rules(self):
        """iptables rules (argv tails) of the build account's egress chain."""
        uid = self.build_uid
        first, count = self.subid_range(self.build_user) or (0, 0)
        owners = [str(uid)] + ([f"{first}-{first + count - 1}"] if count else [])
        head = self.host("head").address
        ports = ":".join(map(str, self.SITE_GIT_PORTS))
        rules = []
        for owner in owners:
            by = ["-m", "owner", "--uid-owner", owner]
            for ns in self._nameservers():
                rules += [
                    ["-A", self.FIREWALL_CHAIN, "-d", ns, "-p", proto, "--dport", "53", *by, "-j", "RETURN"]
                    for proto in ("udp", "tcp")
                ]
            rules.append(["-A", self.FIREWALL_CHAIN, "-d", head, "-p", "tcp", "--dport", ports, *by, "-j", "RETURN"])
            for dest in (self.subnet, "127.0.0.0/8"):
                # a reset, so a RUN step fails at once ("connection refused")
                # instead of waiting out its timeout behind slirp4netns
                rules.append(
                    [
                        "-A",
                        self.FIREWALL_CHAIN,
                        "-d",
                        dest,
                        "-p",
                        "tcp",
                        *by,
                        "-j",
                        "REJECT",
                        "--reject-with",
                        "tcp-reset",
                    ]
                )
                rules.append(
                    [
                        "-A",
                        self.FIREWALL_CHAIN,
                        "-d",
                        dest,
                        *by,
                        "-j",
                        "REJECT",
                        "--reject-with",
                        "icmp-admin-prohibited",
                    ]
                )
        return rules

    def _ensure_build_firewall(self):
        ns = self.build_host.run_in

        def ipt(*args, check=True):
            return _run(ns(["iptables", "-w", *args]), check=check, timeout=30)

        if ipt("-S", self.FIREWALL_CHAIN, check=False).returncode:
            ipt("-N", self.FIREWALL_CHAIN)
        ipt("-F", self.FIREWALL_CHAIN)
        for rule in self.build_firewall_rules():
            ipt(*rule)
        if ipt("-C", "OUTPUT", "-j", self.FIREWALL_CHAIN, check=False).returncode:
            ipt("-I", "OUTPUT", "1", "-j", self.FIREWALL_CHAIN)

    def ensure_site_venv(self):
        """``/opt/binderhub-hpc``: Debian's python3 (every account can run
        it) with this checkout (editable) and its dependencies, repo2docker
        among them. Made once; later calls only re-point it at this checkout
        when another one installed itself there."""
        import binderhub_hpc

        checkout = Path(binderhub_hpc.__file__).resolve().parents[1]
        if not (checkout / "pyproject.toml").is_file():
            raise DevClusterError(f"the site virtualenv installs a source checkout; {checkout} is none")
        venv, marker = self.site_venv, self.site_venv / ".binderhub-hpc-checkout"
        deps = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()[:16]
        want = f"{checkout} {deps}"
        have = marker.read_text().strip() if marker.exists() else ""
        if have == want and (venv / "bin" / "binderhub-hpc").exists():
            return venv
        t0 = time.monotonic()
        pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if not (venv / "bin" / "python").exists():
            _run(["/usr/bin/python3", "-m", "venv", venv], timeout=300)
            _run([*pip, "--upgrade", "pip"], timeout=600)
        # same dependencies as before: only the checkout moved
        no_deps = ["--no-deps"] if have.split(" ")[1:] == [deps] else []
        _run([*pip, *no_deps, "-e", checkout], timeout=1800)
        _run(["chmod", "-R", "a+rX", venv])
        marker.write_text(want + "\n")
        log.info("site virtualenv %s (%s) in %.1f s", venv, checkout, time.monotonic() - t0)
        return venv

    # sshd on the build node, for the SSH runner: own host key and config
    # in the state dir, keys only, the build account only
    @property
    def sshd_dir(self):
        return self.state_dir / "sshd"

    @property
    def ssh_key(self):
        """The private key BinderHub's host logs in to the build node with."""
        return self.sshd_dir / "client_ed25519"

    @property
    def ssh_known_hosts(self):
        return self.sshd_dir / "known_hosts"

    def ssh_argv(self):
        """The ssh command prefix that reaches the build account (SSHRunner.ssh)."""
        return [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-T",
            "-i",
            str(self.ssh_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.ssh_known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
        ]

    @property
    def ssh_target(self):
        return f"{self.build_user}@{self.build_node}"

    def sshd_config_text(self):
        d = self.sshd_dir
        return textwrap.dedent(f"""\
            # binderhub-hpc dev cluster: sshd of the build node (generated)
            ListenAddress {self.build_host.address}:22
            HostKey {d / "host_ed25519"}
            PidFile {self._run_dir / "sshd-build.pid"}
            AuthorizedKeysFile {d / "authorized_keys" / "%u"}
            AllowUsers {self.build_user}
            PermitRootLogin no
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            X11Forwarding no
            AllowTcpForwarding no
            AllowAgentForwarding no
            PermitTunnel no
            PermitUserEnvironment no
            PrintMotd no
            LogLevel VERBOSE
            """)

    def _sshd_pid(self):
        pid = _read_pid(self._run_dir / "sshd-build.pid")
        conf = str(self.sshd_dir / "sshd_config")
        if pid and pid_alive(pid) and conf in cmdline(pid):
            return pid
        pids = [p for p in _pgrep_exact("sshd") if conf in cmdline(p)]
        return pids[0] if pids else None

    def _ensure_sshd(self):
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            raise DevClusterError("sshd is missing: apt-get install openssh-server (scripts/install-deps.sh)")
        d = self.sshd_dir
        (d / "authorized_keys").mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        os.chmod(d / "authorized_keys", 0o755)
        for key, comment in ((d / "host_ed25519", "build host key"), (self.ssh_key, "binderhub-hpc builds")):
            if not key.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key])
            os.chmod(key, 0o600)
        host_pub = (d / "host_ed25519.pub").read_text().split()
        self._write_if_changed(
            self.ssh_known_hosts, f"{self.build_node},{self.build_host.address} {host_pub[0]} {host_pub[1]}\n"
        )
        # only this key, only without a terminal or forwarding
        opts = "restrict"
        self._write_if_changed(
            d / "authorized_keys" / self.build_user, f"{opts} {self.ssh_key.with_suffix('.pub').read_text().strip()}\n"
        )
        changed = self._write_if_changed(d / "sshd_config", self.sshd_config_text())
        pid = self._sshd_pid()
        if pid and changed:
            os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid, 10)
            pid = None
        if pid:
            return
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        _run(
            self.node_argv(self.build_node, [sshd, "-f", d / "sshd_config", "-E", self._log_dir / "sshd-build.log"]),
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while not (pid := self._sshd_pid()):
            if time.monotonic() > deadline:
                raise DevClusterError("sshd did not start:\n" + _tail(self._log_dir / "sshd-build.log"))
            time.sleep(0.1)
        self._mark_started("sshd@build", pid)

    def _stop_sshd(self):
        if self._started_by_us("sshd@build") is None:
            return False
        pid = self._sshd_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid, 10)
        (self._started_dir / "sshd@build").unlink(missing_ok=True)
        return True

    def node_pids(self, node):
        """Every process of a node: those in its network namespace and all
        below them (a RUN step's container has a network of its own)."""
        host = self.host(node)
        want = os.stat(host.netns_path).st_ino
        members, children = set(), {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.stat(d / "ns" / "net").st_ino == want:
                    members.add(int(d.name))
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
        todo, found = list(members), set(members)
        while todo:
            for c in children.get(todo.pop(), ()):
                if c not in found:
                    found.add(c)
                    todo.append(c)
        return sorted(found)

    def kill_node(self, node):
        """The node dies: SIGKILL to all its processes at once (slurmd, job
        steps, sshd, builds, podman's pause process) and so its mounts
        (/run/user ...) go too, as in a power cut. ``up()`` brings it back
        (its local disk, /tmp and /var/tmp, survives). Returns the pids."""
        if not self.multi:
            raise DevClusterError("only a node of a multi-node dev cluster can die alone")
        pids = self.node_pids(node)
        for _ in range(20):
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            left = [p for p in self.node_pids(node) if pid_alive(p)]
            if not left:
                break
            pids = sorted(set(pids) | set(left))
            time.sleep(0.1)
        (self._started_dir / self._slurmd(node)).unlink(missing_ok=True)
        if node == self.build_node:
            (self._started_dir / "sshd@build").unlink(missing_ok=True)
        return pids

    def build_image_id(self, image=None):
        """The image's id in the build account's storage on the build node (None: missing)."""
        p = self.on_node(
            self.build_node,
            ["podman", "image", "inspect", "--format", "{{.Id}}", image or self.base_image],
            user=self.build_user,
            timeout=120,
        )
        return p.stdout.strip() if p.returncode == 0 else None

    def ensure_build_image(self, image=None):
        """The base image (made if missing) in the build account's rootless
        storage on the build node, the same image as root's."""
        image = image or self.ensure_base_image()
        want = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image], timeout=60).stdout.strip()
        if self.build_image_id(image) != want:
            self.copy_image_to_user(image, self.build_user, self.build_node)
        return image

    # podman ----------------------------------------------------------------
    def containers_conf_text(self):
        return textwrap.dedent(
            f"""\
            {CONTAINERS_CONF_MARKER}; delete this line to keep local edits.
            # crun fails here (setrlimit, hybrid cgroups): use runc and cgroupfs,
            # and pass no default ulimits.
            [containers]
            default_ulimits = []

            [engine]
            runtime = "runc"
            cgroup_manager = "cgroupfs"
            events_logger = "file"
            """
        )

    def _ensure_podman(self):
        conf = Path(CONTAINERS_CONF)
        if not conf.exists() or CONTAINERS_CONF_MARKER in conf.read_text():
            conf.parent.mkdir(parents=True, exist_ok=True)
            self._write_if_changed(conf, self.containers_conf_text())
        else:
            text = conf.read_text()
            missing = [
                want
                for want in ('runtime = "runc"', 'cgroup_manager = "cgroupfs"', "default_ulimits = []")
                if want not in text
            ]
            if missing:
                log.warning("%s is not ours and lacks %s; podman may fail here", conf, ", ".join(missing))
        self._ensure_rootless_storage()
        if not self._podman_ok(rootless=False):
            raise DevClusterError("podman info fails as root:\n" + _run(["podman", "info"], check=False).stdout)
        if not self._podman_ok(rootless=True):
            p = self.as_service_user(["podman", "info"], check=False, timeout=60)
            raise DevClusterError(f"rootless podman info fails as {self.service_user}:\n{p.stdout}")

    def _ensure_rootless_storage(self, user=None, graphroot=None):
        """Rootless storage on native overlay for an account (the service
        account unless `user`), at `graphroot` if given.

        Left to itself podman 4.3 falls back to ``vfs`` here (``/dev/fuse`` is
        root-only, so fuse-overlayfs cannot serve), which copies every layer
        for every container (seconds per ``podman run``). The kernel mounts
        overlay inside a user namespace, so ask for it explicitly.
        """
        user = user or self.service_user
        pw = pwd.getpwnam(user)
        home = Path(pw.pw_dir)
        cfg_dir = home / ".config" / "containers"
        conf = cfg_dir / "storage.conf"
        text = f'{CONTAINERS_CONF_MARKER}\n[storage]\ndriver = "overlay"\n'
        if graphroot:
            text += f'graphroot = "{graphroot}"\n'
        if conf.exists() and CONTAINERS_CONF_MARKER not in conf.read_text():
            return
        store = home / ".local" / "share" / "containers" / "storage"
        if not graphroot and (store / "vfs").exists() and not (store / "overlay").exists():
            # storage was initialised with vfs: podman refuses a driver change
            log.info("resetting %s's podman storage (vfs -> overlay)", user)
            _run(
                self._user_argv(["podman", "system", "reset", "--force"], user), check=False, timeout=300, cwd=str(home)
            )
        for d in (home / ".config", cfg_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        if self._write_if_changed(conf, text):
            os.chown(conf, pw.pw_uid, pw.pw_gid)

    def _podman_ok(self, rootless=False):
        if not shutil.which("podman"):
            return False
        try:
            if rootless:
                p = self.as_service_user(
                    ["podman", "info", "--format", "{{.Host.Security.Rootless}}"],
                    check=False,
                    timeout=60,
                )
                return p.returncode == 0 and p.stdout.strip().endswith("true")
            p = _run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], check=False, timeout=60)
            return p.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # base image ------------------------------------------------------------
    def image_exists(self, image=None, rootless=False):
        image = image or self.base_image
        cmd = ["podman", "image", "exists", image]
        if rootless:
            return self.as_service_user(cmd, check=False, timeout=60).returncode == 0
        return _run(cmd, check=False, timeout=60).returncode == 0

    def image_label(self, label, image=None):
        p = _run(
            ["podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', image or self.base_image],
            check=False,
            timeout=60,
        )
        return p.stdout.strip() if p.returncode == 0 else None

    def ensure_base_image(self, rootless=False, force=False):
        """Make ``self.base_image`` in root's podman storage, if missing.

        The debootstrap tarball is cached in ``<state>/cache``; ``force``
        rebuilds the image on top of it (delete the cache to start over).

        With ``rootless=True`` also copy it into the service account's own
        (rootless) storage. Returns the image name.
        """
        self._require_root()
        t0 = time.monotonic()
        want = {MAJOR_LABEL: str(hub_major()), REVISION_LABEL: BASE_REVISION}
        if not force and self.image_exists():
            have = {label: self.image_label(label) for label in want}
            if have != want:
                log.info("base image is %s, wanted %s: rebuilding", have, want)
                force = True
        if force or not self.image_exists():
            cache = self.state_dir / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            tarball = cache / "bookworm-minbase.tar"
            if not tarball.exists():
                self._debootstrap(tarball)
            if not self.image_exists(ROOTFS_IMAGE):
                log.info("podman import %s", tarball)
                _run(["podman", "import", "--quiet", tarball, ROOTFS_IMAGE], timeout=600)
            with tempfile.TemporaryDirectory(prefix="base-image-") as ctx:
                cf = Path(ctx) / "Containerfile"
                cf.write_text(
                    BASE_CONTAINERFILE.format(
                        rootfs=ROOTFS_IMAGE,
                        jupyterhub_major=hub_major(),
                        major_label=MAJOR_LABEL,
                        revision_label=REVISION_LABEL,
                        revision=BASE_REVISION,
                    )
                )
                log.info("podman build %s", self.base_image)
                _run(
                    [
                        "podman",
                        "build",
                        "--network",
                        "host",
                        "--pull=never",
                        "--volume",
                        f"{HOST_CA_BUNDLE}:/run/host-ca.crt:ro",
                        "--tag",
                        self.base_image,
                        "--file",
                        cf,
                        ctx,
                    ],
                    timeout=1800,
                )
            log.info("base image built in %.1f s", time.monotonic() - t0)
        if rootless and (force or not self.image_exists(rootless=True)):
            self.copy_image_to_service_user(self.base_image)
        return self.base_image

    def copy_image_to_service_user(self, image):
        """Copy an image from root's podman storage into the service account's."""
        self.copy_image_to_user(image, self.service_user)

    def copy_image_to_user(self, image, user, node=None):
        """Copy an image from root's podman storage into an account's rootless
        storage, on `node` (its own storage there) or on this machine."""

        def as_user(cmd, **kw):
            if node is None:
                return _run(self._user_argv(cmd, user), cwd=pwd.getpwnam(user).pw_dir, **kw)
            return self.on_node(node, cmd, user=user, check=True, **kw)

        (self.state_dir / "cache").mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix="img-", dir=self.state_dir / "cache"))
        try:
            os.chmod(tmpdir, 0o755)
            archive = tmpdir / "image.tar"
            _run(["podman", "save", "--quiet", "--format", "oci-archive", "-o", archive, image], timeout=900)
            os.chmod(archive, 0o644)
            as_user(["podman", "load", "--quiet", "-i", archive], timeout=900)
            # oci-archive loses the name unless given again
            ref = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image]).stdout.strip()
            as_user(["podman", "tag", ref, image], timeout=60)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _debootstrap(self, tarball):
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=tarball.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            log.info("debootstrap --variant=minbase bookworm (a few minutes)")
            p = _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--components=main",
                    "bookworm",
                    rootfs,
                    DEBIAN_MIRROR,
                ],
                check=False,
                timeout=1800,
            )
            if p.returncode != 0:
                logf = rootfs / "debootstrap" / "debootstrap.log"
                raise DevClusterError(f"debootstrap failed:\n{p.stdout[-3000:]}\n{_tail(logf)}")
            # trim what a container does not need
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                d = rootfs / sub
                for child in d.glob("*"):
                    if child.is_file():
                        child.unlink()
            part = tarball.with_name(tarball.name + ".part")
            _run(["tar", "--numeric-owner", "--xattrs", "-C", rootfs, "-cf", part, "."], timeout=600)
            os.replace(part, tarball)
        log.info("debootstrap done in %.1f s", time.monotonic() - t0)

    def podman_run_ok(self, image=None, rootless=False):
        cmd = ["podman", "run", "--rm", "--network", "host", image or self.base_image, "true"]
        if rootless:
            return self.as_service_user(cmd, check=False, timeout=120).returncode == 0
        return _run(cmd, check=False, timeout=120).returncode == 0
