"""``python -m binderhub_hpc.builder.guard -- CMD ...``: nothing of CMD outlives the builder.

A builder killed with SIGKILL cannot stop what it started. ``setpriv
--pdeathsig`` covers a direct child only: repo2docker would die, but its
``podman build`` and the ``RUN`` step's container (a session of its own,
under ``buildah-oci-runtime``) would run on. The guard sits between the
builder and CMD:

- ``PR_SET_PDEATHSIG``: the kernel tells it when the builder dies;
- ``PR_SET_CHILD_SUBREAPER``: whatever CMD's processes orphan (a
  double-forked helper, a container whose runtime died) becomes its child,
  so every process of the build stays in its tree;
- on the builder's death it SIGKILLs the whole tree at once; on SIGTERM (a
  stop or a timeout) it passes SIGTERM on, waits ``--grace`` seconds, then
  SIGKILLs what is left; when CMD ends, what it left running goes too;
- ``--cpus``: the build's CPU binding, which every process below inherits;
- umask 022 for the command: the build's files do not depend on the
  account's umask.

Rootless podman's pause process (``podman pause``), which keeps the
account's user namespace for every later podman command and other builds,
is left alone.
"""

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: processes of the account that must outlive any one build
SPARED = {"podman pause", "catatonit"}


def _prctl(option, value):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _children_map():
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(d))
    return children


def descendants(pid):
    """pids below `pid` (in any pid namespace), children first."""
    children = _children_map()
    out, todo = [], list(children.get(pid, ()))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _signal_tree(sig):
    """Send `sig` to every descendant of this process but the spared ones;
    returns how many were signalled."""
    n = 0
    for p in descendants(os.getpid()):
        if _comm(p) in SPARED:
            continue
        try:
            os.kill(p, sig)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_tree():
    """SIGKILL every descendant until none is left (they may fork meanwhile)."""
    for _ in range(50):
        if not _signal_tree(signal.SIGKILL):
            return
        time.sleep(0.02)
        _reap()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    grace = 5.0
    parent = os.getppid()
    while argv and argv[0].startswith("--"):
        opt = argv.pop(0)
        if opt == "--":
            break
        if opt == "--grace":
            grace = float(argv.pop(0))
        elif opt == "--parent":
            parent = int(argv.pop(0))
        elif opt == "--cpus":
            # the build's CPUs: inherited by every process it starts
            os.sched_setaffinity(0, {int(c) for c in argv.pop(0).split(",")})
        else:
            print(f"guard: unknown option {opt}", file=sys.stderr)
            return 2
    if not argv:
        print("guard: no command", file=sys.stderr)
        return 2
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() != parent:  # the builder died before the guard was armed
        return 137

    stopping = {"signal": None, "at": None}

    def on_signal(signum, frame):
        if signum == signal.SIGHUP:  # the builder died: nobody waits for a clean stop
            kill_tree()
            os._exit(137)
        if stopping["signal"] is None:
            stopping["signal"], stopping["at"] = signum, time.monotonic()
            _signal_tree(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    try:
        child = os.fork()
    except OSError as e:
        print(f"guard: cannot fork: {e}", file=sys.stderr)
        return 127
    if child == 0:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        # the clone's files and so the image's get their modes from the
        # repository, not from the account's umask (077 made the repository
        # unreadable to every session account)
        os.umask(0o022)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"{argv[0]}: {e}", file=sys.stderr)
            os._exit(127)

    status = None
    while status is None:
        if stopping["at"] is not None and time.monotonic() - stopping["at"] > grace:
            kill_tree()
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            status = st
        elif pid == 0:
            time.sleep(0.05)
    # CMD is done: nothing it started may run on
    kill_tree()
    if status is None:
        return 1
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def guarded(argv, grace=5.0, cpus=""):
    """`argv` run under the guard (this file, standard library only, run by
    this interpreter), bound to the CPUs in `cpus` ('0,1'; '' for all)."""
    opts = ["--grace", str(grace), "--parent", str(os.getpid())]
    if cpus:
        opts += ["--cpus", cpus]
    return [sys.executable, "-I", os.path.abspath(__file__), *opts, "--", *argv]


if __name__ == "__main__":
    sys.exit(main())
