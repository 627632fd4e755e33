"""A cluster whose parts fail, with real processes on the multi-node dev
cluster (hub, build and compute nodes as hosts of their own): a compute
node dying under its sessions, a drained node, a hub restarting while
sessions run on two nodes."""

import os
import secrets
import signal
import subprocess
import uuid

import pytest
import requests

from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc_testing.hub import spawner_config
from binderhub_hpc_testing.repo import publish_podman_image

from hubutil import Hub

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def multi(cluster):
    if not cluster.multi:
        pytest.skip("needs the multi-node dev cluster (binderhub-hpc devcluster up --nodes 4)")
    if len(cluster.compute_nodes) < 2:
        pytest.skip("needs two compute nodes")
    return cluster


@pytest.fixture(scope="module")
def registry(multi, base_image):
    root, compute_root = multi.site_registry("faults-" + uuid.uuid4().hex[:8])
    reg = SIFRegistry(root=str(root), compute_root=compute_root)
    image = "binder-test/binder-2dfaults-abc123:" + secrets.token_hex(20)
    publish_podman_image(reg, image, base_image)
    yield reg, image
    subprocess.run(["rm", "-rf", str(root)], check=False)


def options(image):
    return {
        "image": image,
        "token": secrets.token_hex(16),
        "repo_url": "https://example.org/r.git",
        "binder_ref_url": "https://example.org/r/tree/abc",
        "binder_launch_host": "https://binder.example.org/",
        "binder_request": "v2/gh/example/r/abc",
        "binder_persistent_request": "v2/gh/example/r/abc",
    }


def node_of(cluster, job_id):
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%N"], env=cluster.full_env(), capture_output=True, text=True
    ).stdout.strip()


def launch(hub, image, name=None):
    name = hub.create_user(name or "binder-faults-" + secrets.token_hex(3))
    hub.users.append(name)
    opts = options(image)
    r = hub.start_server(name, opts)
    assert r.status_code in (201, 202), r.text
    events = hub.progress(name)
    assert events[-1].get("ready"), (events, hub.log_tail())
    server = hub.user(name)["servers"][""]
    return name, opts["token"], server


def answers(hub, server, token):
    r = requests.get(hub.url + server["url"] + "api/status", headers={"Authorization": f"token {token}"}, timeout=30)
    return r.status_code == 200


@pytest.fixture
def hub(multi, registry, tmp_path):
    reg, _ = registry
    # whole-node sessions on the non-oversubscribed partition: two sessions,
    # two nodes
    extra = f'c.BinderBatchMixin.req_nprocs = "{os.cpu_count()}"\nc.BinderBatchMixin.req_memory = "1G"\n'
    h = Hub(
        str(tmp_path),
        spawner_config(reg.root, partition="batch", compute_root=reg.compute_root, extra=extra),
        env=multi.env,
    ).start()
    h.users = []
    yield h
    for name in h.users:
        h.stop_server(name)
    h.stop()
    # whatever a test did to the nodes: back in service
    multi.up()


def kill_node(cluster, node):
    """Kill everything that runs on `node`: its slurmd, the jobs' steps,
    the sessions (every process in the node's network namespace)."""
    host = cluster.host(node)
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def node_state(cluster, node):
    return subprocess.run(
        ["sinfo", "-h", "-N", "-n", node, "-o", "%T"], env=cluster.full_env(), capture_output=True, text=True
    ).stdout.strip()


def test_a_dead_compute_node_ends_its_sessions_and_the_next_launch_goes_elsewhere(multi, hub, registry):
    _, image = registry
    name, token, server = launch(hub, image)
    job = server["state"]["job_id"]
    node = node_of(multi, job)
    assert node in multi.compute_nodes
    assert kill_node(multi, node) > 0
    # the queue still says RUNNING; the hub's next poll (every 2 s here)
    # finds nobody at the server's address and ends the session
    hub.wait_for(lambda: not hub.user(name)["servers"], timeout=15, what="the hub to stop the dead session")
    # once the scheduler has the node down, a new launch runs on another node
    hub.wait_for(
        lambda: node_state(multi, node).startswith("down"),
        timeout=90,
        interval=1,
        what=f"slurmctld to mark {node} down",
    )
    _, token2, server2 = launch(hub, image)
    other = node_of(multi, server2["state"]["job_id"])
    assert other and other != node
    assert answers(hub, server2, token2)


def test_a_drained_node_is_named_as_the_reason_a_launch_waits(multi, hub, registry):
    _, image = registry
    env = multi.full_env()
    nodes = ",".join(multi.compute_nodes)
    subprocess.run(
        ["scontrol", "update", f"nodename={nodes}", "state=drain", "reason=maintenance by test"], env=env, check=True
    )
    try:
        name = hub.create_user("binder-drained-" + secrets.token_hex(3))
        hub.users.append(name)
        r = hub.start_server(name, options(image))
        assert r.status_code in (201, 202), r.text
        events = []
        import threading

        threading.Thread(target=hub.progress, args=(name,), kwargs={"events": events}, daemon=True).start()
        msg = hub.wait_for(
            lambda: next((e["message"] for e in events if "unavailable" in e.get("message", "")), None),
            timeout=60,
            what="a pending message that names the drained nodes",
        )
        assert "down, drained or reserved" in msg, msg
    finally:
        subprocess.run(["scontrol", "update", f"nodename={nodes}", "state=resume"], env=env, check=False)


def test_a_hub_restart_reconnects_to_sessions_on_two_nodes(multi, hub, registry):
    _, image = registry
    sessions = [launch(hub, image) for _ in range(2)]
    nodes = {node_of(multi, s[2]["state"]["job_id"]) for s in sessions}
    assert len(nodes) == 2, nodes
    hub.stop()
    for _, _, server in sessions:
        assert node_of(multi, server["state"]["job_id"]), "stopping the hub must leave the jobs running"
    hub.start()
    for name, token, _ in sessions:
        server = hub.wait_for(lambda n=name: hub.server_ready(n), timeout=60, what=f"{name} after the restart")
        assert answers(hub, server, token)
