"""OpenPBS as the dev cluster's scheduler, beside (or instead of) Slurm.

``PBSDevCluster.up()`` turns an OpenPBS that is already installed on this
machine into a single-node PBS site, the way :class:`DevCluster` does it
for Slurm. It configures; it never builds or installs OpenPBS (a site's
PBS is installed by the site). An installation is a prefix with
``bin/qsub`` and ``libexec/pbs_init.d``: ``prefix=`` (``devcluster up
--scheduler pbs --pbs-prefix``), else ``$PBS_EXEC``, else the one whose
``qsub`` is on PATH, else the newest (last installed) of ``/opt/pbs`` and
``/opt/pbs-*``. Only one OpenPBS runs at a time on a machine; ``up`` with
another prefix stops the one the dev cluster started and starts afresh.

What ``up`` does, in the order OpenPBS needs it:

- the site of the Slurm dev cluster without Slurm (service account
  ``binder``, the registry and jobs directories, podman);
- a name for this machine's own non-loopback address in ``/etc/hosts``
  (PBS refuses a server name that resolves to loopback), marked so ``down``
  removes only that line;
- ``/etc/pbs.conf`` (server, scheduler, comm and mom on this host, under
  that name), marked as ours: a ``/etc/pbs.conf`` that is not ours is never
  touched;
- the first start with no ``PBS_HOME`` at all (``pbs_habitat`` creates it,
  and the datastore: a ``mom_priv/config`` written before that makes the
  start fail with "Could not retrieve PBS Data Service User"); only then
  ``$usecp *:/ /`` in ``mom_priv/config`` (output files are copied locally,
  or jobs hang in state E) and a HUP to the mom;
- queues ``interactive`` (the default; oversubscribed 8-fold like the Slurm
  partition), ``batch`` (one job per core) and ``bench`` (64-fold), job
  history for ``qstat -x``, strict ordering with backfilling (so the
  scheduler estimates when a waiting job starts);
- the node ``free`` before it returns (a job submitted earlier may be
  marked "Can Never Run" by the first scheduling cycle and wait ten
  minutes for the next).

``down()`` stops what ``up`` started and removes what it made: the daemons
(and PBS's own PostgreSQL), ``PBS_HOME`` with its jobs and history,
``/etc/pbs.conf`` and the hosts line. The installed prefix stays.
"""

import argparse
import json
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from binderhub_hpc.proc import cmdline, pid_alive

from .cluster import DevCluster, DevClusterError
from .cluster.base import _pgrep_exact, _read_pid, _run, _tail

log = logging.getLogger("binderhub_hpc_testing.pbs")

PBS_CONF = Path("/etc/pbs.conf")
PBS_HOME = Path("/var/spool/pbs")
HOSTS = Path("/etc/hosts")
MARK = "binderhub-hpc devcluster"
CONF_MARK = f"# written by {MARK}; `binderhub-hpc devcluster down --scheduler pbs` removes it"
HOSTS_MARK = f"# {MARK} pbs"
#: a file in PBS_HOME saying the dev cluster made it, for which prefix and name
HOME_MARK = ".binderhub-hpc-devcluster"
#: the name this machine's address gets (the server, the mom and the node)
SERVER_NAME = "pbsdev"
#: the daemons, by process name
DAEMONS = ("pbs_comm", "pbs_mom", "pbs_sched", "pbs_server.bin")
#: interfaces whose addresses are not this machine's own (container bridges)
VIRTUAL_IFACES = ("cni-", "podman", "docker", "veth", "br-", "virbr", "lo")
#: PATH for PBS's own scripts: Debian's tools, not a user's pyenv shims
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: where OpenPBS is looked for when nothing says where it is
PREFIX_GLOBS = ("/opt/pbs", "/opt/pbs-*")


# ------------------------------------------------------------------ installations


def is_prefix(path):
    """Whether `path` holds an OpenPBS installation we can run."""
    p = Path(path)
    return (p / "bin" / "qsub").is_file() and (p / "libexec" / "pbs_init.d").is_file()


