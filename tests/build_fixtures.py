"""Fixtures for the build tests: a git repository, a registry, a base image."""

import os
import shutil
import subprocess
import textwrap

import pytest

BASE_IMAGE = "localhost/binderhub-hpc-base:bookworm"

NOTEBOOK = '{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n'


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


def make_repo(path, base, files=None, marker=""):
    """A git repository with a Dockerfile FROM `base` and a notebook."""
    path.mkdir(parents=True, exist_ok=True)
    dockerfile = textwrap.dedent(f"""\
        FROM {base}
        USER root
        COPY --chown=1000:1000 . /home/jovyan
        ENV BINDER_TEST_MARKER="{marker}"
        USER 1000
        WORKDIR /home/jovyan
        """)
    contents = {"Dockerfile": dockerfile, "hello.ipynb": NOTEBOOK, "README.md": "# test\n"}
    contents.update(files or {})
    for name, text in contents.items():
        (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.email=test@example.org", "-c", "user.name=test"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "fixture"], check=True)
    sha = subprocess.run(git[:3] + ["rev-parse", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    return sha


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


def make_pipeline(root, **kwargs):
    from traitlets.config import Config

    from binderhub_hpc.build.pipeline import BuildPipeline

    cfg = Config()
    cfg.SIFRegistry.root = str(root)
    cfg.Repo2Docker.egress_restricted = True
    for key, value in kwargs.items():
        cls, attr = key.split("__")
        cfg[cls][attr] = value
    return BuildPipeline(config=cfg)


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
