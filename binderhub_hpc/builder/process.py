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
    on_stderr=None,
):
    """Run argv in its own process group, feeding each output line to on_line.

    Stdout and stderr are merged, unless `on_stderr` is given: then stderr's
    lines go to it, apart (a remote build's stderr is shown, never parsed).
    Both are called from this thread. Returns the exit code; on stop or timeout
    the whole process group is killed and BuildCancelled / BuildTimeout raised.
    `watch(proc)` is called as output is read and at least every 0.2 s; what
    it raises (BuildLimitExceeded) stops the process group the same way.
    """
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if on_stderr is None else subprocess.PIPE,
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
    streams = [(proc.stdout, on_line, "output")]
    if on_stderr is not None:
        streams.append((proc.stderr, on_stderr, "stderr"))

    def reader(stream, handler):
        try:
            for raw in stream:
                lines.put((handler, raw.decode("utf-8", "replace")))
        finally:
            lines.put(None)

    threads = [
        threading.Thread(target=reader, args=(stream, handler), daemon=True, name=f"{what}-{name}")
        for stream, handler, name in streams
    ]
    for t in threads:
        t.start()
    open_streams = len(threads)
    deadline = None if not timeout else time.monotonic() + timeout
    try:
        while True:
            try:
                item = lines.get(timeout=0.2)
            except queue.Empty:
                item = ()
            if item is None:
                open_streams -= 1
                if not open_streams:
                    break
            elif item:
                item[0](item[1])
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
        for t in threads:
            t.join(1)
        for stream, _, _ in streams:
            stream.close()
