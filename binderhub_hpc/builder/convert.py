"""Converting a built image into a SIF file.

Two converters, chosen by :func:`make_converter` (``converter = 'auto'``):

``SquashfsSIFConverter`` (default when ``mksquashfs`` and ``siftool`` exist)
    reads the image root straight from ``podman image mount`` and writes one
    squashfs with ``mksquashfs``; Apptainer's ``/.singularity.d`` metadata
    (environment from the image ENV, runscript from ENTRYPOINT/CMD,
    labels.json, action scripts, the ``/singularity`` symlinks) comes from a
    mksquashfs *pseudo file*: each entry adds a file, directory or symlink to
    the squashfs root, so the image root is never copied or modified. Entries
    that the image already has (``/etc/hosts``, ``/tmp`` ...) are skipped by
    mksquashfs; an existing ``/.singularity.d`` (an image made from a SIF) is
    excluded and replaced by ours. ``siftool`` then wraps the squashfs into a
    SIF as the primary system partition, as Apptainer lays it out.

``ApptainerConverter`` (when ``apptainer``/``singularity`` is on PATH and
chosen, or when the squashfs tools are missing)
    runs ``apptainer build <sif> oci-archive:<archive>``; needs the OCI
    archive, which costs a ``podman save``.

Compression: zstd at level 3 is about ten times faster than mksquashfs's
default gzip for the same size (2.8 s vs 31 s on an 815 MB image, 2 cores),
but a runtime must be able to read it (Apptainer >= 1.1 with squashfuse or a
kernel >= 4.14). ``compressor = 'auto'`` picks zstd unless
``runtime_supports_zstd`` is False or mksquashfs lacks it, then gzip.
"""

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from traitlets import Bool, Enum, Float, Integer, List, Unicode
from traitlets.config import LoggingConfigurable

from ..faults import fault_point
from .environment import build_environment
from .export import ROOTFS_PLACEHOLDER, ExportError
from .guard import guarded
from .process import run_streaming

#: siftool --partarch codes (``siftool add --help``)
SIF_ARCH = {
    "i386": 1,
    "i686": 1,
    "x86_64": 2,
    "amd64": 2,
    "armv7l": 3,
    "arm": 3,
    "aarch64": 4,
    "arm64": 4,
    "ppc64": 5,
    "ppc64le": 6,
    "mips": 7,
    "mipsel": 8,
    "mips64": 9,
    "mips64el": 10,
    "s390x": 11,
    "riscv64": 12,
}
SIF_DATATYPE_PARTITION = 4
SIF_PARTTYPE_PRIMSYS = 2
SIF_PARTFS_SQUASH = 1
SIF_GROUP = 1


#: what SquashfsSIFConverter.compressor may be: mksquashfs's compressors, or auto
COMPRESSORS = ("auto", "zstd", "gzip", "xz", "lz4", "lzo", "lzma")


class ConversionError(RuntimeError):
    pass


class DiskFullError(ConversionError):
    pass


# -- /.singularity.d ------------------------------------------------------------

_SOURCE_ENV = """for script in /.singularity.d/env/*.sh; do
    if [ -f "$script" ]; then
        . "$script"
    fi
done
"""

_ACTIONS = {
    "exec": "#!/bin/sh\n" + _SOURCE_ENV + '\nexec "$@"\n',
    "run": "#!/bin/sh\n"
    + _SOURCE_ENV
    + """
if test -x /.singularity.d/runscript; then
    exec /.singularity.d/runscript "$@"
fi
echo "No runscript found, executing /bin/sh"
exec /bin/sh "$@"
""",
    "shell": "#!/bin/sh\n"
    + _SOURCE_ENV
    + """
for shell in "${APPTAINER_SHELL:-}" "${SINGULARITY_SHELL:-}" /bin/bash /bin/sh; do
    if test -n "$shell" && test -x "$shell"; then
        SHELL="$shell"
        export SHELL
        exec "$shell" "$@"
    fi
done
echo "ERROR: no shell found in the container" 1>&2
exit 1
""",
    "start": "#!/bin/sh\n# wake the instance's PID 1\nkill -CONT 1\n"
    + _SOURCE_ENV
    + """
if test -x /.singularity.d/startscript; then
    exec /.singularity.d/startscript
fi
""",
    "test": "#!/bin/sh\n"
    + _SOURCE_ENV
    + """
if test -x /.singularity.d/test; then
    exec /.singularity.d/test "$@"
fi
exec /bin/sh -c true
""",
}

