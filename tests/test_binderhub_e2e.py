"""Upstream BinderHub end to end, as `binderhub-hpc demo` runs it: the
deployment of charts-free-config/ (JupyterHub, BinderHub as an external hub
service), our build executor, registry and Slurm spawner. A Binder build request goes waiting -> building -> built ->
launching -> ready, and the session answers; a second request skips the build.

On a multi-node dev cluster it runs as a site does: the hub and BinderHub on
the hub node, the build as a job on the build node as the build account
(SlurmBatchRunner, rootless podman), the session on a compute node.

Needs BinderHub installed (CI does not have it: skipped there).
"""

import json
import os
import re
import shutil
import subprocess
import time
import uuid

import pytest
import requests

from hubutil import free_port

pytest.importorskip("binderhub")
pytestmark = pytest.mark.cluster


@pytest.fixture(params=["apptainer", "podman"])
def demo(request, cluster, base_image, tmp_path):
    from binderhub_hpc_testing.demo import Demo

    # jobs of the service account read the registry, the build account
    # writes it (compute nodes see it at compute_root); the build node
    # reads the demo's build config: both on the shared filesystem
    root, compute_root = cluster.site_registry(f"e2e-{uuid.uuid4().hex[:8]}")
    state = tmp_path / "demo"
    if cluster.multi:
        state = cluster.root / "test-demos" / uuid.uuid4().hex[:8]
        state.mkdir(parents=True)
        os.chmod(state.parent, 0o755)
    d = Demo(
        state_dir=state,
        port=free_port(),
        registry_root=root,
        compute_root=compute_root,
        cluster=cluster,
        runtime=request.param,
    )
    t0 = time.monotonic()
    d.up(log=lambda msg: None)
    d.started_in = time.monotonic() - t0
    users = []
    d.users = users
    yield d
    d.stop()
    out = subprocess.run(
        ["squeue", "--noheader", "--user=binder", "--format=%i %j"],
        env=cluster.full_env(),
        capture_output=True,
        text=True,
    ).stdout
    left = [line.split()[0] for line in out.splitlines() if line.split()[1] in {f"binder-{u}"[:64] for u in users}]
    if left:  # the hub should have stopped them; do not leave them behind
        subprocess.run(["scancel", *left], env=cluster.full_env(), check=False)
    shutil.rmtree(root, ignore_errors=True)
    if cluster.multi:
        shutil.rmtree(state, ignore_errors=True)
    assert not left, f"jobs left after the demo stopped: {left}"


def build_events(url, timeout=900):
    events = []
    with requests.get(url, headers={"Accept": "text/event-stream"}, stream=True, timeout=(30, timeout)) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                ev = json.loads(line[5:])
                events.append(ev)
                if ev.get("phase") in ("ready", "failed"):
                    break
    return events


def phases(events):
    """The phases in order, repeats collapsed."""
    out = []
    for ev in events:
        p = ev.get("phase")
        if p and (not out or out[-1] != p):
            out.append(p)
    return out


def open_session(ready):
    r = requests.get(ready["url"] + "api/contents", headers={"Authorization": f"token {ready['token']}"}, timeout=30)
    assert r.status_code == 200, r.text
    return [c["name"] for c in r.json()["content"]]


def test_binder_link_builds_launches_and_reuses(demo, cluster):
    links = demo.links()
    t0 = time.monotonic()
    events = build_events(links["build_api"])
    first = time.monotonic() - t0
    seq = phases(events)
    assert seq[-1] == "ready", ("".join(e.get("message", "") for e in events)[-3000:], demo.log_tail())
    assert seq[0] == "waiting", seq
    for a, b in (("waiting", "building"), ("building", "built"), ("built", "launching"), ("launching", "ready")):
        assert seq.index(a) < seq.index(b), seq
    messages = "".join(e.get("message", "") for e in events)
    assert "Converting to SIF" in messages and "running on" in messages, messages[-2000:]
    if cluster.multi:
        # built on the build node, as the build account, through a build job;
        # the session on a compute node
        assert "Submitted build job" in messages and f"Building on build as {cluster.build_user}" in messages
        assert re.search(r"running on c\d", messages), messages[-2000:]
    ready = events[-1]
    demo.users.append(re.search(r"/user/([^/]+)/", ready["url"]).group(1))
    assert "hello-hpc.ipynb" in open_session(ready)

    # the second click: the image is found, no build
    t1 = time.monotonic()
    again = build_events(links["build_api"], timeout=300)
    second = time.monotonic() - t1
    seq2 = phases(again)
    assert seq2[-1] == "ready", again[-5:]
    assert "building" not in seq2 and seq2[0] == "built", seq2
    assert "Found built image" in "".join(e.get("message", "") for e in again)
    demo.users.append(re.search(r"/user/([^/]+)/", again[-1]["url"]).group(1))
    assert "hello-hpc.ipynb" in open_session(again[-1])

    # BinderHub's own endpoints, with our builder in /versions and metrics in /metrics
    versions = requests.get(links["binder"] + "versions", timeout=30).json()
    assert versions["builder_info"]["builder"] == "binderhub-hpc", versions
    health = requests.get(links["binder"] + "health", timeout=30)
    assert health.status_code == 200 and health.json()["ok"], health.text
    metrics = requests.get(links["binder"] + "metrics", timeout=30)
    assert metrics.status_code == 200
    assert 'binderhub_hpc_builds_total{outcome="success"} 1.0' in metrics.text
    assert 'binderhub_hpc_registry_lookups_total{result="hit"}' in metrics.text
    hub_metrics = requests.get(links["hub"] + "hub/metrics", timeout=30).text
    assert 'binderhub_hpc_launches_total{outcome="success",scheduler="slurm"} 2.0' in hub_metrics
    print(
        f"\nBinderHub demo: up in {demo.started_in:.1f} s; first click (build + launch) "
        f"{first:.1f} s; second click (launch only) {second:.1f} s"
    )
