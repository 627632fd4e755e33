"""End to end on a real OpenPBS: the PBS dev cluster (binderhub_hpc_testing.pbs),
a real JupyterHub + proxy with our PBSBinderSpawner, sessions in Apptainer
and in rootless podman, every job the service account's (never root's).

Skipped, saying so, where OpenPBS is not installed. Which installation runs
is chosen as `binderhub-hpc devcluster up --scheduler pbs` chooses it
($PBS_EXEC selects one: PBS_EXEC=/opt/pbs-master pytest tests/test_pbs_e2e.py).
"""

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from jupyterhub.objects import Hub as HubInfo
from jupyterhub.objects import Server
from sessionutil import run_code
from tornado import web

from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc.scheduler.pbs import load_pbs_json
from binderhub_hpc.spawner.runtime import ApptainerRuntime, SessionImage
from binderhub_hpc.spawner.spawner import PBSBinderSpawner
from binderhub_hpc_testing.hub import spawner_config
from binderhub_hpc_testing.repo import publish_podman_image

from hubutil import Hub
from spawnerutil import StubUser

pytestmark = pytest.mark.cluster

NOTEBOOK = {
    "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Hello from a Binder on PBS"]}],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}

#: values no transport may change: quotes (paired and lone), backslashes
#: (inside and trailing), commas, `$()`, newlines (inside and trailing),
#: trailing blanks, non-ASCII, what looks like a PBS directive or a number
HOSTILE = {
    "quotes": 'say "hi" to \'them\' "',
    "json": '{"k": [1, "two"]}',
    "backslashes": "C:\\tmp\\new\\",
    "commas": "a,b=c,,d",
    "shell": "$(touch /tmp/pwned) `id` ${HOME} $HOME; rm -rf / #",
    "newlines": "line1\nline2\n",
    "blanks": "  lead and trail \t ",
    "unicode": "ünïcødé ✓ 日本 🚀",
    "directive": "\n#PBS -l select=99\n",
    "number": "0123",
}


def hostile_options(image, token=None):
    """BinderHub's launch options, every free-text one hostile."""
    return {
        "image": image,
        "token": token or ("tok'en\"\\" + secrets.token_hex(8) + " ü "),
        "repo_url": "https://example.org/" + HOSTILE["quotes"] + HOSTILE["commas"] + ".git",
        "binder_ref_url": "https://example.org/tree/" + HOSTILE["backslashes"] + HOSTILE["shell"],
        "binder_launch_host": "https://binder.example.org/" + HOSTILE["unicode"] + HOSTILE["blanks"],
        "binder_request": "v2/gh/example/" + HOSTILE["newlines"] + HOSTILE["directive"],
        "binder_persistent_request": "v2/gh/example/" + HOSTILE["json"] + HOSTILE["number"],
    }


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def pbs_registry(pbs_cluster, pbs_base_image, tmp_path_factory):
    """A registry the service account reads, holding one notebook image."""
    root = pbs_cluster.site.root / "test-registries" / ("pbs-" + uuid.uuid4().hex[:8])
    root.mkdir(parents=True)
    for p in (root, root.parent):
        os.chmod(p, 0o755)
    ctx = tmp_path_factory.mktemp("image")
    (ctx / "hello.ipynb").write_text(json.dumps(NOTEBOOK))
    (ctx / "Containerfile").write_text(
        f"FROM {pbs_base_image}\nCOPY --chown=1000:1000 hello.ipynb /home/jovyan/hello.ipynb\n"
    )
    tag = "localhost/binderhub-hpc-test-notebook-pbs:latest"
    subprocess.run(["podman", "build", "-q", "-t", tag, str(ctx)], check=True, capture_output=True)
    reg = SIFRegistry(root=str(root))
    image = "binder-test/binder-2dpbs-2dnotebook-abc123:" + secrets.token_hex(20)
    publish_podman_image(reg, image, tag, {"repo_url": "https://example.org/notebook.git"})
    yield reg, image
    shutil.rmtree(root, ignore_errors=True)


def hub_config(pbs, registry, queue="interactive", runtime="apptainer", extra=""):
    return spawner_config(registry.root, partition=queue, runtime=runtime, pbs=pbs, extra=extra)


