"""A session is a workspace, sees its job, and is alone: end to end on the
dev cluster (real JupyterHub, proxy, Slurm) in Apptainer and in podman,
acting inside the sessions through kernels of their own servers, as a user
(or an attacker) would in a notebook."""

import json
import os
import secrets
import subprocess
import time
import uuid

import pytest
import requests
from sessionutil import KernelError, run_code

from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc_testing.hub import spawner_config
from binderhub_hpc_testing.repo import publish_podman_image

from hubutil import Hub, session_scratch

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def registry(cluster, base_image):
    root, compute_root = cluster.site_registry("sessions-" + uuid.uuid4().hex[:8])
    reg = SIFRegistry(root=str(root), compute_root=compute_root)
    image = "binder-test/binder-2dsessions-abc123:" + secrets.token_hex(20)
    publish_podman_image(reg, image, base_image)
    yield reg, image
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(params=["apptainer", "podman"])
def hub(request, cluster, registry, tmp_path):
    reg, _ = registry
    # every session on one node: the attack test pits two against each other there
    extra = (
        'c.BinderBatchMixin.req_memory = "2G"\nc.BinderBatchMixin.req_nprocs = "1"\n'
        f'c.SlurmBinderSpawner.req_options = "--nodelist={cluster.compute_nodes[0]}"\n'
    )
    h = Hub(
        str(tmp_path),
        spawner_config(reg.root, runtime=request.param, extra=extra, compute_root=reg.compute_root),
        env=cluster.env,
    )
    h.runtime = request.param
    h.start()
    h.users = []
    yield h
    for name in h.users:
        h.stop_server(name)
    for name in h.users:
        try:
            h.wait_for(lambda n=name: not h.user(n)["servers"], timeout=60, what="servers to stop")
        except AssertionError:
            pass
    h.stop()


def launch(hub, image):
    """A Binder launch through the hub API; returns (server URL, token, job id)."""
    name = hub.create_user("binder-session-" + secrets.token_hex(3))
    hub.users.append(name)
    token = secrets.token_hex(16)
    opts = {
        "image": image,
        "token": token,
        "repo_url": "https://example.org/r.git",
        "binder_ref_url": "https://example.org/r/tree/abc",
        "binder_launch_host": "https://binder.example.org/",
        "binder_request": "v2/gh/example/r/abc",
        "binder_persistent_request": "v2/gh/example/r/abc",
    }
    r = hub.start_server(name, opts)
    assert r.status_code in (201, 202), r.text
    events = hub.progress(name)
    assert events[-1].get("ready"), (events, hub.log_tail())
    server = hub.user(name)["servers"][""]
    return hub.url + server["url"], token, server["state"]["job_id"]


def du(cluster, node, path):
    """Bytes under `path` on `node` as the job account sees them (podman's
    files are the account's subordinate uids: count inside its user namespace)."""
    out = cluster.on_node(node, ["podman", "unshare", "du", "-sb", str(path)], user=True).stdout
    return int(out.split()[0]) if out.strip() else 0