def installed_prefixes():
    """OpenPBS installations under /opt (``/opt/pbs``, ``/opt/pbs-*``), the
    newest (last installed: the mtime of its ``bin/qstat``) first."""
    found = []
    for pattern in PREFIX_GLOBS:
        found += [p for p in sorted(Path("/").glob(pattern.lstrip("/"))) if is_prefix(p)]
    return sorted(set(found), key=lambda p: (p / "bin" / "qstat").stat().st_mtime, reverse=True)


def find_prefix(prefix=None):
    """The OpenPBS installation to use (see the module docstring), or None."""
    if prefix:
        if not is_prefix(prefix):
            raise DevClusterError(f"{prefix} is not an OpenPBS installation (no bin/qsub and libexec/pbs_init.d)")
        return Path(prefix)
    env = os.environ.get("PBS_EXEC")
    if env:
        if not is_prefix(env):
            raise DevClusterError(
                f"$PBS_EXEC={env} is not an OpenPBS installation (no bin/qsub and libexec/pbs_init.d)"
            )
        return Path(env)
    qsub = shutil.which("qsub")
    if qsub:
        p = Path(os.path.realpath(qsub)).parent.parent
        if is_prefix(p):
            return p
    found = installed_prefixes()
    return found[0] if found else None


def pbs_version(prefix):
    """What the installation calls itself (``qstat --version``)."""
    p = _run([Path(prefix) / "bin" / "qstat", "--version"], check=False, timeout=20)
    return p.stdout.strip().split("=")[-1].strip() if p.returncode == 0 else ""


def writes_cjson(prefix):
    """Whether its qstat writes JSON with cJSON (master since 2024) rather
    than by hand (23.06 and older): the two differ in escaping and numbers."""
    p = _run(["ldd", Path(prefix) / "bin" / "qstat"], check=False, timeout=20)
    return "libcjson" in p.stdout


def own_address():
    """This machine's first non-loopback IPv4 address of a real interface."""
    p = _run(["ip", "-4", "-o", "addr", "show", "scope", "global"], check=False, timeout=10)
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[1].startswith(VIRTUAL_IFACES):
            continue
        return parts[3].split("/")[0]
    raise DevClusterError(
        "this machine has no non-loopback IPv4 address; PBS refuses a server name that resolves to loopback"
    )


# ------------------------------------------------------------------ the cluster


