"""Builds on the multi-node cluster's build node, as the build account, with
no root in the build path: through SlurmBatchRunner (a job on partition
`build`) and SSHRunner (sshd in the build node's namespaces), with real
processes: the build log arriving as it is written, job files private and
removed, RUN steps kept off the cluster's addresses, and the build node
dying in the middle of a build.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from binderhub_hpc.builder.pipeline import BuildRequest
from binderhub_hpc.builder.runners import SlurmBatchRunner, SSHRunner
from binderhub_hpc.proc import cmdline
from binderhub_hpc_testing.repo import dockerfile, make_repo

from build_fixtures import make_pipeline, write_config

pytestmark = pytest.mark.cluster

#: the fixture builds compress with lz4: no test here depends on the compressor
FAST = {"SquashfsSIFConverter__compressor": "lz4"}


@pytest.fixture
def shared_dir(build_node):
    """A directory on the shared filesystem the build account can read."""
    d = build_node.root / "test-repos" / f"node-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    os.chmod(d.parent, 0o755)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def node_registry(build_node, site_registry, shared_dir):
    """(pipeline, config file) on a fresh registry the build account writes."""
    reg = site_registry("buildnode")
    cfg = write_config(shared_dir / "build_config.py", reg.root, **FAST)
    return make_pipeline(reg.root, **FAST), cfg


def slurm_runner(cluster, cfg, **kw):
    kw.setdefault("cli", [str(cluster.site_venv / "bin" / "binderhub-hpc")])
    return SlurmBatchRunner(partition="build", job_user=cluster.build_user, remote_config=str(cfg), **kw)


def ssh_runner(cluster, cfg, **kw):
    kw.setdefault("cli", [str(cluster.site_venv / "bin" / "binderhub-hpc")])
    return SSHRunner(host=cluster.ssh_target, ssh=cluster.ssh_argv(), remote_config=str(cfg), **kw)


RUNNERS = {"slurm": slurm_runner, "ssh": ssh_runner}


class Log:
    """The progress a runner reports, with when each line arrived."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.lines = []

    def __call__(self, kind, payload):
        self.lines.append((time.monotonic() - self.t0, json.loads(payload)))

    def messages(self):
        return "".join(d.get("message", "") for _, d in self.lines)

    def wait_for(self, text, thread, timeout=600):
        deadline = time.monotonic() + timeout
        while text not in self.messages():
            assert thread.is_alive(), f"the build ended before {text!r}:\n{self.messages()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.messages()[-3000:]}"
            time.sleep(0.1)


def node_scratch(cluster):
    """Build scratch directories on the build node's own /tmp."""
    return sorted(p.name for p in cluster.host_path(cluster.build_node, "/tmp").glob("bhpc-build-*"))


# ------------------------------------------------------------------ the build node


def test_the_build_account_has_rootless_podman_with_storage_on_the_build_nodes_own_disk(build_node):
    c = build_node
    out = c.as_build_user(
        [
            "sh",
            "-c",
            "id -un; id -gn; hostname; podman info --format "
            "'{{.Host.Security.Rootless}} {{.Store.GraphRoot}} {{.Store.GraphDriverName}}'",
        ]
    ).stdout.split()
    assert out[:3] == [c.build_user, c.build_group, "build"]
    assert out[-3:] == ["true", c.build_graphroot, "overlay"]
    # node-local: the build node's /var/tmp, not this machine's
    assert (c.host_path("build", c.build_graphroot)).is_dir()
    assert not Path(c.build_graphroot).exists()
    assert c.build_image_id(c.base_image)
    # the registry is the build group's to write, the build account's home its own
    assert c.as_build_user(["test", "-w", str(c.registry_dir)], check=False).returncode == 0
    assert oct(c.build_home.stat().st_mode & 0o777) == "0o750"


