"""The spawner's whole life against a scripted scheduler, without a cluster
or a hub, in batchspawner's own test style: start -> progress -> poll ->
stop, with the job moved along by the test as a scheduler would."""

import asyncio
import json
import os
import pwd
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from batchspawner import JobStatus
from jupyterhub.objects import Hub, Server

from binderhub_hpc.sif import minimal_sif
from binderhub_hpc.spawner.spawner import SlurmBinderSpawner

from spawnerutil import StubUser

HERE = Path(__file__).resolve().parent
BINDER_TOKEN = "bindertoken-" + uuid.uuid4().hex
API_TOKEN = "apitoken-" + uuid.uuid4().hex


class FakeSlurm:
    """sbatch/squeue/scancel in a directory of their own, sharing state.json."""

    def __init__(self, directory):
        self.dir = Path(directory)
        for name in ("sbatch", "squeue", "scancel"):
            exe = self.dir / name
            exe.write_text(f"#!{sys.executable}\n" + (HERE / "fake_slurm.py").read_text())
            exe.chmod(0o755)
        self.state_path = self.dir / "state.json"

    @property
    def state(self):
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {"jobs": {}, "scripts": {}}

    def set_job(self, job, **values):
        st = self.state
        st["jobs"][job].update(values)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        os.replace(tmp, self.state_path)


class DB:
    def commit(self):
        pass


@pytest.fixture
def fake(tmp_path):
    return FakeSlurm(tmp_path)


def new_spawner(fake, tmp_path):
    sp = SlurmBinderSpawner(
        user=StubUser("alice"),
        hub=Hub(ip="127.0.0.1", port=8081, base_url="/hub/"),
        api_token=API_TOKEN,
        oauth_client_id="jupyterhub-user-alice",
        db=DB(),
        job_user=pwd.getpwuid(os.getuid()).pw_name,
        container_runtime="apptainer",
        exec_prefix="",
        batch_submit_cmd=f"{fake.dir}/sbatch --parsable",
        batch_cancel_cmd=f"{fake.dir}/scancel {{job_id}}",
        queue_poll_interval=0.05,
        startup_poll_interval=0.05,
        server_poll_interval=0,  # no server behind these jobs (see the test that has one)
        job_dir=str(tmp_path),
    )
    sp.config.SlurmQueue.squeue = str(fake.dir / "squeue")
    sp.server = Server(base_url="/user/alice/")
    sp.registry.root = str(tmp_path / "registry")
    sp.user_options = {"image": "binder/x:abc", "token": BINDER_TOKEN, "repo_url": "https://example.org/r.git"}
    return sp


def publish(sp, image="binder/x:abc"):
    tmp = sp.registry.tempfile(image)
    tmp.write_bytes(minimal_sif(b"hsqs root filesystem"))
    sp.registry.publish(image, {"sif": tmp})