class PBSDevCluster:
    """The PBS side of the dev cluster. Attributes:

    - ``prefix``: the OpenPBS installation (None when none is found)
    - ``server``: the name of this host in PBS (server, mom and node)
    - ``home``: PBS_HOME; ``conf``: the pbs.conf clients and daemons read
    - ``site``: the :class:`DevCluster` whose service account and
      directories the jobs use
    - ``queues``: {name: cores per core of the machine it may use (None:
      the node's, 64-fold)}; the first is the default queue
    """

    queues = {"interactive": 8, "batch": 1, "bench": None}
    #: the node's cpus, as a multiple of the machine's (the bench queue's share)
    node_oversubscribe = 64

    def __init__(self, prefix=None, state_dir=None, server=SERVER_NAME, home=PBS_HOME, conf=PBS_CONF):
        self.prefix = find_prefix(prefix)
        self.site = DevCluster(state_dir=state_dir)
        self.server = server
        self.home = Path(home)
        self.conf = Path(conf)

    # -------------------------------------------------------------- paths
    def bin(self, name):
        """A client command of the installation (qsub, qstat, qmgr, ...)."""
        return str(self._need_prefix() / "bin" / name)

    def _need_prefix(self):
        if self.prefix is None:
            raise DevClusterError(
                "OpenPBS is not installed: no qsub on PATH, no $PBS_EXEC, no /opt/pbs or /opt/pbs-*. "
                "Install it (it builds from source: github.com/openpbs/openpbs), then run again, "
                "or give its prefix with --pbs-prefix."
            )
        return self.prefix

    @property
    def env(self):
        """Environment additions for PBS clients."""
        return {"PBS_CONF_FILE": str(self.conf)}

    def full_env(self, **extra):
        env = dict(os.environ)
        env.update(self.env)
        env["PATH"] = f"{self._need_prefix() / 'bin'}:{env.get('PATH', SYSTEM_PATH)}"
        env.update(extra)
        return env

    @property
    def service_user(self):
        return self.site.service_user

    def service_env(self):
        """What the service account's commands see: its identity, the PBS
        clients first on PATH, the conf."""
        env = dict(self.site.service_env)
        env.pop("SLURM_CONF", None)
        env.update(self.env)
        env["PATH"] = f"{self._need_prefix() / 'bin'}:{env['PATH']}"
        return env

    def as_service_user(self, cmd, **kw):
        """Run `cmd` as the service account (never root: PBS refuses root's jobs, rightly)."""
        argv = ["runuser", "-u", self.service_user, "--", "env", "-i"]
        argv += [f"{k}={v}" for k, v in self.service_env().items()] + [str(c) for c in cmd]
        kw.setdefault("cwd", str(self.site.service_home))
        return _run(argv, **kw)

    def qmgr(self, command, check=True):
        return _run([self.bin("qmgr"), "-c", command], check=check, env=self.full_env(), timeout=60)

    def spawner_config(self):
        """Config lines that point the hub's PBS spawner at this installation.
        The hub submits through ``sudo``, whose secure_path hides the prefix:
        the commands are named by their full paths, as a site would."""
        return textwrap.dedent(f"""
            c.JupyterHub.spawner_class = "binderhub_hpc.spawner.PBSBinderSpawner"
            c.PBSBinderSpawner.batch_submit_cmd = {self.bin("qsub") + " -f"!r}
            c.PBSBinderSpawner.batch_cancel_cmd = {self.bin("qdel") + " {job_id}"!r}
            c.PBSQueue.qstat = {self.bin("qstat")!r}
            """)

    # -------------------------------------------------------------- state
    def _conf_values(self):
        """KEY=value of the current pbs.conf ({} when there is none)."""
        try:
            text = self.conf.read_text()
        except OSError:
            return {}
        values = {}
        for line in text.splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                values[k.strip()] = v.strip()
        return values

    def conf_is_ours(self):
        try:
            return CONF_MARK in self.conf.read_text()
        except OSError:
            return False

    def home_mark(self):
        """What the dev cluster wrote into PBS_HOME when it made it
        ("<prefix> <server>"), or None when PBS_HOME is not ours."""
        try:
            return (self.home / HOME_MARK).read_text().strip()
        except OSError:
            return None

    def daemons(self):
        """{daemon: pid} of the PBS daemons running on this machine."""
        running = {}
        for name in DAEMONS:
            pids = _pgrep_exact(name)
            if pids:
                running[name] = pids[0]
        return running

    def running_prefix(self):
        """The installation whose daemons run now (None: none run)."""
        for pid in self.daemons().values():
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            return Path(exe).parent.parent
        return None

    def node_state(self):
        p = _run([self.bin("pbsnodes"), self.server], check=False, env=self.full_env(), timeout=20)
        m = re.search(r"^\s*state = (.*)$", p.stdout, re.M)
        return m.group(1).strip() if p.returncode == 0 and m else None

    def is_up(self):
        return (
            self.prefix is not None
            and self.conf_is_ours()
            and set(self.daemons()) == set(DAEMONS)
            and self.running_prefix() == self.prefix
            and self.node_state() == "free"
        )

    # -------------------------------------------------------------- up
    def up(self, timeout=120):
        t0 = time.monotonic()
        prefix = self._need_prefix()
        self.site.ensure_site()
        self._check_install(prefix)
        address = own_address()
        self._ensure_hosts(address)
        fresh = self._ensure_stopped_unless_current(prefix)
        self._write_conf(prefix)
        if fresh or set(self.daemons()) != set(DAEMONS):
            self._start(prefix)
        if fresh or not self._usecp_set():
            self._set_usecp()
        self._set_strict_ordering()
        self.home.joinpath(HOME_MARK).write_text(f"{prefix} {self.server}\n")
        self._configure()
        self._wait_node_free(timeout)
        log.info("PBS dev cluster (%s) up in %.1f s", prefix, time.monotonic() - t0)
        return self

    @staticmethod
    def _check_install(prefix):
        """What pbs_postinstall and the admin leave done on a real site."""
        for name in ("pbs_iff", "pbs_rcp"):
            path = prefix / "sbin" / name
            if path.exists() and not (path.stat().st_mode & stat.S_ISUID and path.stat().st_uid == 0):
                raise DevClusterError(
                    f"{path} is not setuid root: PBS clients of other accounts cannot authenticate "
                    f"(pbs_iff: cannot connect). As the installer would: chmod 4755 {path}"
                )

    def _ensure_hosts(self, address):
        lines = HOSTS.read_text().splitlines(keepends=True)
        want = f"{address} {self.server}  {HOSTS_MARK}\n"
        if want in lines:
            return
        for line in lines:
            words = line.split("#")[0].split()
            if self.server in words[1:] and not line.rstrip().endswith(HOSTS_MARK):
                if words[0] == address:
                    return
                raise DevClusterError(f"{HOSTS} already names {words[0]} {self.server}: not ours, left alone")
        kept = [line for line in lines if not line.rstrip().endswith(HOSTS_MARK)]
        if kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
        # in place: /etc/hosts may be a bind mount that cannot be replaced
        with open(HOSTS, "w") as f:
            f.writelines(kept + [want])

    def _remove_hosts_line(self):
        try:
            lines = HOSTS.read_text().splitlines(keepends=True)
        except OSError:
            return False
        kept = [line for line in lines if not line.rstrip().endswith(HOSTS_MARK)]
        if kept != lines:
            with open(HOSTS, "w") as f:
                f.writelines(kept)
            return True
        return False

    def _ensure_stopped_unless_current(self, prefix):
        """Stop an OpenPBS of ours that is another installation or set up
        under other names; refuse to touch one that is not ours. Returns
        whether PBS_HOME must be made afresh."""
        running = self.running_prefix()
        if self.conf.exists() and not self.conf_is_ours():
            raise DevClusterError(
                f"{self.conf} is not the dev cluster's: this machine has a PBS of its own, left alone"
            )
        mark = self.home_mark()
        if running and mark is None and self.home.exists():
            raise DevClusterError(
                f"an OpenPBS from {running} runs with {self.home}, which the dev cluster did not make"
            )
        current = mark == f"{prefix} {self.server}" and self._conf_values().get("PBS_EXEC") == str(prefix)
        if current:
            return False
        if running or self.daemons():
            log.info("stopping the dev cluster's OpenPBS from %s to start %s", running, prefix)
            self._stop(running or Path(self._conf_values().get("PBS_EXEC", prefix)))
        if self.home.exists():
            if mark is None:
                raise DevClusterError(f"{self.home} exists and was not made by the dev cluster: left alone")
            shutil.rmtree(self.home)
        return True

    def conf_text(self, prefix):
        return textwrap.dedent(f"""\
            {CONF_MARK}
            PBS_EXEC={prefix}
            PBS_HOME={self.home}
            PBS_SERVER={self.server}
            PBS_LEAF_NAME={self.server}
            PBS_MOM_NODE_NAME={self.server}
            PBS_START_SERVER=1
            PBS_START_SCHED=1
            PBS_START_COMM=1
            PBS_START_MOM=1
            PBS_CORE_LIMIT=unlimited
            PBS_SCP=/usr/bin/scp
            """)

    def _write_conf(self, prefix):
        self.site._write_if_changed(self.conf, self.conf_text(prefix))

    def _init_d(self, prefix, action, timeout=300):
        env = {
            "PATH": f"{prefix}/bin:{prefix}/sbin:{SYSTEM_PATH}",
            "PBS_CONF_FILE": str(self.conf),
            "LANG": "C.UTF-8",
            "HOME": "/root",
        }
        # the init script asks for a "y" when PBS_HOME does not match: no stdin
        p = _run([prefix / "libexec" / "pbs_init.d", action], check=False, env=env, timeout=timeout)
        return p

    def _start(self, prefix):
        log.info("starting OpenPBS from %s (%s)", prefix, "new PBS_HOME" if not self.home.exists() else "restart")
        p = self._init_d(prefix, "start")
        missing = set(DAEMONS) - set(self.daemons())
        if p.returncode != 0 or missing:
            raise DevClusterError(
                f"{prefix}/libexec/pbs_init.d start failed (exit {p.returncode}; not running: "
                f"{', '.join(sorted(missing)) or 'none'}):\n{p.stdout[-3000:]}\n{self._log_tails()}"
            )

    def _log_tails(self):
        out = []
        for sub in ("server_logs", "mom_logs", "sched_logs", "comm_logs"):
            logs = sorted((self.home / sub).glob("*")) if (self.home / sub).is_dir() else []
            if logs:
                out.append(f"--- {logs[-1]} ---\n{_tail(logs[-1], 15)}")
        return "\n".join(out)

    @property
    def mom_config(self):
        return self.home / "mom_priv" / "config"

    def _usecp_set(self):
        try:
            return any(line.split() == ["$usecp", "*:/", "/"] for line in self.mom_config.read_text().splitlines())
        except OSError:
            return False

    def _set_usecp(self):
        """Output files by cp, not scp: written only now, after the first
        start made PBS_HOME (before it the start fails)."""
        if not self._usecp_set():
            with open(self.mom_config, "a") as f:
                f.write("$usecp *:/ /\n")
        pid = _read_pid(self.home / "mom_priv" / "mom.lock") or self.daemons().get("pbs_mom")
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGHUP)

    @property
    def sched_config(self):
        return self.home / "sched_priv" / "sched_config"

    def _set_strict_ordering(self):
        """Jobs start in queue order, with backfilling (as most sites run
        PBS): the scheduler then estimates when the first waiting job will
        start (estimated.start_time), which a pending launch shows."""
        text = self.sched_config.read_text()
        new = re.sub(r"^strict_ordering:\s*false\s+ALL\s*$", "strict_ordering: true\tALL", text, flags=re.M)
        if new != text:
            self.sched_config.write_text(new)
            pid = self.daemons().get("pbs_sched")
            if pid:
                os.kill(pid, signal.SIGHUP)

    def _configure(self):
        """Queues, limits and job history (idempotent)."""
        cpus = os.cpu_count() or 1
        q = self.qmgr
        q("set server job_history_enable = True")
        # a scheduling cycle at least every 10 s besides those that events start
        q("set server scheduler_iteration = 10")
        existing = set(self._queue_names())
        for name, share in self.queues.items():
            if name not in existing:
                q(f"create queue {name} queue_type = execution")
            q(f"set queue {name} enabled = True")
            q(f"set queue {name} started = True")
            if share:
                # the cores jobs of this queue may use together
                q(f"set queue {name} resources_available.ncpus = {share * cpus}")
        q(f"set server default_queue = {next(iter(self.queues))}")
        if "workq" in existing and "workq" not in self.queues:
            q("delete queue workq", check=False)
        q(f"set node {self.server} resources_available.ncpus = {self.node_oversubscribe * cpus}")
        q("set server scheduling = True")

    def _queue_names(self):
        p = _run([self.bin("qstat"), "-Q"], check=False, env=self.full_env(), timeout=20)
        return [line.split()[0] for line in p.stdout.splitlines()[2:] if line.strip()]

    def _wait_node_free(self, timeout):
        """Free, with its cores reported, twice in a row (the mom reconnects
        after the HUP; its first report may still be the old one)."""
        deadline = time.monotonic() + timeout
        seen = 0
        state = None
        while time.monotonic() < deadline:
            state = self.node_state()
            seen = seen + 1 if state == "free" else 0
            if seen >= 2:
                return state
            time.sleep(0.5)
        raise DevClusterError(
            f"PBS node {self.server} not free after {timeout} s (state {state!r}).\n{self._log_tails()}"
        )

    # -------------------------------------------------------------- down
    def down(self):
        """Stop the OpenPBS the dev cluster started and remove what it made.
        Returns what was stopped or removed."""
        done = []
        if not self.conf_is_ours() and self.home_mark() is None:
            if self._remove_hosts_line():
                done.append("hosts line")
            return done
        prefix = self.running_prefix() or Path(self._conf_values().get("PBS_EXEC") or self.prefix or "/nonexistent")
        if self.daemons():
            self._stop(prefix)
            done.append(f"OpenPBS ({prefix})")
        if self.home_mark() is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            done.append(str(self.home))
        if self.conf_is_ours():
            self.conf.unlink()
            done.append(str(self.conf))
        if self._remove_hosts_line():
            done.append("hosts line")
        return done

    def _stop(self, prefix, timeout=60):
        if is_prefix(prefix):
            self._init_d(prefix, "stop", timeout=180)
        deadline = time.monotonic() + timeout
        while self.daemons() and time.monotonic() < deadline:
            time.sleep(0.5)
        for name, pid in self.daemons().items():
            log.warning("%s (pid %d) outlived pbs_init.d stop: killing it", name, pid)
            os.kill(pid, signal.SIGKILL)
        # PBS's own PostgreSQL (its datastore in PBS_HOME) goes with the server
        for pid in self._datastore_pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)

    def _datastore_pids(self):
        datastore = str(self.home / "datastore")
        return [pid for pid in _pgrep_exact("postgres") if datastore in cmdline(pid)]

    # -------------------------------------------------------------- status
    def status(self):
        st = {
            "prefix": str(self.prefix) if self.prefix else None,
            "installed": [str(p) for p in installed_prefixes()],
            "running_prefix": str(self.running_prefix() or "") or None,
            "conf": str(self.conf) if self.conf_is_ours() else None,
            "server": self.server,
            "daemons": {name: {"pid": pid} for name, pid in ((n, self.daemons().get(n)) for n in DAEMONS)},
            "node": None,
            "queues": None,
        }
        if self.prefix and st["daemons"]["pbs_server.bin"]["pid"]:
            st["node"] = self.node_state()
            p = _run([self.bin("qstat"), "-Q"], check=False, env=self.full_env(), timeout=20)
            st["queues"] = p.stdout.strip()
        st["env"] = f"export PBS_CONF_FILE={self.conf} PATH={self.prefix}/bin:$PATH" if self.prefix else ""
        return st

    def format_status(self, st=None):
        st = st or self.status()
        if not st["prefix"]:
            return "OpenPBS: not installed (no qsub on PATH, no $PBS_EXEC, no /opt/pbs or /opt/pbs-*)"
        out = [f"OpenPBS: {st['prefix']} (installed: {', '.join(st['installed']) or 'none under /opt'})"]
        if st["running_prefix"] and st["running_prefix"] != st["prefix"]:
            out.append(f"running: {st['running_prefix']}")
        for name, d in st["daemons"].items():
            out.append(f"{name}: running, pid {d['pid']}" if d["pid"] else f"{name}: not running")
        if st["node"]:
            out.append(f"node {st['server']}: {st['node']}")
        if st["queues"]:
            out += ["queues:"] + ["  " + line for line in st["queues"].splitlines()]
        out.append(st["env"])
        return "\n".join(out)


