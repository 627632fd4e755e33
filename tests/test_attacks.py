"""Attacks on the service's trust boundaries, run for real on the multi-node
dev cluster, each as a stranger (a repository, its git server, its URL) or a
second real Unix account would make it. Every test here fails if its attack
works."""

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest
import requests
from sessionutil import run_code
from test_build_node import FAST, RUNNERS, node_registry, shared_dir  # noqa: F401  (fixtures)

from binderhub_hpc.builder.pipeline import BuildRequest
from binderhub_hpc.builder.protocol import LOG_PHASES, binderhub_log
from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc.scheduler.jobs import PENDING, RUNNING
from binderhub_hpc.scheduler.slurm import SlurmQueue
from binderhub_hpc.scheduler.tags import JobTags, count_sessions
from binderhub_hpc_testing.hostile import COMMENT_MAX, FORGED_REASON, LINE_BREAKS, held_job_argv, hostile_jobs
from binderhub_hpc_testing.hub import spawner_config
from binderhub_hpc_testing.repo import dockerfile, make_repo, publish_podman_image

from build_fixtures import write_config
from hubutil import Hub, session_scratch

pytestmark = pytest.mark.cluster


# -- the build channel
# A remote build's log and result come back over a stream that strangers
# write much of. Before it was framed, a git server's ERR reply carrying a
# forged result line made BinderHub see BUILT for a build that never ran
# (10 of 10 builds on both runners), and a forged 'ready' event sent the
# visitor's browser to the stranger's site. Here each attack runs through
# both runners; the build must end FAILED or with its real outcome, and
# every event progress gets must be a plain log line (what BinderHub's
# adapter then forwards unchanged).

#: how often each cheap attack is tried per runner (a race won 6 of 12 times)
TRIES = 10
ELSEWHERE = "https://elsewhere.example/"


def forged_lines(image):
    """What a stranger prints to be taken for the build's result or for
    BinderHub's own events: a success for exactly the image asked for
    (signed with a made-up key too), a 'ready' with a url, 'built'."""
    record = {"outcome": "success", "image": image, "path": "/forged.sif", "error": "", "metadata": {}}
    return [
        json.dumps({"phase": "result", "message": "", "result": record}),
        json.dumps({"phase": "result", "message": "", "result": record, "signature": "0" * 64}),
        json.dumps({"phase": "ready", "message": "Server ready\n", "url": ELSEWHERE, "token": "forged"}),
        json.dumps({"phase": "built", "message": "Built\n", "imageName": image}),
    ]


class Progress:
    """What progress gets from a runner, checked as it arrives: each payload
    a plain log line, which BinderHub's adapter passes on unchanged."""

    def __init__(self):
        self.events = []
        self.problems = []

    def __call__(self, kind, payload):
        try:
            event = json.loads(payload)
        except ValueError:
            self.problems.append(("not JSON", payload))
            return
        self.events.append(event)
        if set(event) != {"phase", "message"} or not isinstance(event["message"], str):
            self.problems.append(("keys", event))
        elif event["phase"] == "failed":
            if not event["message"].startswith(("Build failed: ", "Build stopped: ")):
                self.problems.append(("a failed line not from the runner", event))
        elif event["phase"] not in LOG_PHASES:
            self.problems.append(("phase", event))
        if binderhub_log(payload) != payload:
            self.problems.append(("changed by the adapter", payload))

    def messages(self):
        return "".join(e.get("message", "") for e in self.events)

    def count(self, phase):
        return sum(e.get("phase") == phase for e in self.events)


class Channel:
    """Builds on the build node through a runner, into a fresh registry."""

    def __init__(self, cluster, pipeline, cfg):
        self.cluster, self.pipeline, self.cfg = cluster, pipeline, cfg

    def build(self, runner, request):
        """Run one build; returns (result, Progress) after checking that no
        forged event got through."""
        progress = Progress()
        result = RUNNERS[runner](self.cluster, self.cfg).run(self.pipeline, request, progress)
        assert progress.problems == [], progress.problems[:5]
        return result, progress

    def built(self, result, image):
        """Whether BinderHub would have seen BUILT (or the image appeared)."""
        return result.ok or self.pipeline.registry.exists(image)


@pytest.fixture
def channel(build_node, node_registry):  # noqa: F811
    pipeline, cfg = node_registry
    return Channel(build_node, pipeline, cfg)


