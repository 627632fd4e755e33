"""``binderhub-hpc doctor``: check a deployment and say what is wrong.

Each check is a small function returning ``(status, message)`` with status
``ok``, ``warn`` or ``fail`` and a message in plain words for the admin. The
same functions serve BinderHub's ``/health`` (:class:`HealthChecks`, used by
:class:`binderhub_hpc.binderhub.SIFHealthHandler`), so a fault is described
the same way wherever it shows up.

What is checked, in order:

- the scheduler answers (``sinfo`` / ``qstat -B``);
- the configured partition (queue) exists and is up;
- the container runtime is installed and runs ``true`` in a SIF as the job
  account, with the session's own setup and command line (Apptainer on the
  SIF, podman on its root mounted with squashfuse), or at least
  ``--version``;
- the registry root exists, the build account can write it, the job account
  can read it, and how much space is free;
- the registry's filesystem type, with a warning when it is local to this
  host on a cluster of several nodes;
- the build engine (``podman info``) works, and rootless;
- the hub accepts the API token (``GET /hub/api/user``) and it has the
  scopes BinderHub needs;
- a short job on a compute node reaches the hub's API (what a session's job
  does first), and the same job cannot connect to BinderHub's port (a
  session must reach the hub's API and nothing else of the service).

Configuration comes from the same traitlets files as JupyterHub's and
BinderHub's (``--config``, repeatable): ``c.SlurmBinderSpawner.req_partition``,
``c.SIFRegistry.root``, ``c.JupyterHub.hub_connect_ip``, ... Command-line
options override them.
"""

import asyncio
import functools
import grp
import json
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from traitlets import Enum, Float, Integer, Unicode
from traitlets.config import Config, LoggingConfigurable

from .scheduler import pbs, slurm

OK, WARN, FAIL = "ok", "warn", "fail"

#: filesystems that live on one host: compute nodes cannot see them
LOCAL_FS = {"tmpfs", "ext2/ext3", "ext4", "xfs", "btrfs", "overlayfs", "zfs", "ramfs", "f2fs", "jfs", "reiserfs"}

#: what BinderHub does with its token: create (temporary) users, start and
#: stop their servers, read their state
BINDER_SCOPES = ("admin:users", "admin:servers")

GiB = 1024**3


@dataclass
class Result:
    name: str
    status: str
    message: str
    seconds: float = 0.0


# ------------------------------------------------------------------ helpers


def current_user():
    return pwd.getpwuid(os.geteuid()).pw_name


def as_user(argv, user=None, env=None):
    """`argv` run as `user` (runuser when root, else sudo -n), with a clean
    environment holding the account's HOME/USER and the keys of `env`."""
    if not user or user == current_user():
        return list(argv)
    pw = pwd.getpwnam(user)
    clean = {
        "HOME": pw.pw_dir,
        "USER": user,
        "LOGNAME": user,
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "XDG_RUNTIME_DIR": f"/run/user/{pw.pw_uid}",
    }
    for k in ("SLURM_CONF", "PBS_CONF_FILE", "LANG"):
        if env and env.get(k):
            clean[k] = env[k]
    switch = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else ["sudo", "-n", "-u", user, "--"]
    return switch + ["env", "-i"] + [f"{k}={v}" for k, v in clean.items()] + list(argv)


def _run(argv, env=None, timeout=30, user=None, cwd="/"):
    """Run a command; returns (returncode, stdout, stderr); 127 when missing."""
    argv = as_user(argv, user, env)
    try:
        p = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
    except FileNotFoundError as e:
        return 127, "", str(e)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:g} s"
    return p.returncode, p.stdout, p.stderr


def _last_line(text):
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def user_can(path, user, want):
    """Whether `user` may `want` ('r', 'w', 'x' letters) on `path`, from its
    mode bits and the account's groups (ACLs are not considered)."""
    st = os.stat(path)
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return "x" not in want or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_uid == pw.pw_uid:
        shift = 6
    elif st.st_gid in groups:
        shift = 3
    else:
        shift = 0
    bits = (st.st_mode >> shift) & 0o7
    need = (4 if "r" in want else 0) | (2 if "w" in want else 0) | (1 if "x" in want else 0)
    return bits & need == need