# ------------------------------------------------------------------ recorded qstat output
#: values that make `qstat -f -F json` misbehave, in a job's Variable_List
#: (submitted with `qsub -V`: `-v` refuses quotes): JSON's own specials,
#: number-like strings, quotes, backslashes, non-ASCII, separators
HOSTILE_VARIABLES = {
    "HOSTILE_QUOTES": "say \"hi\" to 'them'",
    "HOSTILE_LEADING_QUOTE": '"quoted" first',
    "HOSTILE_BACKSLASH": "C:\\tmp\\new",
    "HOSTILE_TRAILING_BACKSLASH": "C:\\",
    "HOSTILE_JSON": '{"k": [1, 2]}',
    "HOSTILE_COMMA": "a,b=c,d",
    "HOSTILE_NEWLINE": "line1\nline2",
    "HOSTILE_TAB": "a\tb",
    "HOSTILE_UTF8": "ünïcødé ✓ 日本",
    "HOSTILE_SHELL": "$(id) `id` ${HOME}",
    "HOSTILE_INF": "inf",
    "HOSTILE_NAN": "nan",
    "HOSTILE_NAN_JSON": "NaN",
    "HOSTILE_INFINITY": "-Infinity",
    "HOSTILE_ONE_DOT": "1.",
    "HOSTILE_PLUS": "+5",
    "HOSTILE_ZEROS": "00",
    "HOSTILE_OCTAL": "0123",
    "HOSTILE_EXP": "1e5",
    "HOSTILE_NEG": "-007",
    "HOSTILE_HALF": ".5",
    "HOSTILE_HEX": "0x1F",
    "HOSTILE_TRUE": "true",
    "HOSTILE_NULL": "null",
    "HOSTILE_EMPTY": "",
}
#: ... in its name (qsub allows only [A-Za-z][A-Za-z0-9._+-]*: these are
#: the names some versions print as bare JSON numbers)
HOSTILE_NAME = "inf"
#: ... and in its arguments (Submit_arguments): a backslash that is no JSON
#: escape, a trailing backslash, quotes and non-ASCII
HOSTILE_ARGS = ["/bin/echo", "a\\sb", 'say "hi"', "ünï", "x\\"]


