"""podman on this machine and the local base image, made without any
registry pull."""

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

from .base import (
    BASE_CONTAINERFILE,
    BASE_REVISION,
    CONTAINERS_CONF,
    CONTAINERS_CONF_MARKER,
    DEBIAN_MIRROR,
    HOST_CA_BUNDLE,
    MAJOR_LABEL,
    REVISION_LABEL,
    ROOTFS_IMAGE,
    DevClusterError,
    _run,
    _tail,
    hub_major,
    log,
)


class Images:
    # podman ----------------------------------------------------------------
    def containers_conf_text(self):
        return textwrap.dedent(
            f"""\
            {CONTAINERS_CONF_MARKER}; delete this line to keep local edits.
            # crun fails here (setrlimit, hybrid cgroups): use runc and cgroupfs,
            # and pass no default ulimits.
            [containers]
            default_ulimits = []

            [engine]
            runtime = "runc"
            cgroup_manager = "cgroupfs"
            events_logger = "file"
            """
        )

    def _ensure_podman(self):
        conf = Path(CONTAINERS_CONF)
        if not conf.exists() or CONTAINERS_CONF_MARKER in conf.read_text():
            conf.parent.mkdir(parents=True, exist_ok=True)
            self._write_if_changed(conf, self.containers_conf_text())
        else:
            text = conf.read_text()
            missing = [
                want
                for want in ('runtime = "runc"', 'cgroup_manager = "cgroupfs"', "default_ulimits = []")
                if want not in text
            ]
            if missing:
                log.warning("%s is not ours and lacks %s; podman may fail here", conf, ", ".join(missing))
        self._ensure_tun()
        self._ensure_rootless_storage()
        if not self._podman_ok(rootless=False):
            raise DevClusterError("podman info fails as root:\n" + _run(["podman", "info"], check=False).stdout)
        if not self._podman_ok(rootless=True):
            p = self.as_service_user(["podman", "info"], check=False, timeout=60)
            raise DevClusterError(f"rootless podman info fails as {self.service_user}:\n{p.stdout}")

    @staticmethod
    def _ensure_tun(path="/dev/net/tun"):
        """Rootless podman's network (slirp4netns, every RUN step of a build
        on the build node) opens /dev/net/tun as the account. udev makes it
        0666; a machine without udev (a fresh container or VM) leaves it
        0600, and each RUN step then fails with "failed to read from
        slirp4netns sync pipe: EOF"."""
        try:
            st = os.stat(path)
        except OSError:
            return
        if stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) != 0o666:
            os.chmod(path, 0o666)
            log.info("%s made 0666 (as udev does)", path)

    def _ensure_rootless_storage(self, user=None, graphroot=None):
        """Rootless storage on native overlay for an account (the service
        account unless `user`), at `graphroot` if given.

        Left to itself podman 4.3 falls back to ``vfs`` here (``/dev/fuse`` is
        root-only, so fuse-overlayfs cannot serve), which copies every layer
        for every container (seconds per ``podman run``). The kernel mounts
        overlay inside a user namespace, so ask for it explicitly.
        """
        user = user or self.service_user
        pw = pwd.getpwnam(user)
        home = Path(pw.pw_dir)
        cfg_dir = home / ".config" / "containers"
        conf = cfg_dir / "storage.conf"
        text = f'{CONTAINERS_CONF_MARKER}\n[storage]\ndriver = "overlay"\n'
        if graphroot:
            text += f'graphroot = "{graphroot}"\n'
        if conf.exists() and CONTAINERS_CONF_MARKER not in conf.read_text():
            return
        store = home / ".local" / "share" / "containers" / "storage"
        if not graphroot and (store / "vfs").exists() and not (store / "overlay").exists():
            # storage was initialised with vfs: podman refuses a driver change
            log.info("resetting %s's podman storage (vfs -> overlay)", user)
            _run(
                self._user_argv(["podman", "system", "reset", "--force"], user), check=False, timeout=300, cwd=str(home)
            )
        for d in (home / ".config", cfg_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        if self._write_if_changed(conf, text):
            os.chown(conf, pw.pw_uid, pw.pw_gid)

    def _podman_ok(self, rootless=False):
        if not shutil.which("podman"):
            return False
        try:
            if rootless:
                p = self.as_service_user(
                    ["podman", "info", "--format", "{{.Host.Security.Rootless}}"],
                    check=False,
                    timeout=60,
                )
                return p.returncode == 0 and p.stdout.strip().endswith("true")
            p = _run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], check=False, timeout=60)
            return p.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # base image ------------------------------------------------------------
    def image_exists(self, image=None, rootless=False):
        image = image or self.base_image
        cmd = ["podman", "image", "exists", image]
        if rootless:
            return self.as_service_user(cmd, check=False, timeout=60).returncode == 0
        return _run(cmd, check=False, timeout=60).returncode == 0

    def image_label(self, label, image=None):
        p = _run(
            ["podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', image or self.base_image],
            check=False,
            timeout=60,
        )
        return p.stdout.strip() if p.returncode == 0 else None

    def ensure_base_image(self, rootless=False, force=False):
        """Make ``self.base_image`` in root's podman storage, if missing.

        The debootstrap tarball is cached in ``<state>/cache``; ``force``
        rebuilds the image on top of it (delete the cache to start over).

        With ``rootless=True`` also copy it into the service account's own
        (rootless) storage. Returns the image name.
        """
        self._require_root()
        t0 = time.monotonic()
        want = {MAJOR_LABEL: str(hub_major()), REVISION_LABEL: BASE_REVISION}
        if not force and self.image_exists():
            have = {label: self.image_label(label) for label in want}
            if have != want:
                log.info("base image is %s, wanted %s: rebuilding", have, want)
                force = True
        if force or not self.image_exists():
            cache = self.state_dir / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            tarball = cache / "bookworm-minbase.tar"
            if not tarball.exists():
                self._debootstrap(tarball)
            if not self.image_exists(ROOTFS_IMAGE):
                log.info("podman import %s", tarball)
                _run(["podman", "import", "--quiet", tarball, ROOTFS_IMAGE], timeout=600)
            with tempfile.TemporaryDirectory(prefix="base-image-") as ctx:
                cf = Path(ctx) / "Containerfile"
                cf.write_text(
                    BASE_CONTAINERFILE.format(
                        rootfs=ROOTFS_IMAGE,
                        jupyterhub_major=hub_major(),
                        major_label=MAJOR_LABEL,
                        revision_label=REVISION_LABEL,
                        revision=BASE_REVISION,
                    )
                )
                log.info("podman build %s", self.base_image)
                _run(
                    [
                        "podman",
                        "build",
                        "--network",
                        "host",
                        "--pull=never",
                        "--volume",
                        f"{HOST_CA_BUNDLE}:/run/host-ca.crt:ro",
                        "--tag",
                        self.base_image,
                        "--file",
                        cf,
                        ctx,
                    ],
                    timeout=1800,
                )
            log.info("base image built in %.1f s", time.monotonic() - t0)
        if rootless and (force or not self.image_exists(rootless=True)):
            self.copy_image_to_service_user(self.base_image)
        return self.base_image

    def copy_image_to_service_user(self, image):
        """Copy an image from root's podman storage into the service account's."""
        self.copy_image_to_user(image, self.service_user)

    def copy_image_to_user(self, image, user, node=None):
        """Copy an image from root's podman storage into an account's rootless
        storage, on `node` (its own storage there) or on this machine."""

        def as_user(cmd, **kw):
            if node is None:
                return _run(self._user_argv(cmd, user), cwd=pwd.getpwnam(user).pw_dir, **kw)
            return self.on_node(node, cmd, user=user, check=True, **kw)

        (self.state_dir / "cache").mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix="img-", dir=self.state_dir / "cache"))
        try:
            os.chmod(tmpdir, 0o755)
            archive = tmpdir / "image.tar"
            _run(["podman", "save", "--quiet", "--format", "oci-archive", "-o", archive, image], timeout=900)
            os.chmod(archive, 0o644)
            as_user(["podman", "load", "--quiet", "-i", archive], timeout=900)
            # oci-archive loses the name unless given again
            ref = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image]).stdout.strip()
            as_user(["podman", "tag", ref, image], timeout=60)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _debootstrap(self, tarball):
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=tarball.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            log.info("debootstrap --variant=minbase bookworm (a few minutes)")
            p = _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--components=main",
                    "bookworm",
                    rootfs,
                    DEBIAN_MIRROR,
                ],
                check=False,
                timeout=1800,
            )
            if p.returncode != 0:
                logf = rootfs / "debootstrap" / "debootstrap.log"
                raise DevClusterError(f"debootstrap failed:\n{p.stdout[-3000:]}\n{_tail(logf)}")
            # trim what a container does not need
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                d = rootfs / sub
                for child in d.glob("*"):
                    if child.is_file():
                        child.unlink()
            part = tarball.with_name(tarball.name + ".part")
            _run(["tar", "--numeric-owner", "--xattrs", "-C", rootfs, "-cf", part, "."], timeout=600)
            os.replace(part, tarball)
        log.info("debootstrap done in %.1f s", time.monotonic() - t0)

    def podman_run_ok(self, image=None, rootless=False):
        cmd = ["podman", "run", "--rm", "--network", "host", image or self.base_image, "true"]
        if rootless:
            return self.as_service_user(cmd, check=False, timeout=120).returncode == 0
        return _run(cmd, check=False, timeout=120).returncode == 0
