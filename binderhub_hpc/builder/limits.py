"""Bounds on a build: memory, CPUs, scratch disk, image and published size.

A build runs a stranger's Dockerfile on a shared build node; a timeout alone
does not stop it from filling the node's memory or disk. The limits here are
enforced by binderhub-hpc itself, rootless and without cgroup delegation
(which rootless podman on cgroup v1 cannot use):

- ``cpus``: every process of the build is bound to that many CPUs
  (``sched_setaffinity`` in the guard, inherited by podman and the RUN
  steps' processes: ``nproc`` inside a RUN step says so);
- ``memory``: the resident memory of the build's whole process tree
  (repo2docker, git, podman, the RUN steps' processes) is read every
  ``poll_interval`` seconds; above the limit the build is stopped;
- ``scratch``: what the build's scratch filesystems (podman's storage and
  the build's scratch directory) gained since the build started; above the
  limit the build is stopped. It counts everything written there meanwhile,
  so with several concurrent builds on one node set it with that in mind,
  or give builds a filesystem of their own;
- ``image_size``: the built podman image; ``published_size``: the files
  that would be published (SIF, OCI archive). Checked before converting and
  before publishing.

A hard ceiling belongs to the scheduler: with ``SlurmBatchRunner`` give the
build job ``--mem``/``--cpus-per-task`` (``c.SlurmBatchRunner.extra_sbatch_args``)
on a partition whose ``task/cgroup`` enforces them; these limits then stop
the build with a clear message before the kernel's OOM killer does.
"""

import os
import re
import time

from traitlets import Float, Integer, List, TraitError, TraitType, Unicode, validate
from traitlets.config import LoggingConfigurable

from .guard import descendants


class BuildLimitExceeded(RuntimeError):
    """A build went over a limit; the message is for the Binder log."""


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*", re.I)


def parse_size(text):
    """Bytes from ``10G``, ``512M``, ``1.5g``, ``100`` (powers of 1024)."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    mult = 1024 ** ("kmgtp".find(m.group(2).lower()) + 1) if m.group(2) else 1
    return int(float(m.group(1)) * mult)


def format_size(n):
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n} bytes"


class ByteSize(TraitType):
    """A size in bytes: an integer or a string such as ``8G`` or ``512M``; 0 is no limit."""

    default_value = 0
    info_text = "a size in bytes (an integer, or a string such as '8G' or '512M')"

    def validate(self, obj, value):
        if isinstance(value, bool):
            self.error(obj, value)
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except ValueError:
                self.error(obj, value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or value < 0:
            self.error(obj, value)
        return value


def _rss(pid):
    """Resident bytes of a process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_memory(pid):
    """Resident bytes of `pid` and everything below it. Shared pages count
    once per process: the figure errs on the high side."""
    return _rss(pid) + sum(_rss(p) for p in descendants(pid))


def _used(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class Watchdog:
    """Checks a running build's process tree and scratch against the limits.

    Called with the build's top process (the guard) from the loop that
    reads its output; checks at most once per `interval` seconds and
    raises BuildLimitExceeded.
    """

    def __init__(self, memory=0, scratch=0, scratch_paths=(), interval=1.0):
        self.memory = memory
        self.scratch = scratch
        self.interval = interval
        self.peak_memory = 0
        self.peak_scratch = 0
        self._next = 0.0
        self._filesystems = {}
        for p in scratch_paths if scratch else ():
            try:
                dev = os.stat(p).st_dev
            except OSError:
                continue
            self._filesystems.setdefault(dev, (p, _used(p)))

    @property
    def active(self):
        return bool(self.memory or self._filesystems)

    def __call__(self, proc):
        now = time.monotonic()
        if now < self._next or proc.poll() is not None:
            return
        self._next = now + self.interval
        if self.memory:
            used = tree_memory(proc.pid)
            self.peak_memory = max(self.peak_memory, used)
            if used > self.memory:
                raise BuildLimitExceeded(
                    f"the build used {format_size(used)} of memory, more than the "
                    f"{format_size(self.memory)} a build may use: it was stopped "
                    "(c.BuildLimits.memory)"
                )
        if self._filesystems:
            grown = sum(max(0, _used(p) - start) for p, start in self._filesystems.values())
            self.peak_scratch = max(self.peak_scratch, grown)
            if grown > self.scratch:
                raise BuildLimitExceeded(
                    f"the build wrote {format_size(grown)} to the build node's scratch disk, more "
                    f"than the {format_size(self.scratch)} a build may use: it was stopped "
                    "(c.BuildLimits.scratch)"
                )

    def figures(self):
        out = {}
        if self.memory:
            out["peak_memory"] = self.peak_memory
        if self._filesystems:
            out["peak_scratch"] = self.peak_scratch
        return out


class BuildLimits(LoggingConfigurable):
    """What one build may use (0: no limit). See the module's docstring."""

    memory = ByteSize(
        0,
        help="""Resident memory of the build's processes (repo2docker, git,
        podman, the RUN steps), e.g. '4G'. Above it the build is stopped with
        a message in the Binder log. 0: no limit.""",
    ).tag(config=True)

    cpus = Integer(
        0,
        min=0,
        help="""CPUs a build may use: its processes (RUN steps
        included) are bound to that many of the CPUs this process may use.
        0: all.""",
    ).tag(config=True)

    scratch = ByteSize(
        0,
        help="""Disk a build may write to the build node's scratch
        filesystems (podman's storage, the build's scratch directory), e.g.
        '20G': what those filesystems gained since the build started. Above
        it the build is stopped. 0: no limit.""",
    ).tag(config=True)

    scratch_paths = List(
        Unicode(),
        help="""Directories whose filesystems `scratch` measures
        (default: podman's storage and the build's scratch directory).""",
    ).tag(config=True)

    image_size = ByteSize(
        0,
        help="""Largest podman image a build may produce (its size as podman
        reports it), checked before the conversion. 0: no limit.""",
    ).tag(config=True)

    published_size = ByteSize(
        0,
        help="""Largest total of the files a build publishes to the registry
        (the SIF, and the OCI archive where published), checked before
        publishing. 0: no limit.""",
    ).tag(config=True)

    poll_interval = Float(1.0, help="Seconds between two checks of a running build's memory and scratch.").tag(
        config=True
    )

    @validate("poll_interval")
    def _validate_poll_interval(self, proposal):
        if proposal["value"] <= 0:
            raise TraitError("BuildLimits.poll_interval must be positive")
        return proposal["value"]

    def cpu_list(self):
        """The CPUs a build is bound to ('' for no binding)."""
        if not self.cpus:
            return ""
        allowed = sorted(os.sched_getaffinity(0))
        return ",".join(map(str, allowed[: self.cpus]))

    def watchdog(self, scratch_paths=()):
        return Watchdog(self.memory, self.scratch, list(self.scratch_paths) or list(scratch_paths), self.poll_interval)

    def check_image(self, size):
        if self.image_size and size > self.image_size:
            raise BuildLimitExceeded(
                f"the built image is {format_size(size)}, more than the "
                f"{format_size(self.image_size)} an image may be: not published (c.BuildLimits.image_size)"
            )

    def check_published(self, size):
        if self.published_size and size > self.published_size:
            raise BuildLimitExceeded(
                f"the image's files are {format_size(size)}, more than the "
                f"{format_size(self.published_size)} the registry takes for one image: not published "
                "(c.BuildLimits.published_size)"
            )
