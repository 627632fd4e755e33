"""A development cluster on one Debian machine: a hub node, a build node and
compute nodes as network namespaces (or, with ``nodes=1``, one node).

``DevCluster.up()`` turns the machine it runs on into a small HPC site:

- a non-root service account (``binder``) that submits all session jobs,
  with subordinate uid/gid ranges so it can run rootless podman;
- a stranger (``mallory``): another cluster user with no rights of the
  service's, whose jobs the attack tests submit;
- the shared directories: the SIF registry root and the jobs directory;
- munge, slurmctld and slurmd (Debian's ``slurm-wlm``) with a generated
  ``slurm.conf`` under the state directory (``/etc/slurm`` is left alone),
  partitions ``interactive`` (default, oversubscribed like a Jupyter
  partition), ``batch`` (exclusive cores) and ``bench`` (oversubscribed
  64-fold, for concurrent-launch benchmarks);
- podman configured so it works here (runc, cgroupfs, no default ulimits),
  as root and rootless as the service account;
- on several hosts, the build node's and the compute nodes' egress
  firewalls (:mod:`.buildnode`, :mod:`.computenode`).

``ensure_base_image()`` makes the test/demo base image locally, without any
registry pull: debootstrap of Debian bookworm, ``podman import``, then a short
Containerfile that adds Python, a venv with JupyterHub's single-user server
and the ``jovyan`` user.

Everything is idempotent; ``down()`` stops only the daemons this class
started (recorded in ``<state>/started/``) and never removes packages.
"""

import grp
import json
import os
import pwd
import signal
import socket
import time
from pathlib import Path

from binderhub_hpc.proc import cmdline, pid_alive

from . import network
from .accounts import Accounts
from .base import (
    BASE_IMAGE,
    DEFAULT_NODES,
    DEFAULT_ROOT,
    STATE_DIR_ENV,
    DevClusterError,
    _pgrep_exact,
    _read_pid,
    _run,
    hub_major,
    log,
)
from .buildnode import BuildNode
from .computenode import ComputeNodes
from .images import Images
from .nodes import Nodes
from .slurm import Slurm

__all__ = [
    "BASE_IMAGE",
    "DEFAULT_ROOT",
    "STATE_DIR_ENV",
    "DevCluster",
    "DevClusterError",
    "hub_major",
    "network",
]


class DevCluster(Accounts, Slurm, BuildNode, ComputeNodes, Nodes, Images):
    """The dev cluster. Attributes are plain and documented.

    - ``root``: top of the shared tree (``/var/lib/binderhub-hpc``)
    - ``state_dir``: slurm.conf, spool, logs, pidfiles, caches
    - ``registry_dir``: the SIF registry root (root-owned, world-readable,
      group ``binder-build`` may write)
    - ``jobs_dir``: job logs and scratch (owned by the service account, 0700)
    - ``service_user`` / ``service_home``: the account that runs all jobs
    - ``build_user`` / ``build_home``: the build account (group
      ``binder-build``: writes the registry), rootless podman on the build
      node with node-local storage; ``site_venv`` is binderhub-hpc for it
    - ``stranger_user`` / ``stranger_home``: another cluster user (attack tests)
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
        stranger_user="mallory",
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
        self.stranger_user = stranger_user
        self.stranger_home = self.root / stranger_user
        self.base_image = base_image
        self.node_name = socket.gethostname().split(".")[0]
        # the topology and ports: what was asked, else what runs
        # (topology.json), else DEFAULT_NODES on the default ports
        saved = self._saved_topology()
        self.slurmctld_port = int(slurmctld_port or saved.get("slurmctld_port") or 16817)
        self.slurmd_port = int(slurmd_port or saved.get("slurmd_port") or 16818)
        self.nodes = int(nodes or saved.get("nodes") or DEFAULT_NODES)
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
        self._refuse_private_state_dir()
        self._ensure_accounts()
        self._ensure_dirs()
        self._leave_old_topology()
        if self.multi:
            self._ensure_network()
        self._save_topology()
        self._ensure_munge()
        self._ensure_slurm(timeout=timeout)
        self._ensure_podman()
        if self.multi:
            self._ensure_build_node()
            self.ensure_compute_firewall()
        log.info("dev cluster up in %.1f s", time.monotonic() - t0)
        return self

    def _refuse_private_state_dir(self):
        """Each host of a multi-host cluster mounts a /tmp and /var/tmp of
        its own, so a slurm.conf kept there is missing on every node but
        the hub: slurmd would wait for it and time out. Say so at once."""
        if not self.multi:
            return
        state = self.state_dir.resolve()
        for private in (Path("/tmp"), Path("/var/tmp")):
            if state == private or private in state.parents:
                raise DevClusterError(
                    f"the state directory {state} is under {private}, which each of the "
                    f"{self.nodes} hosts has a private copy of; choose another directory "
                    "or a single node (nodes=1)"
                )

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
        os.chmod(self.compute_registry, 0o755)

    def _save_topology(self):
        """What runs, for the next DevCluster() on this machine (one node too:
        without it the next one would take the default)."""
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

    def ensure_site(self):
        """What every scheduler of the dev cluster needs, without Slurm: the
        service account, the shared directories and podman (the PBS dev
        cluster, :mod:`binderhub_hpc_testing.pbs`, builds on it)."""
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
        # nothing runs: the next cluster takes what it is asked, or the default
        (self.state_dir / "topology.json").unlink(missing_ok=True)
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
