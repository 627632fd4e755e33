"""End to end: real JupyterHub + configurable-http-proxy + our Slurm spawner
on the dev cluster, sessions in Apptainer and in rootless podman (both from
the registry's SIF), with BinderHub-shaped user_options."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import requests
from sessionutil import run_code

from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc.sif import minimal_sif
from binderhub_hpc_testing.hub import spawner_config
from binderhub_hpc_testing.repo import publish_podman_image

from hubutil import Hub, fill_batch_partition, session_scratch

pytestmark = pytest.mark.cluster

NOTEBOOK = {
    "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Hello from a Binder on Slurm"]}],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture(scope="session")
def launch_registry(cluster, base_image, tmp_path_factory):
    """A registry (inside the cluster's, which compute nodes see at their own
    path) holding one notebook image, a SIF made by our converter."""
    root, compute_root = cluster.site_registry("launch-" + uuid.uuid4().hex[:8])
    ctx = tmp_path_factory.mktemp("image")
    (ctx / "hello.ipynb").write_text(json.dumps(NOTEBOOK))
    (ctx / "Containerfile").write_text(
        f"FROM {base_image}\nCOPY --chown=1000:1000 hello.ipynb /home/jovyan/hello.ipynb\n"
    )
    tag = "localhost/binderhub-hpc-test-notebook:latest"
    subprocess.run(["podman", "build", "-q", "-t", tag, str(ctx)], check=True, capture_output=True)
    reg = SIFRegistry(root=str(root), compute_root=compute_root)
    image = "binder-test/binder-2dexample-2dnotebook-abc123:" + secrets.token_hex(20)
    publish_podman_image(reg, image, tag, {"repo_url": "https://example.org/notebook.git"})
    yield reg, image
    shutil.rmtree(root, ignore_errors=True)


def hub_config(registry, partition="interactive", extra="", runtime="apptainer"):
    return spawner_config(
        registry.root, partition=partition, extra=extra, runtime=runtime, compute_root=registry.compute_root
    )


@pytest.fixture
def hub(cluster, launch_registry, runtime, tmp_path):
    reg, _ = launch_registry
    cancel_binder_jobs(cluster)
    h = Hub(str(tmp_path), hub_config(reg, runtime=runtime), env=cluster.env)
    h.start()
    yield h
    h.stop()
    cancel_binder_jobs(cluster)


def cancel_binder_jobs(cluster):
    """Leave the partitions empty for the next test, whatever this one did."""

    def ours():
        out = subprocess.run(
            ["squeue", "--noheader", "--user=binder", "--format=%i %j"],
            env=cluster.full_env(),
            capture_output=True,
            text=True,
        ).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()[1] in MY_JOB_NAMES]

    ids = ours()
    if ids:
        subprocess.run(["scancel", *ids], env=cluster.full_env(), check=False)
    deadline = time.monotonic() + 30
    while ours() and time.monotonic() < deadline:
        time.sleep(0.5)


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
    name, opts, r = _launch(hub, image)
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

    # the repository's files are writable
    r = requests.put(
        url + "api/contents/new.txt",
        headers={"Authorization": f"token {opts['token']}"},
        json={"type": "file", "format": "text", "content": "hello"},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    # the job account's home is not visible inside the session
    marker = cluster.service_home / "binder-home-marker"
    marker.write_text("private")
    seen = run_code(
        url,
        opts["token"],
        f"""
