"""The SIF registry: a directory on the shared filesystem that build nodes
write and compute nodes read.

Layout under ``root``::

    images/<repo>/<tag>.sif        the image (Apptainer/Singularity SIF)
    images/<repo>/<tag>.oci.tar    optional OCI archive (both runtimes run the SIF)
    images/<repo>/<tag>.json       metadata (repo URL, ref, durations, size,
                                   created, ...)
    images/<repo>/<tag>.used       empty file; its mtime is the last launch
    images/<repo>/<tag>.lock       build lock (see :mod:`binderhub_hpc.lock`)
    images/<repo>/.<tag>.*.tmp     files being written; never read

``<repo>`` and ``<tag>`` come from BinderHub's image name
``prefix/build-slug:ref`` through :func:`escape`, so any string maps to one
safe file name inside the root, and two different names never share one.
Work on one image goes through its :class:`RegistryEntry`
(:meth:`SIFRegistry.entry`), which validates the name once; the methods of
:class:`SIFRegistry` that take a name are thin wrappers over it.

Whoever can write the registry could plant symlinks in it. Lookups may pass
symlinks that stay inside the root (checked by :func:`binderhub_hpc.safefs.inside`); listing,
eviction and cleanup never follow one (directories are opened with
``O_NOFOLLOW`` and walked relative to their descriptor, files are lstat'ed
and unlinked by name), and ``.used``/lock files are opened with
``O_NOFOLLOW``, so a planted link never makes us touch, list or delete what
it points to (the calls live in :mod:`binderhub_hpc.safefs`). Directories and files get `dir_mode`/`file_mode` whatever the
umask of the process that made them.
"""

import errno
import functools
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from traitlets import Enum, Float, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from . import metrics, sif
from .faults import fault_point
from .lock import ImageLock
from .safefs import fsync_dir, inside, lstat_mtime, makedirs, open_dir, open_regular, remove, rmtree_at

#: characters that stand for themselves in a file name; everything else,
#: '_' included, is written as ``_hh`` per UTF-8 byte, so the mapping is
#: injective and the result never holds '/', '.', upper case or controls.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
#: escaped components longer than this are shortened to a prefix and a hash;
#: ``_h`` (never produced by the byte escape, whose ``_`` is followed by a hex
#: digit) marks them so a shortened name cannot equal an unshortened one.
MAX_COMPONENT = 160
MAX_IMAGE_NAME = 1024
#: metadata files are a few KB; a larger one is damaged, not read into memory
MAX_METADATA = 1 << 20

FORMATS = {"sif": ".sif", "oci-archive": ".oci.tar"}
#: every file of an image but its lock, which a builder may hold
_IMAGE_FILE_SUFFIXES = (*FORMATS.values(), ".json", ".used")


def sif_complete(fd, size):
    """Whether the open file `fd` of `size` bytes is a whole SIF, as
    :func:`binderhub_hpc.sif.check` (the one SIF reader) tells."""
    return _sif_root(fd, size) is not None


def _sif_root(fd, size):
    """The root partition of the whole SIF `fd` of `size` bytes, or None:
    kept with the check's answer, so a session's mount offset costs no
    second read of the header."""
    try:
        return sif.check(fd, size)
    except sif.SIFError:
        return None


def tar_complete(fd, size):
    """Whether the open file `fd` of `size` bytes looks like a whole tar
    archive (an OCI archive): whole 512-byte blocks, a ustar header first
    and the two zero blocks that end an archive last."""
    if size < 1536 or size % 512:
        return False
    return os.pread(fd, 5, 257) == b"ustar" and os.pread(fd, 1024, size - 1024) == bytes(1024)


#: format -> check(fd, size) of a complete file: a true value (for SIF, its
#: root partition) when whole, a false one when not
_FILE_CHECKS = {"sif": _sif_root, "oci-archive": tar_complete}


class RegistryFull(OSError):
    """The registry's filesystem is full (or the build account over its
    quota) while publishing; the message is for a person."""


class InvalidImageName(ValueError):
    """An image name that cannot be an image of this registry.

    The message is meant for the person who clicked the Binder link.
    """


@functools.lru_cache(maxsize=4096)
def escape(component):
    """Map any string to a file name made of ``[a-z0-9_-]``, injectively."""
    out = []
    for ch in component:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    escaped = "".join(out)
    if len(escaped) > MAX_COMPONENT:
        digest = hashlib.sha256(component.encode("utf-8", "surrogatepass")).hexdigest()
        escaped = escaped[: MAX_COMPONENT - 67] + "_h" + digest
    return escaped