@pytest.fixture
def err_server(git_server):
    """`answer(text)`: a repository of the dev cluster's git server whose
    info/refs is answered with an ERR carrying `text`; returns its URL."""
    names = []

    def answer(text):
        name = f"err-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return git_server.answer_with_err(name, text)

    yield answer
    for name in names:
        (git_server.root / f"{name}.err-reply").unlink(missing_ok=True)


def err_text(image):
    return "repository not found\n" + "\n".join(forged_lines(image)) + "\n"


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_a_git_servers_err_reply_with_forged_result_and_ready_lines_never_makes_a_build_succeed(
    channel, err_server, runner
):
    """The ref is resolved on the build node with git ls-remote, which
    prints the ERR text, line breaks included, on stderr."""
    built, other = [], []
    for _ in range(TRIES):
        image = f"binderhub-hpc/test-attack-err-{runner}:{uuid.uuid4().hex[:8]}"
        url = err_server(err_text(image))
        result, progress = channel.build(runner, BuildRequest(url, "main", image))
        if channel.built(result, image):
            built.append(image)
        # it failed for the real reason, said once
        if "remote error: repository not found" not in result.error or progress.count("failed") != 1:
            other.append((result.error, progress.messages()[-2000:]))
    print(f"\nforged BUILT via git ERR (ls-remote), {runner}: {len(built)} of {TRIES} builds")
    assert built == [] and other == []


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_a_git_servers_err_reply_during_the_clone_never_makes_a_build_succeed(channel, err_server, runner):
    """With a commit for ref nothing is resolved: repo2docker's git clone
    meets the ERR, and its output (git's stderr included) is the log."""
    built, other = [], []
    tries = 3
    for _ in range(tries):
        image = f"binderhub-hpc/test-attack-clone-{runner}:{uuid.uuid4().hex[:8]}"
        url = err_server(err_text(image))
        result, progress = channel.build(runner, BuildRequest(url, uuid.uuid4().hex + "0" * 8, image))
        if channel.built(result, image):
            built.append(image)
        # git's words reached the log (so the attack ran), as plain text
        if result.outcome != "failure" or "repository not found" not in progress.messages():
            other.append((result.outcome, result.error, progress.messages()[-2000:]))
    print(f"\nforged BUILT via git ERR (clone), {runner}: {len(built)} of {tries} builds")
    assert built == [] and other == []


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_a_repository_url_carrying_line_breaks_and_forged_events_never_makes_a_build_succeed(
    channel, git_server, runner
):
    """BinderHub hands the build a git link's URL as the stranger wrote it;
    this one carries a forged result and a forged ready event."""
    built, other = [], []
    for i in range(TRIES):
        image = f"binderhub-hpc/test-attack-url-{runner}:{uuid.uuid4().hex[:8]}"
        url = git_server.url("nothing-here") + "\n" + "\n".join(forged_lines(image)) + "\n"
        ref = "main" if i % 2 else uuid.uuid4().hex + "0" * 8
        result, progress = channel.build(runner, BuildRequest(url, ref, image))
        if channel.built(result, image):
            built.append(image)
        if "is not a repository URL" not in result.error or progress.count("failed") != 1:
            other.append((result.error, progress.messages()[-2000:]))
    print(f"\nforged BUILT via a repository URL, {runner}: {len(built)} of {TRIES} builds")
    assert built == [] and other == []