async def wait_for(predicate, timeout=10):
    for _ in range(int(timeout / 0.02)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_start_progress_poll_stop_against_a_scripted_scheduler(fake, tmp_path):
    sp = new_spawner(fake, tmp_path)
    publish(sp)
    assert await sp.poll() == 1 and sp.job_id == ""

    started = asyncio.ensure_future(sp.start())
    job = await wait_for(lambda: next(iter(fake.state["jobs"]), None))
    messages = []

    async def follow():
        async for event in sp.progress():
            messages.append(event["message"])

    follower = asyncio.ensure_future(follow())
    await wait_for(lambda: any("waiting in the jupyter queue (position 1 of 1)" in m for m in messages))
    assert "waiting behind jobs with higher priority" in messages[-1]
    assert not started.done()

    # the job reports its port and node to the hub before the queue's
    # snapshot says it runs: the report ends the wait, and the launch goes
    # on once the queue agrees on the node
    sp.accept_job_report({"port": 45678, "node": "node7"})
    fake.set_job(job, state="RUNNING", reason="None", node="node7")
    ip, port = await asyncio.wait_for(started, 10)
    assert (ip, port) == ("node7", 45678) and sp.job_id == job
    assert await sp.poll() is None
    await asyncio.wait_for(follower, 10)
    assert any(f"Job {job} is running on node7" in m for m in messages)

    # what the scheduler was given: a script without secrets, secrets by name
    submitted = fake.state["scripts"][job]
    assert BINDER_TOKEN not in submitted["script"] and API_TOKEN not in submitted["script"]
    assert "JUPYTER_TOKEN" in submitted["env"] and "JUPYTERHUB_API_TOKEN" in submitted["env"]

    state = sp.get_state()
    assert state["job_id"] == job and state["image"] == "binder/x:abc"
    await sp.stop()
    assert fake.state["jobs"] == {}
    assert await sp.poll() == 1


async def test_a_job_that_disappears_while_pending_fails_the_start(fake, tmp_path):
    sp = new_spawner(fake, tmp_path)
    publish(sp)
    started = asyncio.ensure_future(sp.start())
    job = await wait_for(lambda: next(iter(fake.state["jobs"]), None))
    st = fake.state
    del st["jobs"][job]
    fake.state_path.write_text(json.dumps(st))
    with pytest.raises(RuntimeError, match="disappeared"):
        await asyncio.wait_for(started, 10)


async def test_an_image_not_in_the_registry_is_refused_before_submission(fake, tmp_path):
    from tornado import web

    sp = new_spawner(fake, tmp_path)
    with pytest.raises(web.HTTPError) as e:
        await sp.start()
    assert e.value.status_code == 404 and "not in the registry" in e.value.log_message
    assert fake.state["jobs"] == {}
    shutil.rmtree(tmp_path / "registry", ignore_errors=True)


def test_resolving_an_image_reads_its_sif_header_once_and_names_its_root_partition(fake, tmp_path, monkeypatch):
    """What the spawner submits comes from one registry entry: the check that
    the SIF is whole also finds where its root filesystem starts."""
    from tornado import web

    from binderhub_hpc import sif

    sp = new_spawner(fake, tmp_path)
    sp.registry.compute_root = "/compute/registry"
    publish(sp)
    reads = []
    real = sif._header
    monkeypatch.setattr(sif, "_header", lambda fd: reads.append(fd) or real(fd))
    image = sp.resolve_image("binder/x:abc")
    assert len(reads) == 1
    path = sp.registry.path("binder/x:abc")
    assert (
        image.path
        == str(sp.registry.compute_path("binder/x:abc"))
        == "/compute/registry/" + str(path.relative_to(sp.registry.root))
    )
    assert image.root_offset == sif.root_partition(path).offset > 0
    for bad, status in (("binder/x", 400), ("binder/x:other", 404)):
        with pytest.raises(web.HTTPError) as e:
            sp.resolve_image(bad)
        assert e.value.status_code == status
    path.write_bytes(path.read_bytes()[:-1])  # cut short: not there
    with pytest.raises(web.HTTPError) as e:
        sp.resolve_image("binder/x:abc")
    assert e.value.status_code == 404


async def test_the_job_reports_once_and_only_its_port_and_node(fake, tmp_path):
    from tornado import web

    sp = new_spawner(fake, tmp_path)
    publish(sp)
    with pytest.raises(web.HTTPError) as e:  # nothing submitted yet
        sp.accept_job_report({"port": 4000})
    assert e.value.status_code == 409
    started = asyncio.ensure_future(sp.start())
    await wait_for(lambda: sp.job_id)
    for bad in (
        {"port": 4000, "exec_prefix": "touch /tmp/owned;"},
        {"port": 0},
        {"port": "4000"},
        {"port": True},
        {"port": 4000, "node": "a b"},
        {"port": 4000, "node": "-x"},
    ):
        with pytest.raises(web.HTTPError) as e:
            sp.accept_job_report(bad)
        assert e.value.status_code == 400, bad
    assert sp.exec_prefix == "" and sp.port == 0
    sp.accept_job_report({"port": 4000, "node": "node3"})
    fake.set_job(sp.job_id, state="RUNNING", node="node3")
    assert await asyncio.wait_for(started, 10) == ("node3", 4000)
    # a session reporting again (authenticated containers hold the token)
    with pytest.raises(web.HTTPError) as e:
        sp.accept_job_report({"port": 5000, "node": "elsewhere"})
    assert e.value.status_code == 409 and (sp.ip, sp.port) == ("node3", 4000)
    await sp.stop()


@pytest.mark.parametrize("reported", ["127.0.0.1", "10.213.0.10", "hub", "169.254.169.254", "0x7f000001"])
async def test_a_report_naming_another_host_than_the_queues_node_is_refused(fake, tmp_path, reported):
    """Whoever holds the token could report first and have the hub route
    the user to an address of their choosing (the hub's own API, a cloud
    metadata address): the queue's node for the job must agree."""
    sp = new_spawner(fake, tmp_path)
    publish(sp)
    started = asyncio.ensure_future(sp.start())
    job = await wait_for(lambda: sp.job_id)
    sp.accept_job_report({"port": 8081, "node": reported})
    fake.set_job(job, state="RUNNING", node="node7")
    with pytest.raises(RuntimeError, match="reported that it runs on .* but the scheduler runs it on 'node7'"):
        await asyncio.wait_for(started, 10)
    assert job not in fake.state["jobs"]  # cancelled


async def test_a_report_under_another_name_of_the_same_host_is_taken(fake, tmp_path):
    """A node may report its fully qualified name where the queue has its
    short one: names that resolve to the same addresses are one host."""
    sp = new_spawner(fake, tmp_path)
    publish(sp)
    started = asyncio.ensure_future(sp.start())
    job = await wait_for(lambda: sp.job_id)
    sp.accept_job_report({"port": 4200, "node": "localhost"})
    fake.set_job(job, state="RUNNING", node="127.0.0.1")
    assert await asyncio.wait_for(started, 10) == ("localhost", 4200)
    await sp.stop()


async def test_a_user_name_with_control_characters_gets_no_job(fake, tmp_path):
    sp = new_spawner(fake, tmp_path)
    sp.user = StubUser("alice\nbob")
    publish(sp)
    with pytest.raises(RuntimeError, match="control characters"):
        await sp.start()
    assert fake.state["jobs"] == {}


async def test_a_report_that_comes_before_the_job_id_is_taken(fake, tmp_path):
    """A busy hub reads sbatch's output after the job already started and
    reported its port: the report belongs to the launch all the same."""
    sp = new_spawner(fake, tmp_path)
    publish(sp)
    (fake.dir / "sbatch.delay").write_text("1.0")
    started = asyncio.ensure_future(sp.start())
    job = await wait_for(lambda: next(iter(fake.state["jobs"]), None))
    assert sp.job_id == ""  # sbatch has not answered yet
    sp.accept_job_report({"port": 4100, "node": "node4"})
    fake.set_job(job, state="RUNNING", node="node4")
    assert await asyncio.wait_for(started, 10) == ("node4", 4100)
    assert sp.job_id == job
    await sp.stop()


async def test_start_returns_once_the_server_answers_not_before(fake, tmp_path):
    """The spawner waits for the server itself, checking often, so the hub's
    exponentially spaced checks find it up at the first try."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    sp = new_spawner(fake, tmp_path)
    sp.server_poll_interval = 0.02
    publish(sp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    started = asyncio.ensure_future(sp.start())
    await wait_for(lambda: sp.job_id)
    sp.accept_job_report({"port": port, "node": "127.0.0.1"})
    fake.set_job(sp.job_id, state="RUNNING", node="127.0.0.1")
    await asyncio.sleep(0.5)
    assert not started.done()  # nothing answers yet
    httpd = HTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert await asyncio.wait_for(started, 10) == ("127.0.0.1", port)
        assert asked and asked[0] == "/user/alice/api"
    finally:
        httpd.shutdown()
    await sp.stop()


async def test_a_running_job_whose_server_is_gone_ends_at_the_next_poll(fake, tmp_path):
    """The queue still says RUNNING (a node whose slurmd died with its
    sessions stays so for minutes), but nothing listens at the server's
    address any more: the poll ends the session and cancels the job."""
    import socket

    sp = new_spawner(fake, tmp_path)
    publish(sp)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    started = asyncio.ensure_future(sp.start())
    job = await wait_for(lambda: sp.job_id)
    sp.accept_job_report({"port": port, "node": "127.0.0.1"})
    fake.set_job(job, state="RUNNING", reason="None", node="127.0.0.1")
    await asyncio.wait_for(started, 10)
    assert await sp.poll() is None  # the server listens
    listener.close()
    assert await sp.poll() == 1
    assert job not in fake.state["jobs"]  # cancelled


async def test_a_record_of_our_job_id_that_another_account_owns_is_never_our_job(fake, tmp_path):
    """The queue shows our job id as another account's job (a forged or a
    reused id): the spawner trusts nothing it says. A pending launch keeps
    waiting, a running session keeps running, and no text of it reaches the
    progress; once the record is ours again, it is believed again."""
    sp = new_spawner(fake, tmp_path)
    publish(sp)
    started = asyncio.ensure_future(sp.start())
    job = await wait_for(lambda: next(iter(fake.state["jobs"]), None))
    messages = []

    async def follow():
        async for event in sp.progress():
            messages.append(event["message"])

    follower = asyncio.ensure_future(follow())
    await wait_for(lambda: any("position 1 of 1" in m for m in messages))
    # the record turns into a stranger's: ended, and with a reason to show
    fake.set_job(job, user="mallory", state="CANCELLED", reason="Continue at https://elsewhere.example/")
    await wait_for(lambda: sp.state_isunknown())
    assert await sp.query_job_status() == JobStatus.UNKNOWN
    await asyncio.sleep(0.3)  # several queue intervals
    assert not started.done() and sp.state_isunknown()
    fake.set_job(job, state="RUNNING", node="node7")
    await asyncio.sleep(0.3)
    assert sp.state_isunknown() and not sp.state_isrunning()
    assert not any("elsewhere.example" in m or "running on node7" in m for m in messages), messages
    # ours again: the launch goes on
    fake.set_job(job, user=pwd.getpwuid(os.getuid()).pw_name, state="RUNNING", node="node7")
    await wait_for(lambda: sp.state_isrunning())
    sp.accept_job_report({"port": 45679, "node": "node7"})
    assert await asyncio.wait_for(started, 10) == ("node7", 45679)
    await asyncio.wait_for(follower, 10)
    # a running session: the stranger's record ends nothing
    fake.set_job(job, user="mallory", state="CANCELLED")
    for _ in range(3):
        assert await sp.poll() is None
        await asyncio.sleep(0.1)
    assert job in fake.state["jobs"]
    fake.set_job(job, user=pwd.getpwuid(os.getuid()).pw_name, state="CANCELLED")
    assert await sp.poll() == 1


@pytest.mark.parametrize(
    "body",
    [
        {"port": True},
        {"port": False},
        {"port": 1.0},
        {"port": "80"},
        {"port": 0},
        {"port": 65536},
        {"port": 8000, "ip": "10.0.0.1"},
        {},
    ],
)
def test_a_plain_batchspawner_report_takes_a_port_number_and_nothing_else(body):
    from tornado import web

    from binderhub_hpc.spawner.api import plain_port

    with pytest.raises(web.HTTPError) as e:
        plain_port(body)
    assert e.value.status_code == 400
    assert plain_port({"port": 8000}) == 8000
