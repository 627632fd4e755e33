"""Fixtures for the build tests: a git repository, a registry, a base image."""

import os
import shutil
import subprocess

import pytest

from binderhub_hpc.dev.repo import NOTEBOOK, make_pipeline, make_repo  # noqa: F401  (re-exported)

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
    out = subprocess.run(["siftool", "info", "1", str(sif)], check=True, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("Offset:"):
            return int(line.split(":")[1])
    raise AssertionError(out)


def sif_listing(sif):
    out = subprocess.run(["unsquashfs", "-o", str(sif_offset(sif)), "-lln", str(sif)],
                         check=True, capture_output=True, text=True).stdout
    return out


def sif_cat(sif, path):
    return subprocess.run(["unsquashfs", "-o", str(sif_offset(sif)), "-cat", str(sif), path],
                          check=True, capture_output=True, text=True).stdout