def _blocked_ancestor(path, user):
    """The first directory above `path` that `user` cannot traverse, or None."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        if not user_can(d, user, "x"):
            return d
    return None


# ------------------------------------------------------------------ checks


def slurm_partitions(env=None, timeout=20):
    """{partition: (availability, nodes)} from sinfo, or raise RuntimeError."""
    rc, out, err = _run(slurm.partitions_argv(), env=env, timeout=timeout)
    if rc:
        raise RuntimeError(_last_line(err) or f"sinfo exited {rc}")
    return slurm.parse_partitions(out)


def slurm_node_count(env=None):
    rc, out, _ = _run(slurm.nodes_argv(), env=env)
    return len(slurm.parse_nodes(out)) if rc == 0 else 0


def pbs_queues(env=None, qstat="qstat", timeout=20):
    """{queue: (enabled, started)} from `qstat -Q`, or raise RuntimeError."""
    rc, out, err = _run(pbs.queues_argv(qstat), env=env, timeout=timeout)
    if rc:
        raise RuntimeError(_last_line(err) or f"qstat -Q exited {rc}")
    return pbs.parse_queues(out)


def pbs_nodes(env=None, qstat="qstat", timeout=20):
    """{node: state} from `pbsnodes -a`, or raise RuntimeError."""
    rc, out, err = _run(pbs.nodes_argv(qstat), env=env, timeout=timeout)
    if rc:
        raise RuntimeError(_last_line(err) or f"pbsnodes -a exited {rc}")
    return pbs.parse_nodes(out)


def check_scheduler(scheduler="slurm", env=None, timeout=20, qstat="qstat"):
    """The scheduler answers a cheap query."""
    if scheduler == "pbs":
        rc, out, err = _run([qstat, "-B"], env=env, timeout=timeout)
        if rc == 127:
            return FAIL, (
                f"{qstat} is not installed on this host (PBS client commands are needed; "
                "c.PBSQueue.qstat names it by its full path)."
            )
        if rc:
            conf = (env or os.environ).get("PBS_CONF_FILE", "/etc/pbs.conf")
            return FAIL, (
                f"PBS does not answer (qstat -B: {_last_line(err) or rc}); is pbs_server running, "
                f"and does {conf} name it (PBS_SERVER)?"
            )
        words = _last_line(out).split()
        server = words[0] if words else "?"
        status = words[-1] if len(words) > 1 else "?"
        try:
            queues = pbs_queues(env, qstat, timeout)
        except RuntimeError:
            queues = {}
        return OK, f"PBS server {server} answers ({status}); queues: {', '.join(sorted(queues)) or 'none'}."
    if not shutil.which("sinfo", path=(env or os.environ).get("PATH")):
        return FAIL, "sinfo is not installed on this host (Slurm client commands are needed)."
    try:
        parts = slurm_partitions(env, timeout)
    except RuntimeError as e:
        conf = (env or os.environ).get("SLURM_CONF", "/etc/slurm/slurm.conf")
        return FAIL, f"Slurm does not answer (sinfo: {e}); is slurmctld running, and is SLURM_CONF ({conf}) right?"
    return OK, f"Slurm answers; partitions: {', '.join(sorted(parts)) or 'none'}."


def check_partition(scheduler="slurm", partition="", env=None, qstat="qstat"):
    """The partition (PBS: queue) jobs are submitted to exists and is up."""
    if scheduler == "pbs":
        return _check_pbs_queue(partition, env, qstat)
    try:
        parts = slurm_partitions(env)
    except RuntimeError as e:
        return FAIL, f"Cannot list partitions: {e}."
    if not partition:
        return OK, "No partition configured: jobs go to the default partition."
    if partition not in parts:
        return FAIL, (
            f"Partition {partition!r} does not exist; this cluster has: "
            f"{', '.join(sorted(parts)) or 'none'}. Fix req_partition."
        )
    avail, nodes = parts[partition]
    if avail != "up":
        return FAIL, f"Partition {partition!r} is {avail}: jobs would wait forever."
    if not nodes:
        return FAIL, f"Partition {partition!r} has no nodes."
    return OK, f"Partition {partition!r} is up with {nodes} node(s)."


#: PBS node states in which a node takes no new job at all
_PBS_NODE_DOWN = ("down", "offline", "state-unknown", "stale", "unresolvable", "maintenance", "sleep")


def _check_pbs_queue(queue, env, qstat):
    try:
        queues = pbs_queues(env, qstat)
        nodes = pbs_nodes(env, qstat)
    except RuntimeError as e:
        return FAIL, f"Cannot list PBS queues and nodes: {e}."
    if queue and queue not in queues:
        return FAIL, (
            f"Queue {queue!r} does not exist; this server has: {', '.join(sorted(queues)) or 'none'}. Fix req_queue."
        )
    where = f"Queue {queue!r}" if queue else "No queue configured (the server's default queue)"
    if queue:
        enabled, started = queues[queue]
        if not enabled:
            return FAIL, f"Queue {queue!r} is disabled: qsub refuses jobs (qmgr -c 'set queue {queue} enabled=True')."
        if not started:
            return (
                FAIL,
                f"Queue {queue!r} is stopped: jobs would wait forever (qmgr -c 'set queue {queue} started=True').",
            )
    up = [n for n, state in nodes.items() if not any(d in state for d in _PBS_NODE_DOWN)]
    if not up:
        states = ", ".join(f"{n} {st or '?'}" for n, st in sorted(nodes.items())) or "no nodes"
        return FAIL, f"{where}, but no PBS node can run jobs ({states})."
    free = sum(1 for n in up if nodes[n] == "free")
    return OK, f"{where} is enabled and started; {len(up)} node(s) up, {free} free."


def check_runtime(rt, image=None, user=None, env=None, timeout=180):
    """The container runtime `rt` (a ContainerRuntime) is installed and,
    given a SIF (a path, or a SessionImage the registry resolved, whose
    header is not read again), runs `true` in it exactly as a session job
    would."""
    from . import sif
    from .spawner.runtime import SessionImage

    if not shutil.which(rt.executable):
        return FAIL, f"The container runtime {rt.executable!r} ({rt.name}) is not installed on this host."
    if not image:
        rc, out, err = _run([rt.executable, "--version"], env=env, user=user, timeout=timeout)
        if rc:
            return FAIL, f"{rt.executable} --version failed (exit {rc}): {_last_line(err) or _last_line(out)}"
        return OK, f"{rt.name}: {_last_line(out)} (give --image to run one)."
    if isinstance(image, SessionImage):
        session_image, image = image, image.path
    else:
        try:
            session_image = SessionImage(image, sif.root_partition(image).offset)
        except (OSError, sif.SIFError) as e:
            return FAIL, f"{image} is not a usable SIF image: {e}"
    rc, out, err = _run(["bash", "-c", rt.check_script(session_image)], env=env, user=user, timeout=timeout)
    who = f" as {user}" if user else ""
    if rc:
        return FAIL, f"{rt.name} could not run `true` in {image}{who} (exit {rc}): {_last_line(err) or _last_line(out)}"
    return OK, f"{rt.name} ran `true` in {image}{who}, as a session job does."


def check_registry(root, build_user=None, job_user=None, min_free=10 * GiB):
    """The registry root exists, the build account writes it, the job
    account reads it; enough space is free."""
    build_user = build_user or current_user()
    job_user = job_user or current_user()
    if not os.path.isdir(root):
        return FAIL, f"Registry root {root} does not exist (c.SIFRegistry.root)."
    problems = []
    try:
        if not user_can(root, build_user, "rwx"):
            problems.append(f"the build account {build_user} cannot write {root}")
        blocked = _blocked_ancestor(root, build_user)
        if blocked:
            problems.append(f"the build account {build_user} cannot enter {blocked}")
        for d in (root, os.path.join(root, "images")):
            if os.path.isdir(d) and not user_can(d, job_user, "rx"):
                problems.append(f"the job account {job_user} cannot read {d}")
        blocked = _blocked_ancestor(root, job_user)
        if blocked:
            problems.append(f"the job account {job_user} cannot enter {blocked}")
    except KeyError as e:
        return FAIL, f"Unknown account {e.args[0] if e.args else e}."
    if problems:
        return FAIL, "Registry permissions: " + "; ".join(problems) + "."
    vfs = os.statvfs(root)
    free = vfs.f_bavail * vfs.f_frsize
    msg = f"Registry {root}: writable by {build_user}, readable by {job_user}; {_human_bytes(free)} free."
    if free < min_free:
        return WARN, msg + f" Less than {_human_bytes(min_free)}: builds may fail (run `binderhub-hpc gc`)."
    return OK, msg


def filesystem_type(path):
    rc, out, err = _run(["stat", "--file-system", "--format=%T", path])
    if rc:
        raise RuntimeError(_last_line(err))
    return out.strip()


def check_registry_fs(root, nodes=1):
    """Report the registry's filesystem; warn when it is local to this host
    while jobs run on several nodes."""
    try:
        fstype = filesystem_type(root)
    except RuntimeError as e:
        return FAIL, f"Cannot stat the registry's filesystem: {e}"
    if fstype in LOCAL_FS:
        if nodes > 1:
            return WARN, (
                f"Registry {root} is on {fstype}, a filesystem local to this host, but the "
                f"cluster has {nodes} nodes: compute nodes must see the same files "
                "(NFS, Lustre, GPFS, CephFS, BeeGFS, ...)."
            )
        return OK, f"Registry is on {fstype} (local; fine for a single-node cluster)."
    return OK, f"Registry is on {fstype}."


def check_build_engine(podman="podman", user=None, env=None, timeout=60):
    """podman works for the build account, rootless."""
    if not shutil.which(podman):
        return FAIL, f"The build engine {podman!r} is not installed on this host."
    rc, out, err = _run([podman, "info", "--format", "json"], env=env, user=user, timeout=timeout)
    who = user or current_user()
    if rc:
        return FAIL, f"podman info failed for {who} (exit {rc}): {_last_line(err)}"
    try:
        info = json.loads(out)
    except ValueError:
        return FAIL, f"podman info printed no JSON: {out[:200]!r}"
    host = info.get("host", {})
    rootless = host.get("security", {}).get("rootless")
    version = info.get("version", {}).get("Version", "?")
    driver = info.get("store", {}).get("graphDriverName", "?")
    msg = f"podman {version} works for {who} (storage driver {driver}"
    if not rootless:
        return WARN, msg + "), but not rootless: builds run as root. Run builds as a service account."
    return OK, msg + ", rootless)."


def _hub_api(hub_url):
    url = hub_url.rstrip("/")
    return url if url.endswith("/hub/api") else url + "/hub/api"


def check_hub_token(hub_url, token, timeout=10):
    """The hub answers and accepts the token with the scopes BinderHub needs."""
    if not hub_url:
        return WARN, "No hub URL (give --hub-url or c.BinderHub.hub_url); hub checks skipped."
    if not token:
        return FAIL, "No hub API token: set JUPYTERHUB_API_TOKEN (or c.BinderHub.hub_api_token)."
    url = _hub_api(hub_url) + "/user"
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            model = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return (
                FAIL,
                f"The hub at {hub_url} refused the API token (HTTP {e.code}): it is not a valid token for this hub.",
            )
        return FAIL, f"The hub API at {url} answered HTTP {e.code}."
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return FAIL, f"The hub at {hub_url} is unreachable ({reason}): is jupyterhub running there?"
    who = f"{model.get('kind', 'user')} {model.get('name', '?')}"
    scopes = set(model.get("scopes") or [])
    missing = [s for s in BINDER_SCOPES if s not in scopes]
    if scopes and missing:
        return WARN, f"Token of {who} is valid but lacks {', '.join(missing)}: BinderHub cannot start servers."
    return OK, f"The hub accepts the token ({who})."


#: the doctor's job on a compute node: first whether BinderHub's address
#: (argv[2], host:port, if given) takes a TCP connection, then a GET of the
#: hub's API (argv[1]). Its exit code says both: HUB_UNREACHABLE or
#: HUB_SERVER_ERROR (else 0) for the hub, plus BINDERHUB_ANSWERED when
#: BinderHub took the connection.
_REACH = (
    "import socket, sys, urllib.request, urllib.error\n"
    "code = 0\n"
    "if len(sys.argv) > 2:\n"
    "    host, _, port = sys.argv[2].rpartition(':')\n"
    "    try:\n"
    "        socket.create_connection((host.strip('[]'), int(port)), timeout=10).close()\n"
    "        code = 8\n"
    "    except OSError:\n"
    "        pass\n"
    "try:\n"
    "    urllib.request.urlopen(sys.argv[1], timeout=20).read()\n"
    "except urllib.error.HTTPError as e:\n"
    "    sys.exit(code + (0 if e.code < 500 else 4))\n"
    "except Exception as e:\n"
    "    print(e, file=sys.stderr); sys.exit(code + 3)\n"
    "sys.exit(code)\n"
)
HUB_UNREACHABLE, HUB_SERVER_ERROR, BINDERHUB_ANSWERED = 3, 4, 8


def reach_job_argv(scheduler, url, name, partition="", python="python3", walltime_min=2, qstat="qstat", binderhub=""):
    """The submit command for a job that GETs `url` from a compute node (and
    tries to connect to `binderhub`, host:port, first) and whose exit code
    says what it could reach (the submit command waits)."""
    wrap = shlex.join([python, "-c", _REACH, url] + ([binderhub] if binderhub else []))
    if scheduler == "pbs":
        return pbs.probe_job_argv(wrap, name, partition, walltime_min, qstat)
    return slurm.probe_job_argv(wrap, name, partition, walltime_min)


@dataclass
class ComputeProbe:
    """What the doctor's job on a compute node saw: its exit code (None:
    it did not run; `failure` says why), how long from submission, and
    where it was sent."""

    rc: "int | None"
    seconds: float = 0.0
    failure: str = ""
    where: str = ""
    url: str = ""
    binderhub: str = ""

    @property
    def binderhub_answered(self):
        return self.rc is not None and self.rc in {
            BINDERHUB_ANSWERED + c for c in (0, HUB_UNREACHABLE, HUB_SERVER_ERROR)
        }

    @property
    def hub_rc(self):
        return self.rc - BINDERHUB_ANSWERED if self.binderhub_answered else self.rc


def probe_from_compute(
    scheduler,
    hub_api_url,
    partition="",
    user=None,
    python="python3",
    env=None,
    timeout=120,
    qstat="qstat",
    binderhub="",
):
    """Run the doctor's job on a compute node: it reaches for the hub's API
    and for BinderHub's address `binderhub` (host:port; '' not tried)."""
    url = _hub_api(hub_api_url) + "/"
    where = f"partition {partition!r}" if partition else "the default partition"
    name = "binderhub-hpc-doctor-" + secrets.token_hex(4)
    argv = as_user(reach_job_argv(scheduler, url, name, partition, python, qstat=qstat, binderhub=binderhub), user, env)
    probe = ComputeProbe(None, where=where, url=url, binderhub=binderhub)
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd="/"
        )
    except FileNotFoundError as e:
        probe.failure = f"Cannot submit a job: {e}"
        return probe
    except subprocess.TimeoutExpired:
        why = _cancel_named_job(scheduler, name, user, env, qstat)
        probe.failure = f"The test job did not finish within {timeout:g} s ({why}); cancelled it."
        return probe
    probe.seconds = time.monotonic() - t0
    probe.rc = p.returncode
    if p.returncode == 127:
        probe.failure = f"{python} is missing on the compute node: set host_python."
    elif p.returncode not in (0, HUB_UNREACHABLE, HUB_SERVER_ERROR) and not probe.binderhub_answered:
        probe.failure = f"The test job failed (exit {p.returncode}): {_last_line(p.stderr) or _last_line(p.stdout)}"
    return probe