_ENV_FILES = {
    "01-base.sh": "#!/bin/sh\n# base environment (empty; the image's own is in 10-docker2singularity.sh)\n",
    "90-environment.sh": "#!/bin/sh\n# Custom environment shell code should follow\n\n",
    "99-base.sh": """#!/bin/sh
if [ -z "${LD_LIBRARY_PATH:-}" ]; then
    LD_LIBRARY_PATH="/.singularity.d/libs"
else
    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"
fi
PS1="Apptainer> "
export LD_LIBRARY_PATH PS1
""",
    "99-runtimevars.sh": """#!/bin/sh
# --env PREPEND_PATH / APPEND_PATH / PATH given to the runtime
if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PREPEND_PATH}:${PATH}"
fi
if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
    PATH="${PATH}:${SING_USER_DEFINED_APPEND_PATH}"
fi
if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PATH}"
fi
unset SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH SING_USER_DEFINED_PATH
export PATH
""",
}

#: symlinks in the image root, as Apptainer makes them
_SYMLINKS = {
    "singularity": ".singularity.d/runscript",
    ".run": ".singularity.d/actions/run",
    ".exec": ".singularity.d/actions/exec",
    ".shell": ".singularity.d/actions/shell",
    ".test": ".singularity.d/actions/test",
    "environment": ".singularity.d/env/90-environment.sh",
}

#: mount points the runtime needs; mksquashfs skips those the image has
_DIRS = ["dev", "proc", "sys", "tmp", "home", "root", "etc", "var", "var/tmp"]
_BIND_FILES = ["etc/hosts", "etc/resolv.conf"]


def _dq(value):
    """Quote for the inside of a double-quoted sh string."""
    out = value
    for ch in ("\\", '"', "$", "`"):
        out = out.replace(ch, "\\" + ch)
    return out


_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_script(env):
    """``10-docker2singularity.sh`` from an image's ENV list.

    PATH is set outright (the image's PATH is what its programs need);
    other variables keep a value given to the runtime (``--env``), as
    Apptainer's own conversion does.
    """
    lines = ["#!/bin/sh"]
    for item in env:
        key, sep, value = item.partition("=")
        # a shell can name only ASCII identifiers ("café" is a Python one)
        if not sep or not _SHELL_NAME.fullmatch(key):
            continue
        if key == "PATH":
            lines.append(f'export PATH="{_dq(value)}"')
        else:
            lines.append(f'export {key}="${{{key}:-"{_dq(value)}"}}"')
    return "\n".join(lines) + "\n"


def runscript(entrypoint, cmd):
    """``/.singularity.d/runscript``: ENTRYPOINT with CMD as default arguments."""
    entry = " ".join(shlex.quote(a) for a in entrypoint)
    default = " ".join(shlex.quote(a) for a in cmd) or ("/bin/sh" if not entrypoint else "")
    lines = ["#!/bin/sh", "# from the image's ENTRYPOINT and CMD"]
    if default:
        lines += ['if [ "$#" -eq 0 ]; then', f"    set -- {default}", "fi"]
    lines.append(f'exec {entry} "$@"' if entry else 'exec "$@"')
    return "\n".join(lines) + "\n"