def split_image_name(image):
    """Split ``name:tag`` into its two parts, refusing what is not an image name."""
    if not isinstance(image, str) or not image:
        raise InvalidImageName("No image name was given.")
    if len(image) > MAX_IMAGE_NAME:
        raise InvalidImageName(f"Image name is longer than {MAX_IMAGE_NAME} characters.")
    if re.search(r"[\x00-\x1f\x7f]", image):
        raise InvalidImageName("Image name contains control characters.")
    if re.search("[\ud800-\udfff]", image):
        # not text (no URL decodes to it); the metadata's JSON would also
        # turn a surrogate pair into another name than the one published
        raise InvalidImageName("Image name is not valid Unicode text.")
    name, sep, tag = image.rpartition(":")
    if not sep or not name or not tag or "/" in tag:
        raise InvalidImageName(f"Image name {image!r} is not of the form name:tag.")
    return name, tag


@dataclass(frozen=True)
class ImageRecord:
    """One image in the registry, as listed by :meth:`SIFRegistry.images`."""

    image: str
    path: Path
    size: int
    created: float
    last_used: float
    metadata: dict


class SIFRegistry(LoggingConfigurable):
    """Images as files on a shared filesystem, addressed by BinderHub's image names."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        #: files already warned about (damaged metadata, broken images)
        self._warned = set()
        #: path -> ((dev, ino, size, mtime_ns), complete?)
        self._checked = {}
        #: image -> time.monotonic() of the last use this process recorded
        self._touched = {}

    root = Unicode(
        "/var/lib/binderhub-hpc/registry",
        help="""Directory on the shared filesystem holding the images.

        Build nodes write it, compute nodes read it; it must be the same path
        on both (or set `compute_root` for the compute nodes' view).
        """,
    ).tag(config=True)

    compute_root = Unicode(
        "",
        help="""The registry root as compute nodes see it, when it is mounted
        at another path there. Empty means the same as `root`.""",
    ).tag(config=True)

    max_size = Integer(
        0,
        help="""Size quota in bytes for `gc`: least recently used images are
        evicted until the registry fits. 0 means no quota.""",
    ).tag(config=True)

    grace_period = Float(
        3600,
        help="""Seconds after its last recorded use (or its publication)
        during which `gc` never evicts an image. Uses are recorded when
        BinderHub finds the image for a launch, when `gc` learns from the hub
        that a server runs it, and at publication; this covers a launch the
        hub does not list yet and hubs `gc` cannot ask. Keep it well above the
        time between `gc` runs and any clock skew between hosts.""",
    ).tag(config=True)

    formats = List(
        Enum(list(FORMATS)),
        minlen=1,
        help="""Image formats every image is published in: 'sif' (what
        Apptainer, Singularity and podman, through squashfuse, run) and/or
        'oci-archive' (an OCI archive beside it, for other tools). The first
        is the one whose presence means "built".""",
    ).tag(config=True)

    @default("formats")
    def _default_formats(self):
        return ["sif"]

    @validate("formats")
    def _validate_formats(self, proposal):
        formats = list(proposal.value)
        if len(set(formats)) != len(formats):
            raise TraitError(f"c.SIFRegistry.formats lists a format twice: {formats!r}")
        return formats

    file_mode = Integer(
        0o644,
        help="""Mode of the files the registry writes (images, metadata, `.used`,
        locks), set explicitly whatever the umask: compute jobs of any
        account read them.""",
    ).tag(config=True)

    dir_mode = Integer(
        0o2775,
        help="""Mode of the directories the registry makes, set explicitly
        whatever the umask: writable by the build accounts' group, setgid so
        what they write keeps that group, readable by every job account.""",
    ).tag(config=True)

    # -- names -> entries -> paths -----------------------------------------

    def entry(self, image):
        """The :class:`RegistryEntry` of `image`; raises InvalidImageName."""
        return RegistryEntry(self, image)

    def _dir(self, name):
        return Path(self.root) / "images" / escape(name)

    # the per-image methods below are the entry's, for callers with a name

    def path(self, image, fmt="sif"):
        """The path where `image` lives (or would live) in format `fmt`."""
        return self.entry(image).path(fmt)

    def compute_path(self, image, fmt="sif"):
        """`path` as compute nodes see it."""
        return self.entry(image).compute_path(fmt)

    def metadata_path(self, image):
        return self.entry(image).metadata_path

    def lock_path(self, image):
        return self.entry(image).lock_path

    def used_path(self, image):
        return self.entry(image).used_path

    def lock(self, image, **kwargs):
        """The build lock of `image` (not taken), its directory made."""
        return self.entry(image).lock(**kwargs)

    def _makedirs(self, path):
        """Make `path` and its missing parents with `dir_mode`."""
        makedirs(path, self.dir_mode)

    # -- lookup -------------------------------------------------------------

    def exists(self, image):
        """True when `image` is published, complete, in every configured format."""
        try:
            return self.entry(image).complete()
        except InvalidImageName:
            return False

    def lookup(self, image, fmt=None):
        """The published, complete file of `image`, or None. Raises InvalidImageName."""
        return self.entry(image).lookup(fmt)

    def complete(self, path, fmt):
        """Whether `path` is a whole file of `fmt` (see :data:`_FILE_CHECKS`).

        A 0-byte or truncated image would otherwise count as built forever
        and never be rebuilt. The answer is cached by the file's identity
        (device, inode, size, mtime): a publish renames a new inode into
        place, so a lookup costs one stat() and reads a header only once per
        file version.
        """
        return bool(self._check(path, fmt))

    def _check(self, path, fmt):
        """What :data:`_FILE_CHECKS` found in `path` (false when it is not a
        whole file of `fmt`), cached as :meth:`complete` says."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._checked.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            st = os.fstat(fd)  # the file we read, even if replaced since the stat
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            found = stat.S_ISREG(st.st_mode) and _FILE_CHECKS[fmt](fd, st.st_size)
        except OSError:
            return False
        finally:
            os.close(fd)
        if len(self._checked) >= 100_000:
            self._checked.clear()
        self._checked[path] = (key, found)
        if not found:
            self._warn_once(
                (path, key), "%s is not a complete %s file (truncated or damaged): it counts as absent", path, fmt
            )
        return found

    def metadata(self, image):
        """The metadata of `image` as a dict; {} when absent or damaged."""
        return self.entry(image).metadata()

    def _read_metadata(self, path):
        try:
            with open(path, "rb") as f:
                return self._parse_metadata(f, path)
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn_once(path, "Ignoring unreadable image metadata %s: %s", path, e)
            return {}

    def _parse_metadata(self, f, path):
        """A metadata file's JSON object. Anything else (not UTF-8, not JSON,
        not an object, absurdly large) counts as absent, with one warning per
        file: one damaged file must not break lookups, listings or gc."""
        data = f.read(MAX_METADATA + 1)
        if len(data) > MAX_METADATA:
            why = f"larger than {MAX_METADATA} bytes"
        else:
            try:
                meta = json.loads(data.decode("utf-8"))
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError
                why = str(e)[:200]
            else:
                if isinstance(meta, dict):
                    return meta
                why = f"a JSON {type(meta).__name__}, not an object"
        self._warn_once(path, "Ignoring damaged image metadata %s: %s", path, why)
        return {}

    def _warn_once(self, key, msg, *args):
        if key not in self._warned:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned.add(key)
            self.log.warning(msg, *args)

    def touch(self, image, min_interval=0):
        """Record a use of `image` (its last use, for eviction); never raises.

        See :meth:`RegistryEntry.touch`.
        """
        try:
            entry = self.entry(image)
        except InvalidImageName as e:
            self.log.debug("Could not record use of %s: %s", image, e)
            return
        entry.touch(min_interval)

    # -- publish ------------------------------------------------------------

    def tempfile(self, image, fmt="sif"):
        """See :meth:`RegistryEntry.tempfile`."""
        return self.entry(image).tempfile(fmt)

    def publish(self, image, files, metadata=None):
        """See :meth:`RegistryEntry.publish`."""
        return self.entry(image).publish(files, metadata)

    def discard(self, *paths):
        """Remove temporary files (or directories) we made; missing ones are fine."""
        for p in paths:
            remove(p)

    def remove_stale_temporaries(self, older_than=3600):
        """Remove what crashed builds left (temporary files and directories,
        the apptainer converter's ``.apptainer-*``) unchanged for
        `older_than` seconds; returns how many."""
        now = time.time()
        removed = 0
        for _, fd, entries in self._image_dirs():
            for e in entries:
                if not (e.name.startswith(".") and (e.name.endswith(".tmp") or e.name.startswith(".apptainer-"))):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                    if now - st.st_mtime <= older_than:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        rmtree_at(fd, e.name)
                    else:
                        os.unlink(e.name, dir_fd=fd)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # -- listing and eviction -------------------------------------------------

    def _image_dirs(self):
        """Yield ``(name, dir_fd, entries)`` for every image directory.

        Never through a symlink: ``images`` and each directory below it are
        opened with O_NOFOLLOW and read relative to their descriptor, so what
        is listed (and removed through `dir_fd`) is inside the root. The
        descriptor is closed when the caller moves on.
        """
        base = open_dir(os.path.join(self.root, "images"), log=self.log)
        if base is None:
            return
        try:
            with os.scandir(base) as it:
                names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            for name in names:
                fd = open_dir(name, dir_fd=base, log=self.log)
                if fd is None:
                    continue
                try:
                    with os.scandir(fd) as it:
                        entries = list(it)
                    yield name, fd, entries
                finally:
                    os.close(fd)
        finally:
            os.close(base)

    def _open_image_dir(self, dirname):
        """The descriptor of ``images/<dirname>``, not through a symlink, or None."""
        base = open_dir(os.path.join(self.root, "images"), log=self.log)
        if base is None:
            return None
        try:
            return open_dir(dirname, dir_fd=base, log=self.log)
        finally:
            os.close(base)

    def images(self):
        """Every published image, least recently used first."""
        records = []
        primary = FORMATS[self.formats[0]]
        base = Path(self.root) / "images"
        for name, fd, entries in self._image_dirs():
            regular = {}
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    regular[e.name] = st
            for fname, st in regular.items():
                if fname.startswith(".") or not fname.endswith(primary):
                    continue
                stem = fname[: -len(primary)]
                meta = self._read_metadata_at(fd, name, stem + ".json")
                created = meta.get("created")
                if isinstance(created, bool) or not isinstance(created, (int, float)):
                    created = st.st_mtime
                size = sum(regular[stem + ext].st_size for ext in FORMATS.values() if stem + ext in regular)
                used = regular.get(stem + ".used")
                last_used = used.st_mtime if used else st.st_mtime
                records.append(
                    ImageRecord(
                        self._record_name(meta, name, fname), base / name / fname, size, created, last_used, meta
                    )
                )
        records.sort(key=lambda r: r.last_used)
        metrics.REGISTRY_IMAGES.set(len(records))
        metrics.REGISTRY_BYTES.set(sum(r.size for r in records))
        return records

    def _read_metadata_at(self, dir_fd, dirname, name):
        """`metadata` for the file `name` below `dir_fd`, not through a symlink."""
        path = Path(self.root) / "images" / dirname / name
        try:
            fd = open_regular(name, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn_once(path, "Ignoring unreadable image metadata %s: %s", path, e)
            return {}
        with os.fdopen(fd, "rb") as f:
            return self._parse_metadata(f, path)

    def _record_name(self, meta, dirname, fname):
        """The image name a listed file stands for: its metadata's, when that
        is a name and maps to this very file; else the file's own path."""
        image = meta.get("image")
        if isinstance(image, str):
            try:
                name, tag = split_image_name(image)
                if (escape(name), escape(tag) + FORMATS[self.formats[0]]) == (dirname, fname):
                    return image
            except InvalidImageName:
                pass
        return f"{dirname}/{fname}"

    def total_size(self):
        return sum(r.size for r in self.images())

    def remove(self, image):
        """Delete every file of `image` (but its lock)."""
        self.entry(image).remove()

    def _remove_files(self, dirname, stem):
        """Unlink ``images/<dirname>/<stem>.*`` by name, never through a
        symlink; the primary format first, so the image stops counting as
        built before its other files go."""
        fd = self._open_image_dir(dirname)
        if fd is None:
            return
        primary = FORMATS[self.formats[0]]
        try:
            for suffix in sorted(_IMAGE_FILE_SUFFIXES, key=lambda s: s != primary):
                try:
                    os.unlink(stem + suffix, dir_fd=fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)

    def evict(self, max_size=None, in_use=(), grace_period=None):
        """Evict least recently used images until the registry fits `max_size`.

        Images named in `in_use` (sessions' images) and images used or
        published within `grace_period` seconds are never removed; the last
        use is read again just before a removal, so a lookup during gc keeps
        its image. Returns the evicted records.
        """
        max_size = self.max_size if max_size is None else max_size
        grace = self.grace_period if grace_period is None else grace_period
        if not max_size:
            return []
        # by path: a record whose metadata is damaged has no usable name
        busy = set()
        for image in in_use:
            try:
                busy.add(self.path(image, self.formats[0]))
            except InvalidImageName:
                pass
        records = self.images()
        total = sum(r.size for r in records)
        evicted = []
        primary = FORMATS[self.formats[0]]
        for r in records:
            if total <= max_size:
                break
            if r.path in busy:
                continue
            stem = r.path.name[: -len(primary)]
            if time.time() - max(r.last_used, lstat_mtime(r.path.with_name(stem + ".used"))) < grace:
                continue
            self.log.info("Evicting %s (%d bytes, last used %s)", r.image, r.size, time.ctime(r.last_used))
            self._remove_files(r.path.parent.name, stem)
            total -= r.size
            evicted.append(r)
        if total > max_size:
            self.log.warning(
                "Registry still holds %d bytes, over its quota of %d: the rest is in use "
                "or was used within the last %.0f s",
                total,
                max_size,
                grace,
            )
        metrics.REGISTRY_EVICTIONS.inc(len(evicted))
        return evicted


class RegistryEntry:
    """One image of a registry, its name validated once: where its files
    are, whether it is published, its build lock, its publication and what a
    session job runs.

    Made by :meth:`SIFRegistry.entry` for one lookup or one build. The
    launch side composes lookups from it (BinderHub's manifest, the
    spawner's :meth:`session_image`, the doctor), so a launch validates the
    name once, checks a path for symlinks leaving the root once per format
    (cached in the entry: make a new entry per lookup, not one per process)
    and reads a SIF header at most once: the registry caches the check's
    answer, root partition included, per file version.
    """

    def __init__(self, registry, image):
        name, tag = split_image_name(image)
        self.registry = registry
        self.image = image
        #: the image's directory below ``images/`` and its files' stem
        self.dirname = escape(name)
        self.stem = escape(tag)
        self._paths = {}

    def __repr__(self):
        return f"<RegistryEntry {self.image!r} in {self.registry.root}>"

    # -- paths ------------------------------------------------------------

    def path(self, fmt=None):
        """The path where the image lives (or would live) in format `fmt`
        (default: the registry's primary format); raises InvalidImageName
        when a symlink below the root makes it leave the root."""
        fmt = fmt or self.registry.formats[0]
        p = self._paths.get(fmt)
        if p is None:
            if fmt not in FORMATS:
                raise ValueError(f"unknown image format {fmt!r}")
            rel = os.path.join("images", self.dirname, self.stem + FORMATS[fmt])
            # escape() makes leaving the root impossible; kept as the last
            # line of defence, symlinks below the root included.
            if not inside(self.registry.root, rel):
                raise InvalidImageName(f"Image {self.image!r} maps outside the registry.")
            p = self._paths[fmt] = Path(self.registry.root) / rel
        return p

    def compute_path(self, fmt=None):
        """:meth:`path` as compute nodes see it."""
        p = self.path(fmt)
        if not self.registry.compute_root:
            return p
        return Path(self.registry.compute_root) / p.relative_to(self.registry.root)

    def _sidecar(self, suffix):
        return self.path("sif").with_suffix(suffix)

    @property
    def metadata_path(self):
        return self._sidecar(".json")

    @property
    def lock_path(self):
        return self._sidecar(".lock")

    @property
    def used_path(self):
        return self._sidecar(".used")

    # -- lookup -------------------------------------------------------------

    def complete(self, fmt=None):
        """Whether the image is published and whole in `fmt`; without
        `fmt`, in every configured format (what "built" means)."""
        formats = [fmt] if fmt else self.registry.formats
        return all(self.registry.complete(os.fspath(self.path(f)), f) for f in formats)

    def lookup(self, fmt=None):
        """The published, complete file in `fmt` (default: the primary
        format), or None."""
        fmt = fmt or self.registry.formats[0]
        p = self.path(fmt)
        return p if self.registry.complete(os.fspath(p), fmt) else None

    def session_image(self, fmt=None, compute=True):
        """What a session job runs: a
        :class:`~binderhub_hpc.spawner.runtime.SessionImage` (the file as
        compute nodes see it, or as this host does with ``compute=False``,
        and where its root filesystem starts), or None when the image is not
        published whole in `fmt` (default: the primary format).

        The header read that tells a whole SIF also finds its root
        partition, so this reads it at most once (never, when the registry
        already checked this version of the file); formats that are not SIF
        start at offset 0.
        """
        from .spawner.runtime import SessionImage

        fmt = fmt or self.registry.formats[0]
        path = self.path(fmt)
        found = self.registry._check(os.fspath(path), fmt)
        if not found:
            return None
        offset = found.offset if isinstance(found, sif.Partition) else 0
        return SessionImage(str(self.compute_path(fmt) if compute else path), offset)

    def metadata(self):
        """The image's metadata as a dict; {} when absent or damaged."""
        return self.registry._read_metadata(self.metadata_path)

    def touch(self, min_interval=0):
        """Record a use of the image (its last use, for eviction); never raises.

        Only accounts that may write the registry can: BinderHub's lookup
        before every launch, `gc` for the images the hub's servers use, and
        publish. `min_interval`: skip when this process recorded a use of
        the image that many seconds ago or less (a lookup need not write the
        shared filesystem on every launch).
        """
        reg = self.registry
        now = time.monotonic()
        last = reg._touched.get(self.image)
        if last is not None and now - last < min_interval:
            return
        try:
            fd = open_regular(self.used_path, os.O_WRONLY | os.O_CREAT, reg.file_mode)
            try:
                os.utime(fd)
            finally:
                os.close(fd)
        except (OSError, InvalidImageName) as e:
            reg.log.debug("Could not record use of %s: %s", self.image, e)
            return
        if len(reg._touched) >= 100_000:
            reg._touched.clear()
        reg._touched[self.image] = now

    # -- build and publish ----------------------------------------------------

    def lock(self, **kwargs):
        """The image's build lock (not taken), its directory made."""
        path = self.lock_path
        self.registry._makedirs(path.parent)
        return ImageLock(path, mode=self.registry.file_mode, **kwargs)

    def tempfile(self, fmt="sif"):
        """A new, empty temporary file beside the final path in `fmt`.

        Same directory, so the rename in :meth:`publish` is atomic; its name
        starts with '.' and ends with '.tmp' so nothing lists or runs it.
        """
        final = self.path(fmt)
        self.registry._makedirs(final.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        return Path(tmp)

    def publish(self, files, metadata=None):
        """Atomically move finished temporary files into place.

        `files` maps format -> temporary path (from :meth:`tempfile`). Each is
        fsynced, chmodded and renamed over its final name; the directory is
        fsynced so the rename survives a crash. The primary format goes last,
        so an image counts as built only when everything is in place.
        """
        reg = self.registry
        image = self.image
        metadata = dict(metadata or {})
        order = sorted(files, key=lambda f: f == reg.formats[0])
        size = 0
        # everything that writes comes before the first rename: a full
        # filesystem (which NFS may report only at fsync) leaves the
        # previous image and its metadata as they were
        try:
            for fmt in order:
                tmp = Path(files[fmt])
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, reg.file_mode)
                size += tmp.stat().st_size
            metadata.setdefault("image", image)
            metadata.setdefault("size", size)
            metadata.setdefault("created", time.time())
            metadata["formats"] = sorted(files)
            meta_tmp = self._write_temp_json(metadata)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise RegistryFull(
                e.errno,
                f"No space left on the registry filesystem ({os.strerror(e.errno)}) while "
                f"publishing {image} in {self.path('sif').parent}: nothing was replaced; "
                "free space or lower the quota (binderhub-hpc gc)",
            ) from e
        os.replace(meta_tmp, self.metadata_path)
        fault_point("publish:metadata")
        for fmt in order:
            os.replace(files[fmt], self.path(fmt))
            fault_point(f"publish:{fmt}")
        self.touch()
        fsync_dir(self.path("sif").parent)
        return self.path(reg.formats[0])

    def _write_temp_json(self, data):
        final = self.metadata_path
        self.registry._makedirs(final.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, self.registry.file_mode)
        except BaseException:
            self.registry.discard(tmp)
            raise
        return tmp

    def remove(self):
        """Delete every file of the image (but its lock)."""
        self.registry._remove_files(self.dirname, self.stem)