def check_hub_from_compute(
    scheduler, hub_api_url, partition="", user=None, python="python3", env=None, timeout=120, qstat="qstat", probe=None
):
    """A short job on a compute node reaches the hub's API. `probe`: a
    ComputeProbe already run (the BinderHub check shares its job)."""
    if not hub_api_url:
        return WARN, "No hub API URL for compute nodes (c.JupyterHub.hub_connect_ip/url); not checked."
    if probe is None:
        probe = probe_from_compute(scheduler, hub_api_url, partition, user, python, env, timeout, qstat)
    if probe.failure:
        return FAIL, probe.failure
    where, url = probe.where, probe.url
    if probe.hub_rc == 0:
        return OK, f"A job on {where} reached the hub at {url} ({probe.seconds:.1f} s from submission)."
    if probe.hub_rc == HUB_UNREACHABLE:
        return FAIL, (
            f"A job on {where} ran but cannot reach the hub at {url}: set "
            "c.JupyterHub.hub_connect_ip (or hub_connect_url) to an address compute "
            "nodes reach, c.JupyterHub.hub_bind_url so the hub listens on it, and "
            "check firewalls."
        )
    return FAIL, f"A job reached {url} but the hub answered with a server error."


def _loopback(host):
    return host == "localhost" or host == "::1" or host.startswith("127.")


