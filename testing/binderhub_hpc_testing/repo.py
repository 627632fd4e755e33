"""Example repositories the dev cluster can build, for the demo, the tests
and the benchmarks.

Only Dockerfile repositories build here without the internet (repo2docker's
other buildpacks download micromamba and conda-forge packages), so each is a
Dockerfile on the local base image that copies the repository into
/home/jovyan, plus a notebook.
"""

import subprocess
import textwrap
from pathlib import Path

NOTEBOOK = '{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n'


def dockerfile(base, marker=""):
    """A repo2docker-compatible Dockerfile: the repository in jovyan's home.
    `marker` (an ENV line) makes otherwise equal repositories differ."""
    env = f'ENV BINDER_EXAMPLE_MARKER="{marker}"\n' if marker else ""
    return (
        textwrap.dedent(f"""\
        FROM {base}
        USER root
        COPY --chown=1000:1000 . /home/jovyan
        """)
        + env
        + "USER 1000\nWORKDIR /home/jovyan\n"
    )


def make_repo(path, base, files=None, marker="", message="Example repository"):
    """Create a one-commit git repository at `path`; returns its commit sha.
    `files` adds or replaces files (name -> text; None leaves one out)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    contents = {
        "Dockerfile": dockerfile(base, marker),
        "hello.ipynb": NOTEBOOK,
        "README.md": "# binderhub-hpc example repository\n",
    }
    contents.update(files or {})
    for name, text in contents.items():
        if text is not None:
            (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.email=example@binderhub-hpc.invalid", "-c", "user.name=binderhub-hpc"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", message], check=True)
    return subprocess.run(git[:3] + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def make_pipeline(root, **kwargs):
    """A BuildPipeline on registry `root` for this machine (content providers
    restricted: no internet). kwargs like ``Repo2Docker__command=[...]``."""
    from traitlets.config import Config

    from binderhub_hpc.builder.pipeline import BuildPipeline

    cfg = Config()
    cfg.SIFRegistry.root = str(root)
    cfg.Repo2Docker.egress_restricted = True
    for key, value in kwargs.items():
        cls, attr = key.split("__")
        cfg[cls][attr] = value
    return BuildPipeline(config=cfg)


def publish_podman_image(registry, image, tag, metadata=None):
    """Publish the podman image `tag` (root's storage) as `image` in
    `registry`, converted to a SIF by our converter, as a build would."""
    from binderhub_hpc.builder.convert import ConversionSource, SquashfsSIFConverter
    from binderhub_hpc.builder.export import PodmanImage

    podman = PodmanImage(rootless=False)
    tmp = registry.tempfile(image, "sif")
    try:
        SquashfsSIFConverter().convert(ConversionSource(tag, podman.inspect(tag), podman), tmp)
        return registry.publish(image, {"sif": tmp}, metadata or {})
    except BaseException:
        registry.discard(tmp)
        raise