import os, subprocess
print(subprocess.run("ls {cluster.service_home} 2>&1", shell=True, capture_output=True, text=True).stdout)
print("HOME=" + os.environ["HOME"], "CWD=" + os.getcwd())
""",
    )
    assert "binder-home-marker" not in seen and "HOME=/home/jovyan" in seen and "CWD=/home/jovyan" in seen, seen
    # per-session scratch exists on the node while the job runs ...
    node, scratch = session_scratch(cluster, job_id)
    assert node in cluster.compute_nodes
    assert os.path.isdir(scratch)

    r = hub.stop_server(name)
    assert r.status_code in (202, 204), r.text
    hub.wait_for(lambda: job_id not in squeue_ids(cluster), timeout=60, what="job to leave the queue")
    hub.wait_for(lambda: not hub.user(name)["servers"], timeout=60, what="server to be gone")
    # ... and is gone once it ended, with the container (which podman's
    # conmon had taken out of the job's process tree)
    hub.wait_for(lambda: not os.path.exists(scratch), timeout=30, what="scratch to be removed")
    left = cluster.as_service_user(["podman", "ps", "-a", "--format", "{{.Names}}"]).stdout.split()
    assert os.path.basename(scratch) not in left
    mounts = cluster.on_node(node, ["podman", "unshare", "cat", "/proc/self/mountinfo"], user=True).stdout
    assert os.path.basename(scratch) not in mounts


#: Slurm job names of the sessions this module starts: cleanup touches no others
MY_JOB_NAMES = {"blocker"}


def _launch(hub, image, name=None, **extra):
    name = hub.create_user(name or "binder-example-" + secrets.token_hex(3))
    MY_JOB_NAMES.add(f"binder-{name}"[:64])
    opts = binder_options(image)
    opts.update(extra)
    r = hub.start_server(name, opts)
    return name, opts, r


def _job_of(cluster, name):
    out = subprocess.run(
        ["squeue", "--noheader", "--user=binder", "--format=%i %j"],
        env=cluster.full_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        jid, jname = line.split()
        if jname == f"binder-{name}"[:64]:
            return jid
    return None


def test_pending_launch_says_why_and_where(cluster, launch_registry, tmp_path):
    """Fill the non-oversubscribed partition, then launch: the progress
    stream names the reason and the queue position, then the node."""
    reg, image = launch_registry
    cancel_binder_jobs(cluster)
    h = Hub(str(tmp_path), hub_config(reg, partition="batch"), env=cluster.env).start()
    blockers = fill_batch_partition(cluster)
    try:
        name, opts, r = _launch(h, image)
        assert r.status_code == 202, r.text
        events = []
        import threading

        t = threading.Thread(target=h.progress, args=(name,), kwargs={"events": events})
        t.start()

        def reasoned():
            return [
                e["message"]
                for e in events
                if "position" in e.get("message", "")
                and ("free resources" in e["message"] or "higher priority" in e["message"])
            ]

        h.wait_for(reasoned, timeout=60, what="a pending message with the scheduler's reason")
        queue = subprocess.run(
            ["squeue", "--format=%i %P %T %r %j"], env=cluster.full_env(), capture_output=True, text=True
        ).stdout
        msg = reasoned()[0]
        assert "batch queue" in msg
        assert "position 1 of 1" in msg, queue
        subprocess.run(["scancel", *blockers], env=cluster.full_env(), check=True)
        t.join(180)
        assert events[-1].get("ready"), events
        assert any("running on" in e.get("message", "") for e in events), [e.get("message") for e in events]
        h.stop_server(name)
        h.wait_for(lambda: not h.user(name)["servers"], timeout=60, what="server to stop")
    finally:
        subprocess.run(["scancel", *blockers], env=cluster.full_env(), check=False)
        h.stop()
        cancel_binder_jobs(cluster)


def test_job_killed_outside_the_hub_is_noticed(cluster, hub, launch_registry):
    _, image = launch_registry
    name, opts, r = _launch(hub, image)
    assert hub.progress(name)[-1].get("ready")
    job_id = _job_of(cluster, name)
    assert job_id
    subprocess.run(["scancel", job_id], env=cluster.full_env(), check=True)
    # the hub polls every 2 s (Spawner.poll_interval) through the shared reflector
    hub.wait_for(lambda: not hub.user(name)["servers"], timeout=30, what="the hub to notice the dead job")


def test_hub_restart_reconnects_to_running_job(cluster, launch_registry, runtime, tmp_path):
    reg, image = launch_registry
    cancel_binder_jobs(cluster)
    h = Hub(str(tmp_path), hub_config(reg, runtime=runtime), env=cluster.env).start()
    name, opts, r = _launch(h, image)
    try:
        assert h.progress(name)[-1].get("ready")
        job_id = _job_of(cluster, name)
        h.stop()
        assert job_id in squeue_ids(cluster), "stopping the hub must leave the job running"
        h.start()
        server = h.wait_for(lambda: h.server_ready(name), timeout=30, what="server after restart")
        r = requests.get(
            h.url + server["url"] + "api/contents", headers={"Authorization": f"token {opts['token']}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert job_id in squeue_ids(cluster)
    finally:
        h.stop_server(name)
        h.wait_for(lambda: not h.user(name)["servers"], timeout=60, what="server to stop")
        h.stop()


@pytest.mark.parametrize(
    "image, expect",
    [
        ("../../../../etc/passwd:latest", "not in the registry"),
        ("binder-test/no-such-repo:deadbeef", "not in the registry"),
        ("no-tag-at-all", "not of the form name:tag"),
        ("evil\n#SBATCH --uid=0:tag", "control characters"),
        ("x" * 2000 + ":tag", "longer than"),
    ],
)
def test_bad_image_names_fail_clearly(cluster, hub, image, expect):
    name, opts, r = _launch(hub, image)
    if r.status_code == 400:
        assert expect in r.json()["message"]
        return
    events = hub.progress(name)
    assert events[-1].get("failed"), events
    assert expect in events[-1]["message"], events[-1]
    assert _job_of(cluster, name) is None


def test_unknown_user_options_are_refused(cluster, hub, launch_registry):
    _, image = launch_registry
    name, opts, r = _launch(hub, image, cmd="rm -rf /")
    if r.status_code == 400:
        assert "Unknown launch options" in r.json()["message"]
    else:
        events = hub.progress(name)
        assert events[-1].get("failed") and "Unknown launch options" in events[-1]["message"], events
    assert _job_of(cluster, name) is None


def test_gc_never_evicts_the_image_of_a_running_session(cluster, hub, launch_registry, tmp_path):
    reg, image = launch_registry
    # a second, unused and older image that gc may take
    other = "binder-test/binder-2dother-2drepo-def456:" + secrets.token_hex(20)
    tmp = reg.tempfile(other)
    tmp.write_bytes(minimal_sif(b"x" * 4096))
    reg.publish(other, {"sif": tmp}, {})
    os.utime(reg.used_path(other), (1, 1))
    os.utime(reg.used_path(image), (2, 2))  # the running one is even older

    name, opts, r = _launch(hub, image)
    assert hub.progress(name)[-1].get("ready")
    cfg = tmp_path / "gc_config.py"
    cfg.write_text(f"c.SIFRegistry.root = {str(reg.root)!r}\n")
    env = dict(os.environ, JUPYTERHUB_API_TOKEN=hub.token)

    def gc(hub_url):
        argv = [sys.executable, "-m", "binderhub_hpc.cli", "gc", "--config", str(cfg), "--max-size", "1"]
        return subprocess.run(argv + ["--hub-url", hub_url], env=env, capture_output=True, text=True)

    out = gc(hub.url)
    assert out.returncode == 0, out.stderr
    assert reg.lookup(image) is not None, out.stdout
    assert reg.lookup(other) is None, out.stdout
    assert "1 images evicted" in out.stdout
    # the hub being unreachable stops gc rather than evicting blind
    bad = gc("http://127.0.0.1:9")
    assert bad.returncode == 1 and "cannot ask" in bad.stderr
    assert reg.lookup(image) is not None


def test_tokens_through_a_private_file(cluster, launch_registry, tmp_path):
    """secrets_in_file (the PBS default): the tokens reach the real job in a
    0600 file of the job account, which the job reads and deletes; neither
    the script nor sbatch's environment holds them."""
    reg, image = launch_registry
    cancel_binder_jobs(cluster)
    h = Hub(
        str(tmp_path), hub_config(reg, extra="c.SlurmBinderSpawner.secrets_in_file = True"), env=cluster.env
    ).start()
    try:
        name, opts, r = _launch(h, image)
        assert h.progress(name)[-1].get("ready"), h.log_tail()
        server = h.user(name)["servers"][""]
        r = requests.get(
            h.url + server["url"] + "api/contents", headers={"Authorization": f"token {opts['token']}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        job_id = _job_of(cluster, name)
        script = subprocess.run(
            ["scontrol", "write", "batch_script", job_id, "-"], env=cluster.full_env(), capture_output=True, text=True
        ).stdout
        assert ".binder-secrets." in script and opts["token"] not in script
        assert "JUPYTERHUB_API_TOKEN" not in script.split("--export=")[1].splitlines()[0]
        assert not list(cluster.jobs_dir.glob(".binder-secrets.*")), "the job must delete the file"
        h.stop_server(name)
        h.wait_for(lambda: not h.user(name)["servers"], timeout=60, what="server to stop")
    finally:
        h.stop()
        cancel_binder_jobs(cluster)


def test_a_job_cancelled_while_pending_leaves_no_token_file(cluster, launch_registry, tmp_path):
    """The private token file (secrets_in_file, the PBS default) is deleted
    by the job when it starts; a job cancelled before that must not leave
    it behind."""
    reg, image = launch_registry
    cancel_binder_jobs(cluster)
    h = Hub(
        str(tmp_path),
        hub_config(reg, partition="batch", extra="c.BinderBatchMixin.secrets_in_file = True"),
        env=cluster.env,
    ).start()
    blockers = fill_batch_partition(cluster)
    try:
        before = set(cluster.jobs_dir.glob(".binder-secrets.*"))
        name, opts, r = _launch(h, image)
        assert r.status_code == 202, r.text
        h.wait_for(lambda: _job_of(cluster, name), timeout=60, what="the session's job to be queued")
        written = set(cluster.jobs_dir.glob(".binder-secrets.*")) - before
        assert len(written) == 1, written
        assert oct(next(iter(written)).stat().st_mode & 0o777) == "0o600"
        h.stop_server(name)
        h.wait_for(lambda: not h.user(name)["servers"], timeout=60, what="the server to stop")
        assert not _job_of(cluster, name)
        assert not (set(cluster.jobs_dir.glob(".binder-secrets.*")) - before), "the token file was left behind"
    finally:
        subprocess.run(["scancel", *blockers], env=cluster.full_env(), check=False)
        h.stop()
        cancel_binder_jobs(cluster)
