"""The SIF registry: a directory on the shared filesystem that build nodes
write and compute nodes read.

Layout under ``root``::

    images/<repo>/<tag>.sif        the image (Apptainer/Singularity SIF)
    images/<repo>/<tag>.oci.tar    optional OCI archive, for the podman runtime
    images/<repo>/<tag>.json       metadata (repo URL, ref, durations, size,
                                   created, ...)
    images/<repo>/<tag>.used       empty file; its mtime is the last launch
    images/<repo>/<tag>.lock       build lock (see :mod:`binderhub_hpc.lock`)
    images/<repo>/.<tag>.*.tmp     files being written; never read

``<repo>`` and ``<tag>`` come from BinderHub's image name
``prefix/build-slug:ref`` through :func:`escape`, so any string maps to one
safe file name inside the root, and two different names never share one.
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

from traitlets import Enum, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from . import metrics

#: characters that stand for themselves in a file name; everything else,
#: '_' included, is written as ``_hh`` per UTF-8 byte, so the mapping is
#: injective and the result never holds '/', '.', upper case or controls.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
#: escaped components longer than this are shortened to a prefix and a hash;
#: ``_h`` (never produced by the byte escape, whose ``_`` is followed by a hex
#: digit) marks them so a shortened name cannot equal an unshortened one.
MAX_COMPONENT = 160
MAX_IMAGE_NAME = 1024

FORMATS = {"sif": ".sif", "oci-archive": ".oci.tar"}


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

    formats = List(
        Enum(list(FORMATS)),
        minlen=1,
        help="""Image formats every image is published in: 'sif' (Apptainer,
        Singularity) and/or 'oci-archive' (podman). The first is the one whose
        presence means "built".""",
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
        help="Mode of published image files: compute jobs of any account read them.",
    ).tag(config=True)

    # -- names -> paths ---------------------------------------------------

    def _dir(self, name):
        return Path(self.root) / "images" / escape(name)

    def _relpath(self, image, fmt):
        """The path of `image` in `fmt` relative to `root`, checked to stay inside."""
        name, tag = split_image_name(image)
        if fmt not in FORMATS:
            raise ValueError(f"unknown image format {fmt!r}")
        rel = os.path.join("images", escape(name), escape(tag) + FORMATS[fmt])
        # escape() makes leaving the root impossible; kept as the last line
        # of defence, symlinks below the root included.
        if not _inside(self.root, rel):
            raise InvalidImageName(f"Image {image!r} maps outside the registry.")
        return rel

    def path(self, image, fmt="sif"):
        """The path where `image` lives (or would live) in format `fmt`."""
        return Path(self.root) / self._relpath(image, fmt)

    def compute_path(self, image, fmt="sif"):
        """`path` as compute nodes see it."""
        p = self.path(image, fmt)
        if not self.compute_root:
            return p
        return Path(self.compute_root) / p.relative_to(self.root)

    def _sidecar(self, image, suffix):
        return self.path(image).with_suffix(suffix)

    def metadata_path(self, image):
        return self._sidecar(image, ".json")

    def lock_path(self, image):
        return self._sidecar(image, ".lock")

    def used_path(self, image):
        return self._sidecar(image, ".used")

    # -- lookup -------------------------------------------------------------

    def exists(self, image):
        """True when `image` is published in every configured format."""
        try:
            root = self.root
            return all(
                os.path.isfile(os.path.join(root, self._relpath(image, f)))
                for f in self.formats
            )
        except InvalidImageName:
            return False

    def lookup(self, image, fmt=None):
        """The published file of `image`, or None. Raises InvalidImageName."""
        fmt = fmt or self.formats[0]
        p = self.path(image, fmt)
        return p if p.is_file() else None

    def metadata(self, image):
        try:
            with open(self.metadata_path(image)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def touch(self, image):
        """Record a launch of `image` (last use, for eviction)."""
        p = self.used_path(image)
        try:
            p.touch()
            os.utime(p)
        except OSError as e:
            # compute nodes may mount the registry read-only: last use is
            # then recorded by the hub side, which calls this too
            self.log.debug("Could not record use of %s: %s", image, e)

    # -- publish ------------------------------------------------------------

    def tempfile(self, image, fmt="sif"):
        """A new, empty temporary file beside the final path of `image`.

        Same directory, so the rename in :meth:`publish` is atomic; its name
        starts with '.' and ends with '.tmp' so nothing lists or runs it.
        """
        final = self.path(image, fmt)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=".tmp", dir=final.parent
        )
        os.close(fd)
        return Path(tmp)

    def publish(self, image, files, metadata=None):
        """Atomically move finished temporary files into place.

        `files` maps format -> temporary path (from :meth:`tempfile`). Each is
        fsynced, chmodded and renamed over its final name; the directory is
        fsynced so the rename survives a crash. The primary format goes last,
        so an image counts as built only when everything is in place.
        """
        metadata = dict(metadata or {})
        order = sorted(files, key=lambda f: f == self.formats[0])
        size = 0
        for fmt in order:
            tmp = Path(files[fmt])
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, self.file_mode)
            size += tmp.stat().st_size
        metadata.setdefault("image", image)
        metadata.setdefault("size", size)
        metadata.setdefault("created", time.time())
        metadata["formats"] = sorted(files)
        meta_tmp = self._write_temp_json(image, metadata)
        os.replace(meta_tmp, self.metadata_path(image))
        for fmt in order:
            os.replace(files[fmt], self.path(image, fmt))
        self.used_path(image).touch()
        _fsync_dir(self.path(image).parent)
        return self.path(image, self.formats[0])

    def _write_temp_json(self, image, data):
        final = self.metadata_path(image)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=".tmp", dir=final.parent
        )
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, self.file_mode)
        return tmp

    def discard(self, *paths):
        """Remove temporary files; missing ones are fine."""
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def remove_stale_temporaries(self, older_than=3600):
        """Remove temporary files left by crashed builds; returns how many."""
        now = time.time()
        removed = 0
        for p in (Path(self.root) / "images").glob("*/.*.tmp"):
            try:
                if now - p.stat().st_mtime > older_than:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    # -- listing and eviction -------------------------------------------------

    def images(self):
        """Every published image, least recently used first."""
        records = []
        base = Path(self.root) / "images"
        primary = FORMATS[self.formats[0]]
        if not base.is_dir():
            return records
        for d in base.iterdir():
            for p in d.glob("*" + primary):
                if p.name.startswith("."):
                    continue
                meta_p = p.with_name(p.name[: -len(primary)] + ".json")
                try:
                    meta = json.loads(meta_p.read_text())
                except (OSError, json.JSONDecodeError):
                    meta = {}
                image = meta.get("image", str(p.relative_to(base)))
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                size = sum(
                    _size(p.with_name(p.name[: -len(primary)] + ext))
                    for ext in FORMATS.values()
                )
                used = p.with_name(p.name[: -len(primary)] + ".used")
                last_used = _mtime(used) or st.st_mtime
                records.append(
                    ImageRecord(image, p, size, meta.get("created", st.st_mtime), last_used, meta)
                )
        records.sort(key=lambda r: r.last_used)
        metrics.REGISTRY_IMAGES.set(len(records))
        metrics.REGISTRY_BYTES.set(sum(r.size for r in records))
        return records

    def total_size(self):
        return sum(r.size for r in self.images())

    def remove(self, image):
        """Delete every file of `image`."""
        for fmt in FORMATS:
            self.discard(self.path(image, fmt))
        self.discard(self.metadata_path(image), self.used_path(image))

    def _remove_files(self, path):
        """Delete every file beside the primary-format file `path`."""
        stem = path.name[: -len(FORMATS[self.formats[0]])]
        exts = [FORMATS[self.formats[0]], *FORMATS.values(), ".json", ".used"]
        self.discard(*(path.with_name(stem + ext) for ext in exts))

    def evict(self, max_size=None, in_use=()):
        """Evict least recently used images until the registry fits `max_size`.

        Images named in `in_use` (running sessions) are never removed.
        Returns the evicted records.
        """
        max_size = self.max_size if max_size is None else max_size
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
        for r in records:
            if total <= max_size:
                break
            if r.path in busy:
                continue
            self.log.info("Evicting %s (%d bytes, last used %s)", r.image, r.size, time.ctime(r.last_used))
            self._remove_files(r.path)
            total -= r.size
            evicted.append(r)
        metrics.REGISTRY_EVICTIONS.inc(len(evicted))
        return evicted


def _inside(root, rel):
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
    for part in full[len(prefix):].split(os.sep):
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


def _size(p):
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(p):
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
