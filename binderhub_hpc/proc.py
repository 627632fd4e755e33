"""Scheduler commands as async subprocesses: argv lists (never a shell),
a timeout, and their latency and failures in the metrics; and what /proc
says about a process."""

import asyncio
import os
import time

from . import metrics


class CommandError(RuntimeError):
    def __init__(self, argv, returncode, stderr):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{os.path.basename(argv[0])} exited {returncode}: {stderr.strip()}")


async def run(argv, input=None, env=None, timeout=30, label=None, binary=False):
    """Run `argv`, return stdout as text (as bytes with `binary`); raise
    CommandError or TimeoutError."""
    label = label or os.path.basename(argv[0])
    start = time.perf_counter()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as e:
        metrics.SCHEDULER_COMMAND_ERRORS.labels(label).inc()
        raise CommandError(argv, 127, str(e)) from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        metrics.SCHEDULER_COMMAND_ERRORS.labels(label).inc()
        raise
    finally:
        metrics.SCHEDULER_COMMAND_SECONDS.labels(label).observe(time.perf_counter() - start)
    if proc.returncode:
        metrics.SCHEDULER_COMMAND_ERRORS.labels(label).inc()
        raise CommandError(argv, proc.returncode, err.decode(errors="replace"))
    return out if binary else out.decode(errors="replace")


def pid_alive(pid):
    """Whether process `pid` runs (another account's counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid):
    """Process `pid`'s command line, its arguments joined by spaces ('' when gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
