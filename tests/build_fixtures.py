"""Fixtures for the build tests: a git repository, a registry, a base image."""

import os
import shutil
import subprocess

import pytest

from binderhub_hpc_testing.repo import NOTEBOOK, make_pipeline, make_repo  # noqa: F401  (re-exported)

BASE_IMAGE = "localhost/binderhub-hpc-base:bookworm"


def need_build_tools():
    if os.geteuid() != 0:
        pytest.skip("the build tests run podman as root")
    for tool in ("podman", "mksquashfs", "siftool", "unsquashfs", "jupyter-repo2docker", "git"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="session")
def build_base(request):
    """The local base image (made by the dev cluster when missing)."""
    need_build_tools()
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode != 0:
        return request.getfixturevalue("base_image")
    return BASE_IMAGE


@pytest.fixture
def fixture_repo(tmp_path, build_base):
    """(file:// URL, sha) of a fresh repository; unique content per test."""
    repo = tmp_path / "repo"
    sha = make_repo(repo, build_base, marker=str(tmp_path))
    return f"file://{repo}", sha


@pytest.fixture
def registry_root(tmp_path):
    root = tmp_path / "registry"
    root.mkdir()
    return root


def sif_offset(sif):
    """Offset of the squashfs partition in a SIF (from `siftool info`)."""
    out = subprocess.run(["siftool", "info", "1", str(sif)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("Offset:"):
            return int(line.split(":")[1])
    raise AssertionError(out)


def sif_listing(sif):
    out = subprocess.run(
        ["unsquashfs", "-o", str(sif_offset(sif)), "-lln", str(sif)], check=True, capture_output=True, text=True
    ).stdout
    return out


def sif_cat(sif, path):
    return subprocess.run(
        ["unsquashfs", "-o", str(sif_offset(sif)), "-cat", str(sif), path], check=True, capture_output=True, text=True
    ).stdout


# ------------------------------------------------------------ served repositories
# Builds on the build node run as the build account, and git refuses a
# repository another account owns: repositories are served over HTTP, as a
# site's git server would serve them (on the head node, at a port the build
# node's firewall lets builds reach; on loopback on a single node).


@pytest.fixture(scope="session")
def git_server(cluster):
    """A git HTTP server for the session's test repositories."""
    import uuid

    root = cluster.root / "test-repos" / f"served-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    os.chmod(root.parent, 0o755)
    os.chmod(root, 0o755)
    server = git_server_for(cluster, root).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def git_server_for(cluster, root, **auth):
    from binderhub_hpc_testing.gitserver import GitServer

    if cluster.multi:
        lo, hi = cluster.SITE_GIT_PORTS
        return GitServer(root, cluster.host("head").address, range(lo, hi + 1), **auth)
    return GitServer(root, **auth)


@pytest.fixture
def served_repo(git_server, build_base, request):
    """(http URL, sha) of a fresh repository served by `git_server`."""
    import uuid

    name = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    sha = make_repo(git_server.root / name, build_base, marker=name)
    yield git_server.url(name), sha
    shutil.rmtree(git_server.root / name, ignore_errors=True)


def write_config(path, root, **extra):
    """A config file for ``binderhub-hpc build`` (readable by the build
    account): registry `root`, egress restricted, `Class__trait=value` extras."""
    lines = [f"c.SIFRegistry.root = {str(root)!r}", "c.Repo2Docker.egress_restricted = True"]
    lines += [f"c.{k.replace('__', '.')} = {v!r}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    return path
