"""Faults of a real registry: builders killed at every step, what dead
builders leave behind, a full filesystem.

The fault campaign runs the builder as its own process (``binderhub-hpc
build``, what BinderHub's remote runners run too) and SIGKILLs it at each
step of the pipeline, then checks that nothing partial was published, that
the lock is free and that the next request succeeds. Steps too short to hit
by timing are reached through the test-only hook
:func:`binderhub_hpc.faults.fault_point`: with ``BINDERHUB_HPC_STOP_AT=<step>``
the builder stops itself there and the test kills it (or fills the disk and
lets it go on). ``BINDERHUB_HPC_FAULT_ROUNDS`` (default 1) sets how many times
each step is killed; ``BINDERHUB_HPC_FAULT_REPORT`` names a file for the
figures (JSON).
"""

import errno
import fnmatch
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from binderhub_hpc.registry import SIFRegistry

from build_fixtures import make_pipeline

REPO = str(Path(__file__).resolve().parent.parent)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_stale_cleanup_removes_what_dead_builders_left(tmp_path):
    """Temporary files and directories (the converters' work directories,
    apptainer's build directory, also under its old ``.apptainer-*`` name)
    go once older than --stale-after; fresh ones and images stay."""
    reg = SIFRegistry(root=str(tmp_path / "root"))
    image = "p/a:1"
    tmp = reg.tempfile(image)
    tmp.write_bytes(b"partial")
    d = tmp.parent
    work = d / (tmp.name + ".abc.tmp")  # SquashfsSIFConverter's work directory
    (work / "files").mkdir(parents=True)
    (work / "files" / "x").write_text("x")
    (work / "pseudo").write_text("")
    legacy = d / ".apptainer-xyz"
    (legacy / "rootfs" / "etc").mkdir(parents=True)
    (legacy / "rootfs" / "etc" / "passwd").write_text("x")
    (legacy / "rootfs" / "link").symlink_to("/etc")
    apptainer = d / (tmp.name + ".apptainer-q.tmp")
    apptainer.mkdir()
    fresh = d / ".apptainer-fresh"
    fresh.mkdir()
    for p in (tmp, work, legacy, apptainer):
        _age(p, 7200)
    assert reg.remove_stale_temporaries(older_than=3600) == 4
    assert sorted(p.name for p in d.iterdir()) == [".apptainer-fresh"]
    assert Path("/etc/passwd").exists()