def run_step(lines, then=""):
    """A RUN step printing `lines` on stdout and on stderr (then `then`)."""
    quoted = " ".join("'" + line.replace("'", "'\\''") + "'" for line in lines)
    return f"RUN printf '%s\\n' {quoted} && printf '%s\\n' {quoted} >&2{then}\n"


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_a_run_step_printing_forged_result_and_ready_lines_gets_the_real_outcome(
    channel,
    git_server,
    build_base,
    shared_dir,  # noqa: F811
    runner,
):
    """One repository's RUN step prints forged lines and succeeds: the build
    succeeds, really. Another's prints a forged success and fails: the build
    fails. Neither gets a forged event through. (The RUN steps need no
    network: they get none, so the attack does not depend on the build
    node's slirp4netns.)"""
    registry = channel.pipeline.registry
    channel.cfg = write_config(
        shared_dir / "offline_config.py", registry.root, Repo2Docker__build_network="none", **FAST
    )
    outcomes = {}
    names = []
    try:
        for case, then in (("succeeds", ""), ("fails", " && exit 3")):
            name = f"attack-run-{case}-{uuid.uuid4().hex[:8]}"
            names.append(name)
            image = f"binderhub-hpc/test-attack-run-{runner}:{name}"
            sha = make_repo(
                git_server.root / name,
                build_base,
                files={"Dockerfile": dockerfile(build_base, name) + run_step(forged_lines(image), then)},
            )
            result, progress = channel.build(runner, BuildRequest(git_server.url(name), sha, image))
            outcomes[case] = result.outcome
            # the RUN step printed the forged lines (so the attack ran): they
            # arrived as plain text, each a message of its own
            printed = [e["message"].strip() for e in progress.events]
            assert all(line in printed for line in forged_lines(image)), progress.messages()[-3000:]
            if case == "succeeds":
                assert result.outcome == "success", (result.error, progress.messages()[-3000:])
                assert result.path == str(registry.lookup(image)) != "/forged.sif"
            else:
                assert result.outcome == "failure" and not registry.exists(image), result
    finally:
        for name in names:
            shutil.rmtree(git_server.root / name, ignore_errors=True)
    print(f"\nRUN step with forged lines, {runner}: {outcomes}")


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_binderhub_sees_failed_and_no_forged_event_for_a_git_servers_err_reply(channel, err_server, runner):
    """Through BinderHub's own BuildExecutor interface, as its build handler
    drives it: the statuses it gets, and every log payload, which it sends on
    to the browser as it is."""
    pytest.importorskip("binderhub", reason="BinderHub is not installed (it is not on PyPI; CI cannot install it)")
    from binderhub.build import ProgressEvent
    from traitlets.config import Config

    from binderhub_hpc.binderhub import SIFBuildExecutor

    image = f"binderhub-hpc/test-attack-bh-{runner}:{uuid.uuid4().hex[:8]}"
    url = err_server(err_text(image))
    remote = RUNNERS[runner](channel.cluster, channel.cfg)
    config = Config()
    config.SIFRegistry.root = channel.pipeline.registry.root
    config.SIFBuildExecutor.runner_class = type(remote)
    for name in remote.trait_names(config=True):
        config[type(remote).__name__][name] = getattr(remote, name)
    items = []

    class Queue:
        def put(self, item):
            items.append(item)

    async def build():
        executor = SIFBuildExecutor(config=config, q=Queue(), name="attack", repo_url=url, ref="main", image_name=image)
        await asyncio.get_running_loop().run_in_executor(None, executor.submit)
        await asyncio.sleep(0.1)  # let the progress callbacks run on the loop

    asyncio.run(build())
    statuses = [e.payload for e in items if e.kind == ProgressEvent.Kind.BUILD_STATUS_CHANGE]
    assert statuses[-1] == ProgressEvent.BuildStatus.FAILED, statuses
    assert ProgressEvent.BuildStatus.BUILT not in statuses
    progress = Progress()
    for e in items:
        if e.kind == ProgressEvent.Kind.LOG_MESSAGE:
            progress("log", e.payload)
    assert progress.problems == [] and progress.events, progress.problems[:5]


# -- what a session can reach
#
# A session runs a stranger's code on a compute node, as the service
# account. It must reach the hub's API (it reports its port there and talks
# to it) and nothing else of the service: not BinderHub's port (its /build/
# and /metrics, which nginx refuses at the front), not the proxy's API, not
# the build node (its sshd takes the build account's key), not the head's
# services, not another compute node's (another session's server). The
# compute nodes' egress firewall (DevCluster.ensure_compute_firewall) keeps
# them out; without it every one of these answers.

#: a TCP server that accepts and closes, printing its port: what another
#: node's service (another session's server) is to a connecting session
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    s.accept()[0].close()
"""

#: run in the session's kernel: try each (label, host, port), then the
#: hub's API as the session has it; one JSON line
REACH_FROM_SESSION = """
import json, os, socket, urllib.request
targets = {targets!r}
seen = {{}}
for label, (host, port) in targets.items():
    try:
        socket.create_connection((host, port), timeout=5).close()
        seen[label] = "open"
    except ConnectionRefusedError:
        seen[label] = "refused"
    except OSError as e:
        seen[label] = type(e).__name__
with urllib.request.urlopen(os.environ["JUPYTERHUB_API_URL"].rstrip("/") + "/", timeout=10) as r:
    seen["hub API answers"] = r.status
