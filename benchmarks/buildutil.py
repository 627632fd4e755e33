"""What the build benchmarks share: fixture repositories, pipelines, and the
pipeline's steps done by hand with plain commands."""

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from binderhub_hpc_testing import repo as devrepo
from binderhub_hpc_testing.repo import make_pipeline  # noqa: F401  (re-exported)

from .cluster import dev_cluster, workdir


def base_image():
    for tool in ("podman", "mksquashfs", "siftool", "jupyter-repo2docker", "git"):
        if not shutil.which(tool):
            raise RuntimeError(f"the build benchmarks need {tool}")
    return dev_cluster().ensure_base_image()


def make_repo(path, base, marker):
    """An example repository (devrepo); returns (file URL, sha)."""
    sha = devrepo.make_repo(path, base, marker=marker)
    return f"file://{path}", sha


class Fixtures:
    """Fresh repositories (unique content: nothing cached but the base) and
    registries in one working directory, removed with it."""

    def __init__(self, prefix):
        self.base = base_image()
        self.dir = workdir(prefix)
        self.images = []

    def repo(self):
        marker = uuid.uuid4().hex
        url, sha = make_repo(self.dir / "repos" / marker[:12], self.base, marker)
        image = f"binderhub-hpc-bench/build-{marker[:12]}:{sha}"
        self.images.append(image)
        return url, sha, image

    def registry_root(self):
        d = self.dir / "registries" / uuid.uuid4().hex[:8]
        d.mkdir(parents=True)
        return d

    def cleanup(self):
        for image in self.images:
            subprocess.run(["podman", "image", "unmount", "--force", image], capture_output=True)
            subprocess.run(["podman", "rmi", "--force", image], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def by_hand(url, sha, image, dest, compressor_args, r2d_argv_prefix=("jupyter-repo2docker",)):
    """The pipeline's steps as plain commands: repo2docker, podman image
    mount, mksquashfs, siftool, mv, podman rmi. Returns seconds per step."""
    from binderhub_hpc.builder.convert import SquashfsSIFConverter
    from binderhub_hpc.builder.repo2docker import Repo2Docker

    r2d = Repo2Docker(egress_restricted=True)
    steps = {}
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".by-hand")
    squashfs = tmp.with_name(tmp.name + ".squashfs")
    cfg = tmp.with_name(tmp.name + ".r2d_config.py")
    cfg.write_text(r2d.config_text())

    def step(name, argv, **kw):
        t0 = time.monotonic()
        p = subprocess.run(argv, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
        steps[name] = steps.get(name, 0) + time.monotonic() - t0
        return p.stdout

    try:
        # the same repo2docker command line as the pipeline's (BinderHub's options)
        step(
            "repo2docker",
            list(r2d_argv_prefix) + r2d.options(sha, image) + ["--config", str(cfg), url],
            env=r2d.environment(),
        )
        rootfs = step("podman mount", ["podman", "image", "mount", image]).strip()
        try:
            step("mksquashfs", ["mksquashfs", rootfs, str(squashfs), *compressor_args, "-noappend", "-no-progress"])
        finally:
            step("podman mount", ["podman", "image", "unmount", image])
        sif = SquashfsSIFConverter()
        for argv in sif.siftool_argvs(squashfs, tmp):
            step("siftool", argv)
        step("publish", ["mv", str(tmp), str(dest)])
        step("podman rmi", ["podman", "rmi", image])
    finally:
        for p in (squashfs, cfg, tmp):
            p.unlink(missing_ok=True)
    return steps


def image_size(image):
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", image], check=True, capture_output=True, text=True
    ).stdout
    return int(out.strip())


def file_size(path):
    return os.stat(path).st_size