def test_a_killed_apptainer_conversion_leaves_only_what_the_next_build_removes(tmp_path):
    """apptainer's build directory is named after the image's temporary, so
    the next build of that image (which removes ``.<name>.*.tmp`` under its
    lock) and gc both find it."""
    reg = SIFRegistry(root=str(tmp_path / "root"))
    image = "p/a:1"
    dest = reg.tempfile(image)
    record = tmp_path / "tmpdir"
    fake = tmp_path / "apptainer"
    fake.write_text(f'#!/bin/sh\necho "$APPTAINER_TMPDIR" > {record}\nexec sleep 60\n')
    fake.chmod(0o755)
    code = (
        "import sys\n"
        "from binderhub_hpc.builder.convert import ApptainerConverter, ConversionSource\n"
        f"ApptainerConverter(executable={str(fake)!r}).convert(\n"
        f"    ConversionSource({image!r}, None, None, '/nonexistent.tar'), {str(dest)!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 30
        while not record.exists() or not record.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    left = Path(record.read_text().strip())
    assert left.is_dir() and left.parent == dest.parent
    final = reg.path(image)
    assert fnmatch.fnmatch(left.name, f".{final.name}.*.tmp")
    assert reg.remove_stale_temporaries(older_than=-1) == 2  # the temporary and the directory
    assert not left.exists()


# --------------------------------------------------------------- a full filesystem


def _tmpfs(mnt, size):
    """Mount a real filesystem of `size` (tmpfs) at `mnt` for a test; unmount after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)], check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def small_fs(tmp_path):
    """A registry filesystem of 4 MiB."""
    yield from _tmpfs(tmp_path / "small", "4m")


def fill(directory):
    """Write a file in `directory` until its filesystem is full; returns it."""
    filler = Path(directory) / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def test_publish_on_a_full_filesystem_fails_clearly_and_keeps_the_previous_image(small_fs):
    from binderhub_hpc.registry import RegistryFull
    from binderhub_hpc.sif import minimal_sif

    reg = SIFRegistry(root=str(small_fs / "registry"))
    image = "p/a:1"
    old = minimal_sif(b"v1" * 1000)
    tmp = reg.tempfile(image)
    tmp.write_bytes(old)
    reg.publish(image, {"sif": tmp}, {"version": 1})
    new = reg.tempfile(image)
    new.write_bytes(minimal_sif(b"v2" * 1000))
    filler = fill(small_fs)
    with pytest.raises(RegistryFull, match="No space left on the registry filesystem") as e:
        reg.publish(image, {"sif": new}, {"version": 2})
    assert "nothing was replaced" in str(e.value)
    # the previous image, its metadata and nothing half-written
    assert reg.exists(image) and reg.lookup(image).read_bytes() == old
    assert reg.metadata(image)["version"] == 1
    assert sorted(p.name for p in reg.path(image).parent.iterdir()) == sorted(["1.json", "1.sif", "1.used", new.name])
    reg.discard(new)
    filler.unlink()


# --------------------------------------------------------------- the builder killed at every step

ROUNDS = int(os.environ.get("BINDERHUB_HPC_FAULT_ROUNDS", "1"))
SIF = ("sif",)
BOTH = ("sif", "oci-archive")
#: (step, how the builder is caught there, the registry's formats). "stop":
#: the fault_point hook; "log": a repo2docker build step is running (its
#: JSON log lines); "file:<part>": a temporary whose name holds <part> is
#: being written (by podman save, mksquashfs)
STEPS = [
    ("locked", "stop", SIF),
    ("repo2docker", "log", SIF),
    ("export", "stop", SIF),
    ("podman save", "file:.oci.tar.", BOTH),
    ("mounted", "stop", SIF),
    ("mksquashfs", "file:.squashfs.tmp", SIF),
    ("siftool", "stop", SIF),
    ("publish", "stop", SIF),
    ("publish:metadata", "stop", SIF),
    ("publish:oci-archive", "stop", BOTH),
    ("publish:sif", "stop", SIF),
    ("cleanup", "stop", SIF),
]


class Builder:
    """``binderhub-hpc build`` as its own process, its output collected."""

    def __init__(self, config, image, url, ref, stop_at=""):
        env = dict(
            os.environ, BINDERHUB_HPC_STOP_AT=stop_at, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "binderhub_hpc.cli",
                "build",
                "--config",
                str(config),
                "--json-logs",
                "--image",
                image,
                url,
                ref,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def stopped(self):
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "T"
        except OSError:
            return False

    def wait_for(self, condition, what, timeout=300):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the builder ended before {what}:\n" + "".join(self.lines[-20:]))
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def result(self):
        self.proc.wait(timeout=600)
        self._reader.join(10)
        for line in reversed(self.lines):
            if '"phase": "result"' in line:
                return json.loads(line)["result"]
        raise AssertionError("no result line:\n" + "".join(self.lines[-20:]))


#: the campaign's builds compress with lz4: faster than zstd, and no fault
#: depends on the compressor
FAST = {"SquashfsSIFConverter__compressor": "lz4"}


def _config(path, root, formats, **extra):
    """A config file for ``binderhub-hpc build``, as make_pipeline(root, **extra)."""
    lines = [
        f"c.SIFRegistry.root = {str(root)!r}",
        f"c.SIFRegistry.formats = {list(formats)!r}",
        "c.Repo2Docker.egress_restricted = True",
    ]
    lines += [f"c.{k.replace('__', '.')} = {v!r}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _catch(builder, how, reg, image):
    """Wait until the builder is at the step; True if it is still running there."""
    if how == "stop":
        builder.wait_for(builder.stopped, "stopping at its fault point")
    elif how == "log":
        builder.wait_for(lambda: any('"STEP ' in line for line in builder.lines), "a repo2docker step")
    else:
        part = how.split(":", 1)[1]
        d = reg.path(image).parent

        def writing():
            try:
                return any(part in p.name and p.stat().st_size > 0 for p in d.iterdir())
            except OSError:
                return False

        builder.wait_for(writing, f"a {part} temporary being written")
    return builder.proc.poll() is None


def _damage(reg, image):
    """What is wrong with `image` as published: files at their final names
    that are not complete, a published image that siftool cannot read or
    whose metadata is missing."""
    wrong = [
        fmt for fmt in reg.formats if reg.path(image, fmt).exists() and not reg.complete(str(reg.path(image, fmt)), fmt)
    ]
    if reg.exists(image):
        if subprocess.run(["siftool", "list", str(reg.path(image))], check=False, capture_output=True).returncode:
            wrong.append("siftool cannot read the SIF")
        if reg.metadata(image).get("image") != image:
            wrong.append("metadata")
    return wrong


@pytest.mark.cluster
def test_builder_killed_at_every_step_publishes_nothing_partial(fixture_repo, tmp_path):
    """SIGKILL at each step, ROUNDS times: never a partial or corrupt image at
    its final name, the lock free at once, and the next request succeeds
    (it builds, or finds the image complete when the kill came after it was
    published)."""
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    figures = []
    for n, (step, how, formats) in enumerate(STEPS):
        root = tmp_path / f"registry-{n}"
        cfg = _config(tmp_path / f"config-{n}.py", root, formats, **FAST)
        pipeline = make_pipeline(root, SIFRegistry__formats=list(formats), **FAST)
        reg = pipeline.registry
        image = f"binderhub-hpc/test-fault-{n}:{sha}"
        row = {
            "step": step,
            "kills": 0,
            "partial": 0,
            "locks released": 0,
            "rebuilt": 0,
            "found complete": 0,
            "left for gc": 0,
            "podman images for gc": 0,
            "podman images left": 0,
        }
        for _ in range(ROUNDS):
            builder = Builder(cfg, image, url, sha, stop_at=step if how == "stop" else "")
            alive = _catch(builder, how, reg, image)
            builder.proc.kill()
            builder.proc.wait()
            assert alive, f"{step}: the builder finished before it was killed"
            row["kills"] += 1
            damage = _damage(SIFRegistry(root=str(root), formats=list(formats)), image)
            row["partial"] += bool(damage)
            assert not damage, f"{step}: {damage}"
            lock = reg.lock(image)
            if lock.try_acquire():
                row["locks released"] += 1
                lock.release()
            result = pipeline.run(BuildRequest(url, sha, image))
            assert result.outcome in ("success", "cached"), f"{step}: {result.error}"
            assert reg.exists(image) and not _damage(reg, image)
            row["rebuilt" if result.outcome == "success" else "found complete"] += 1
            if result.outcome == "success":
                assert not list(reg.path(image).parent.glob(".*.tmp")), step
            row["left for gc"] += reg.remove_stale_temporaries(older_than=-1)
            mounts = subprocess.run(["podman", "image", "mount"], check=True, capture_output=True, text=True).stdout
            assert image not in mounts, f"{step}: still mounted"
            # killed after publishing and before removing its podman image,
            # a builder leaves that image behind and the next request (a
            # cache hit) builds nothing: gc removes it, as the next build
            # of any image of the registry would
            row["podman images for gc"] += len(pipeline.remove_leftover_images())
            if pipeline.podman.remove(image):
                row["podman images left"] += 1
            reg.remove(image)
        figures.append(row)
    _report(figures)
    assert all(
        r["partial"] == 0
        and r["locks released"] == r["kills"] == ROUNDS
        and r["rebuilt"] + r["found complete"] == ROUNDS
        and r["podman images left"] == 0
        for r in figures
    ), figures


def _report(figures):
    cols = list(figures[0])
    lines = [" | ".join(cols), " | ".join("-" * len(c) for c in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in figures]
    print(f"\nfault campaign, {ROUNDS} round(s) per step:\n" + "\n".join(lines))
    if os.environ.get("BINDERHUB_HPC_FAULT_REPORT"):
        Path(os.environ["BINDERHUB_HPC_FAULT_REPORT"]).write_text(json.dumps(figures, indent=1))


@pytest.fixture
def registry_fs(tmp_path):
    """A registry filesystem of 1 GiB: room for two images of the fixture
    repository and the temporaries of a third."""
    yield from _tmpfs(tmp_path / "registry-fs", "1g")


@pytest.mark.cluster
def test_registry_full_during_publish_fails_clearly_and_keeps_the_previous_image(fixture_repo, registry_fs):
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    root = registry_fs / "registry"
    pipeline = make_pipeline(root)
    reg = pipeline.registry
    previous = f"binderhub-hpc/test-full-a:{sha}"
    assert pipeline.run(BuildRequest(url, sha, previous)).outcome == "success"
    digest = hashlib.sha256(reg.path(previous).read_bytes()).hexdigest()
    meta = reg.metadata(previous)

    image = f"binderhub-hpc/test-full-b:{sha}"
    builder = Builder(_config(registry_fs.parent / "config.py", root, SIF), image, url, sha, stop_at="publish")
    builder.wait_for(builder.stopped, "the publish step")
    filler = fill(registry_fs)
    os.kill(builder.proc.pid, signal.SIGCONT)
    result = builder.result()
    assert builder.proc.returncode == 1
    assert result["outcome"] == "failure"
    assert "No space left on the registry filesystem" in result["error"], result["error"]
    assert "nothing was replaced" in result["error"]
    # the previous image is untouched, nothing of the new one stays behind
    assert reg.exists(previous) and not _damage(reg, previous)
    assert hashlib.sha256(reg.path(previous).read_bytes()).hexdigest() == digest
    assert reg.metadata(previous) == meta
    assert not reg.exists(image)
    assert [p.name for p in reg.path(image).parent.iterdir()] == [reg.lock_path(image).name]
    filler.unlink()
    assert pipeline.run(BuildRequest(url, sha, image)).outcome == "success"
    assert reg.exists(image) and not _damage(reg, image)
