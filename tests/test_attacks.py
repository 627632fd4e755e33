"""Attacks on the service's trust boundaries, run for real on the dev cluster
by a stranger's repository or a second real Unix account; each asserts the
attack is refused and can fail if it is not."""

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid

import pytest
import requests

from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc.scheduler.jobs import PENDING, RUNNING
from binderhub_hpc.scheduler.slurm import SlurmQueue
from binderhub_hpc.scheduler.tags import JobTags, count_sessions
from binderhub_hpc_testing.hostile import COMMENT_MAX, FORGED_REASON, LINE_BREAKS, held_job_argv, hostile_jobs
from binderhub_hpc_testing.hub import spawner_config
from binderhub_hpc_testing.repo import publish_podman_image

from hubutil import Hub

pytestmark = pytest.mark.cluster


# -- the scheduler's output ------------------------------------------------------
#
# The stranger (another cluster account, DevCluster.stranger_user) submits
# held jobs whose names and comments forge records of a running session's
# job and of a pending launch's (every Unicode line break, '|', squeue's own
# JSON, 10 KB, bytes that are not UTF-8), and quota tags made the old,
# public way or copied from the session. One real hub (JupyterHub, the
# proxy, our Slurm spawner) runs the session and the launch throughout.

#: where the tests' tag key is (the hub's own, see DevHub.tag_key)
SCHED_KEY_ENV = "BINDERHUB_HPC_ATTACK_TAG_KEY"
SCHED_NOTEBOOK = {
    "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# attacked"]}],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def sched_snapshot(cluster):
    """What the hub's spawner reads: squeue --json through SlurmQueue."""
    return asyncio.run(SlurmQueue().snapshot(env=cluster.full_env()))


def sched_job_of(cluster, hub_user):
    """The service account's job of a hub user's session, or None."""
    name = f"binder-{hub_user}"[:64]
    return next(
        (
            j
            for j in sched_snapshot(cluster).values()
            if j.name == name and j.user == cluster.service_user and j.state in (PENDING, RUNNING)
        ),
        None,
    )


@pytest.fixture(scope="module")
def sched_scene(cluster, base_image, tmp_path_factory):
    """A hub on the `batch` partition with one running session (A) and one
    launch (B) pending behind a whole-node blocker; then the stranger's
    hostile jobs. Everything is cancelled at the end."""
    stranger = cluster.ensure_stranger()
    root, compute_root = cluster.site_registry("attacks-" + uuid.uuid4().hex[:8])
    ctx = tmp_path_factory.mktemp("image")
    (ctx / "attacked.ipynb").write_text(json.dumps(SCHED_NOTEBOOK))
    (ctx / "Containerfile").write_text(f"FROM {base_image}\nCOPY attacked.ipynb /home/jovyan/attacked.ipynb\n")
    podman_tag = "localhost/binderhub-hpc-test-attacked:latest"
    subprocess.run(["podman", "build", "-q", "-t", podman_tag, str(ctx)], check=True, capture_output=True)
    reg = SIFRegistry(root=str(root), compute_root=compute_root)
    image = "binder-test/binder-2dattacked-abc123:" + secrets.token_hex(20)
    publish_podman_image(reg, image, podman_tag, {"repo_url": "https://example.org/attacked.git"})

    config = spawner_config(reg.root, partition="batch", compute_root=reg.compute_root)
    hub = Hub(str(tmp_path_factory.mktemp("hub")), config, env=cluster.env)
    scene = {"hub": hub, "image": image, "stranger": stranger, "events": [], "blockers": [], "theirs": {}}
    os.environ[SCHED_KEY_ENV] = hub.tag_key
    try:
        hub.start()
        # the whole of one compute node taken; the session takes the other
        # (the deployment's sessions ask for 2 CPUs, a node's all)
        nodes = sorted(cluster.compute_nodes)
        blocker = cluster.as_service_user(
            [
                "sbatch",
                "--parsable",
                "--partition=batch",
                f"--nodelist={nodes[-1]}",
                "--exclusive",
                "--job-name=attack-blocker",
                "--output=/dev/null",
                "--wrap=sleep 900",
            ]
        ).stdout.strip()
        scene["blockers"].append(blocker)
        hub.wait_for(
            lambda: getattr(sched_snapshot(cluster).get(blocker), "state", "") == RUNNING,
            timeout=60,
            what="the blocker to run",
        )

        def launch(label):
            user = hub.create_user(f"attack-{label}-{secrets.token_hex(3)}")
            opts = {"image": image, "token": secrets.token_hex(16), "repo_url": "https://example.org/attacked.git"}
            r = hub.start_server(user, opts)
            assert r.status_code in (201, 202), r.text
            return user, opts

        scene["a"], scene["a_opts"] = launch("a")
        assert hub.progress(scene["a"], timeout=180)[-1].get("ready"), hub.log_tail()
        scene["a_job"] = sched_job_of(cluster, scene["a"])
        assert scene["a_job"] and scene["a_job"].state == RUNNING
        scene["b"], _ = launch("b")
        threading.Thread(
            target=lambda: hub.progress(scene["b"], timeout=900, events=scene["events"]), daemon=True
        ).start()
        hub.wait_for(
            lambda: any("waiting in the batch queue" in e.get("message", "") for e in scene["events"]),
            timeout=60,
            what="the launch to wait in the queue",
        )
        scene["b_job"] = sched_job_of(cluster, scene["b"])
        assert scene["b_job"] and scene["b_job"].state == PENDING
        tags = JobTags(key_env=SCHED_KEY_ENV)
        scene["tags"] = tags
        scene["count_before"] = {
            job_user: count_sessions(sched_snapshot(cluster).values(), tags, image, job_user)
            for job_user in ("", cluster.service_user)
        }

        # the stranger's jobs, held in the same partition
        refused = {}
        for label, name, comment in hostile_jobs(
            scene["a_job"].job_id, scene["b_job"].job_id, scene["a_job"].tag, image, cluster.service_user
        ):
            p = cluster.as_stranger(held_job_argv(name, comment), check=False)
            if p.returncode:
                refused[label] = p.stderr.strip()[:200]
            else:
                scene["theirs"][label] = p.stdout.strip().split(";")[0]
        scene["refused"] = refused
        scene["submitted_at"] = time.monotonic()
        yield scene
    finally:
        everything = scene["blockers"] + list(scene["theirs"].values())
        for key in ("a", "b"):
            if key in scene:
                hub.stop_server(scene[key])
        if everything:
            subprocess.run(["scancel", *everything], env=cluster.full_env(), check=False)
        for key in ("a_job", "b_job"):
            if scene.get(key):
                subprocess.run(["scancel", scene[key].job_id], env=cluster.full_env(), check=False)
        hub.stop()
        os.environ.pop(SCHED_KEY_ENV, None)
        shutil.rmtree(root, ignore_errors=True)


