"""The image lock with real processes and threads: a dead holder never
leaves a stale lock, and there is never more than one holder at a time."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from binderhub_hpc.lock import ImageLock, LockTimeout

REPO = str(Path(__file__).resolve().parent.parent)

# A child process that takes the lock, says so, and keeps it until killed
# or until stdin closes.
HOLDER = """
import sys
from binderhub_hpc.lock import ImageLock
lock = ImageLock(sys.argv[1], poll_interval=0.01)
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""

# A child process that only tries: prints True or False.
TRY = """
import sys
from binderhub_hpc.lock import ImageLock
lock = ImageLock(sys.argv[1])
print(lock.try_acquire(), flush=True)
"""

# Contention: threads take the lock, check no one else is inside through an
# O_EXCL marker file, and increment a counter file.
CONTEND = """
import os, sys, threading, time
from binderhub_hpc.lock import ImageLock

def critical(marker, counter, violations):
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        violations.append(1)
        fd = None
    with open(counter) as f:
        n = int(f.read() or 0)
    time.sleep(0.0005)
    with open(counter, "w") as f:
        f.write(str(n + 1))
    if fd is not None:
        os.close(fd)
        os.unlink(marker)

def worker(path, marker, counter, rounds, violations, start):
    start.wait()
    for _ in range(rounds):
        lock = ImageLock(path, poll_interval=0.002)
        # on_wait reads the holder while another thread holds the lock
        lock.acquire(timeout=120, on_wait=lambda holder: None)
        try:
            critical(marker, counter, violations)
        finally:
            lock.release()

def run(path, marker, counter, threads, rounds, start=None):
    violations = []
    start = start or threading.Event()
    ts = [threading.Thread(target=worker, args=(path, marker, counter, rounds, violations, start))
          for _ in range(threads)]
    for t in ts:
        t.start()
    start.set()
    for t in ts:
        t.join()
    return len(violations)

if __name__ == "__main__":
    path, marker, counter, threads, rounds, go = sys.argv[1:]
    while not os.path.exists(go):
        time.sleep(0.001)
    sys.exit(min(run(path, marker, counter, int(threads), int(rounds)), 100))
"""


def child(code, *args, **kw):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


def other_process_can_lock(path):
    p = child(TRY, path)
    out, _ = p.communicate(timeout=30)
    return out.strip() == "True"


@pytest.fixture
def held(tmp_path):
    """A lock file held by a child process; yields (path, process)."""
    path = tmp_path / "images" / "repo" / "tag.lock"
    p = child(HOLDER, path)
    assert p.stdout.readline().strip() == "locked"
    yield path, p
    if p.poll() is None:
        p.kill()
    p.wait()


def test_sigkilled_holder_leaves_no_stale_lock(held):
    path, p = held
    lock = ImageLock(path, poll_interval=0.01)
    assert not lock.try_acquire()
    assert lock.holder()["pid"] == p.pid
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    assert lock.acquire(timeout=5)
    assert time.monotonic() - t0 < 0.5
    assert lock.holder()["pid"] == os.getpid()
    assert not other_process_can_lock(path)
    lock.release()
    assert other_process_can_lock(path)


def test_holder_shows_host_and_pid(held):
    path, p = held
    h = ImageLock(path).holder()
    assert h["host"] == socket.gethostname()
    assert h["pid"] == p.pid
    assert time.time() - 60 < h["since"] <= time.time()
    assert ImageLock(path.with_name("never-locked.lock")).holder() == {}