print(json.dumps(seen))
"""


def start_listener(argv):
    """A LISTENER started by `argv` (a prefix entering a node); (process, port)."""
    p = subprocess.Popen(
        [*argv, "/usr/bin/python3", "-c", LISTENER, "0.0.0.0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    return p, int(p.stdout.readline())


def answers(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="class")
def reach_scene(cluster, base_image, tmp_path_factory):
    """A real session, launched through the hub as BinderHub launches it,
    and the things it must not reach, each shown to answer from the head
    (root, on no compute node) first: a test here passes because the
    session is refused, not because nothing listens. Class-scoped, and
    before the scheduler's section: its session is gone before that
    section's blockers fill the compute nodes."""
    if not cluster.multi:
        pytest.skip("needs the multi-node dev cluster (compute nodes of their own)")
    root, compute_root = cluster.site_registry("reach-" + uuid.uuid4().hex[:8])
    reg = SIFRegistry(root=str(root), compute_root=compute_root)
    image = "binder-test/binder-2dreach-abc123:" + secrets.token_hex(20)
    publish_podman_image(reg, image, base_image, {"repo_url": "https://example.org/reach.git"})
    hub = Hub(
        str(tmp_path_factory.mktemp("hub")), spawner_config(reg.root, compute_root=reg.compute_root), env=cluster.env
    )
    listeners, user = [], None
    try:
        hub.start()
        user = hub.create_user("reach-" + secrets.token_hex(3))
        opts = {"image": image, "token": secrets.token_hex(16), "repo_url": "https://example.org/reach.git"}
        r = hub.start_server(user, opts)
        assert r.status_code in (201, 202), r.text
        assert hub.progress(user, timeout=180)[-1].get("ready"), hub.log_tail()
        job = sched_job_of(cluster, user)
        node, _ = session_scratch(cluster, job.job_id)
        other = next(n for n in cluster.compute_nodes if n != node)
        head, build, hub_node = (cluster.host(n).address for n in ("head", "build", "hub"))
        for argv in ([], cluster.node_argv(other, [])):
            listeners.append(start_listener(argv))
        forbidden = {
            "BinderHub's port on the hub node": (hub_node, hub.binder_port),
            "the proxy's API on the hub node": (hub_node, hub.api_port),
            "the build node's sshd": (build, 22),
            "the build node's slurmd": (build, cluster.slurmd_port),
            "a service on the head": (head, listeners[0][1]),
            f"another compute node's slurmd ({other})": (cluster.host(other).address, cluster.slurmd_port),
            f"a server on another compute node ({other})": (cluster.host(other).address, listeners[1][1]),
        }
        allowed = {
            "the hub's API": (hub_node, hub.hub_port),
            "the proxy's public port": (hub_node, hub.port),
            "slurmctld on the head": (head, cluster.slurmctld_port),
        }
        silent = [label for label, where in {**forbidden, **allowed}.items() if not answers(*where)]
        assert not silent, f"nothing answers at {silent}: the test would prove nothing"
        url = hub.url + hub.user(user)["servers"][""]["url"]
        out = run_code(url, opts["token"], REACH_FROM_SESSION.format(targets={**forbidden, **allowed}), timeout=120)
        seen = json.loads(out.strip().splitlines()[-1])
        tried = len(forbidden) + len(allowed)
        refused = sum(seen[label] == "refused" for label in forbidden)
        print(f"\nfrom a session on {node}: {tried} ports tried, {refused} of {len(forbidden)} forbidden refused")
        yield {"node": node, "seen": seen, "forbidden": forbidden, "allowed": allowed}
    finally:
        for p, _ in listeners:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
        if user:
            hub.stop_server(user)
            hub.wait_for(lambda: sched_job_of(cluster, user) is None, timeout=60, what="the session's job to end")
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)


REACH_FORBIDDEN = [
    "BinderHub's port on the hub node",
    "the proxy's API on the hub node",
    "the build node's sshd",
    "the build node's slurmd",
    "a service on the head",
    "another compute node's slurmd",
    "a server on another compute node",
]


class TestWhatASessionCanReach:
    @pytest.mark.parametrize("what", REACH_FORBIDDEN)
    def test_a_session_is_refused_everything_of_the_service_but_the_hub_api(self, reach_scene, what):
        (label,) = [label for label in reach_scene["forbidden"] if label.startswith(what)]
        assert reach_scene["seen"][label] == "refused", (label, reach_scene["forbidden"][label], reach_scene["seen"])

    def test_a_session_still_reaches_the_hub_api_the_proxy_and_slurmctld(self, reach_scene):
        seen = reach_scene["seen"]
        assert [seen[label] for label in reach_scene["allowed"]] == ["open"] * len(reach_scene["allowed"]), seen
        assert seen["hub API answers"] == 200, seen