def test_the_build_nodes_sshd_lets_in_the_build_accounts_key_and_nothing_else(build_node):
    c = build_node
    ok = subprocess.run(
        c.ssh_argv() + ["--", c.ssh_target, "id -un; hostname"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == [c.build_user, "build"]
    for who, extra in (
        ("root", []),
        (c.service_user, []),
        (
            c.build_user,
            ["-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no"],
        ),
    ):
        p = subprocess.run(
            c.ssh_argv() + extra + ["--", f"{who}@{c.build_node}", "true"], capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 255 and "Permission denied" in p.stderr, (who, p.stderr)
    # no forwarding through the build node: the key is for builds only
    p = subprocess.run(
        c.ssh_argv() + ["-W", f"{c.hub_host.address}:22", "--", c.ssh_target],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 255 and "prohibited" in p.stderr, p.stderr


#: a digest of a package directory's files, the same in both places it runs
_PACKAGE_DIGEST = """
import hashlib, pathlib, sys
top = pathlib.Path(sys.argv[1])
h = hashlib.sha256()
for p in sorted(top.rglob("*")):
    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
        h.update(str(p.relative_to(top)).encode() + b"\\0" + p.read_bytes() + b"\\0")
print(h.hexdigest())
"""


def test_the_site_virtualenv_runs_this_checkouts_code_for_the_build_account(build_node):
    """An installed copy, not a link to the checkout: the build account runs
    it wherever the checkout lives, and it is this checkout's code."""
    c = build_node
    code = (
        "import binderhub_hpc, importlib.metadata as m; print(binderhub_hpc.__file__); "
        "print([e.value for e in m.entry_points(group='repo2docker.engines') if e.name == 'podman-hpc'])"
    )
    out = c.as_build_user([str(c.site_venv / "bin" / "python"), "-c", code]).stdout.splitlines()
    installed = Path(out[0]).parent
    assert installed.is_relative_to(c.site_venv), installed
    assert out[1] == "['binderhub_hpc.builder.engine:PodmanEngine']"
    here = Path(__file__).resolve().parents[1] / "binderhub_hpc"
    theirs = c.as_build_user([str(c.site_venv / "bin" / "python"), "-c", _PACKAGE_DIGEST, str(installed)])
    ours = subprocess.run([sys.executable, "-c", _PACKAGE_DIGEST, str(here)], capture_output=True, text=True)
    assert theirs.stdout.strip() == ours.stdout.strip() != ""
    assert c.as_build_user([str(c.site_venv / "bin" / "jupyter-repo2docker"), "--version"]).returncode == 0


# ------------------------------------------------------------------ builds


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_a_build_runs_on_the_build_node_as_the_build_account_and_leaves_nothing(
    build_node, node_registry, served_repo, runner, tmp_path
):
    c = build_node
    pipeline, cfg = node_registry
    url, sha = served_repo
    image = f"binderhub-hpc/test-node-{runner}:{sha}"
    log = Log()
    t0 = time.monotonic()
    result = RUNNERS[runner](c, cfg).run(pipeline, BuildRequest(url, sha, image), log)
    took = time.monotonic() - t0
    assert result.outcome == "success", (result.error, log.messages()[-3000:])
    assert log.lines[0][1]["message"].startswith(("Submitted build job", "Building on build as"))
    assert f"Building on build as {c.build_user}" in log.messages()
    sif = Path(result.path)
    assert sif == pipeline.registry.path(image) and pipeline.registry.exists(image)
    st = sif.stat()
    assert (st.st_uid, st.st_gid) == (c.build_uid, os.stat(c.registry_dir).st_gid)
    assert pipeline.registry.metadata(image)["build_host"] == "build"
    # nothing left: job files, the podman image, scratch and clones, temporaries
    jobs = Path(pipeline.registry.root) / ".build-jobs"
    assert not jobs.exists() or list(jobs.iterdir()) == []
    assert c.build_image_id(image) is None
    assert node_scratch(c) == []
    assert not list(sif.parent.glob(".*.tmp"))

    # the same repository through LocalRunner (root, this machine), for the figure
    local = make_pipeline(tmp_path / "local-registry", **FAST)
    t1 = time.monotonic()
    assert local.run(BuildRequest(url, sha, image)).outcome == "success"
    local_took = time.monotonic() - t1
    print(f"\nfixture build through {runner}: {took:.1f} s; LocalRunner (root): {local_took:.1f} s")


def test_the_build_accounts_umask_does_not_make_the_repository_unreadable_in_the_image(
    build_node, node_registry, served_repo
):
    """With umask 077 (a site's policy for service accounts) the clone's files
    were 0600 in the image, owned by jovyan: unreadable to the session
    account, whose session then could not open its own repository."""
    from build_fixtures import sif_listing

    c = build_node
    pipeline, cfg = node_registry
    url, sha = served_repo
    image = f"binderhub-hpc/test-umask:{sha}"
    cli = ["sh", "-c", f'umask 077; exec {c.site_venv / "bin" / "binderhub-hpc"} "$@"', "sh"]
    log = Log()
    result = ssh_runner(c, cfg, cli=cli).run(pipeline, BuildRequest(url, sha, image), log)
    assert result.outcome == "success", (result.error, log.messages()[-2000:])
    listing = sif_listing(result.path)
    for name in ("README.md", "hello.ipynb", "Dockerfile"):
        line = next(x for x in listing.splitlines() if x.endswith(f"/home/jovyan/{name}"))
        assert line.startswith("-rw-r--r--"), line


def fake_cli(cluster, directory, body):
    """A stand-in for `binderhub-hpc` on the build node: a Python script
    (the site virtualenv's, for the protocol module) with `body`; it prints
    repo2docker-style JSON lines and signs its result with the key the
    runner gave it on stdin."""
    path = directory / "fake-cli"
    path.write_text(
        f"#!{cluster.site_venv / 'bin' / 'python'}\nimport json, os, sys, time\n"
        "from binderhub_hpc.builder.protocol import result_signature\n"
        "key = sys.stdin.readline().strip()\n"
        "image = sys.argv[sys.argv.index('--image') + 1]\n"
        "def say(m): print(json.dumps({'phase': 'building', 'message': m + '\\n'}), flush=True)\n"
        "def result(outcome, error=''):\n"
        "    r = {'outcome': outcome, 'image': image, 'path': '', 'error': error, 'metadata': {}}\n"
        "    print(json.dumps({'phase': 'result', 'message': '', 'result': r, "
        "'signature': result_signature(key, r)}), flush=True)\n" + body
    )
    os.chmod(path, 0o755)
    return [str(path)]


def publish_stand_in(registry, image):
    """Publish a minimal SIF as `image`: a stand-in build's success counts
    only when its image is in the registry."""
    from binderhub_hpc.sif import minimal_sif

    tmp = registry.tempfile(image, "sif")
    tmp.write_bytes(minimal_sif(b"stand-in"))
    registry.publish(image, {"sif": tmp})


def test_the_slurm_runner_relays_each_log_line_while_the_job_still_runs(build_node, node_registry, shared_dir):
    """The job waits (up to 120 s) for a file that the test makes only when
    the job's first line has reached the Binder log: a runner that relays at
    the end would make it give up and fail."""
    c = build_node
    pipeline, cfg = node_registry
    seen = shared_dir / "relayed"
    publish_stand_in(pipeline.registry, "p/i:t")
    cli = fake_cli(
        c,
        shared_dir,
        f"""
say('first line')
deadline = time.time() + 120
while not os.path.exists({str(seen)!r}) and time.time() < deadline:
    time.sleep(0.1)
say('second line')
result('success' if os.path.exists({str(seen)!r}) else 'failure', 'not relayed while running')
""",
    )

    def progress(kind, payload):
        if "first line" in payload:
            seen.touch()

    runner = slurm_runner(c, cfg, cli=cli)
    result = runner.run(pipeline, BuildRequest("https://example.org/r", "a" * 40, "p/i:t"), progress)
    assert result.outcome == "success", result.error


def test_job_files_are_private_on_the_shared_filesystem_and_removed_on_every_exit(
    build_node, node_registry, shared_dir
):
    """Script, stdin (result key and credentials), output and error live in
    a 0700 directory of the build account under the registry's .build-jobs,
    and are gone after a success, a job that dies without a result, and a
    stop (which cancels the job)."""
    c = build_node
    pipeline, cfg = node_registry
    jobs = Path(pipeline.registry.root) / ".build-jobs"
    publish_stand_in(pipeline.registry, "p/i:t")
    cli = fake_cli(
        c,
        shared_dir,
        """
here = os.getcwd()
st = os.stat(here)
say(f'dir {oct(st.st_mode & 0o777)} {st.st_uid} ' + ' '.join(sorted(os.listdir(here))))
stdin = os.path.join(here, 'stdin')
creds = sys.stdin.read()
say(f'stdin {oct(os.stat(stdin).st_mode & 0o777)} key={len(key)} read={creds == "password=s3cret"}')
if 'sleep' in sys.argv:
    time.sleep(300)
if 'die' in sys.argv:
    sys.exit(3)
result('success')
""",
    )
    runner = slurm_runner(c, cfg, cli=cli)

    def run(ref, creds="", stop=None):
        log = Log()
        res = runner.run(
            pipeline, BuildRequest("https://example.org/r", ref, "p/i:t", git_credentials=creds), log, stop_event=stop
        )
        return res, log

    res, log = run("ok", creds="password=s3cret")
    assert res.outcome == "success", (res.error, log.messages())
    assert f"dir 0o700 {c.build_uid} job.err job.out job.sh stdin" in log.messages()
    assert "stdin 0o600 key=64 read=True" in log.messages()
    assert oct(jobs.stat().st_mode & 0o777) == "0o700" and jobs.stat().st_uid == c.build_uid
    assert list(jobs.iterdir()) == []

    res, log = run("die")
    assert res.outcome == "failure" and "ended FAILED" in res.error, res.error
    assert "Build failed: build job" in log.messages()
    assert list(jobs.iterdir()) == []

    stop = threading.Event()
    box = {}
    t = threading.Thread(target=lambda: box.update(r=run("sleep", stop=stop)))
    t.start()
    deadline = time.monotonic() + 300
    while not list(jobs.glob("*/job.out")) or "dir 0o700" not in list(jobs.glob("*/job.out"))[0].read_text():
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.1)
    stop.set()
    t.join(120)
    res, log = box["r"]
    assert res.outcome == "cancelled", res.error
    assert list(jobs.iterdir()) == []
    job_id = next(d["message"].split()[3] for _, d in log.lines if d["message"].startswith("Submitted"))
    # scancel'd: the job does not run on
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], env=c.full_env(), capture_output=True, text=True
        ).stdout.strip()
        if out in ("", "CANCELLED", "COMPLETED", "FAILED"):
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.5)


