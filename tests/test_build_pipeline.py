"""The build pipeline with its real parts: repo2docker, podman, mksquashfs, siftool."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from build_fixtures import make_pipeline, sif_cat, sif_listing

pytestmark = pytest.mark.cluster


def podman_env(image, var="PATH"):
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "json", image], check=True, capture_output=True, text=True
    ).stdout
    env = dict(e.split("=", 1) for e in json.loads(out)[0]["Config"]["Env"])
    return env[var]


def test_build_fixture_repository_into_sif(fixture_repo, registry_root, capsys):
    url, sha = fixture_repo
    image = f"binderhub-hpc/test-fixture:{sha}"
    pipeline = make_pipeline(registry_root, BuildPipeline__remove_podman_image=False)
    events = []
    t0 = time.monotonic()
    result = pipeline.run(
        __import__("binderhub_hpc.builder.pipeline", fromlist=["x"]).BuildRequest(url, sha, image),
        lambda kind, payload: events.append((kind, payload)),
    )
    elapsed = time.monotonic() - t0
    assert result.outcome == "success", result.error
    try:
        sif = Path(result.path)
        assert sif == pipeline.registry.path(image) and sif.is_file()
        # every log payload is a JSON line with phase and message, as BinderHub wants
        for kind, payload in events:
            assert kind == "log"
            data = json.loads(payload)
            assert "phase" in data and "message" in data
        assert any("Using DockerBuildPack builder" in json.loads(p)["message"] for _, p in events)

        listing = subprocess.run(["siftool", "list", str(sif)], check=True, capture_output=True, text=True).stdout
        assert "FS (Squashfs/*System/amd64)" in listing
        files = sif_listing(sif)
        # the repository, owned by jovyan (1000)
        for name in ("hello.ipynb", "README.md", "Dockerfile"):
            line = next(f for f in files.splitlines() if f.endswith(f"/home/jovyan/{name}"))
            assert " 1000/1000 " in line, line
        assert "/opt/venv/bin/jupyterhub-singleuser" in files
        assert "squashfs-root/singularity -> .singularity.d/runscript" in files
        assert "/.singularity.d/actions/exec" in files

        # the env scripts reproduce the image's PATH
        env_sh = sif_cat(sif, "/.singularity.d/env/10-docker2singularity.sh")
        script = env_sh + '\nprintf "%s" "$PATH"'
        got = subprocess.run(
            ["/bin/bash", "-c", script], env={"PATH": "/nowhere"}, capture_output=True, text=True, check=True
        ).stdout
        assert got == podman_env(image)
        assert "/opt/venv/bin" in got
        labels = json.loads(sif_cat(sif, "/.singularity.d/labels.json"))
        assert labels["repo2docker.ref"] == sha

        meta = pipeline.registry.metadata(image)
        assert meta["repo_url"] == url and meta["resolved_ref"] == sha
        assert meta["engine"] == "podman-hpc" and meta["repo2docker_version"]
        assert set(meta["durations"]) >= {"repo2docker", "export", "convert"}
        assert meta["size"] == sif.stat().st_size
        print(
            f"\nfixture build: {elapsed:.1f} s total, durations {meta['durations']}, "
            f"image {meta['image_size'] / 1e6:.0f} MB -> SIF {meta['size'] / 1e6:.0f} MB "
            f"({meta['conversion']})"
        )
        # no temporaries, nothing left mounted
        assert not list(sif.parent.glob(".*.tmp"))
        mounts = subprocess.run(["podman", "image", "mount"], capture_output=True, text=True).stdout
        assert image not in mounts

        # a second request is a cache hit and runs nothing
        again = pipeline.run(__import__("binderhub_hpc.builder.pipeline", fromlist=["x"]).BuildRequest(url, sha, image))
        assert again.outcome == "cached"
    finally:
        subprocess.run(["podman", "rmi", "--force", image], capture_output=True)


def _counting_repo2docker(tmp_path):
    """A repo2docker wrapper that records each invocation."""
    counter = tmp_path / "r2d-runs"
    wrapper = tmp_path / "r2d-counting"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {counter}\nexec jupyter-repo2docker "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, counter


def _config_file(tmp_path, registry_root, **extra):
    lines = [f"c.SIFRegistry.root = {str(registry_root)!r}", "c.Repo2Docker.egress_restricted = True"]
    lines += [f"c.{k.replace('__', '.')} = {v!r}" for k, v in extra.items()]
    cfg = tmp_path / "binderhub_hpc_config.py"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def test_concurrent_requests_build_once(fixture_repo, registry_root, tmp_path):
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    image = f"binderhub-hpc/test-concurrent:{sha}"
    wrapper, counter = _counting_repo2docker(tmp_path)
    cfg = _config_file(tmp_path, registry_root, Repo2Docker__command=[str(wrapper)])
    cli = [sys.executable, "-m", "binderhub_hpc.cli", "build", "--config", str(cfg), "--image", image, url, sha]
    procs = [subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    pipeline = make_pipeline(registry_root, Repo2Docker__command=[str(wrapper)])
    results = [None] * 20
    barrier = threading.Barrier(20)

    def one(i):
        barrier.wait()
        results[i] = pipeline.run(BuildRequest(url, sha, image))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(r is not None and r.ok for r in results), [r and r.error for r in results]
    runs = counter.read_text().split()
    assert len(runs) == 1, runs
    assert sum(r.outcome == "success" for r in results) + sum("success:" in o for o in outs) == 1
    assert pipeline.registry.exists(image)


def test_sigkill_during_conversion_leaves_nothing(fixture_repo, registry_root, tmp_path):
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    image = f"binderhub-hpc/test-killed:{sha}"
    # gzip makes the conversion long enough to be caught in the middle
    cfg = _config_file(tmp_path, registry_root, SquashfsSIFConverter__compressor="gzip")
    proc = subprocess.Popen(
        [sys.executable, "-m", "binderhub_hpc.cli", "build", "--config", str(cfg), "--image", image, url, sha],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pipeline = make_pipeline(registry_root)
    sif = pipeline.registry.path(image)
    deadline = time.monotonic() + 300
    while not list(sif.parent.glob(".*.squashfs.tmp")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not pipeline.registry.exists(image)
    assert not sif.exists()
    # mksquashfs died with its parent: the temporary stops growing
    time.sleep(1)
    leftovers = list(sif.parent.glob(".*.tmp"))
    sizes = [p.stat().st_size for p in leftovers]
    time.sleep(1)
    assert sizes == [p.stat().st_size for p in leftovers if p.exists()]

    result = pipeline.run(BuildRequest(url, sha, image))
    assert result.outcome == "success", result.error
    assert pipeline.registry.exists(image)
    assert not list(sif.parent.glob(".*.tmp")), "stale temporaries were not removed"
    mounts = subprocess.run(["podman", "image", "mount"], capture_output=True, text=True).stdout
    assert "test-killed" not in mounts


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode
    if rc != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_during_conversion(fixture_repo, tiny_tmpfs):
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    image = f"binderhub-hpc/test-full:{sha}"
    pipeline = make_pipeline(tiny_tmpfs)
    result = pipeline.run(BuildRequest(url, sha, image))
    assert result.outcome == "failure"
    assert "No space left" in result.error
    d = pipeline.registry.path(image).parent
    assert [p.name for p in d.iterdir() if not p.name.endswith(".lock")] == []
    assert not pipeline.registry.exists(image)


def test_stop_event_cancels_build(fixture_repo, registry_root):
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    image = f"binderhub-hpc/test-stop:{sha}"
    pipeline = make_pipeline(registry_root, SquashfsSIFConverter__compressor="gzip")
    stop = threading.Event()
    sif_dir = pipeline.registry.path(image).parent

    def stopper():
        while not list(sif_dir.glob(".*.squashfs.tmp")) if sif_dir.is_dir() else True:
            time.sleep(0.05)
        stop.set()

    threading.Thread(target=stopper, daemon=True).start()
    result = pipeline.run(BuildRequest(url, sha, image), stop_event=stop)
    assert result.outcome == "cancelled"
    assert not list(sif_dir.glob(".*.tmp"))
    assert not pipeline.registry.exists(image)


def test_a_broken_published_sif_is_rebuilt_and_replaced_atomically(fixture_repo, registry_root):
    """A 0-byte or truncated SIF is not "built": the next request builds the
    image again and the new SIF replaces the broken one by rename."""
    from binderhub_hpc.builder.pipeline import BuildRequest
    from binderhub_hpc.sif import root_partition

    url, sha = fixture_repo
    image = f"binderhub-hpc/test-broken:{sha}"
    pipeline = make_pipeline(registry_root)
    reg = pipeline.registry
    tmp = reg.tempfile(image)
    reg.publish(image, {"sif": tmp}, {"repo_url": url})  # 0 bytes, as a full disk leaves it
    broken = reg.path(image)
    assert broken.stat().st_size == 0 and not reg.exists(image)
    old_inode = broken.stat().st_ino
    result = pipeline.run(BuildRequest(url, sha, image))
    assert result.outcome == "success", result.error
    assert reg.exists(image)
    assert broken.stat().st_ino != old_inode
    assert root_partition(broken).size > 0
    listing = subprocess.run(["siftool", "list", str(broken)], check=True, capture_output=True, text=True).stdout
    assert "FS (Squashfs/*System/amd64)" in listing
    # truncated: a cache of the earlier answer must not hide it
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 2)
    assert not reg.exists(image)
    assert pipeline.run(BuildRequest(url, sha, image)).outcome == "success"
    assert reg.exists(image)
    assert not list(broken.parent.glob(".*.tmp"))


def test_an_incomplete_conversion_is_never_published(fixture_repo, registry_root, monkeypatch):
    """A converter that exits 0 but leaves a truncated SIF (a filesystem that
    reports the error late) fails the build instead of publishing it."""
    from binderhub_hpc.builder.convert import SquashfsSIFConverter
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    image = f"binderhub-hpc/test-incomplete:{sha}"
    real = SquashfsSIFConverter.convert

    def truncating(self, source, dest, **kw):
        info = real(self, source, dest, **kw)
        with open(dest, "r+b") as f:
            f.truncate(4096)
        return info

    monkeypatch.setattr(SquashfsSIFConverter, "convert", truncating)
    pipeline = make_pipeline(registry_root, BuildPipeline__converter="squashfs")
    result = pipeline.run(BuildRequest(url, sha, image))
    assert result.outcome == "failure"
    assert "incomplete" in result.error
    assert not pipeline.registry.path(image).exists()
    assert not list(pipeline.registry.path(image).parent.glob(".*.tmp"))
