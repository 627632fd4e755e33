"""What a build may see and what it leaves: BinderHub's environment stays
out of git, podman and RUN steps; a SIGKILLed builder takes every process
of its build with it; no clone, scratch or podman image outlives a build,
including one whose builder was killed. Real builds (LocalRunner)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from binderhub_hpc.builder.guard import descendants
from binderhub_hpc.builder.pipeline import BuildRequest
from binderhub_hpc_testing.repo import dockerfile, make_repo

from build_fixtures import make_pipeline, write_config

pytestmark = pytest.mark.cluster

REPO = str(Path(__file__).resolve().parent.parent)
FAST = {"SquashfsSIFConverter__compressor": "lz4"}


def repo_with(tmp_path, base, extra):
    """(file:// URL, sha) of a repository whose Dockerfile ends with `extra`."""
    name = uuid.uuid4().hex[:8]
    sha = make_repo(tmp_path / f"repo-{name}", base, files={"Dockerfile": dockerfile(base, marker=name) + extra})
    return f"file://{tmp_path}/repo-{name}", sha


def builder(cfg, image, url, ref, env=None, stop_at=""):
    """``binderhub-hpc build`` as its own process."""
    env = dict(
        env or os.environ,
        BINDERHUB_HPC_STOP_AT=stop_at,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "binderhub_hpc.cli",
            "build",
            "--config",
            str(cfg),
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


def read_until(proc, text, timeout=300):
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line and '"STEP ' not in line and "RUN " not in line:
            return seen
        assert time.monotonic() < deadline, f"no {text!r}"
    raise AssertionError(f"the builder ended before {text!r}:\n" + "".join(seen[-20:]))


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_no_secret_of_binderhubs_environment_reaches_git_podman_or_a_run_step(build_base, tmp_path, monkeypatch):
    """BinderHub's process holds the hub token (and a site may keep other
    secrets in its environment). git and podman are replaced on PATH by
    wrappers that record their environment; a RUN step prints its own."""
    url, sha = repo_with(tmp_path, build_base, "RUN env | sort\n")
    secrets = {
        name: f"secret-{name.lower()}-{uuid.uuid4().hex}"
        for name in (
            "JUPYTERHUB_API_TOKEN",
            "BINDERHUB_API_TOKEN",
            "BINDERHUB_HPC_JOB_TAG_KEY",
            "SITE_DB_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
        )
    }
    wrappers, dumps = tmp_path / "bin", tmp_path / "dumps"
    wrappers.mkdir()
    dumps.mkdir()
    for tool in ("git", "podman"):
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (wrappers / tool).write_text(f'#!/bin/sh\nenv > "{dumps}/{tool}.$$"\nexec {real} "$@"\n')
        (wrappers / tool).chmod(0o755)
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    image = f"binderhub-hpc/test-env:{sha}"
    pipeline = make_pipeline(tmp_path / "registry", **FAST)
    log = []
    result = pipeline.run(BuildRequest(url, sha, image), lambda kind, payload: log.append(payload))
    assert result.outcome == "success", result.error
    seen = {tool: [p.read_text() for p in dumps.glob(f"{tool}.*")] for tool in ("git", "podman")}
    assert seen["git"] and seen["podman"], "the wrappers were not used"
    text = "\n".join(sum(seen.values(), [])) + "\n".join(log)
    # the RUN step printed its environment: it is in the log
    assert any("HOSTNAME=" in json.loads(x).get("message", "") for x in log)
    leaked = [name for name, value in secrets.items() if value in text]
    assert leaked == [], f"{leaked} reached the build"


def test_a_sigkilled_builder_leaves_no_repo2docker_podman_or_run_step_running(build_base, tmp_path):
    url, sha = repo_with(tmp_path, build_base, "RUN echo run-step-sleeping && sleep 300\n")
    image = f"binderhub-hpc/test-orphans:{sha}"
    cfg = write_config(tmp_path / "c.py", tmp_path / "registry", **FAST)
    proc = builder(cfg, image, url, sha)
    try:
        read_until(proc, "run-step-sleeping")
        deadline = time.monotonic() + 60
        while True:
            tree = descendants(proc.pid)
            names = {open(f"/proc/{p}/comm").read().strip() for p in tree if alive(p)}
            if {"jupyter-repo2do", "podman", "sleep"} <= names or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert {"jupyter-repo2do", "podman", "sleep"} <= names, names
        proc.kill()
        proc.wait()
        left = wait_gone(tree)
        assert left == [], [(p, open(f"/proc/{p}/comm").read().strip()) for p in left]
    finally:
        proc.kill()
        subprocess.run(["podman", "rmi", "--force", image], capture_output=True)


def scratch_left(scratch):
    return sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []


def test_no_clone_or_scratch_outlives_a_build_and_a_killed_builders_goes_with_the_next_build(build_base, tmp_path):
    """BinderHub's --no-clean made repo2docker keep every clone; builds now
    clone into a private scratch directory that goes when the build ends
    (success or failure), and the next build removes one a killed builder left."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    extra = dict(FAST, Repo2Docker__scratch_dir=str(scratch))
    pipeline = make_pipeline(tmp_path / "registry", **extra)
    url, sha = repo_with(tmp_path, build_base, "")
    assert pipeline.run(BuildRequest(url, sha, f"binderhub-hpc/test-scratch:{sha}")).outcome == "success"
    assert scratch_left(scratch) == []
    url, sha = repo_with(tmp_path, build_base, "RUN false\n")
    assert pipeline.run(BuildRequest(url, sha, f"binderhub-hpc/test-scratch-fails:{sha}")).outcome == "failure"
    assert scratch_left(scratch) == []

    url, sha = repo_with(tmp_path, build_base, "RUN echo run-step-sleeping && sleep 300\n")
    image = f"binderhub-hpc/test-scratch-killed:{sha}"
    proc = builder(write_config(tmp_path / "c.py", tmp_path / "registry", **extra), image, url, sha)
    try:
        read_until(proc, "run-step-sleeping")
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    left = scratch_left(scratch)
    assert len(left) == 1 and left[0].startswith(f"bhpc-build-{os.uname().nodename}-{proc.pid}-"), left
    # the clone is in it, as repo2docker left it
    assert list((scratch / left[0] / "tmp").glob("repo2docker*/Dockerfile"))
    url, sha = repo_with(tmp_path, build_base, "")
    assert pipeline.run(BuildRequest(url, sha, f"binderhub-hpc/test-scratch-next:{sha}")).outcome == "success"
    assert scratch_left(scratch) == []
    subprocess.run(["podman", "rmi", "--force", image], capture_output=True)


def test_a_podman_image_a_builder_killed_after_publishing_left_is_removed_by_the_next_build_and_by_gc(
    build_base, tmp_path
):
    """Killed between the SIF's rename and `podman rmi`, a builder leaves its
    podman image; the next request for that image is a cache hit that builds
    nothing. The next build of any image of the registry removes it, and so
    does `binderhub-hpc gc` (run on the build host)."""
    root = tmp_path / "registry"
    cfg = write_config(tmp_path / "c.py", root, **FAST)
    pipeline = make_pipeline(root, **FAST)
    images = []

    def killed_before_rmi(n):
        url, sha = repo_with(tmp_path, build_base, "")
        image = f"binderhub-hpc/test-leftover-{n}:{sha}"
        images.append(image)
        proc = builder(cfg, image, url, sha, stop_at="cleanup")
        deadline = time.monotonic() + 300
        while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        assert pipeline.registry.exists(image) and pipeline.podman.exists(image)
        assert pipeline.run(BuildRequest(url, sha, image)).outcome == "cached"
        assert pipeline.podman.exists(image), "a cache hit removed it?"
        return image

    try:
        first = killed_before_rmi(0)
        # the next build (of another image, itself killed before its rmi)
        second = killed_before_rmi(1)
        assert not pipeline.podman.exists(first)
        out = subprocess.run(
            [sys.executable, "-m", "binderhub_hpc.cli", "gc", "--config", str(cfg)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        assert out.returncode == 0, out.stderr
        assert f"removed podman image {second}" in out.stdout
        assert not pipeline.podman.exists(second)
        # the SIFs stay
        assert all(pipeline.registry.exists(i) for i in images)
    finally:
        for i in images:
            subprocess.run(["podman", "rmi", "--force", i], capture_output=True)


def test_a_build_stopped_by_signal_stops_its_run_step_through_the_guard(build_base, tmp_path):
    """SIGTERM (a stop, a scancel) reaches the RUN step's container, which
    runs in a session of its own: the guard passes it on."""
    url, sha = repo_with(tmp_path, build_base, "RUN echo run-step-sleeping && sleep 300\n")
    image = f"binderhub-hpc/test-sigterm:{sha}"
    proc = builder(write_config(tmp_path / "c.py", tmp_path / "registry", **FAST), image, url, sha)
    try:
        read_until(proc, "run-step-sleeping")
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        result = json.loads([x for x in out.splitlines() if '"phase": "result"' in x][-1])["result"]
        assert result["outcome"] == "cancelled", result
        assert wait_gone(tree) == []
    finally:
        proc.kill()
        subprocess.run(["podman", "rmi", "--force", image], capture_output=True)
