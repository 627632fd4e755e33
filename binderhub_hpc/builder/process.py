"""Running one step of a build as a process group: its output line by
line, and a stop, a timeout or a limit that ends the whole group.

Every build command (repo2docker, the converters, a remote runner's ssh)
runs through :func:`run_streaming`, so each one stops the same way: SIGTERM
to its process group, SIGKILL after a grace period, and nothing of the
group left behind.
"""

import os
import queue
import signal
import subprocess
import threading
import time

from .limits import BuildLimitExceeded


class BuildCancelled(Exception):
    """The build was asked to stop."""


class BuildTimeout(TimeoutError):
    """A step of the build ran longer than allowed."""


def kill_group(proc, grace):
    """SIGTERM the process group, SIGKILL it after `grace` seconds (plus a
    margin: a guard at its top stops its own tree after `grace`)."""
    for sig, wait in ((signal.SIGTERM, grace + 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # the leader is gone; make sure no member of its group lingers
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def run_streaming(
    argv,
    on_line,
    *,
    env=None,
    stop_event=None,
    timeout=None,
    kill_grace=5,
    what="command",
    cwd=None,
    stdin=None,
    watch=None,
):
    """Run argv in its own process group, feeding each output line to on_line.

    Stdout and stderr are merged. Returns the exit code; on stop or timeout
    the whole process group is killed and BuildCancelled / BuildTimeout raised.
    `watch(proc)` is called as output is read and at least every 0.2 s; what
    it raises (BuildLimitExceeded) stops the process group the same way.
    """
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    if stdin is not None:
        try:
            proc.stdin.write(stdin.encode() if isinstance(stdin, str) else stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    lines = queue.Queue()

    def reader():
        try:
            for raw in proc.stdout:
                lines.put(raw.decode("utf-8", "replace"))
        finally:
            lines.put(None)

    t = threading.Thread(target=reader, daemon=True, name=f"{what}-output")
    t.start()
    deadline = None if not timeout else time.monotonic() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                on_line(line)
            if stop_event is not None and stop_event.is_set():
                kill_group(proc, kill_grace)
                raise BuildCancelled(f"{what} stopped on request")
            if deadline is not None and time.monotonic() > deadline:
                kill_group(proc, kill_grace)
                raise BuildTimeout(f"{what} timed out after {timeout:.0f} s")
            if watch is not None:
                try:
                    watch(proc)
                except BuildLimitExceeded:
                    kill_group(proc, kill_grace)
                    raise
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            kill_group(proc, 0.5)
        raise
    finally:
        t.join(1)
        proc.stdout.close()