def test_timeout_raises(held):
    path, p = held
    lock = ImageLock(path, poll_interval=0.02)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as e:
        lock.acquire(timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert str(path) in str(e.value) and str(p.pid) in str(e.value)
    assert not lock.locked


def test_timeout_within_one_process(tmp_path):
    path = tmp_path / "a.lock"
    with ImageLock(path):
        with pytest.raises(LockTimeout):
            ImageLock(path, poll_interval=0.01).acquire(timeout=0.1)


def test_stop_event_returns_false(held):
    path, p = held
    stop = threading.Event()
    # a long poll interval: the event, not the next poll, ends the wait
    lock = ImageLock(path, poll_interval=30)
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert lock.acquire(timeout=60, stop_event=stop) is False
    assert time.monotonic() - t0 < 2
    assert not lock.locked
    assert lock.acquire(stop_event=stop) is False  # already set: at once


def test_on_wait_called_once_with_holder(held):
    path, p = held
    seen = []
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    ImageLock(path, poll_interval=0.01).acquire(stop_event=stop, on_wait=seen.append)
    assert [h["pid"] for h in seen] == [p.pid]


def test_reading_holder_in_holding_process_keeps_lock(tmp_path):
    """POSIX record locks are dropped when the process closes *any*
    descriptor of the file: reading the holder must not do that."""
    path = tmp_path / "a.lock"
    lock = ImageLock(path)
    assert lock.try_acquire()
    try:
        assert lock.holder()["pid"] == os.getpid()
        assert not other_process_can_lock(path)
        assert ImageLock(path).holder()["pid"] == os.getpid()
        assert not other_process_can_lock(path)
        # another thread waiting for it reads the holder too
        stop = threading.Event()
        seen = []
        t = threading.Thread(
            target=ImageLock(path, poll_interval=0.01).acquire,
            kwargs=dict(stop_event=stop, on_wait=seen.append),
        )
        t.start()
        time.sleep(0.1)
        stop.set()
        t.join()
        assert seen and seen[0]["pid"] == os.getpid()
        assert not other_process_can_lock(path)
    finally:
        lock.release()
    assert other_process_can_lock(path)


def test_threads_in_one_process_are_exclusive(tmp_path):
    path = tmp_path / "a.lock"
    a, b = ImageLock(path), ImageLock(path)
    assert a.try_acquire()
    assert not b.try_acquire()
    with pytest.raises(RuntimeError):
        a.try_acquire()
    a.release()
    a.release()  # twice is harmless
    assert b.try_acquire()
    b.release()
    with a:
        assert a.locked
    assert not a.locked


def test_threads_and_processes_never_hold_together(tmp_path):
    path = tmp_path / "images" / "repo" / "tag.lock"
    marker = tmp_path / "inside"
    counter = tmp_path / "counter"
    counter.write_text("0")
    go = tmp_path / "go"
    threads, rounds, procs, proc_threads = 20, 10, 3, 4
    children = [child(CONTEND, path, marker, counter, proc_threads, rounds, go) for _ in range(procs)]
    ns = {}
    exec(compile(CONTEND.replace('if __name__ == "__main__":', "if False:"), "contend", "exec"), ns)
    go.touch()
    violations = ns["run"](str(path), str(marker), str(counter), threads, rounds)
    codes = [c.wait(timeout=180) for c in children]
    assert violations == 0
    assert codes == [0] * procs
    assert int(counter.read_text()) == threads * rounds + procs * proc_threads * rounds
    assert not marker.exists()


def test_two_spellings_of_one_path_are_one_lock(tmp_path, monkeypatch):
    """A relative and an absolute (or symlinked) name of the same lock file
    must exclude each other inside one process too."""
    from binderhub_hpc.lock import ImageLock

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    a = ImageLock("real/x.lock")
    b = ImageLock(tmp_path / "link" / "x.lock")
    c = ImageLock("bare.lock")
    assert a.try_acquire()
    try:
        assert not b.try_acquire()
        assert c.try_acquire()
        c.release()
    finally:
        a.release()
    assert b.try_acquire()
    b.release()


def test_waiter_leaves_as_soon_as_the_lock_is_unneeded(tmp_path):
    """A waiter whose goal is reached (the image got published) stops
    waiting at once, without taking the lock."""
    import threading

    from binderhub_hpc.lock import ImageLock

    holder = ImageLock(tmp_path / "x.lock")
    assert holder.try_acquire()
    done = threading.Event()
    threading.Timer(0.3, done.set).start()
    waiter = ImageLock(tmp_path / "x.lock", poll_interval=0.05)
    try:
        assert waiter.acquire(timeout=10, unneeded=done.is_set) is None
        assert not waiter.locked
    finally:
        holder.release()
    assert waiter.acquire(timeout=1, unneeded=lambda: False) is True
    waiter.release()


# --------------------------------------------------------------- hostile lock files


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    """Whoever can write the registry directory must not be able to make a
    builder truncate and overwrite another file through a lock symlink."""
    from binderhub_hpc.lock import LockFileError

    precious = tmp_path / "precious"
    precious.write_text("keep me")
    lock_dir = tmp_path / "images" / "repo"
    lock_dir.mkdir(parents=True)
    (lock_dir / "tag.lock").symlink_to(precious)
    (lock_dir / "dangling.lock").symlink_to(tmp_path / "created-through-link")
    for name in ("tag.lock", "dangling.lock"):
        lock = ImageLock(lock_dir / name, poll_interval=0.01)
        with pytest.raises(LockFileError, match="not a regular file"):
            lock.acquire(timeout=1)
        assert not lock.locked
        assert lock.holder() == {}
    assert precious.read_text() == "keep me"
    assert not (tmp_path / "created-through-link").exists()
    # the per-path thread lock was given back: a real lock file works again
    (lock_dir / "tag.lock").unlink()
    with ImageLock(lock_dir / "tag.lock") as lock:
        assert lock.holder()["pid"] == os.getpid()


def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path):
    from binderhub_hpc.lock import LockFileError

    fifo = tmp_path / "fifo.lock"
    os.mkfifo(fifo)
    (tmp_path / "dir.lock").mkdir()
    for path in (fifo, tmp_path / "dir.lock"):
        lock = ImageLock(path)
        with pytest.raises(LockFileError, match="not a regular file"):
            lock.try_acquire()
        assert not lock.locked
        assert lock.holder() == {}


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_lock_file_mode_does_not_depend_on_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        for mode in (0o644, 0o664):
            path = tmp_path / f"{mode:o}" / "tag.lock"
            with ImageLock(path, mode=mode):
                assert (path.stat().st_mode & 0o7777) == mode
    finally:
        os.umask(old)