def check_binderhub_from_compute(probe, binderhub):
    """BinderHub's port does not answer a job on a compute node: sessions
    run strangers' code there, and BinderHub's /build/ and /metrics are for
    nginx alone (mybinder.org keeps user pods from BinderHub with network
    policies; a batch cluster's compute nodes need a firewall)."""
    if not binderhub:
        return WARN, "BinderHub's address is unknown (c.BinderHub.port, the hub's 'binder' service); not checked."
    if probe.failure:
        return FAIL, f"Not checked: {probe.failure}"
    if not probe.binderhub_answered:
        return OK, f"A job on {probe.where} cannot connect to BinderHub at {binderhub}."
    if _loopback(binderhub.rpartition(":")[0].strip("[]")):
        return WARN, (
            f"A job on {probe.where} connected to BinderHub at {binderhub}: sessions run on "
            "BinderHub's own host, where no address firewall can keep them off it. Run sessions on "
            "other nodes, or refuse the job accounts' connections to that port on this host "
            "(iptables -m owner)."
        )
    return FAIL, (
        f"A job on {probe.where} connected to BinderHub at {binderhub}: a session can call its "
        "/build/ and /metrics directly, past nginx. On the compute nodes, refuse job accounts' "
        "connections to the service host except the hub's API and the proxy's public port "
        "(docs/howto/deploy.md, 'Compute nodes: sessions reach the hub API only')."
    )