@pytest.fixture
def hub(pbs_cluster, pbs_registry, runtime, tmp_path):
    reg, _ = pbs_registry
    cancel_my_jobs(pbs_cluster)
    h = Hub(str(tmp_path), hub_config(pbs_cluster, reg, runtime=runtime), env=pbs_cluster.env, here=True)
    h.start()
    yield h
    h.stop()
    cancel_my_jobs(pbs_cluster)


# ------------------------------------------------------------------ PBS helpers
#: names of the jobs this module starts: cleanup touches no others
MY_JOB_NAMES = {"blocker"}


def qstat(pbs, *args):
    """`qstat -f -F json` (plus args) as the hub sees it, parsed."""
    out = subprocess.run(
        [pbs.bin("qstat"), "-f", "-F", "json", *args], env=pbs.full_env(), capture_output=True, check=True
    ).stdout
    return load_pbs_json(out).get("Jobs") or {}


def job_of(pbs, name):
    """The id of the session job of hub user `name` still in the queue, or None."""
    want = PBSBinderSpawner.job_name_for(name)
    for jid, j in qstat(pbs).items():
        if j.get("Job_Name") == want:
            return jid
    return None


def in_queue(pbs):
    return set(qstat(pbs))


def cancel_my_jobs(pbs):
    ids = [jid for jid, j in qstat(pbs).items() if j.get("Job_Name") in MY_JOB_NAMES]
    if ids:
        pbs.as_service_user([pbs.bin("qdel"), "-W", "force", *ids], check=False, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and set(ids) & in_queue(pbs):
        time.sleep(0.5)


def wait_job_state(pbs, job_id, state, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = qstat(pbs).get(job_id)
        if j and j.get("job_state") == state:
            return j
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in state {state}: {qstat(pbs).get(job_id)}")


def blocker(pbs, queue="batch"):
    """A job that takes every core of `queue`, as the service account."""
    cpus = os.cpu_count() or 1
    jid = pbs.as_service_user(
        [
            pbs.bin("qsub"),
            "-q",
            queue,
            "-N",
            "blocker",
            "-l",
            f"select=1:ncpus={cpus}",
            "-l",
            "walltime=00:10:00",
            "-o",
            "/dev/null",
            "-j",
            "oe",
            "--",
            "/bin/sleep",
            "600",
        ],
        timeout=60,
    ).stdout.strip()
    wait_job_state(pbs, jid, "R")
    return jid


def launch(hub, image, name=None, options=None):
    name = hub.create_user(name or "binder-pbs-" + secrets.token_hex(3))
    MY_JOB_NAMES.add(PBSBinderSpawner.job_name_for(name))
    opts = options or {
        "image": image,
        "token": secrets.token_hex(16),
        "repo_url": "https://example.org/notebook.git",
        "binder_ref_url": "https://example.org/notebook/tree/abc123",
        "binder_launch_host": "https://binder.example.org/",
        "binder_request": "v2/gh/example/notebook/abc123",
        "binder_persistent_request": "v2/gh/example/notebook/abc123",
    }
    t0 = time.monotonic()
    r = hub.start_server(name, opts)
    assert r.status_code in (201, 202), r.text
    return name, opts, t0


def stop(hub, pbs, name):
    job_id = job_of(pbs, name)
    r = hub.stop_server(name)
    assert r.status_code in (202, 204), r.text
    hub.wait_for(lambda: not hub.user(name)["servers"], timeout=60, what="the server to stop")
    if job_id:
        hub.wait_for(lambda: job_id not in in_queue(pbs), timeout=60, what="the job to leave the queue")


# ------------------------------------------------------------------ the tests
def test_launch_open_notebook_and_stop(pbs_cluster, hub, pbs_registry, runtime):
    _, image = pbs_registry
    name, opts, t0 = launch(hub, image)
    events = hub.progress(name)
    took = time.monotonic() - t0
    assert events[-1].get("ready"), (events, hub.log_tail())
    print(f"\nPBS launch ({runtime}, {pbs_cluster.prefix}): {took:.2f} s from the start request to ready")
    messages = [e.get("message", "") for e in events]
    assert any("Submitted job" in m or "Job " in m for m in messages), messages

    server = hub.user(name)["servers"][""]
    url = hub.url + server["url"]
    auth = {"Authorization": f"token {opts['token']}"}
    r = requests.get(url + "api/contents", headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    assert "hello.ipynb" in [c["name"] for c in r.json()["content"]]
    assert requests.get(url + "api/contents", timeout=30).status_code in (401, 403)
    r = requests.put(
        url + "api/contents/new.txt",
        headers=auth,
        json={"type": "file", "format": "text", "content": "hello"},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text

    job_id = job_of(pbs_cluster, name)
    job = qstat(pbs_cluster)[job_id]
    # the service account's job, in the default queue, on the PBS node
    assert job["Job_Owner"].split("@")[0] == pbs_cluster.service_user and job.get("euser", "binder") == "binder"
    assert job["queue"] == "interactive" and job["exec_host"].startswith(pbs_cluster.server + "/")
    seen = run_code(url, opts["token"], "import os; print(os.environ['PBS_JOBID'], os.getcwd(), os.environ['HOME'])")
    assert seen.split() == [job_id, "/home/jovyan", "/home/jovyan"], seen

    stop(hub, pbs_cluster, name)
    # the job's output, which PBS delivers into job_dir when the job ends
    # (with $usecp into a directory it keeps its spool name, <job id>.OU),
    # names its scratch, which is gone, and its container, which is gone too
    # (podman's conmon leaves the job's process tree)
    jobs = pbs_cluster.site.jobs_dir
    outputs = [jobs / f"{job_id}.OU", jobs / f"{PBSBinderSpawner.job_name_for(name)}.o{job_id.split('.')[0]}"]
    output = hub.wait_for(
        lambda: next((o for o in outputs if o.exists()), None), timeout=60, what=f"the job's output, one of {outputs}"
    )
    scratch = output.read_text().split("scratch ", 1)[1].split()[0]
    hub.wait_for(lambda: not os.path.exists(scratch), timeout=30, what="the scratch to be removed")
    left = pbs_cluster.as_service_user(["podman", "ps", "-a", "--format", "{{.Names}}"]).stdout.split()
    assert os.path.basename(scratch) not in left, left


def test_pending_launch_says_why_and_where(pbs_cluster, pbs_registry, tmp_path):
    """Fill the batch queue, then launch into it: the progress stream says
    why the job waits (in plain words), where it stands and when it is
    expected to start; then the node."""
    reg, image = pbs_registry
    cancel_my_jobs(pbs_cluster)
    h = Hub(str(tmp_path), hub_config(pbs_cluster, reg, queue="batch"), env=pbs_cluster.env, here=True).start()
    block = blocker(pbs_cluster)
    try:
        name, opts, _ = launch(h, image)
        events = []
        t = threading.Thread(target=h.progress, args=(name,), kwargs={"events": events})
        t.start()

        def reasoned():
            return [
                e["message"]
                for e in events
                if "position" in e.get("message", "") and "waiting for free resources" in e["message"]
            ]

        h.wait_for(reasoned, timeout=90, what="a pending message with the scheduler's reason")
        msg = reasoned()[-1]
        assert "the batch queue (position 1 of 1)" in msg, msg
        assert "ncpus: it needs " in msg and " are free in its queue" in msg, msg
        # strict ordering + the blocker's walltime: PBS estimates the start
        h.wait_for(
            lambda: [e for e in events if "Expected start" in e.get("message", "")],
            timeout=60,
            what="the expected start in the progress",
        )
        pbs_cluster.as_service_user([pbs_cluster.bin("qdel"), block], timeout=60)
        t.join(180)
        assert events[-1].get("ready"), events
        assert any(f"running on {pbs_cluster.server}" in e.get("message", "") for e in events), events
        stop(h, pbs_cluster, name)
    finally:
        pbs_cluster.as_service_user([pbs_cluster.bin("qdel"), "-W", "force", block], check=False, timeout=60)
        h.stop()
        cancel_my_jobs(pbs_cluster)


def test_job_killed_outside_the_hub_is_noticed(pbs_cluster, hub, pbs_registry):
    _, image = pbs_registry
    name, _, _ = launch(hub, image)
    assert hub.progress(name)[-1].get("ready"), hub.log_tail()
    job_id = job_of(pbs_cluster, name)
    assert job_id
    pbs_cluster.as_service_user([pbs_cluster.bin("qdel"), job_id], timeout=60)
    # Spawner.poll_interval (2 s) through the shared queue query
    hub.wait_for(lambda: not hub.user(name)["servers"], timeout=60, what="the hub to notice the job is gone")


def test_hub_restart_reconnects_to_running_job(pbs_cluster, pbs_registry, runtime, tmp_path):
    reg, image = pbs_registry
    cancel_my_jobs(pbs_cluster)
    h = Hub(str(tmp_path), hub_config(pbs_cluster, reg, runtime=runtime), env=pbs_cluster.env, here=True).start()
    name, opts, _ = launch(h, image)
    try:
        assert h.progress(name)[-1].get("ready"), h.log_tail()
        job_id = job_of(pbs_cluster, name)
        h.stop()
        assert job_id in in_queue(pbs_cluster), "stopping the hub must leave the job running"
        h.start()
        server = h.wait_for(lambda: h.server_ready(name), timeout=60, what="the server after the restart")
        r = requests.get(
            h.url + server["url"] + "api/contents", headers={"Authorization": f"token {opts['token']}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert qstat(pbs_cluster)[job_id]["job_state"] == "R"
        stop(h, pbs_cluster, name)
    finally:
        h.stop()
        cancel_my_jobs(pbs_cluster)


def spool_files(pbs):
    """Every file under PBS_HOME: the mom's and server's job files, the
    datastore (PBS's PostgreSQL), the logs."""
    for path in Path(pbs.home).rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def test_tokens_are_nowhere_in_pbs(pbs_cluster, hub, pbs_registry, runtime):
    """Neither the Binder token nor the hub's API token of the session is in
    `qstat -f` (text or JSON, live or history) nor in any file of PBS_HOME
    (mom_priv/jobs, server_priv, the datastore, logs); the private file
    that carried them is gone once the job read it."""
    _, image = pbs_registry
    before = set(pbs_cluster.site.jobs_dir.glob(".binder-secrets.*"))
    name, opts, _ = launch(hub, image)
    assert hub.progress(name)[-1].get("ready"), hub.log_tail()
    server = hub.user(name)["servers"][""]
    api_token = run_code(
        hub.url + server["url"], opts["token"], "import os; print(os.environ['JUPYTERHUB_API_TOKEN'])"
    ).strip()
    tokens = [opts["token"], api_token]
    assert all(len(t) >= 16 for t in tokens)
    job_id = job_of(pbs_cluster, name)
    spool = Path(pbs_cluster.home) / "mom_priv" / "jobs"
    assert list(spool.glob(f"{job_id.split('.')[0]}*")), "the running job's files are in the mom's spool"

    # what the job does carry (its name, the session's URL) is found where
    # the tokens are looked for: the search sees the job's data
    carried = [PBSBinderSpawner.job_name_for(name).encode(), server["url"].encode()]

    def look(views, in_spool_wanted):
        found = set()
        for args in views:
            out = subprocess.run(
                [pbs_cluster.bin("qstat"), *args], env=pbs_cluster.full_env(), capture_output=True
            ).stdout
            for t in tokens:
                assert t.encode() not in out, f"a token is in qstat {' '.join(args)}"
            found |= {c for c in carried if c in out}
        assert carried[0] in found, "the job is not in the qstat output searched"
        in_spool = set()
        for path in spool_files(pbs_cluster):
            data = path.read_bytes()
            for t in tokens:
                assert t.encode() not in data, f"a token is in {path}"
            in_spool |= {c for c in carried if c in data}
        assert in_spool >= set(in_spool_wanted), "the job's name (and URL) are not in the spool searched"

    look([["-f"], ["-f", "-F", "json"], ["-f", job_id], ["-f", "-F", "json", job_id]], carried)
    assert not set(pbs_cluster.site.jobs_dir.glob(".binder-secrets.*")) - before, "the job must delete the file"
    stop(hub, pbs_cluster, name)
    # finished: history, accounting, logs
    look([["-x", "-f"], ["-x", "-f", "-F", "json"], ["-x", "-f", job_id]], carried[:1])


def test_every_value_reaches_the_session_as_it_was(pbs_cluster, pbs_registry, runtime, tmp_path):
    """Hostile launch options and a hostile hub user name: inside the
    session (in the container, through a kernel), every BINDER_*,
    JUPYTER_TOKEN and the user's JUPYTERHUB_* values are what the hub sent."""
    reg, image = pbs_registry
    cancel_my_jobs(pbs_cluster)
    h = Hub(str(tmp_path), hub_config(pbs_cluster, reg, runtime=runtime), env=pbs_cluster.env, here=True).start()
    try:
        # JupyterHub's names: no '/', no surrounding blanks; lower case
        name = 'o\'brien-"x"-\\-ü,$(id)-' + secrets.token_hex(2)
        # a token an HTTP header carries (no trailing blank, latin-1) to
        # reach the kernel; the job-level test below has a nastier one
        opts = hostile_options(image, token="tok'en\"\\,$(id)" + secrets.token_hex(8))
        name, opts, _ = launch(h, image, name=name, options=opts)
        events = h.progress(name)
        assert events[-1].get("ready"), (events, h.log_tail())
        server = h.user(name)["servers"][""]
        url = h.url + server["url"]
        seen = json.loads(
            run_code(
                url,
                opts["token"],
                """
import json, os
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(("BINDER_", "JUPYTER"))}))
""",
            )
        )
        for key in ("repo_url", "binder_ref_url", "binder_launch_host", "binder_request", "binder_persistent_request"):
            env = "BINDER_REPO_URL" if key == "repo_url" else key.upper()
            assert seen.get(env) == opts[key], (env, seen.get(env), opts[key])
        assert seen["JUPYTER_TOKEN"] == opts["token"]
        assert seen["JUPYTERHUB_USER"] == name
        assert seen["JUPYTERHUB_SERVICE_PREFIX"] == server["url"]
        scopes = json.loads(seen["JUPYTERHUB_OAUTH_SCOPES"])
        assert any(name in s for s in scopes), scopes
        assert not os.path.exists("/tmp/pwned")
        stop(h, pbs_cluster, name)
    finally:
        h.stop()
        cancel_my_jobs(pbs_cluster)


def test_a_job_cancelled_while_pending_leaves_no_token_file(pbs_cluster, pbs_registry, tmp_path):
    reg, image = pbs_registry
    cancel_my_jobs(pbs_cluster)
    h = Hub(str(tmp_path), hub_config(pbs_cluster, reg, queue="batch"), env=pbs_cluster.env, here=True).start()
    block = blocker(pbs_cluster)
    try:
        before = set(pbs_cluster.site.jobs_dir.glob(".binder-secrets.*"))
        name, _, _ = launch(h, image)
        h.wait_for(lambda: job_of(pbs_cluster, name), timeout=60, what="the session's job to be queued")
        written = set(pbs_cluster.site.jobs_dir.glob(".binder-secrets.*")) - before
        assert len(written) == 1, written
        assert oct(next(iter(written)).stat().st_mode & 0o777) == "0o600"
        h.stop_server(name)
        h.wait_for(lambda: not h.user(name)["servers"], timeout=60, what="the server to stop")
        assert not job_of(pbs_cluster, name)
        assert not (set(pbs_cluster.site.jobs_dir.glob(".binder-secrets.*")) - before), "the token file was left"
    finally:
        pbs_cluster.as_service_user([pbs_cluster.bin("qdel"), "-W", "force", block], check=False, timeout=60)
        h.stop()
        cancel_my_jobs(pbs_cluster)


# ------------------------------------------------------------------ the job's environment, with real qsub
#: the PBS job script with the server replaced by a dump of the job's
#: environment, taken where the server would start (after the session setup
#: read the private file)
DUMP_SCRIPT = """#!/bin/bash
#PBS -N {{job_name}}
#PBS -j oe
#PBS -o {{homedir}}/
#PBS -l walltime=00:05:00
{% if keepvars %}#PBS -v {{keepvars}}
{% endif %}
set -euo pipefail
cd {{homedir}}
{{binder_setup}}
python3 -c 'import os, sys; sys.stdout.buffer.write(b"\\0".join(k + b"=" + v for k, v in os.environb.items()))' \\
  > {{homedir}}/env-dump.$PBS_JOBID.part
mv {{homedir}}/env-dump.$PBS_JOBID.part {{homedir}}/env-dump.$PBS_JOBID
exit 0
{% if false %}{{cmd}}{% endif %}
"""


class _FakeHubAPI(BaseHTTPRequestHandler):
    """Takes the job's port report as the hub would (201)."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(201)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHubAPI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def dump_spawner(pbs, port, user_name, options, **config):
    config.setdefault("batch_script", DUMP_SCRIPT)
    sp = PBSBinderSpawner(
        user=StubUser(user_name),
        hub=HubInfo(ip="127.0.0.1", port=port, base_url="/hub/"),
        api_token="api-" + secrets.token_hex(16),
        oauth_client_id=f"jupyterhub-user-{quote(user_name, safe='')}",
        job_user=pbs.service_user,
        exec_prefix="sudo -E -u {username}",
        job_dir=str(pbs.site.jobs_dir),
        batch_submit_cmd=pbs.bin("qsub") + " -f",
        batch_cancel_cmd=pbs.bin("qdel") + " {job_id}",
        # the host side only: a runtime that runs nothing
        runtime=ApptainerRuntime(executable="/bin/true"),
        **config,
    )
    sp.server = Server(base_url=f"/user/{quote(user_name, safe='')}/")
    sp.user_options = options
    sp._image_path = SessionImage("/nonexistent/image.sif", 0)
    sp.image = options["image"]  # as start() sets it
    return sp


HOSTILE_USER = 'o\'brien "x" \\ ü,$(id)'


def test_every_value_reaches_the_job_byte_for_byte(pbs_cluster, fake_hub):
    """Real qsub, as the service account: every variable the spawner hands
    the job (through `qsub -v` or the private file) is, in the job, exactly
    what the spawner had."""
    options = hostile_options("binder/x:abc")
    sp = dump_spawner(pbs_cluster, fake_hub, HOSTILE_USER, options)
    sp.validate_user_options()
    expected = sp.get_env()
    job_id = asyncio.run(sp.submit_batch_script())
    dump = pbs_cluster.site.jobs_dir / f"env-dump.{job_id}"
    try:
        deadline = time.monotonic() + 120
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dump.exists(), f"the job wrote no environment: {qstat(pbs_cluster, '-x', job_id)}"
        got = dict(item.split(b"=", 1) for item in dump.read_bytes().split(b"\0") if item)
    finally:
        dump.unlink(missing_ok=True)
    # the setup rewrites the service URL with the port it reported; PATH is
    # not handed to PBS jobs: their login shell sets the node's own
    expected.pop("JUPYTERHUB_SERVICE_URL")
    expected.pop("PATH")
    assert "PATH" not in sp.template_vars()["keepvars"].split(",")
    wrong = {k: (v, got.get(k.encode())) for k, v in expected.items() if got.get(k.encode()) != v.encode()}
    assert not wrong, wrong
    assert got[b"JUPYTER_TOKEN"] == options["token"].encode()
    assert got[b"JUPYTERHUB_USER"] == HOSTILE_USER.encode()
    assert got[b"BINDER_JOB_TAG"] == sp._job_tag.encode()
    # and the values that are the user's did not travel through qsub -v
    variables = qstat(pbs_cluster, "-x", job_id)[job_id]["Variable_List"]
    assert not {k for k in variables if k.startswith(("BINDER_", "JUPYTER")) and k != "BINDER_JOB_TAG"}, sorted(
        variables
    )
    # but the quota tag did: ours, made for the job account
    assert sp.job_tags.verify(variables["BINDER_JOB_TAG"], sp.req_username) is not None
    assert not os.path.exists(sp._secrets_path()), "the job deletes the private file once read"


def test_without_the_private_file_a_value_qsub_would_change_is_refused_before_qsub(pbs_cluster, fake_hub):
    options = hostile_options("binder/x:abc", token=secrets.token_hex(16))
    sp = dump_spawner(pbs_cluster, fake_hub, "alice", options, secrets_in_file=False)
    before = set(qstat(pbs_cluster, "-x"))
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(sp.submit_batch_script())
    assert "cannot be handed to the PBS job through qsub -v" in e.value.log_message
    assert "secrets_in_file" in e.value.log_message
    assert set(qstat(pbs_cluster, "-x")) == before, "nothing may be submitted"
    # plain launch options too: JupyterHub's own scope lists are JSON, with quotes
    plain = {"image": "binder/x:abc", "token": secrets.token_hex(16), "binder_request": "v2/gh/a/b/c"}
    sp = dump_spawner(pbs_cluster, fake_hub, "alice", plain, secrets_in_file=False)
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(sp.submit_batch_script())
    assert "JUPYTERHUB_OAUTH" in e.value.log_message
    assert set(qstat(pbs_cluster, "-x")) == before


# ------------------------------------------------------------------ quotas, with real qsub
def test_quotas_count_the_spawners_jobs_and_no_strangers(pbs_cluster, fake_hub):
    """The session job carries its quota tag as BINDER_JOB_TAG (qsub -v):
    in a real qstat snapshot it verifies and counts; the stranger's held
    jobs named like ours, with a tag copied from ours, the old public tag
    or a forged one, count for nothing."""
    from binderhub_hpc.scheduler.pbs import PBSQueue
    from binderhub_hpc.scheduler.tags import count_sessions
    from binderhub_hpc_testing.hostile import public_tag

    site = pbs_cluster.site
    stranger = site.ensure_stranger()
    image = "binderhub-hpc/binder-2dpbs-2dquota-abc123:" + "a" * 40
    sp = dump_spawner(
        pbs_cluster,
        fake_hub,
        "alice",
        hostile_options(image),
        batch_script=DUMP_SCRIPT.replace("#PBS -j oe", "#PBS -h"),
    )
    sp.validate_user_options()
    ours = asyncio.run(sp.submit_batch_script())
    stranger_env = {
        "HOME": str(site.stranger_home),
        "USER": stranger,
        "PATH": f"{pbs_cluster.bin('qsub').rsplit('/', 1)[0]}:/usr/bin:/bin",
        **pbs_cluster.env,
    }
    theirs = []
    try:
        for name, tag in [
            (sp.job_name(), sp._job_tag),
            ("binder-copy", sp._job_tag),
            ("binder-public", public_tag(image)),
            ("binder-forged", sp._job_tag[:-4] + "0000"),
        ]:
            out = subprocess.run(
                ["runuser", "-u", stranger, "--", "env", "-i", *(f"{k}={v}" for k, v in stranger_env.items())]
                + [pbs_cluster.bin("qsub"), "-h", "-N", name, "-v", f"BINDER_JOB_TAG={tag}", "--", "/bin/true"],
                capture_output=True,
                text=True,
                cwd=str(site.stranger_home),
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            theirs.append(out.stdout.strip())
        raw = subprocess.run(
            [pbs_cluster.bin("qstat"), "-f", "-F", "json"], env=pbs_cluster.full_env(), capture_output=True, check=True
        ).stdout
        jobs = PBSQueue().parse(raw)
        assert (jobs[ours].user, jobs[ours].tag) == (pbs_cluster.service_user, sp._job_tag)
        assert {jobs[j].user for j in theirs} == {stranger}
        # other tests' session jobs may still be in the queue: ours adds one
        # to the total and to its repository, the stranger's add nothing
        others = [j for job_id, j in jobs.items() if job_id not in (ours, *theirs)]
        for job_user in ("", pbs_cluster.service_user):
            total, matching = count_sessions(others, sp.job_tags, image, job_user)
            assert count_sessions(jobs.values(), sp.job_tags, image, job_user) == (total + 1, matching + 1)
        assert count_sessions([jobs[j] for j in theirs], sp.job_tags, image) == (0, 0)
    finally:
        # ours as the hub cancels it: a held job never read its private file
        asyncio.run(sp.cancel_batch_job())
        for job_id in theirs:
            subprocess.run([pbs_cluster.bin("qdel"), "-W", "force", job_id], env=pbs_cluster.full_env(), check=False)
    assert not os.path.exists(sp._secrets_path()), "cancelling a job that never ran removes its private file"