def working_containers(cluster):
    out = cluster.as_build_user(["podman", "ps", "--all", "--external", "--format", "json"]).stdout
    return {d["Id"] for d in json.loads(out or "[]") if d.get("Command") == ["buildah"]}


def test_gc_on_the_build_node_removes_the_working_container_a_builder_killed_in_a_run_step_left(
    build_node, node_registry, git_server, build_base, shared_dir
):
    """Killed during a RUN step, a build leaves buildah's working container
    (and its layers) in the build account's storage; `binderhub-hpc gc`
    there removes those older than the build timeout."""
    c = build_node
    pipeline, cfg = node_registry
    name = f"killed-run-{uuid.uuid4().hex[:8]}"
    sha = make_repo(
        git_server.root / name,
        build_base,
        files={"Dockerfile": dockerfile(build_base, name) + "RUN echo run-step-sleeping && sleep 300\n"},
    )
    image = f"binderhub-hpc/test-killed-run:{sha}"
    before = working_containers(c)
    log, box = Log(), {}
    t = threading.Thread(
        target=lambda: box.update(
            r=ssh_runner(c, cfg).run(pipeline, BuildRequest(git_server.url(name), sha, image), log)
        )
    )
    t.start()
    try:
        log.wait_for("run-step-sleeping\n", t)
        builder = [p for p in c.node_pids("build") if image in cmdline(p) and "bin/binderhub-hpc build" in cmdline(p)]
        assert len(builder) == 1, builder
        os.kill(builder[0], signal.SIGKILL)
        t.join(120)
        assert box["r"].outcome == "failure"
        left = working_containers(c) - before
        assert left, "no working container was left: nothing to show"
        gc_cfg = write_config(shared_dir / "gc_config.py", pipeline.registry.root, BuildPipeline__build_timeout=1)
        time.sleep(2)
        out = c.as_build_user(
            [str(c.site_venv / "bin" / "binderhub-hpc"), "gc", "--config", str(gc_cfg), "--stale-after", "0"]
        ).stdout
        assert f"removed {len(left)} working containers" in out or "working containers" in out, out
        assert not left & working_containers(c)
    finally:
        t.join(120)
        shutil.rmtree(git_server.root / name, ignore_errors=True)


