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
        raise DevClusterError(
            f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout or ''}"
        )
    return p


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_cmd(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


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
        if comm == name and _pid_alive(int(d.name)):
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
    - ``node_name``, ``partitions``, ``slurmctld_port``, ``slurmd_port``
    - ``base_image``: the local test/demo image name
    """

    build_group = "binder-build"
    partitions = ("interactive", "batch", "bench")

    def __init__(
        self,
        state_dir=None,
        root=DEFAULT_ROOT,
        service_user="binder",
        slurmctld_port=16817,
        slurmd_port=16818,
        base_image=BASE_IMAGE,
    ):
        self.root = Path(root)
        self.state_dir = Path(
            state_dir or os.environ.get(STATE_DIR_ENV) or self.root / "devcluster"
        )
        self.registry_dir = self.root / "registry"
        self.jobs_dir = self.root / "jobs"
        self.service_user = service_user
        self.service_home = self.root / service_user
        self.slurmctld_port = slurmctld_port
        self.slurmd_port = slurmd_port
        self.base_image = base_image
        self.node_name = socket.gethostname().split(".")[0]

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

    def _pidfile(self, name):
        return {
            "munged": Path("/run/munge/munged.pid"),
            "slurmctld": self._run_dir / "slurmctld.pid",
            "slurmd": self._run_dir / "slurmd.pid",
        }[name]

    def _logfile(self, name):
        return {
            "munged": Path("/var/log/munge/munged.log"),
            "slurmctld": self._log_dir / "slurmctld.log",
            "slurmd": self._log_dir / "slurmd.log",
        }[name]

    def _running_pid(self, name):
        """pid of the running daemon: munged is one per host; the Slurm
        daemons are ours only if they run with our slurm.conf."""
        pid = _read_pid(self._pidfile(name))
        ours = (lambda p: True) if name == "munged" else (
            lambda p: str(self.slurm_conf) in _pid_cmd(p))
        if pid and _pid_alive(pid) and name in _pid_cmd(pid) and ours(pid):
            return pid
        pids = [p for p in _pgrep_exact(name) if ours(p)]
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
    def service_env(self):
        """Environment the service account needs for Slurm and rootless podman."""
        uid = self.service_uid
        return {
            "SLURM_CONF": str(self.slurm_conf),
            "HOME": str(self.service_home),
            "USER": self.service_user,
            "LOGNAME": self.service_user,
            "XDG_RUNTIME_DIR": f"/run/user/{uid}",
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        }

    def as_service_user(self, cmd, **kw):
        """Run ``cmd`` as the service account, with its environment, from its home."""
        env = self.service_env
        argv = ["runuser", "-u", self.service_user, "--", "env", "-i"]
        argv += [f"{k}={v}" for k, v in env.items()] + list(cmd)
        kw.setdefault("cwd", str(self.service_home))
        return _run(argv, **kw)

    # -------------------------------------------------------------- lifecycle
    def up(self, timeout=60):
        t0 = time.monotonic()
        self._require_root()
        self._ensure_accounts()
        self._ensure_dirs()
        self._ensure_munge()
        self._ensure_slurm(timeout=timeout)
        self._ensure_podman()
        log.info("dev cluster up in %.1f s", time.monotonic() - t0)
        return self

    def ensure_site(self):
        """What every scheduler of the dev cluster needs, without Slurm: the
        service account, the shared directories and podman (the PBS dev
        cluster, :mod:`binderhub_hpc.dev.pbs`, builds on it)."""
        self._require_root()
        self._ensure_accounts()
        self._ensure_dirs()
        self._ensure_podman()
        return self

    def down(self):
        stopped = []
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._started_by_us(name)
            if pid is None:
                continue
            running = self._running_pid(name)
            targets = {p for p in (pid, running) if p and _pid_alive(p) and name in _pid_cmd(p)}
            for p in targets:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(_pid_alive(p) for p in targets):
                time.sleep(0.2)
            for p in targets:
                if _pid_alive(p):
                    os.kill(p, signal.SIGKILL)
            (self._started_dir / name).unlink(missing_ok=True)
            stopped.append(name)
        return stopped

    def status(self):
        """A dict describing what runs; ``format_status()`` renders it."""
        st = {"state_dir": str(self.state_dir), "node": self.node_name, "daemons": {}}
        for name in ("munged", "slurmctld", "slurmd"):
            pid = self._running_pid(name)
            st["daemons"][name] = {
                "pid": pid,
                "started_by_devcluster": bool(pid and self._started_by_us(name) == pid),
            }
        st["sinfo"] = None
        if self.slurm_conf.exists() and st["daemons"]["slurmctld"]["pid"]:
            p = _run(
                ["sinfo", "-o", "%P %a %D %T %C %N"], check=False, env=self.full_env(), timeout=20
            )
            st["sinfo"] = p.stdout.strip()
        st["podman_root"] = self._podman_ok(rootless=False)
        try:
            st["podman_rootless"] = self._podman_ok(rootless=True)
        except KeyError:
            st["podman_rootless"] = False
        st["env"] = f"export SLURM_CONF={self.slurm_conf}"
        return st

    def format_status(self, st=None):
        st = st or self.status()
        out = [f"state dir: {st['state_dir']}", f"node: {st['node']}"]
        for name, d in st["daemons"].items():
            if d["pid"]:
                who = "started by devcluster" if d["started_by_devcluster"] else "not ours"
                out.append(f"{name}: running, pid {d['pid']} ({who})")
            else:
                out.append(f"{name}: not running")
        if st["sinfo"]:
            out.append("sinfo:")
            out += ["  " + line for line in st["sinfo"].splitlines()]
        out.append(f"podman (root): {'ok' if st['podman_root'] else 'NOT working'}")
        out.append(
            f"podman (rootless, {self.service_user}): "
            f"{'ok' if st['podman_rootless'] else 'NOT working'}"
        )
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
        try:
            pwd.getpwnam(self.service_user)
        except KeyError:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o755)
            _run(
                [
                    "useradd", "--system", "--create-home",
                    "--home-dir", self.service_home,
                    "--shell", "/bin/bash",
                    "--user-group",
                    "--comment", "binderhub-hpc service account",
                    self.service_user,
                ]
            )
        uid = self.service_uid
        gid = pwd.getpwnam(self.service_user).pw_gid
        self.service_home.mkdir(parents=True, exist_ok=True)
        os.chown(self.service_home, uid, gid)
        os.chmod(self.service_home, 0o750)
        # subordinate ids for rootless podman: a 65536 range not used by anyone
        for path in ("/etc/subuid", "/etc/subgid"):
            self._ensure_subid(Path(path))
        # a runtime dir, as pam_systemd would make at login (no systemd here)
        rd = Path(f"/run/user/{uid}")
        rd.parent.mkdir(mode=0o755, exist_ok=True)
        rd.mkdir(mode=0o700, exist_ok=True)
        os.chown(rd, uid, gid)
        os.chmod(rd, 0o700)

    def _ensure_subid(self, path):
        lines = path.read_text().splitlines() if path.exists() else []
        if any(line.split(":")[0] == self.service_user for line in lines):
            return
        top = 100000
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                top = max(top, int(parts[1]) + int(parts[2]))
        with path.open("a") as f:
            f.write(f"{self.service_user}:{top}:65536\n")

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
            f"{name} did not start within {timeout} s; log {self._logfile(name)}:\n"
            + _tail(self._logfile(name))
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
        return textwrap.dedent(
            f"""\
            # binderhub-hpc single-node dev cluster; generated by
            # `binderhub-hpc devcluster up`: edits are overwritten.
            ClusterName=binderhpc
            SlurmctldHost={self.node_name}
            AuthType=auth/munge
            CredType=cred/munge
            SlurmUser=root
            SlurmdUser=root
            SlurmctldPort={self.slurmctld_port}
            SlurmdPort={self.slurmd_port}
            StateSaveLocation={s}/slurmctld
            SlurmdSpoolDir={s}/slurmd
            SlurmctldPidFile={s}/run/slurmctld.pid
            SlurmdPidFile={s}/run/slurmd.pid
            SlurmctldLogFile={s}/log/slurmctld.log
            SlurmdLogFile={s}/log/slurmd.log
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
            SlurmdTimeout=300
            MessageTimeout=10
            NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
            PartitionName=interactive Nodes={self.node_name} Default=YES OverSubscribe=FORCE:8 MaxTime=INFINITE State=UP
            PartitionName=batch Nodes={self.node_name} Default=NO OverSubscribe=NO MaxTime=INFINITE State=UP
            PartitionName=bench Nodes={self.node_name} Default=NO OverSubscribe=FORCE:64 MaxTime=INFINITE State=UP
            """
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
        for name in ("slurmctld", "slurmd"):
            pid = self._running_pid(name)
            if pid and changed:
                log.info("slurm.conf changed: restarting %s", name)
                os.kill(pid, signal.SIGTERM)
                self._wait_gone(pid, 20)
                pid = None
            if not pid:
                _run([name, "-f", self.slurm_conf], env=env, timeout=30)
                pid = self._wait_pid(name, 15)
                self._mark_started(name, pid)
        self._wait_node_idle(timeout)

    @staticmethod
    def _wait_gone(pid, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def node_state(self):
        p = _run(
            ["sinfo", "-h", "-N", "-n", self.node_name, "-o", "%T"],
            check=False, env=self.full_env(), timeout=20,
        )
        if p.returncode != 0:
            return None
        states = set(p.stdout.split())
        return states.pop() if len(states) == 1 else ",".join(sorted(states)) or None

    def _wait_node_idle(self, timeout):
        deadline = time.monotonic() + timeout
        resumed = False
        state = None
        while time.monotonic() < deadline:
            state = self.node_state()
            if state:
                base = state.rstrip("*~#!%$@^-")
                if base in ("idle", "mixed", "allocated", "completing"):
                    return state
                if not resumed and base in ("down", "drained", "draining", "drain", "fail"):
                    _run(
                        ["scontrol", "update", f"nodename={self.node_name}", "state=resume"],
                        check=False, env=self.full_env(), timeout=20,
                    )
                    resumed = True
            time.sleep(0.5)
        raise DevClusterError(
            f"node {self.node_name} not idle after {timeout} s (state {state!r}).\n"
            f"--- slurmctld log ---\n{_tail(self._logfile('slurmctld'))}\n"
            f"--- slurmd log ---\n{_tail(self._logfile('slurmd'))}"
        )

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
                want for want in ('runtime = "runc"', 'cgroup_manager = "cgroupfs"',
                                  "default_ulimits = []")
                if want not in text
            ]
            if missing:
                log.warning("%s is not ours and lacks %s; podman may fail here",
                            conf, ", ".join(missing))
        self._ensure_rootless_storage()
        if not self._podman_ok(rootless=False):
            raise DevClusterError(
                "podman info fails as root:\n" + _run(["podman", "info"], check=False).stdout
            )
        if not self._podman_ok(rootless=True):
            p = self.as_service_user(["podman", "info"], check=False, timeout=60)
            raise DevClusterError(f"rootless podman info fails as {self.service_user}:\n{p.stdout}")

    def _ensure_rootless_storage(self):
        """Rootless storage on native overlay for the service account.

        Left to itself podman 4.3 falls back to ``vfs`` here (``/dev/fuse`` is
        root-only, so fuse-overlayfs cannot serve), which copies every layer
        for every container (seconds per ``podman run``). The kernel mounts
        overlay inside a user namespace, so ask for it explicitly.
        """
        pw = pwd.getpwnam(self.service_user)
        cfg_dir = self.service_home / ".config" / "containers"
        conf = cfg_dir / "storage.conf"
        text = f'{CONTAINERS_CONF_MARKER}\n[storage]\ndriver = "overlay"\n'
        if conf.exists() and CONTAINERS_CONF_MARKER not in conf.read_text():
            return
        store = self.service_home / ".local" / "share" / "containers" / "storage"
        if (store / "vfs").exists() and not (store / "overlay").exists():
            # storage was initialised with vfs: podman refuses a driver change
            log.info("resetting %s's podman storage (vfs -> overlay)", self.service_user)
            self.as_service_user(["podman", "system", "reset", "--force"],
                                 check=False, timeout=300)
        for d in (self.service_home / ".config", cfg_dir):
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
                    check=False, timeout=60,
                )
                return p.returncode == 0 and p.stdout.strip().endswith("true")
            p = _run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                     check=False, timeout=60)
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
        p = _run(["podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}',
                  image or self.base_image], check=False, timeout=60)
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
                cf.write_text(BASE_CONTAINERFILE.format(
                    rootfs=ROOTFS_IMAGE, jupyterhub_major=hub_major(), major_label=MAJOR_LABEL,
                    revision_label=REVISION_LABEL, revision=BASE_REVISION))
                log.info("podman build %s", self.base_image)
                _run(
                    [
                        "podman", "build", "--network", "host", "--pull=never",
                        "--volume", f"{HOST_CA_BUNDLE}:/run/host-ca.crt:ro",
                        "--tag", self.base_image, "--file", cf, ctx,
                    ],
                    timeout=1800,
                )
            log.info("base image built in %.1f s", time.monotonic() - t0)
        if rootless and (force or not self.image_exists(rootless=True)):
            self.copy_image_to_service_user(self.base_image)
        return self.base_image

    def copy_image_to_service_user(self, image):
        """Copy an image from root's podman storage into the service account's."""
        tmpdir = Path(tempfile.mkdtemp(prefix="img-", dir=self.state_dir / "cache"))
        try:
            os.chmod(tmpdir, 0o755)
            archive = tmpdir / "image.tar"
            _run(["podman", "save", "--quiet", "--format", "oci-archive", "-o", archive, image],
                 timeout=900)
            os.chmod(archive, 0o644)
            # oci-archive loses the name unless given again
            self.as_service_user(["podman", "load", "--quiet", "-i", archive], timeout=900)
            p = self.as_service_user(
                ["podman", "images", "--noheading", "--format", "{{.ID}} {{.Names}}"],
                timeout=60,
            )
            if not self.image_exists(image, rootless=True):
                ref = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image]).stdout
                self.as_service_user(["podman", "tag", ref.strip(), image], timeout=60)
            log.debug("service account images: %s", p.stdout)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _debootstrap(self, tarball):
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=tarball.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            log.info("debootstrap --variant=minbase bookworm (a few minutes)")
            p = _run(
                [
                    "debootstrap", "--variant=minbase", "--components=main",
                    "bookworm", rootfs, DEBIAN_MIRROR,
                ],
                check=False, timeout=1800,
            )
            if p.returncode != 0:
                logf = rootfs / "debootstrap" / "debootstrap.log"
                raise DevClusterError(
                    f"debootstrap failed:\n{p.stdout[-3000:]}\n{_tail(logf)}"
                )
            # trim what a container does not need
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                d = rootfs / sub
                for child in d.glob("*"):
                    if child.is_file():
                        child.unlink()
            part = tarball.with_name(tarball.name + ".part")
            _run(["tar", "--numeric-owner", "--xattrs", "-C", rootfs, "-cf", part, "."],
                 timeout=600)
            os.replace(part, tarball)
        log.info("debootstrap done in %.1f s", time.monotonic() - t0)

    def podman_run_ok(self, image=None, rootless=False):
        cmd = ["podman", "run", "--rm", "--network", "host", image or self.base_image, "true"]
        if rootless:
            return self.as_service_user(cmd, check=False, timeout=120).returncode == 0
        return _run(cmd, check=False, timeout=120).returncode == 0
