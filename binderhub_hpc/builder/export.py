"""Getting a built image out of podman's storage, without copying it.

``podman image mount`` exposes the merged root filesystem of an image in
milliseconds (0.02 s for 815 MB here) where ``podman save`` writes a full
archive (7.6 s for the same image). So the converter reads the mounted root
directly; an OCI archive is written only when the registry publishes one too
(for the podman runtime) or the converter needs one (``apptainer build``).

As root the mount is visible to every process. Rootless, it exists only in
podman's user namespace, so the command that reads it must run in
``podman unshare`` as well: :meth:`PodmanImage.run_mounted_argv` wraps a
command so that, inside that namespace, the image is mounted, ``{rootfs}`` in
the argv is replaced by the mount point, and the image is unmounted after.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from traitlets import Bool, Unicode, default
from traitlets.config import LoggingConfigurable

from .environment import build_environment

ROOTFS_PLACEHOLDER = "{rootfs}"


class ExportError(RuntimeError):
    pass


@dataclass
class ImageConfig:
    """The parts of an image's config a SIF needs."""

    id: str = ""
    env: list = field(default_factory=list)
    entrypoint: list = field(default_factory=list)
    cmd: list = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    labels: dict = field(default_factory=dict)
    size: int = 0

    @classmethod
    def from_inspect(cls, data):
        config = data.get("Config") or {}
        return cls(
            id=data.get("Id", ""),
            env=list(config.get("Env") or []),
            entrypoint=list(config.get("Entrypoint") or []),
            cmd=list(config.get("Cmd") or []),
            working_dir=config.get("WorkingDir") or "",
            user=config.get("User") or "",
            labels=dict(config.get("Labels") or {}),
            size=int(data.get("Size") or 0),
        )

    def env_dict(self):
        out = {}
        for item in self.env:
            k, _, v = item.partition("=")
            out[k] = v
        return out


class PodmanImage(LoggingConfigurable):
    """podman operations on built images: inspect, mount, save, remove."""

    podman = Unicode("podman", help="The podman executable.").tag(config=True)

    rootless = Bool(help="Run podman rootless (default: when not root).").tag(config=True)

    @default("rootless")
    def _default_rootless(self):
        return os.geteuid() != 0

    def _run(self, *args, check=True):
        proc = subprocess.run(
            [self.podman, *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=build_environment(),
        )
        if check and proc.returncode != 0:
            raise ExportError(
                f"podman {args[0]} {args[1] if len(args) > 1 else ''} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def inspect(self, image):
        proc = self._run("image", "inspect", "--format", "json", "--", image)
        data = json.loads(proc.stdout)
        if isinstance(data, list):
            data = data[0]
        return ImageConfig.from_inspect(data)

    def exists(self, image):
        return self._run("image", "exists", "--", image, check=False).returncode == 0

    @contextlib.contextmanager
    def mount(self, image):
        """Mount the image's root filesystem (as root); always unmounts."""
        if self.rootless:
            raise ExportError("rootless podman mounts exist only inside `podman unshare`; use run_mounted_argv()")
        path = self._run("image", "mount", "--", image).stdout.strip()
        if not path or not os.path.isdir(path):
            raise ExportError(f"podman image mount gave no directory for {image}: {path!r}")
        try:
            yield Path(path)
        finally:
            proc = self._run("image", "unmount", "--", image, check=False)
            if proc.returncode != 0:
                self.log.warning("Could not unmount %s: %s", image, proc.stderr.strip())

    def run_mounted_argv(self, image, argv):
        """argv that runs `argv` with ``{rootfs}`` = the image's mounted root.

        Rootless: inside ``podman unshare`` through this module's entry point.
        """
        return [
            self.podman,
            "unshare",
            sys.executable,
            "-m",
            "binderhub_hpc.builder.export",
            "--podman",
            self.podman,
            image,
            "--",
            *argv,
        ]

    def labelled(self, key, value):
        """[(image id, names, labels)] of the images with label key=value."""
        proc = self._run("images", "--noheading", "--filter", f"label={key}={value}", "--format", "json", check=False)
        if proc.returncode != 0:
            self.log.warning("Could not list podman images: %s", proc.stderr.strip())
            return []
        try:
            data = json.loads(proc.stdout or "[]")
        except ValueError:
            return []
        return [
            (d.get("Id", ""), list(d.get("Names") or []), dict(d.get("Labels") or {}))
            for d in data
            if isinstance(d, dict)
        ]

    def working_containers(self):
        """[(id, created epoch seconds, names)] of buildah's working
        containers in podman's storage (``podman ps --external``): a build
        killed during a RUN step leaves its own behind."""
        proc = self._run("ps", "--all", "--external", "--format", "json", check=False)
        try:
            data = json.loads(proc.stdout or "[]") if proc.returncode == 0 else []
        except ValueError:
            data = []
        return [
            (d.get("Id", ""), int(d.get("Created") or 0), list(d.get("Names") or []))
            for d in data
            if isinstance(d, dict) and d.get("Command") == ["buildah"]
        ]

    def remove_container(self, container_id):
        return self._run("rm", "--force", "--", container_id, check=False).returncode == 0

    def graphroot(self):
        """Where podman keeps its images (its storage's graph root), or ''."""
        proc = self._run("info", "--format", "{{.Store.GraphRoot}}", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def save_oci_archive(self, image, dest):
        """Write the image as an OCI archive to `dest` (an existing temp path)."""
        self._run("save", "--format", "oci-archive", "--output", os.fspath(dest), "--", image)
        return Path(dest)

    def force_unmount(self, image):
        """Drop every mount of `image` (mounts left by a killed builder)."""
        self._run("image", "unmount", "--force", "--", image, check=False)

    def remove(self, image):
        self.force_unmount(image)
        proc = self._run("rmi", "--", image, check=False)
        if proc.returncode != 0 and "image not known" not in proc.stderr:
            self.log.warning("Could not remove podman image %s: %s", image, proc.stderr.strip())
        return proc.returncode == 0


def _main(argv=None):
    """``python -m binderhub_hpc.builder.export IMAGE -- CMD...``: run CMD with
    ``{rootfs}`` replaced by IMAGE's mount point (inside ``podman unshare``)."""
    parser = argparse.ArgumentParser(prog="binderhub_hpc.builder.export")
    parser.add_argument("--podman", default="podman")
    parser.add_argument("image")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    images = PodmanImage(podman=args.podman, rootless=False)
    with images.mount(args.image) as rootfs:
        command = [a.replace(ROOTFS_PLACEHOLDER, str(rootfs)) for a in command]
        return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(_main())