def test_a_session_is_a_workspace_bounded_by_node_scratch(cluster, hub, registry):
    """Edit and save a notebook, pip install --user a 200 MB package, write
    1 GB to /tmp: far beyond Apptainer's 64 MB session directory, all on
    the session's scratch on the node."""
    _, image = registry
    url, token, job_id = launch(hub, image)
    auth = {"Authorization": f"token {token}"}
    nb = {
        "type": "notebook",
        "content": {
            "cells": [
                {
                    "cell_type": "code",
                    "source": "print('edited')",
                    "metadata": {},
                    "outputs": [],
                    "execution_count": None,
                }
            ],
            "metadata": {},
            "nbformat": 4,
            "nbformat_minor": 5,
        },
    }
    r = requests.put(url + "api/contents/analysis.ipynb", headers=auth, json=nb, timeout=60)
    assert r.status_code in (200, 201), r.text
    r = requests.get(url + "api/contents/analysis.ipynb", headers=auth, timeout=60)
    assert r.json()["content"]["cells"][0]["source"] == "print('edited')"

    out = run_code(
        url,
        token,
        r"""
import os, subprocess, sys, zipfile
# a 200 MB package (incompressible data), installed --user from a local wheel:
# compute nodes reach no package index
name = "binder_big-1.0-py3-none-any.whl"
whl = "/tmp/" + name
with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
    z.writestr("binder_big/__init__.py", "SIZE = 200 * 2**20\n")
    z.writestr("binder_big/data.bin", os.urandom(200 * 2**20))
    z.writestr("binder_big-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: binder-big\nVersion: 1.0\n")
    z.writestr("binder_big-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("binder_big-1.0.dist-info/RECORD", "")
p = subprocess.run([sys.executable, "-m", "pip", "install", "--user", "--no-index", "--no-deps", "-q", whl],
                   capture_output=True, text=True)
print("PIP", p.returncode, p.stderr[-500:])
os.unlink(whl)
p = subprocess.run([sys.executable, "-c", "import binder_big, os; print(binder_big.__file__)"],
                   capture_output=True, text=True)
print("IMPORTED", p.stdout.strip())
with open("/tmp/big.bin", "wb") as f:
    for _ in range(1024):
        f.write(os.urandom(2**20))
print("TMP", os.path.getsize("/tmp/big.bin"))
""",
        timeout=600,
    )
    assert "PIP 0" in out, out
    assert "IMPORTED /home/jovyan/.local/lib/python3" in out, out
    assert f"TMP {2**30}" in out, out

    node, scratch = session_scratch(cluster, job_id)
    # on the node's own disk (on this machine for a single node)
    assert du(cluster, node, scratch / "tmp") >= 2**30
    assert du(cluster, node, scratch / "home") >= 200 * 2**20
    notebook = cluster.on_node(
        node, ["podman", "unshare", "cat", str(scratch / "home" / "analysis.ipynb")], user=True
    ).stdout
    assert "edited" in notebook


def test_the_session_sees_its_job(cluster, hub, registry):
    """The scheduler's variables and the session's limits inside, in both runtimes."""
    _, image = registry
    url, token, job_id = launch(hub, image)
    seen = json.loads(
        run_code(
            url,
            token,
            """
import json, os
print(json.dumps({k: v for k, v in os.environ.items()
                  if k.startswith("SLURM_") or k in ("MEM_LIMIT", "CPU_LIMIT", "BINDER_JOB_END_TIME")}))
""",
        )
    )
    assert seen["SLURM_JOB_ID"] == job_id
    assert seen["SLURM_JOB_PARTITION"] == "interactive"
    assert int(seen["SLURM_CPUS_ON_NODE"]) >= 1
    assert seen["MEM_LIMIT"] == str(2 * 2**30) and seen["CPU_LIMIT"] == "1"
    assert seen.get("SLURM_MEM_PER_NODE") == "2048"
    # req_runtime 00:30:00 from the dev cluster's settings
    assert abs(int(seen["BINDER_JOB_END_TIME"]) - (time.time() + 1800)) < 300, seen
    assert not any(k.startswith("JUPYTERHUB_API_TOKEN") for k in seen)


ATTACK = r"""
import json, os, signal, subprocess, urllib.request, urllib.error
found = {}
# 1. processes: only this session's own are visible
pids = [p for p in os.listdir("/proc") if p.isdigit()]
cmdlines = []
for p in pids:
    try:
        cmdlines.append(open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace"))
    except OSError:
        pass
found["procs"] = len(pids)
found["victim_in_cmdlines"] = any(VICTIM_MARK in c for c in cmdlines)
# 2. environments: nobody else's token
envs = ""
for p in pids:
    try:
        envs += open(f"/proc/{p}/environ", "rb").read().decode(errors="replace")
    except OSError:
        pass
found["victim_token_in_environ"] = VICTIM_TOKEN in envs
# 3. files: the victim's scratch, home copy, job files, token files
hits = subprocess.run(["grep", "-rl", "--no-messages", "-e", VICTIM_MARK, "-e", VICTIM_TOKEN,
                       "/tmp", "/var/tmp", "/home", "/run", "/dev/shm", "/var/lib", "/etc"],
                      capture_output=True, text=True).stdout
found["victim_files"] = hits.strip()
found["jobs_dir_visible"] = os.path.exists(JOBS_DIR)
# 3b. System V shared memory: the victim's segment is in its own IPC namespace
found["victim_shm"] = [line for line in open("/proc/sysvipc/shm").read().splitlines()[1:]
                       if line.split()[0] == str(VICTIM_SHM_KEY)]
# 4. signals: kill everything we may, as in `kill -9 -1`
try:
    os.kill(-1, 0)
    found["kill_all"] = "allowed (own namespace)"
except OSError as e:
    found["kill_all"] = str(e)
# 5. the victim's server without its token (same node, same account)
for token in ("", OWN_TOKEN):
    req = urllib.request.Request(VICTIM_URL + "api/contents", headers={"Authorization": f"token {token}"} if token else {})
    try:
        urllib.request.urlopen(req, timeout=10)
        found["victim_server_" + ("own_token" if token else "no_token")] = 200
    except urllib.error.HTTPError as e:
        found["victim_server_" + ("own_token" if token else "no_token")] = e.code
print(json.dumps(found))
"""


