"""End to end: real JupyterHub + configurable-http-proxy + our Slurm spawner
on the dev cluster + rootless podman, with BinderHub-shaped user_options."""

import json
import os
import secrets
import shutil
import subprocess
import textwrap
import time
import uuid

import pytest
import requests

from binderhub_hpc.registry import SIFRegistry

from hubutil import Hub

pytestmark = pytest.mark.cluster

NOTEBOOK = {
    "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Hello from a Binder on Slurm"]}],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture(scope="session")
def launch_registry(cluster, base_image, tmp_path_factory):
    """A registry readable by the service account holding one notebook image
    as an OCI archive (what the podman runtime reads)."""
    root = cluster.root / "test-registries" / uuid.uuid4().hex[:8]
    root.mkdir(parents=True)
    for p in (root, root.parent):
        os.chmod(p, 0o755)
    ctx = tmp_path_factory.mktemp("image")
    (ctx / "hello.ipynb").write_text(json.dumps(NOTEBOOK))
    (ctx / "Containerfile").write_text(
        f"FROM {base_image}\nCOPY --chown=1000:1000 hello.ipynb /home/jovyan/hello.ipynb\n"
    )
    tag = "localhost/binderhub-hpc-test-notebook:latest"
    subprocess.run(["podman", "build", "-q", "-t", tag, str(ctx)], check=True, capture_output=True)
    reg = SIFRegistry(root=str(root), formats=["oci-archive"])
    image = "binder-test/binder-2dexample-2dnotebook-abc123:" + secrets.token_hex(20)
    tmp = reg.tempfile(image, "oci-archive")
    tmp.unlink()
    subprocess.run(["podman", "save", "--format", "oci-archive", "-o", str(tmp), tag], check=True, capture_output=True)
    reg.publish(image, {"oci-archive": tmp}, {"repo_url": "https://example.org/notebook.git"})
    yield reg, image
    shutil.rmtree(root, ignore_errors=True)


def hub_config(registry, partition="interactive", extra=""):
    return f"""
c.SIFRegistry.root = {str(registry.root)!r}
c.SIFRegistry.formats = ["oci-archive"]
c.SlurmBinderSpawner.container_runtime = "podman"
c.SlurmBinderSpawner.job_user = "binder"
c.SlurmBinderSpawner.exec_prefix = "runuser -u {{username}} --"
c.SlurmBinderSpawner.host_python = "/usr/bin/python3"
c.SlurmBinderSpawner.req_partition = {partition!r}
c.SlurmBinderSpawner.req_runtime = "00:30:00"
c.SlurmBinderSpawner.queue_poll_interval = 1.0
{extra}
"""


@pytest.fixture
def hub(cluster, launch_registry, tmp_path):
    reg, _ = launch_registry
    h = Hub(str(tmp_path), hub_config(reg), env=cluster.env)
    h.start()
    yield h
    h.stop()
    subprocess.run(["scancel", "--name=binder-" + "x", "-u", "binder"], env=cluster.full_env(), check=False)


def binder_options(image):
    return {
        "image": image,
        "token": secrets.token_hex(16),
        "repo_url": "https://example.org/notebook.git",
        "binder_ref_url": "https://example.org/notebook/tree/abc123",
        "binder_launch_host": "https://binder.example.org/",
        "binder_request": "v2/gh/example/notebook/abc123",
        "binder_persistent_request": "v2/gh/example/notebook/abc123",
    }


def squeue_ids(cluster):
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%i"], env=cluster.full_env(), capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_launch_open_notebook_and_stop(cluster, hub, launch_registry):
    _, image = launch_registry
    name = hub.create_user("binder-example-" + secrets.token_hex(3))
    opts = binder_options(image)
    r = hub.start_server(name, opts)
    assert r.status_code in (201, 202), r.text
    events = hub.progress(name)
    assert events[-1].get("ready"), (events, hub.log_tail())
    messages = [e.get("message", "") for e in events]
    assert any("Job" in m for m in messages), messages

    server = hub.user(name)["servers"][""]
    job_id = server["state"]["job_id"] if "state" in server else None
    # through the proxy, with the Binder token, as the Binder UI would
    url = hub.url + server["url"]
    r = requests.get(url + "api/contents", headers={"Authorization": f"token {opts['token']}"}, timeout=30)
    assert r.status_code == 200, r.text
    names = [c["name"] for c in r.json()["content"]]
    assert "hello.ipynb" in names
    # without the token: refused
    r = requests.get(url + "api/contents", timeout=30)
    assert r.status_code in (401, 403)

    # the job script in Slurm holds no secret
    ids = squeue_ids(cluster)
    assert ids, "no job in the queue"
    for jid in ids:
        script = subprocess.run(
            ["scontrol", "write", "batch_script", jid, "-"], env=cluster.full_env(), capture_output=True, text=True
        ).stdout
        if name not in script:
            continue
        assert opts["token"] not in script
        assert "JUPYTERHUB_API_TOKEN" in script  # by name only
        job_id = jid
    assert job_id

    r = hub.stop_server(name)
    assert r.status_code in (202, 204), r.text
    hub.wait_for(lambda: job_id not in squeue_ids(cluster), timeout=60, what="job to leave the queue")
    hub.wait_for(lambda: not hub.user(name)["servers"], timeout=60, what="server to be gone")