def _cancel_named_job(scheduler, name, user, env, qstat="qstat"):
    """Cancel the doctor's own job (by its unique name); return why it waited."""
    why = "not seen in the queue"
    if scheduler == "pbs":
        rc, out, _ = _run(pbs.named_jobs_argv(name, qstat), env=env, user=user)
        for jid in out.split():
            _, full, _ = _run([qstat, "-f", jid], env=env, user=user)
            why = f"job {jid}: {pbs.comment_of(full) or 'still queued'}"
            _run(pbs.cancel_argv(jid, qstat), env=env, user=user)
        return why
    rc, out, _ = _run(slurm.named_jobs_argv(name), env=env, user=user)
    for jid, state, reason in slurm.parse_named_jobs(out):
        why = f"job {jid} {state.lower()}: {reason}"
        _run(slurm.cancel_argv(jid), env=env, user=user)
    return why


# ------------------------------------------------------------------ deployment


class Deployment:
    """What the checks need, read from traitlets config plus overrides."""

    def __init__(self, config=None, **overrides):
        from .registry import SIFRegistry

        self.config = config if config is not None else Config()
        o = {k: v for k, v in overrides.items() if v not in (None, "")}
        self.env = o.get("env") or dict(os.environ)
        self.scheduler = o.get("scheduler") or self._detect_scheduler()
        self.section = "PBSBinderSpawner" if self.scheduler == "pbs" else "SlurmBinderSpawner"
        self.partition = o.get("partition") or self._spawner(
            "req_queue" if self.scheduler == "pbs" else "req_partition", ""
        )
        self.registry = SIFRegistry(config=self.config)
        if o.get("registry_root"):
            self.registry.root = o["registry_root"]
        self.runtime_name = o.get("runtime") or self._spawner("container_runtime", "")
        self.job_user = o.get("job_user") or self._spawner("job_user", "") or current_user()
        self.build_user = o.get("build_user") or current_user()
        self.host_python = o.get("python") or self._spawner("host_python", "python3")
        self.image = o.get("image")
        self.hub_url = o.get("hub_url") or self._hub_url()
        self.hub_api_url = o.get("hub_api_url") or self._hub_api_url()
        self.token = o.get("token") or self._token()
        self.binderhub = o.get("binderhub") or self._binderhub()
        self.job_timeout = o.get("job_timeout") or 120
        self.qstat = self._qstat()

    def _get(self, section, key, default=None):
        if section in self.config and key in self.config[section]:
            return self.config[section][key]
        return default

    def _spawner(self, key, default):
        for section in (self.section, "BinderBatchMixin", "BatchSpawnerBase", "Spawner"):
            v = self._get(section, key)
            if v is not None:
                return v
        return default

    def _detect_scheduler(self):
        cls = str(self._get("JupyterHub", "spawner_class", ""))
        if "PBS" in cls:
            return "pbs"
        if "Slurm" in cls or shutil.which("sinfo"):
            return "slurm"
        return "pbs" if shutil.which("qstat") else "slurm"

    def _hub_url(self):
        url = self._get("BinderHub", "hub_url")
        if url:
            return url
        if "JupyterHub" not in self.config:
            return ""
        bind = self._get("JupyterHub", "bind_url")
        if bind:
            return bind
        ip = self._get("JupyterHub", "ip") or "127.0.0.1"
        port = self._get("JupyterHub", "port") or 8000
        base = self._get("JupyterHub", "base_url") or "/"
        return f"http://{'127.0.0.1' if ip in ('0.0.0.0', '') else ip}:{port}{base}"

    def _hub_api_url(self):
        """The hub's API as compute nodes reach it (what the spawner gives jobs)."""
        if "JupyterHub" in self.config:
            url = self._get("JupyterHub", "hub_connect_url")
            if url:
                return url
            bind = urllib.parse.urlparse(self._get("JupyterHub", "hub_bind_url") or "")
            ip = (
                self._get("JupyterHub", "hub_connect_ip")
                or self._get("JupyterHub", "hub_ip")
                or (bind.hostname if bind.hostname not in (None, "0.0.0.0", "") else "")
                or "127.0.0.1"
            )
            port = bind.port or self._get("JupyterHub", "hub_port") or 8081
            base = self._get("JupyterHub", "base_url") or "/"
            return f"http://{ip}:{port}{base}"
        return self.hub_url

    def _binderhub(self):
        """BinderHub's address as a compute node would reach it (host:port):
        its port from c.BinderHub.port or the hub's 'binder' service; its
        host that service's, unless loopback (BinderHub beside the hub, as
        the deployment runs it: then the hub's host as compute nodes reach
        it). '' when the configuration does not say."""
        port = self._get("BinderHub", "port")
        host = ""
        for svc in self._get("JupyterHub", "services", []) or []:
            if svc.get("name") in ("binder", "binderhub") and svc.get("url"):
                url = urllib.parse.urlparse(svc["url"])
                port = port or url.port
                if url.hostname and not _loopback(url.hostname):
                    host = url.hostname
        if not port:
            return ""
        host = host or urllib.parse.urlparse(self.hub_api_url).hostname or ""
        if not host:
            return ""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _qstat(self):
        """PBS's qstat as the hub runs it: c.PBSQueue.qstat, else the one
        beside the submit command when that is a full path."""
        qstat = self._get("PBSQueue", "qstat")
        if qstat:
            return qstat
        submit = str(self._spawner("batch_submit_cmd", "") or "").split()
        if self.scheduler == "pbs" and submit and os.sep in submit[0]:
            return os.path.join(os.path.dirname(submit[0]), "qstat")
        return "qstat"

    def _token(self):
        token = self.env.get("JUPYTERHUB_API_TOKEN") or self._get("BinderHub", "hub_api_token")
        if token:
            return token
        for svc in self._get("JupyterHub", "services", []) or []:
            if svc.get("name") in ("binder", "binderhub") and svc.get("api_token"):
                return svc["api_token"]
        return ""

    # -- the parts ---------------------------------------------------------------

    def runtime(self):
        from .spawner.runtime import make_runtime

        return make_runtime(self.runtime_name or None, config=self.config)

    def podman(self):
        from .builder.export import PodmanImage

        return PodmanImage(config=self.config).podman

    def session_image(self):
        """--image to run: a path as given, an image name resolved in the
        registry (as the spawner resolves it, but the file as this host sees
        it), or the name itself when the registry has no such image. An
        invalid name raises InvalidImageName, a failed check."""
        if not self.image or self.image.startswith("/"):
            return self.image
        found = self.registry.entry(self.image).session_image(self.runtime().image_format, compute=False)
        return found or self.image

    def node_count(self):
        if self.scheduler == "slurm":
            return slurm_node_count(self.env)
        try:
            return len(pbs_nodes(self.env, self.qstat))
        except RuntimeError:
            return 0

    def checks(self, job=True):
        """(name, function) for every check, in the order they are reported."""
        rt = self.runtime()
        yield "scheduler", lambda: check_scheduler(self.scheduler, self.env, qstat=self.qstat)
        yield "partition", lambda: check_partition(self.scheduler, self.partition, self.env, qstat=self.qstat)
        yield "runtime", lambda: check_runtime(rt, self.session_image(), self.job_user, self.env)
        yield "registry", lambda: check_registry(self.registry.root, self.build_user, self.job_user)
        yield "registry filesystem", lambda: check_registry_fs(self.registry.root, self.node_count())
        yield "build engine", lambda: check_build_engine(self.podman(), self.build_user, self.env)
        yield "hub API token", lambda: check_hub_token(self.hub_url, self.token)
        if job:

            @functools.cache
            def probed():
                """One job for both checks, run by the first."""
                return probe_from_compute(
                    self.scheduler,
                    self.hub_api_url,
                    self.partition,
                    self.job_user,
                    self.host_python,
                    self.env,
                    self.job_timeout,
                    qstat=self.qstat,
                    binderhub=self.binderhub,
                )

            yield (
                "hub from compute node",
                lambda: check_hub_from_compute(
                    self.scheduler, self.hub_api_url, probe=probed() if self.hub_api_url else None
                ),
            )
            if self.hub_api_url:
                yield "BinderHub from compute node", lambda: check_binderhub_from_compute(probed(), self.binderhub)