def test_one_session_cannot_reach_another_on_the_same_node(cluster, hub, registry):
    """Two anonymous sessions, one Unix account, one node. From A: B's
    processes, environment, System V shared memory, scratch, home, job files and tokens are out of
    reach, `kill -9 -1` leaves B running, and B's server refuses A without
    B's token."""
    _, image = registry
    url_b, token_b, job_b = launch(hub, image)
    url_a, token_a, job_a = launch(hub, image)
    nodes = subprocess.run(
        ["squeue", "-h", "-o", "%N", "-j", f"{job_a},{job_b}"], env=cluster.full_env(), capture_output=True, text=True
    ).stdout.split()
    assert nodes == [cluster.compute_nodes[0]] * 2, nodes
    mark = "victim-" + secrets.token_hex(8)
    shm_key = secrets.randbelow(2**30) + 1
    # B leaves traces where a session writes
    seen_by_b = run_code(
        url_b,
        token_b,
        f"""
import os, subprocess, time
open("/tmp/{mark}", "w").write("{mark}")
open(os.path.expanduser("~/{mark}.txt"), "w").write("{mark}")
subprocess.Popen(["sleep", "3600", "{mark}"])
os.environ["VICTIM"] = "{mark}"
# a System V shared memory segment with a key of its own
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
assert libc.shmget({shm_key}, 4096, 0o1600) >= 0, ctypes.get_errno()
print([line.split()[0] for line in open("/proc/sysvipc/shm").read().splitlines()[1:]])
""",
    )
    assert str(shm_key) in seen_by_b, seen_by_b
    # B's server on the node, where the proxy reaches it
    routes = requests.get(
        f"http://{hub.address}:{hub.api_port}/api/routes",
        timeout=30,
        headers={"Authorization": f"token {proxy_token(hub)}"},
    ).json()
    target = next(v["target"] for k, v in routes.items() if hub.users[0] in k)
    code = (
        ATTACK.replace("VICTIM_MARK", repr(mark))
        .replace("VICTIM_TOKEN", repr(token_b))
        .replace("JOBS_DIR", repr(str(cluster.jobs_dir)))
        .replace("OWN_TOKEN", repr(token_a))
        .replace("VICTIM_URL", repr(target + f"/user/{hub.users[0]}/"))
        .replace("VICTIM_SHM_KEY", repr(shm_key))
    )
    found = json.loads(run_code(url_a, token_a, code))
    assert found["procs"] < 15, found
    assert not found["victim_in_cmdlines"], found
    assert not found["victim_token_in_environ"], found
    assert found["victim_files"] == "", found
    assert not found["jobs_dir_visible"], found
    assert found["victim_shm"] == [], found
    assert found["victim_server_no_token"] in (401, 403), found
    assert found["victim_server_own_token"] in (401, 403), found
    # A kills everything it can: B lives on
    try:
        run_code(url_a, token_a, "import os, signal\nos.kill(-1, signal.SIGKILL)", timeout=30)
    except (KernelError, Exception):  # noqa: BLE001  (A's own kernel dies with the rest)
        pass
    time.sleep(2)
    assert run_code(url_b, token_b, "print('alive')").strip() == "alive"
    assert (
        job_b
        in subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=cluster.full_env(), capture_output=True, text=True
        ).stdout.split()
    )


def proxy_token(hub):
    """The proxy's auth token, which JupyterHub generates and hands the proxy
    in its environment."""
    pid_file = os.path.join(hub.dir, "jupyterhub-proxy.pid")
    pid = int(open(pid_file).read().split()[0])
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"CONFIGPROXY_AUTH_TOKEN="))