def singularity_files(config, extra_labels=None):
    """Everything under /.singularity.d: {relative path: (mode, text or None)}.

    None marks a directory.
    """
    labels = dict(config.labels)
    labels.update(extra_labels or {})
    files = {
        ".singularity.d": (0o755, None),
        ".singularity.d/actions": (0o755, None),
        ".singularity.d/env": (0o755, None),
        ".singularity.d/libs": (0o755, None),
        ".singularity.d/env/10-docker2singularity.sh": (0o755, env_script(config.env)),
        ".singularity.d/runscript": (0o755, runscript(config.entrypoint, config.cmd)),
        ".singularity.d/startscript": (0o755, "#!/bin/sh\n"),
        ".singularity.d/labels.json": (0o644, json.dumps(labels, indent=4, sort_keys=True) + "\n"),
    }
    for name, text in _ENV_FILES.items():
        files[f".singularity.d/env/{name}"] = (0o755, text)
    for name, text in _ACTIONS.items():
        files[f".singularity.d/actions/{name}"] = (0o755, text)
    return files


def _pseudo_quote(path):
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_overlay(config, workdir, extra_labels=None, rootfs=None):
    """Write the metadata files under `workdir` and the mksquashfs pseudo file
    that places them (and the symlinks, mount points) in the image root.

    Returns the pseudo file's path. Files are added with pseudo ``l``
    (hard link to a host file): mksquashfs reads them, nothing is copied.
    Mount points the image already has are left out when `rootfs` is given
    (mksquashfs would skip them anyway, with a warning each).
    """

    def missing(rel):
        return rootfs is None or not os.path.lexists(os.path.join(rootfs, rel))

    workdir = Path(workdir)
    files_dir = workdir / "files"
    lines = []
    for rel, (mode, text) in singularity_files(config, extra_labels).items():
        if text is None:
            lines.append(f"{_pseudo_quote('/' + rel)} d {mode:o} 0 0")
            continue
        host = files_dir / rel.replace("/", "__")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(text)
        os.chmod(host, mode)
        lines.append(f"{_pseudo_quote('/' + rel)} l {host}")
    for d in filter(missing, _DIRS):
        mode = 0o1777 if d in ("tmp", "var/tmp") else 0o755
        lines.append(f"{_pseudo_quote('/' + d)} d {mode:o} 0 0")
    empty = files_dir / "empty"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("")
    os.chmod(empty, 0o644)
    for f in filter(missing, _BIND_FILES):
        lines.append(f"{_pseudo_quote('/' + f)} l {empty}")
    for name, target in _SYMLINKS.items():
        if not missing(name):
            continue
        lines.append(f"{_pseudo_quote('/' + name)} s 777 0 0 {target}")
    pseudo = workdir / "pseudo"
    pseudo.write_text("\n".join(lines) + "\n")
    return pseudo