# ------------------------------------------------------------------ egress


class Listener:
    """A TCP listener in a network namespace (`argv_prefix`), as root."""

    def __init__(self, prefix, address, port):
        code = (
            "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(({address!r}, {port})); s.listen(16); print('up', flush=True)\n"
            "while True:\n    c, _ = s.accept(); c.close()"
        )
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "up"
        self.address, self.port = address, port

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def test_a_run_step_reaches_no_cluster_address_nor_binderhubs_port(build_node, node_registry, git_server, build_base):
    """RUN steps of a build on the build node try the hub node (where
    BinderHub and the hub listen), the head node (slurmctld), the build node's
    own address and its loopback; each is refused, while root on the build
    node reaches every one of them (so the listeners were there)."""
    c = build_node
    pipeline, cfg = node_registry
    port = 18900 + os.getpid() % 50
    hub, build = c.hub_host, c.build_host
    listeners = [
        Listener(hub.run_in([]), hub.address, port),  # BinderHub's port on the hub node
        Listener(c.node_argv("build", []), build.address, port),  # the build host's own address
        Listener(c.node_argv("build", []), "127.0.0.1", port),  # the build host's loopback
    ]
    targets = {
        "hub": (hub.address, port),
        "build": (build.address, port),
        "buildlo": ("10.0.2.2", port),  # slirp4netns' way to the build host's loopback
        "head": (c.host("head").address, c.slurmctld_port),
    }
    probe = "; ".join(
        f'python3 -c "import socket; s=socket.socket(); s.settimeout(5); e=s.connect_ex(({a!r}, {p})); '
        f"print('probe {n}:', 'REACHED' if e == 0 else 'refused', e)\""
        for n, (a, p) in targets.items()
    )
    name = f"egress-{uuid.uuid4().hex[:8]}"
    sha = make_repo(
        git_server.root / name, build_base, files={"Dockerfile": dockerfile(build_base, name) + f"RUN {probe}\n"}
    )
    try:
        log = Log()
        result = slurm_runner(c, cfg).run(
            pipeline, BuildRequest(git_server.url(name), sha, f"binderhub-hpc/test-egress:{sha}"), log
        )
        text = log.messages()
        assert result.outcome == "success", (result.error, text[-3000:])
        for n in targets:
            line = next(x for x in text.splitlines() if x.startswith(f"probe {n}:"))
            assert "refused" in line, line
        # the control: root on the build node reaches them
        for n in ("hub", "build", "head"):
            a, p = targets[n]
            ok = c.on_node("build", [sys.executable, "-c", f"import socket; socket.create_connection(({a!r}, {p}), 5)"])
            assert ok.returncode == 0, (n, ok.stdout)
    finally:
        for listener in listeners:
            listener.stop()
        shutil.rmtree(git_server.root / name, ignore_errors=True)


