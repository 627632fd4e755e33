"""One build per image: a lock on the shared filesystem.

POSIX record locks (``fcntl.lockf``) are what NFS, Lustre and GPFS carry
between hosts, and the kernel (or the NFS server's lease) drops them when
their holder dies, so a crashed builder never leaves a lock behind: the next
builder simply gets it. Record locks belong to a process, not to a file
descriptor, so threads of one process are serialised by a thread lock per
path first.

The lock file also records who holds it (host, pid, since), for humans and
for ``binderhub-hpc images``.

Whoever can write the registry directory could plant a symlink (or a FIFO)
where a lock file goes: the file is opened without following a symlink and
refused unless it is a regular file (:func:`binderhub_hpc.safefs.open_regular`),
so a planted link never makes a builder truncate what it points to. Its mode
is set explicitly, whatever the umask.
"""

import fcntl
import json
import os
import socket
import threading
import time

from .safefs import LockFileError, open_regular

__all__ = ["ImageLock", "LockFileError", "LockTimeout", "open_regular"]

_local_locks = {}
#: path -> descriptor through which this process holds the lock
_held_fds = {}
_local_guard = threading.Lock()


def _thread_lock(path):
    with _local_guard:
        return _local_locks.setdefault(os.fspath(path), threading.Lock())


class LockTimeout(TimeoutError):
    pass


class ImageLock:
    """An exclusive lock across threads, processes and hosts sharing `path`."""

    def __init__(self, path, poll_interval=0.2, mode=0o644):
        # one spelling per file, so the per-path thread lock is really per
        # file; the last component stays as it is (a symlink is refused)
        head, tail = os.path.split(os.path.abspath(os.fspath(path)))
        self.path = os.path.join(os.path.realpath(head), tail)
        self.poll_interval = poll_interval
        self.mode = mode
        self._fd = None
        self._tlock = _thread_lock(self.path)

    @property
    def locked(self):
        return self._fd is not None

    def try_acquire(self):
        if self._fd is not None:
            raise RuntimeError("lock already held by this object")
        if not self._tlock.acquire(blocking=False):
            return False
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, self.mode)
        except BaseException:
            self._tlock.release()
            raise
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._tlock.release()
            return False
        self._fd = fd
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        with _local_guard:
            _held_fds[self.path] = fd
        return True

    def acquire(self, timeout=None, stop_event=None, on_wait=None, unneeded=None):
        """Wait for the lock. `on_wait(holder)` is called once if we must wait.

        Raises LockTimeout after `timeout` seconds; returns False if
        `stop_event` is set while waiting, and None as soon as `unneeded()`
        is true (say, the image the holder builds is published), so waiters
        do not file through the lock one by one to learn that.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while not self.try_acquire():
            if not waited and on_wait:
                on_wait(self.holder())
            waited = True
            if stop_event is not None and stop_event.is_set():
                return False
            if unneeded is not None and unneeded():
                return None
            if deadline is not None and time.monotonic() > deadline:
                raise LockTimeout(f"timed out waiting for {self.path} held by {self.holder()}")
            if stop_event is not None:
                stop_event.wait(self.poll_interval)
            else:
                time.sleep(self.poll_interval)
        return True

    def holder(self):
        """Who holds (or last held) the lock, as recorded in the file."""
        # Closing any descriptor of the file drops every record lock this
        # process has on it. So open the file only while no thread of this
        # process holds (or is taking) the lock; otherwise read through the
        # holder's descriptor, which release() stops using under the guard.
        try:
            if self._tlock.acquire(blocking=False):
                try:
                    fd = open_regular(self.path, os.O_RDONLY)
                    try:
                        data = os.pread(fd, 1 << 16, 0)
                    finally:
                        os.close(fd)
                finally:
                    self._tlock.release()
            else:
                with _local_guard:
                    fd = _held_fds.get(self.path)
                    if fd is None:
                        return {}
                    data = os.pread(fd, 1 << 16, 0)
            return json.loads(data)
        except (OSError, ValueError):
            return {}

    def release(self):
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with _local_guard:
            _held_fds.pop(self.path, None)
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._tlock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