def mksquashfs_supports(compressor, mksquashfs="mksquashfs"):
    try:
        out = subprocess.run([mksquashfs, "-help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = out.stdout + out.stderr
    start = text.find("Compressors available")
    return start >= 0 and f"\t{compressor}" in text[start : start + 400]


def _no_space_left(path):
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize < 1024 * 1024
    except OSError:
        return False


class ConversionSource:
    """What a converter may read: the podman image, its config, an archive."""

    def __init__(self, image, config, podman, oci_archive=None):
        self.image = image
        self.config = config
        self.podman = podman
        self.oci_archive = oci_archive


class Converter(LoggingConfigurable):
    name = "converter"
    needs_oci_archive = False

    timeout = Float(3600, help="Seconds before the conversion is killed.").tag(config=True)

    def convert(self, source, dest, on_log=None, stop_event=None):
        raise NotImplementedError

    def info(self):
        return {"converter": self.name}

    def _run(self, argv, on_log, stop_event, what, dest):
        output = []

        def collect(line):
            output.append(line)
            if on_log:
                on_log(line)

        # under the guard: a killed builder leaves no writer behind, not even
        # below `podman unshare`; with the build's allowlisted environment
        rc = run_streaming(
            guarded(argv),
            collect,
            env=build_environment(),
            stop_event=stop_event,
            timeout=self.timeout,
            what=what,
        )
        if rc != 0:
            text = "".join(output[-20:]).strip()
            if "No space left" in text or _no_space_left(Path(dest).parent):
                raise DiskFullError(
                    f"No space left on the registry filesystem while {what} wrote "
                    f"{Path(dest).parent}: free space or raise the quota "
                    f"(binderhub-hpc gc)."
                )
            raise ConversionError(f"{what} failed with exit code {rc}: {text[-2000:]}")
        return output


class SquashfsSIFConverter(Converter):
    """mksquashfs from the mounted image root + siftool; no copy of the root."""

    name = "squashfs"

    mksquashfs = Unicode("mksquashfs", help="The mksquashfs executable (squashfs-tools).").tag(config=True)
    siftool = Unicode("siftool", help="The siftool executable (Debian: siftool; or `apptainer sif`).").tag(config=True)

    compressor = Enum(
        COMPRESSORS,
        "auto",
        help="""mksquashfs compressor: 'auto' (zstd when the runtime reads it,
        else gzip) or one of mksquashfs's own: 'zstd', 'gzip', 'xz', 'lz4',
        'lzo', 'lzma'.""",
    ).tag(config=True)

    compression_level = Integer(3, help="-Xcompression-level for zstd (gzip uses `gzip_level`).").tag(config=True)

    gzip_level = Integer(9, help="-Xcompression-level for gzip.").tag(config=True)

    runtime_supports_zstd = Bool(
        True,
        help="""The site's container runtime can mount zstd squashfs
        (Apptainer >= 1.1 with squashfuse, or a kernel >= 4.14). Set False
        for older runtimes: 'auto' then uses gzip.""",
    ).tag(config=True)

    processors = Integer(0, help="mksquashfs -processors (0: all).").tag(config=True)

    extra_mksquashfs_args = List(Unicode(), help="Extra mksquashfs arguments.").tag(config=True)

    arch = Unicode(help="Image architecture (default: this machine's).").tag(config=True)

    def resolved_compressor(self):
        if self.compressor != "auto":
            return self.compressor
        if self.runtime_supports_zstd and mksquashfs_supports("zstd", self.mksquashfs):
            return "zstd"
        return "gzip"

    def compression_args(self):
        comp = self.resolved_compressor()
        args = ["-comp", comp]
        if comp == "zstd":
            args += ["-Xcompression-level", str(self.compression_level)]
        elif comp == "gzip":
            args += ["-Xcompression-level", str(self.gzip_level)]
        return args

    def partarch(self):
        machine = (self.arch or platform.machine()).lower()
        try:
            return SIF_ARCH[machine]
        except KeyError:
            raise ConversionError(f"no SIF architecture code for {machine!r}") from None

    def mksquashfs_argv(self, rootfs, out, pseudo):
        argv = [
            self.mksquashfs,
            os.fspath(rootfs),
            os.fspath(out),
            "-pf",
            os.fspath(pseudo),
            *self.compression_args(),
            "-noappend",
            "-no-progress",
        ]
        if self.processors:
            argv += ["-processors", str(self.processors)]
        argv += list(self.extra_mksquashfs_args)
        # an image made from a SIF brings its own metadata: ours replaces it.
        # -e takes every remaining argument, so it comes last.
        return argv + ["-e", ".singularity.d"]

    def siftool_argvs(self, squashfs, sif):
        return [
            [self.siftool, "new", os.fspath(sif)],
            [
                self.siftool,
                "add",
                "--datatype",
                str(SIF_DATATYPE_PARTITION),
                "--parttype",
                str(SIF_PARTTYPE_PRIMSYS),
                "--partfs",
                str(SIF_PARTFS_SQUASH),
                "--partarch",
                str(self.partarch()),
                "--groupid",
                str(SIF_GROUP),
                os.fspath(sif),
                os.fspath(squashfs),
            ],
        ]

    def info(self):
        return {"converter": self.name, "compressor": self.resolved_compressor()}

    def convert(self, source, dest, on_log=None, stop_event=None):
        """Write the SIF of `source` to `dest` (an existing temporary file).

        The squashfs is written beside `dest` (same filesystem, removed after).
        Returns timing details.
        """
        dest = Path(dest)
        squashfs = dest.with_name(dest.name + ".squashfs.tmp")
        t0 = time.monotonic()
        try:
            labels = {"org.binderhub-hpc.image": source.image}
            # beside the output, named like it: what a killed builder leaves
            # is removed by the next build of the image or by `gc`
            with tempfile.TemporaryDirectory(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent) as work:
                if source.podman.rootless:
                    pseudo = write_overlay(source.config, work, labels)
                    argv = source.podman.run_mounted_argv(
                        source.image, self.mksquashfs_argv(ROOTFS_PLACEHOLDER, squashfs, pseudo)
                    )
                    self._run(argv, on_log, stop_event, "mksquashfs", dest)
                else:
                    with source.podman.mount(source.image) as rootfs:
                        fault_point("mounted")
                        pseudo = write_overlay(source.config, work, labels, rootfs)
                        argv = self.mksquashfs_argv(rootfs, squashfs, pseudo)
                        self._run(argv, on_log, stop_event, "mksquashfs", dest)
            t1 = time.monotonic()
            # siftool new refuses to overwrite: our temp name is unique and ours
            dest.unlink(missing_ok=True)
            new, add = self.siftool_argvs(squashfs, dest)
            self._run(new, on_log, stop_event, "siftool", dest)
            fault_point("siftool")
            self._run(add, on_log, stop_event, "siftool", dest)
            t2 = time.monotonic()
        finally:
            squashfs.unlink(missing_ok=True)
        return {
            "mksquashfs_seconds": round(t1 - t0, 3),
            "siftool_seconds": round(t2 - t1, 3),
            **self.info(),
        }


class ApptainerConverter(Converter):
    """``apptainer build`` from the OCI archive."""

    name = "apptainer"
    needs_oci_archive = True

    executable = Unicode("", help="apptainer or singularity binary (default: whichever is on PATH).").tag(config=True)

    extra_args = List(Unicode(), help="Extra `apptainer build` arguments (e.g. --fakeroot).").tag(config=True)

    tmpdir = Unicode("", help="APPTAINER_TMPDIR for the build (default: beside the output).").tag(config=True)

    def binary(self):
        if self.executable:
            return self.executable
        return find_apptainer() or "apptainer"

    def build_argv(self, archive, dest):
        return [
            self.binary(),
            "build",
            "--force",
            *self.extra_args,
            os.fspath(dest),
            f"oci-archive:{os.fspath(archive)}",
        ]

    def convert(self, source, dest, on_log=None, stop_event=None):
        if not source.oci_archive:
            raise ExportError("apptainer build needs the OCI archive of the image")
        t0 = time.monotonic()
        dest = Path(dest)
        # named like the output, so the next build of the image or `gc`
        # removes it when a killed builder leaves it behind
        tmpdir = self.tmpdir or tempfile.mkdtemp(prefix=dest.name + ".apptainer-", suffix=".tmp", dir=dest.parent)
        try:
            argv = ["env", f"APPTAINER_TMPDIR={tmpdir}", f"SINGULARITY_TMPDIR={tmpdir}"]
            argv += self.build_argv(source.oci_archive, dest)
            self._run(argv, on_log, stop_event, "apptainer build", dest)
        finally:
            if not self.tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return {"apptainer_seconds": round(time.monotonic() - t0, 3), **self.info()}


def find_apptainer():
    return shutil.which("apptainer") or shutil.which("singularity")


def make_converter(kind="auto", parent=None, **kwargs):
    """'squashfs', 'apptainer' or 'auto' (squashfs tools first: faster, no archive)."""
    if kind == "auto":
        if shutil.which("mksquashfs") and shutil.which("siftool"):
            kind = "squashfs"
        elif find_apptainer():
            kind = "apptainer"
        else:
            raise ConversionError("No SIF converter: install squashfs-tools and siftool, or apptainer")
    cls = {"squashfs": SquashfsSIFConverter, "apptainer": ApptainerConverter}[kind]
    return cls(parent=parent, **kwargs)
