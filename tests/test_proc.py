"""What /proc says about a process: the dev cluster, the demo and the
build's scratch cleanup decide with these whether a process still runs."""

import os
import subprocess
import sys
import time

from binderhub_hpc.proc import cmdline, pid_alive


def test_a_running_process_is_alive_and_shows_its_command_line():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "marker-arg"])
    try:
        assert pid_alive(p.pid)
        # right after fork the child still shows our command line: wait for its exec
        deadline = time.monotonic() + 10
        while not cmdline(p.pid).endswith("marker-arg") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cmdline(p.pid).endswith("time.sleep(30) marker-arg")
    finally:
        p.kill()
        p.wait()


def test_a_zombie_is_not_alive_and_a_reaped_process_is_gone():
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # exited, not yet reaped: a zombie
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert not pid_alive(p.pid)
    p.wait()
    assert not pid_alive(p.pid) and cmdline(p.pid) == ""


def test_a_process_we_may_not_signal_counts_as_alive(monkeypatch):
    """As an unprivileged account, kill(pid, 0) on another account's process
    raises PermissionError: that process runs."""

    def refused(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    assert pid_alive(os.getpid())