def sched_watch(scene, seconds=10):
    """Let the hub poll (Spawner.poll_interval 2 s, the queue every 1 s)
    with the stranger's jobs in the queue for `seconds` since they came."""
    left = scene["submitted_at"] + seconds - time.monotonic()
    if left > 0:
        time.sleep(left)


def test_the_strangers_forged_records_are_in_the_queue(cluster, sched_scene):
    """The attack is real: sbatch took the stranger's jobs, and their
    comments hold lines that read as records of the session's job."""
    theirs, a_job = sched_scene["theirs"], sched_scene["a_job"]
    jobs = sched_snapshot(cluster)
    for label in LINE_BREAKS:
        assert f"comment-{label}" in theirs, sched_scene["refused"]
        j = jobs[theirs[f"comment-{label}"]]
        assert j.user == sched_scene["stranger"]
        assert any(line.startswith(f"{a_job.job_id}|CANCELLED|") for line in j.tag.splitlines())
    assert len(jobs[theirs["large"]].tag.encode()) > COMMENT_MAX - 4
    if "huge" in theirs:  # Slurm 22.05 refuses comments over 1024 bytes
        assert len(jobs[theirs["huge"]].tag.encode()) > 10 * 1024 - 4
    assert jobs[theirs["copied-tag"]].tag == a_job.tag
    print(f"\n{len(theirs)} hostile jobs in the queue; refused by sbatch: {sched_scene['refused'] or 'none'}")


def test_a_running_session_keeps_running_among_forged_records(cluster, sched_scene):
    hub, a, a_job = sched_scene["hub"], sched_scene["a"], sched_scene["a_job"]
    checks = 0
    deadline = sched_scene["submitted_at"] + 12
    while time.monotonic() < deadline:
        assert hub.server_ready(a), f"the session was ended; hub log:\n{hub.log_tail()}"
        checks += 1
        time.sleep(1)
    server = hub.user(a)["servers"][""]
    r = requests.get(
        hub.url + server["url"] + "api/contents",
        headers={"Authorization": f"token {sched_scene['a_opts']['token']}"},
        timeout=30,
    )
    assert r.status_code == 200 and "attacked.ipynb" in r.text
    assert sched_snapshot(cluster)[a_job.job_id].state == RUNNING
    assert checks >= 5


def test_a_pending_launch_keeps_waiting_and_shows_no_forged_reason(cluster, sched_scene):
    hub, b, b_job, events = sched_scene["hub"], sched_scene["b"], sched_scene["b_job"], sched_scene["events"]
    sched_watch(sched_scene, 12)
    messages = [e.get("message", "") for e in events]
    assert not any(e.get("failed") or e.get("ready") for e in events), messages
    assert not [m for m in messages if FORGED_REASON in m or "running on" in m], messages
    spawner = hub.user(b)["servers"][""]
    assert spawner["pending"] == "spawn" and not spawner["ready"]
    assert sched_snapshot(cluster)[b_job.job_id].state == PENDING
    # it still says where it stands, in the scheduler's words
    assert "waiting in the batch queue" in messages[-1]


def test_the_quota_count_is_unchanged_by_the_strangers_jobs(cluster, sched_scene):
    tags, image = sched_scene["tags"], sched_scene["image"]
    jobs = sched_snapshot(cluster)
    for job_user, before in sched_scene["count_before"].items():
        assert before == (2, 2), job_user  # the session and the pending launch
        assert count_sessions(jobs.values(), tags, image, job_user) == before, job_user
    theirs = [jobs[i] for i in sched_scene["theirs"].values()]
    assert count_sessions(theirs, tags, image) == (0, 0)
