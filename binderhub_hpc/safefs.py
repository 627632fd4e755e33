"""Filesystem calls that a planted symlink cannot redirect.

Whoever can write the registry directory could plant a symlink (or a FIFO,
or a directory) where the registry expects one of its own files. Every call
here refuses to follow one: files are opened with ``O_NOFOLLOW`` and refused
unless regular, directories are opened with ``O_NOFOLLOW`` and walked
relative to their descriptor, entries are lstat'ed and unlinked by name. So
a planted link never makes a builder truncate, list, touch or delete what it
points to. Modes are set explicitly, whatever the umask of the process that
creates a file or directory: jobs of other accounts read them.

The registry (:mod:`binderhub_hpc.registry`) and the build lock
(:mod:`binderhub_hpc.lock`) both use these; keeping them in one place keeps
one answer to "does this follow a symlink?".
"""

import errno
import os
import stat
from pathlib import Path


class LockFileError(OSError):
    """The path is a symlink or not a regular file: refused, not followed.

    (Named after its first user, the build lock; every caller of
    :func:`open_regular` gets it.)
    """


#: open flags for regular files: never through a symlink, never blocking on
#: a FIFO, never inherited by the build's child processes
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: a directory opened for walking: never through a symlink
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_regular(path, flags, mode=0o644, dir_fd=None):
    """``os.open`` that refuses symlinks and anything but a regular file.

    A file this process creates gets exactly `mode`, whatever the umask.
    """
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockFileError(e.errno, f"{path} is a symlink, not a regular file") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise LockFileError(e.errno, f"{path} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LockFileError(errno.EINVAL, f"{path} is not a regular file")
        if flags & os.O_CREAT and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(path, dir_fd=None, log=None):
    """Open a directory for walking, refusing a symlink; None if it is not one."""
    try:
        return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if log is not None:
            log.warning("Not walking %s: a symlink or not a directory", path)
        return None


def rmtree_at(dir_fd, name):
    """Remove directory `name` below `dir_fd` and what it holds, following no symlink."""
    fd = open_dir(name, dir_fd=dir_fd)
    if fd is None:
        os.unlink(name, dir_fd=dir_fd)
        return
    try:
        with os.scandir(fd) as it:
            entries = list(it)
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                rmtree_at(fd, e.name)
            else:
                os.unlink(e.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def remove(path):
    """Remove the file or directory tree `path`, following no symlink (a
    symlink itself is unlinked); a missing one is fine."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            rmtree_at(None, path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def lstat_mtime(path):
    """The mtime of `path` itself (not of a symlink's target); 0 if missing."""
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0


def makedirs(path, mode):
    """Make `path` and its missing parents with exactly `mode`, whatever the umask."""
    missing = []
    path = Path(path)
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # made meanwhile by another builder, who sets its mode
        os.chmod(d, mode)  # mkdir's mode went through the umask


def inside(root, rel):
    """Whether `root`/`rel`, symlinks resolved, is inside `root`, resolved.

    The answer of resolving both paths (which lookups used to do, at one
    lstat per component, twice, before every launch) with one lstat per
    existing component below the root: without symlinks there, the lexical
    answer is the real one.
    """
    base = os.path.abspath(root)
    prefix = base.rstrip(os.sep) + os.sep
    full = os.path.normpath(os.path.join(base, rel))
    if not full.startswith(prefix):
        return False
    cur = base
    for part in full[len(prefix) :].split(os.sep):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return True  # nothing below exists, so no symlink either
        except OSError:
            break
        if stat.S_ISLNK(st.st_mode):
            break
    else:
        return True
    # a symlink (or an unreadable component) below the root: resolve it all
    real_prefix = os.path.realpath(base).rstrip(os.sep) + os.sep
    return (os.path.realpath(full) + os.sep).startswith(real_prefix)


def fsync_dir(path):
    """fsync the directory `path`, so a rename in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