# ------------------------------------------------------------------ the build node dies


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_the_build_node_dying_mid_build_publishes_nothing_frees_the_lock_and_the_next_request_builds(
    build_node, node_registry, served_repo, shared_dir, runner
):
    """Every process of the build node is killed at once while the build
    converts (gzip: long enough to be caught writing its squashfs); the
    runner fails with the reason, nothing is published, the lock is free;
    once the node is back, the same request builds."""
    c = build_node
    pipeline, cfg = node_registry
    reg = pipeline.registry
    url, sha = served_repo
    image = f"binderhub-hpc/test-dying-{runner}:{sha}"
    slow = write_config(shared_dir / "slow_config.py", reg.root, SquashfsSIFConverter__compressor="gzip")
    log, box = Log(), {}
    t = threading.Thread(
        target=lambda: box.update(r=RUNNERS[runner](c, slow).run(pipeline, BuildRequest(url, sha, image), log))
    )
    t.start()
    try:
        log.wait_for("Converting to SIF", t)
        deadline = time.monotonic() + 120
        while not [p for p in reg.path(image).parent.glob(".*.squashfs.tmp") if p.stat().st_size]:
            assert time.monotonic() < deadline and t.is_alive(), log.messages()[-2000:]
            time.sleep(0.05)
        assert c.kill_node("build")
        t.join(300)
        assert not t.is_alive(), "the runner never noticed the node died"
        result = box["r"]
        assert result.outcome == "failure", result
        why = {"slurm": "stopped answering", "ssh": "lost"}[runner]
        assert why in result.error and "Build failed" in log.messages(), result.error
        # nothing published (a partial squashfs stays behind as a temporary),
        # the lock is free at once
        assert not reg.exists(image) and not reg.path(image).exists()
        assert list(reg.path(image).parent.glob(".*.tmp"))
        lock = reg.lock(image)
        assert lock.try_acquire()
        lock.release()
    finally:
        t.join(300)
        c.up()  # the node comes back (its local disk survived, its /run/user did not)
    log = Log()
    again = RUNNERS[runner](c, cfg).run(pipeline, BuildRequest(url, sha, image), log)
    assert again.outcome == "success", (again.error, log.messages()[-3000:])
    assert reg.exists(image)
    assert not list(reg.path(image).parent.glob(".*.tmp")), "the dead build's temporaries stayed"
    print(f"\nbuild node killed mid-conversion ({runner}): {result.error}; rebuilt after it came back")