# -- the port report -------------------------------------------------------------
#
# Whoever holds a session's server token can report a port and a node to the
# hub's job-report endpoint, and the hub then routes the user there. The job
# script reports before the container starts; here a prologue reports first,
# as a stranger with the token would, naming an address of the service.
# (Before the scheduler's section, whose jobs fill the compute nodes until
# the module ends.)


@pytest.fixture(scope="module")
def report_registry(cluster):
    """A registry with one image: the launches here are refused before any
    container matters."""
    from binderhub_hpc.sif import minimal_sif

    root, compute_root = cluster.site_registry("report-" + uuid.uuid4().hex[:8])
    reg = SIFRegistry(root=str(root), compute_root=compute_root)
    image = "binder-test/binder-2dreport-abc123:" + secrets.token_hex(20)
    tmp = reg.tempfile(image)
    tmp.write_bytes(minimal_sif(b"hsqs root filesystem"))
    reg.publish(image, {"sif": tmp})
    yield reg, image
    shutil.rmtree(root, ignore_errors=True)


def forging_prologue(port, node):
    """Shell lines that report (port, node) with the job's token, first,
    then keep the job running on its node."""
    code = (
        "import json, os, urllib.request as u; "
        "u.urlopen(u.Request(os.environ['JUPYTERHUB_API_URL'].rstrip('/') + '/batchspawner', "
        f"data=json.dumps({{'port': {int(port)}, 'node': {node!r}}}).encode(), "
        "headers={'Authorization': 'token ' + os.environ['JUPYTERHUB_API_TOKEN'], "
        "'Content-Type': 'application/json'}), timeout=10)"
    )
    return f'/usr/bin/python3 -c "{code}" && echo forged-report-taken && sleep 300'


@pytest.mark.parametrize("target", ["the hub's address", "the node's loopback"])
def test_a_forged_port_report_naming_another_host_than_the_jobs_node_is_refused(
    cluster, report_registry, tmp_path, target
):
    reg, image = report_registry
    hub = Hub(str(tmp_path), "", env=cluster.env)
    node = cluster.hub_host.address if target == "the hub's address" else "127.0.0.1"
    hub.extra_config = spawner_config(
        reg.root,
        compute_root=reg.compute_root,
        extra=f"c.BinderBatchMixin.req_prologue = {forging_prologue(hub.hub_port, node)!r}\n",
    )
    hub.start()
    try:
        user = hub.create_user(f"report-{secrets.token_hex(3)}")
        opts = {"image": image, "token": secrets.token_hex(16), "repo_url": "https://example.org/report.git"}
        r = hub.start_server(user, opts)
        assert r.status_code in (201, 202), r.text
        events = hub.progress(user, timeout=120)
        last = events[-1]
        assert last.get("failed") and not last.get("ready"), events
        assert f"reported that it runs on {node!r}" in last["message"], last
        assert "but the scheduler runs it on 'c" in last["message"], last
        assert "launch refused" in hub.log_tail(400)
        hub.wait_for(lambda: not hub.user(user)["servers"], timeout=30, what="the server to be gone")
        hub.wait_for(lambda: sched_job_of(cluster, user) is None, timeout=30, what="the job to be cancelled")
    finally:
        hub.stop()


def test_user_names_with_control_characters_are_refused_with_400(cluster, tmp_path):
    """BinderHub (or an admin) creating a hub user with NUL, a line break or
    U+2028 in its name gets a 400 from the deployment's hub."""
    from urllib.parse import quote

    hub = Hub(str(tmp_path), "", env=cluster.env).start()
    try:
        for name in ("evil\x00name", "evil\nname", "evil\rname", "evil\u2028name", "evil\x1bname", "evil\x85name"):
            r = hub.request("POST", "/users/" + quote(name, safe=""))
            assert r.status_code == 400, (repr(name), r.status_code, r.text)
            assert hub.request("GET", "/users/" + quote(name, safe="")).status_code == 404
        ok = f"plain-{secrets.token_hex(3)}"
        assert hub.request("POST", f"/users/{ok}").status_code == 201
    finally:
        hub.stop()


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