def record_qstat(cluster, outdir, timeout=120):
    """Record `qstat -f -F json` of real jobs into `outdir` (the parser's
    test data): a running job, a job queued behind it (its queue full), a
    held one, one held by an operator too, a finished one (`qstat -x`), one with hostile values in its
    variables, name and arguments, the whole queue with all of them, and an
    empty queue. Jobs are the service account's, and so is the view (not a
    manager's: no euser/egroup, as the hub's own account sees them).
    `meta.json` says which job is which and what made them."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    qstat = cluster.bin("qstat")

    def qsub(*args, env=None):
        argv = [cluster.bin("qsub"), "-o", "/dev/null", "-j", "oe", *args]
        if env is None:
            return cluster.as_service_user(argv, timeout=60).stdout.strip()
        # -V: qsub sends its whole environment, so it must hold only these
        pw = pwd.getpwnam(cluster.service_user)
        full = {"HOME": pw.pw_dir, "USER": pw.pw_name, "PATH": SYSTEM_PATH, **cluster.env, **env}
        p = subprocess.run(
            ["runuser", "-u", cluster.service_user, "--", *argv],
            env=full,
            cwd=pw.pw_dir,
            capture_output=True,
            timeout=60,
        )
        if p.returncode:
            raise DevClusterError(f"qsub {args}: {p.stderr.decode(errors='replace')}")
        return p.stdout.decode().strip()

    def view(*args):
        """qstat's bytes exactly as printed (23.06 prints bytes that are not UTF-8)."""
        p = subprocess.run(
            [
                "runuser",
                "-u",
                cluster.service_user,
                "--",
                "env",
                "-i",
                *[f"{k}={v}" for k, v in cluster.service_env().items()],
                qstat,
                *args,
            ],
            capture_output=True,
            timeout=60,
            cwd="/",
        )
        if p.returncode:
            raise DevClusterError(f"qstat {args}: {p.stderr.decode(errors='replace')}")
        return p.stdout

    def state(job_id, history=False):
        out = view("-x", "-f", job_id) if history else view("-f", job_id)
        m = re.search(rb"^\s*job_state = (\S+)", out, re.M)
        return (m.group(1).decode() if m else ""), out.decode(errors="replace")

    def wait(job_id, predicate, what, history=False):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st, comment = state(job_id, history)
            if predicate(st, comment):
                return
            time.sleep(0.5)
        raise DevClusterError(f"job {job_id} not {what} after {timeout} s: {state(job_id, history)}")

    files = {}
    jobs = {}
    files["empty"] = view("-f", "-F", "json", "bench")
    cpus = os.cpu_count() or 1
    # a time limit, so the scheduler can estimate when the queued job starts
    jobs["running"] = qsub(
        "-q",
        "batch",
        "-l",
        f"select=1:ncpus={cpus}",
        "-l",
        "walltime=00:10:00",
        "-N",
        "running",
        "--",
        "/bin/sleep",
        "600",
    )
    try:
        wait(jobs["running"], lambda s, c: s == "R", "running")
        jobs["queued"] = qsub("-q", "batch", "-N", "queued", "--", "/bin/true")
        wait(
            jobs["queued"],
            lambda s, full: s == "Q" and "comment = Not Running" in full and "estimated.start_time" in full,
            "queued with a reason and an expected start",
        )
        jobs["held"] = qsub("-q", "batch", "-h", "-N", "held", "--", "/bin/true")
        # an operator's hold on top of the owner's (root: PBS managers may)
        jobs["held_by_operator"] = qsub("-q", "batch", "-h", "-N", "held-by-operator", "--", "/bin/true")
        _run([qstat.replace("qstat", "qhold"), "-h", "o", jobs["held_by_operator"]], env=cluster.full_env(), timeout=60)
        jobs["hostile"] = qsub(
            "-q", "batch", "-h", "-V", "-N", HOSTILE_NAME, "--", *HOSTILE_ARGS, env=HOSTILE_VARIABLES
        )
        jobs["finished"] = qsub("-q", "interactive", "-N", "finished", "--", "/bin/true")
        wait(jobs["finished"], lambda s, c: s == "F", "finished", history=True)
        for name in ("running", "queued", "held", "held_by_operator", "hostile"):
            files[name] = view("-f", "-F", "json", jobs[name])
        files["finished"] = view("-x", "-f", "-F", "json", jobs["finished"])
        files["queue"] = view("-f", "-F", "json")
    finally:
        ids = [j for k, j in jobs.items() if k != "finished"]
        cluster.as_service_user([cluster.bin("qdel"), "-W", "force", *ids], check=False, timeout=60)
    for name, data in files.items():
        (outdir / f"{name}.json").write_bytes(data)
    meta = {
        "recorded_with": f"python3 -m binderhub_hpc_testing.pbs --pbs-prefix {cluster.prefix} record {outdir}",
        "prefix": str(cluster.prefix),
        "pbs_version": pbs_version(cluster.prefix),
        "json_writer": "cJSON" if writes_cjson(cluster.prefix) else "hand-written (pbs_json.c)",
        "viewer": f"{cluster.service_user} (the jobs' owner, not a PBS manager)",
        "jobs": jobs,
        "hostile_variables": HOSTILE_VARIABLES,
        "hostile_name": HOSTILE_NAME,
        "hostile_args": HOSTILE_ARGS,
        "files": {name: f"{name}.json" for name in files},
    }
    (outdir / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m binderhub_hpc_testing.pbs", description="The PBS dev cluster's tooling."
    )
    parser.add_argument("--pbs-prefix", help="the OpenPBS installation (default: see binderhub_hpc_testing.pbs)")
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record", help="record qstat -f -F json of real jobs (test data)")
    rec.add_argument("outdir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cluster = PBSDevCluster(prefix=args.pbs_prefix)
    was_up = cluster.is_up()
    cluster.up()
    try:
        meta = record_qstat(cluster, args.outdir)
    finally:
        if not was_up:
            cluster.down()
    print(json.dumps(meta["jobs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