def run_checks(checks):
    results = []
    for name, fn in checks:
        t0 = time.monotonic()
        try:
            status, message = fn()
        except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check
            status, message = FAIL, f"{type(e).__name__}: {e}"
        results.append(Result(name, status, message, time.monotonic() - t0))
    return results


# ------------------------------------------------------------------ /health


class HealthChecks(LoggingConfigurable):
    """The doctor's checks for BinderHub's ``/health``, cached.

    Registry and scheduler checks are cheap; ``podman info`` is not, so every
    result is kept for `cache_seconds`, and concurrent requests share one run.
    """

    scheduler = Enum(
        ["slurm", "pbs", ""], "slurm", help="'slurm', 'pbs', or '' to leave the scheduler out of /health."
    ).tag(config=True)
    partition = Unicode("", help="Partition (PBS: queue) that must exist and be up.").tag(config=True)
    cache_seconds = Float(30, help="Seconds a check's result is reused.").tag(config=True)
    min_free_bytes = Integer(10 * GiB, help="Registry free space below which /health warns.").tag(config=True)
    check_build_engine = Enum(
        ["auto", "yes", "no"],
        "auto",
        help="""'yes', 'no' or 'auto': check podman on this host when builds
        run here (LocalRunner), not when they run on a build node.""",
    ).tag(config=True)

    def __init__(self, **kw):
        super().__init__(**kw)
        self._cache = {}

    async def _cached(self, key, fn):
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and (isinstance(hit[1], asyncio.Future) or now - hit[0] < self.cache_seconds):
            return await asyncio.shield(hit[1]) if isinstance(hit[1], asyncio.Future) else hit[1]
        fut = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(None, fn))
        self._cache[key] = (now, fut)
        try:
            status, message = await fut
        except Exception as e:  # noqa: BLE001
            status, message = FAIL, f"{type(e).__name__}: {e}"
        result = {"ok": status != FAIL, "status": status, "message": message}
        self._cache[key] = (time.monotonic(), result)
        return result

    async def registry(self, root, build_user=None):
        return await self._cached(
            ("registry", root), lambda: check_registry(root, build_user, build_user, self.min_free_bytes)
        )

    async def build_engine(self, podman="podman"):
        return await self._cached(("podman", podman), lambda: check_build_engine(podman))

    async def scheduler_status(self):
        from .scheduler.pbs import PBSQueue

        # PBS's commands where the hub's spawner finds them (c.PBSQueue.qstat)
        qstat = PBSQueue(parent=self).qstat

        def both():
            status, message = check_scheduler(self.scheduler, qstat=qstat)
            if status == FAIL or not self.partition:
                return status, message
            return check_partition(self.scheduler, self.partition, qstat=qstat)

        return await self._cached(("scheduler", self.scheduler, self.partition), both)
