"""`binderhub-hpc doctor` and BinderHub's /health: the same checks, against
the real dev cluster and a real JupyterHub, healthy and broken."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from binderhub_hpc import health
from binderhub_hpc.config import load_config_files
from binderhub_hpc.health import FAIL, OK, WARN
from binderhub_hpc_testing.hub import spawner_config

from hubutil import Hub

PY = "/usr/bin/python3"


# ------------------------------------------------------------- no cluster needed


def test_user_can_follows_mode_bits_and_groups(tmp_path):
    d = tmp_path / "reg"
    d.mkdir()
    os.chmod(d, 0o755)
    me = health.current_user()
    assert health.user_can(str(d), me, "rwx")
    if os.geteuid() == 0 and _account("nobody"):
        assert health.user_can(str(d), "nobody", "rx")
        assert not health.user_can(str(d), "nobody", "w")
        os.chmod(d, 0o700)
        assert not health.user_can(str(d), "nobody", "r")


def test_registry_filesystem_type_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(health, "filesystem_type", lambda p: "ext2/ext3")
    assert health.check_registry_fs(str(tmp_path), nodes=1)[0] == OK
    status, msg = health.check_registry_fs(str(tmp_path), nodes=4)
    assert status == WARN and "ext2/ext3" in msg and "4 nodes" in msg
    monkeypatch.setattr(health, "filesystem_type", lambda p: "nfs")
    status, msg = health.check_registry_fs(str(tmp_path), nodes=4)
    assert status == OK and "nfs" in msg


def test_the_runtime_check_resolves_a_registry_name_as_a_session_does_reading_its_header_once(tmp_path, monkeypatch):
    """--image NAME runs what a session of NAME would run, from this host's
    view of the registry, and the check reads the SIF header once."""
    from binderhub_hpc import sif
    from binderhub_hpc.registry import InvalidImageName, SIFRegistry
    from binderhub_hpc.spawner.runtime import SessionImage

    root = tmp_path / "registry"
    reg = SIFRegistry(root=str(root))
    tmp = reg.tempfile("binder/x:abc")
    tmp.write_bytes(sif.minimal_sif(b"hsqs root filesystem"))
    path = reg.publish("binder/x:abc", {"sif": tmp})
    offset = sif.root_partition(path).offset
    reads = []
    real = sif._header
    monkeypatch.setattr(sif, "_header", lambda fd: reads.append(fd) or real(fd))

    def deployment(image):
        return health.Deployment(
            registry_root=str(root), runtime="apptainer", image=image, scheduler="slurm", hub_url="http://hub/"
        )

    assert deployment("binder/x:abc").session_image() == SessionImage(str(path), offset)
    assert len(reads) == 1
    # a file stays a file (check_runtime reads it), an unknown name stays the name
    assert deployment(str(path)).session_image() == str(path)
    assert deployment("binder/x:nothere").session_image() == "binder/x:nothere"
    with pytest.raises(InvalidImageName):
        deployment("binder/x").session_image()


def test_reach_job_argv_holds_no_secret_and_quotes_the_url():
    argv = health.reach_job_argv("slurm", "http://hub:8081/hub/api/", "n", "interactive", PY)
    assert argv[:2] == ["sbatch", "--wait"] and "--partition=interactive" in argv
    assert "http://hub:8081/hub/api/" in argv[-1] and "token" not in " ".join(argv).lower()
    pbs = health.reach_job_argv("pbs", "http://hub:8081/hub/api/", "n", "workq", PY)
    assert pbs[:3] == ["qsub", "-W", "block=true"] and ["-q", "workq"] == pbs[pbs.index("-q") : pbs.index("-q") + 2]


def test_reach_job_argv_tries_binderhubs_address_when_given():
    argv = health.reach_job_argv("slurm", "http://hub:8081/hub/api/", "n", python=PY, binderhub="10.0.0.5:8585")
    assert argv[-1].endswith(" http://hub:8081/hub/api/ 10.0.0.5:8585")


def _reach_here(url, binderhub=None):
    """The doctor's job script, run here as the job runs it: its exit code."""
    argv = [PY, "-c", health._REACH, url] + ([binderhub] if binderhub else [])
    return subprocess.run(argv, capture_output=True, timeout=60).returncode


def test_the_job_scripts_exit_code_says_whether_binderhub_answered_and_the_hub_did():
    """Real sockets on loopback: a listening port stands for BinderHub, a
    closed one for a firewall's refusal, an HTTP server for the hub."""
    import http.server
    import socket
    import threading

    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(4)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    hub_url = f"http://127.0.0.1:{hub.server_address[1]}/"
    bh_open = f"127.0.0.1:{listening.getsockname()[1]}"
    bh_refused = f"127.0.0.1:{closed.getsockname()[1]}"
    try:
        cases = {
            (hub_url, None): 0,
            (hub_url, bh_refused): 0,
            (hub_url, bh_open): health.BINDERHUB_ANSWERED,
            ("http://" + bh_refused + "/", bh_open): health.BINDERHUB_ANSWERED + health.HUB_UNREACHABLE,
            ("http://" + bh_refused + "/", bh_refused): health.HUB_UNREACHABLE,
        }
        seen = {case: _reach_here(*case) for case in cases}
    finally:
        hub.shutdown()
        listening.close()
        closed.close()
    assert seen == cases
    for rc, answered, hub_rc in ((0, False, 0), (8, True, 0), (11, True, 3), (3, False, 3), (12, True, 4)):
        probe = health.ComputeProbe(rc)
        assert (probe.binderhub_answered, probe.hub_rc) == (answered, hub_rc), rc


def test_binderhub_answering_a_compute_job_is_red_with_the_remedy_and_loopback_a_warning():
    probe = health.ComputeProbe(health.BINDERHUB_ANSWERED, where="partition 'interactive'")
    status, msg = health.check_binderhub_from_compute(probe, "10.0.0.5:8585")
    assert status == FAIL and "10.0.0.5:8585" in msg and "/build/" in msg and "compute nodes" in msg, msg
    assert health.check_binderhub_from_compute(probe, "127.0.0.1:8585")[0] == WARN
    assert health.check_binderhub_from_compute(health.ComputeProbe(0), "10.0.0.5:8585")[0] == OK
    assert health.check_binderhub_from_compute(health.ComputeProbe(0), "")[0] == WARN
    assert health.check_binderhub_from_compute(health.ComputeProbe(None, failure="no sbatch"), "h:1")[0] == FAIL


def test_deployment_reads_jupyterhub_and_binderhub_config(tmp_path, monkeypatch):
    cfg = tmp_path / "jupyterhub_config.py"
    cfg.write_text(
        textwrap.dedent("""\
        c.JupyterHub.spawner_class = "binderhub_hpc.spawner.spawner.PBSBinderSpawner"
        c.JupyterHub.bind_url = "https://binder.example.org/"
        c.JupyterHub.hub_connect_ip = "10.0.0.5"
        c.JupyterHub.hub_port = 8081
        c.PBSBinderSpawner.req_queue = "workq"
        c.PBSBinderSpawner.job_user = "binder"
        c.PBSBinderSpawner.host_python = "/usr/bin/python3"
        c.SIFRegistry.root = "/shared/binder/registry"
        """)
    )
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "from-env")
    dep = health.Deployment(load_config_files([str(cfg)]))
    assert (dep.scheduler, dep.partition, dep.job_user) == ("pbs", "workq", "binder")
    assert dep.host_python == "/usr/bin/python3"
    assert dep.registry.root == "/shared/binder/registry"
    assert dep.hub_url == "https://binder.example.org/"
    assert dep.hub_api_url == "http://10.0.0.5:8081/"
    assert dep.token == "from-env"
    # BinderHub beside the hub: the hub's host as compute nodes reach it
    assert dep.binderhub == ""  # no port anywhere in this file
    cfg.write_text(cfg.read_text() + 'c.JupyterHub.services = [{"name": "binder", "url": "http://127.0.0.1:9090"}]\n')
    assert health.Deployment(load_config_files([str(cfg)])).binderhub == "10.0.0.5:9090"
    cfg.write_text(cfg.read_text() + "c.BinderHub.port = 8585\n")
    assert health.Deployment(load_config_files([str(cfg)])).binderhub == "10.0.0.5:8585"
    assert health.Deployment(load_config_files([str(cfg)]), binderhub="bh:1").binderhub == "bh:1"
    assert health.Deployment(load_config_files([str(cfg)]), partition="other").partition == "other"


def _account(name):
    try:
        import pwd

        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# ------------------------------------------------------------- on the dev cluster


@pytest.fixture
def site(cluster):
    """A registry the service account builds into and reads (the healthy
    layout: its own directory, readable by all)."""
    root, _ = cluster.site_registry("doctor-" + uuid.uuid4().hex[:8])
    shutil.chown(root, cluster.service_user, cluster.service_user)
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def hub_config(cluster, root, partition="interactive"):
    compute_root = cluster.compute_registry / "sites" / root.name if cluster.multi else ""
    return spawner_config(root, partition=partition, compute_root=compute_root)


@pytest.fixture
def hub(cluster, site, tmp_path):
    h = Hub(str(tmp_path), hub_config(cluster, site), env=cluster.env)
    h.start()
    yield h
    h.stop()


def run_doctor(cluster, hub, *args, env=None):
    """The CLI as an admin runs it, on the hub's own configuration file and
    environment; returns (exit code, {check: (status, message)}). `cluster`:
    the Slurm or the PBS dev cluster."""
    config = hub.deployment_config
    e = cluster.full_env()
    e.pop("JUPYTERHUB_API_TOKEN", None)
    e.update(hub.config_env())
    e.update(env or {})
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "binderhub_hpc.cli",
            "doctor",
            "--json",
            "--config",
            config,
            "--build-user",
            cluster.service_user,
            "--job-timeout",
            "90",
            *args,
        ],
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.stdout.strip().startswith("["), p.stdout + p.stderr
    results = {r["name"]: (r["status"], r["message"]) for r in json.loads(p.stdout)}
    return p.returncode, results


@pytest.mark.cluster
def test_healthy_deployment_is_all_green(cluster, hub):
    rc, res = run_doctor(cluster, hub)
    assert set(res) == {
        "scheduler",
        "partition",
        "runtime",
        "registry",
        "registry filesystem",
        "build engine",
        "hub API token",
        "hub from compute node",
        "BinderHub from compute node",
    }
    if not cluster.multi:
        # one node: the job runs where BinderHub's stand-in listens
        status, msg = res.pop("BinderHub from compute node")
        assert status == WARN and "BinderHub's own host" in msg, msg
    if cluster.multi:
        # the dev cluster's nodes share this machine's disk, which doctor
        # rightly cannot tell from a disk only one host sees
        status, msg = res.pop("registry filesystem")
        assert status == WARN and "compute nodes must see the same files" in msg, msg
    assert all(s == OK for s, _ in res.values()), {k: v for k, v in res.items() if v[0] != OK}
    assert rc == 0
    assert "interactive" in res["partition"][1]
    assert "rootless" in res["build engine"][1]
    assert "service binder" in res["hub API token"][1]
    assert "reached the hub" in res["hub from compute node"][1]
    if cluster.multi:
        assert "cannot connect to BinderHub" in res["BinderHub from compute node"][1]


@pytest.fixture
def policy_lifted(cluster):
    """The compute nodes' egress firewall emptied, put back afterwards."""
    if not cluster.multi:
        pytest.skip("needs the multi-node dev cluster (compute nodes of their own)")
    cluster.lift_compute_firewall()
    yield
    cluster.ensure_compute_firewall()


@pytest.mark.cluster
def test_binderhub_reachable_from_a_compute_node_is_red(cluster, hub, policy_lifted):
    rc, res = run_doctor(cluster, hub)
    assert rc == 1
    status, msg = res["BinderHub from compute node"]
    assert status == FAIL and f"{cluster.hub_address}:{hub.binder_port}" in msg and "/build/" in msg, msg
    # the hub is still reached by the same job
    assert res["hub from compute node"][0] == OK


@pytest.mark.cluster
def test_nonexistent_partition(cluster, hub):
    rc, res = run_doctor(cluster, hub, "--partition", "no-such-partition", "--no-job")
    assert rc == 1
    status, msg = res["partition"]
    assert status == FAIL and "'no-such-partition' does not exist" in msg and "interactive" in msg
    assert res["scheduler"][0] == OK


@pytest.mark.cluster
def test_unwritable_registry(cluster, hub, site):
    os.chmod(site, 0o555)
    rc, res = run_doctor(cluster, hub, "--no-job")
    assert rc == 1
    status, msg = res["registry"]
    assert status == FAIL and "build account binder cannot write" in msg, msg
    # and unreadable for the job account
    shutil.chown(site, "root", "root")
    os.chmod(site, 0o700)
    rc, res = run_doctor(cluster, hub, "--no-job", "--build-user", "root")
    assert res["registry"][0] == FAIL and "job account binder cannot read" in res["registry"][1]


@pytest.mark.cluster
def test_bad_token(cluster, hub):
    rc, res = run_doctor(cluster, hub, "--no-job", env={"JUPYTERHUB_API_TOKEN": "not-a-token"})
    assert rc == 1
    status, msg = res["hub API token"]
    assert status == FAIL and "refused the API token" in msg, msg


@pytest.mark.cluster
def test_stopped_hub(cluster, hub):
    hub.stop()
    rc, res = run_doctor(cluster, hub)
    assert rc == 1
    assert res["hub API token"][0] == FAIL and "unreachable" in res["hub API token"][1]
    status, msg = res["hub from compute node"]
    assert status == FAIL and "cannot reach the hub" in msg, msg


@pytest.mark.cluster
@pytest.mark.parametrize("name", ["apptainer", "podman"])
def test_runtime_runs_an_image_from_the_registry(cluster, base_image, site, name):
    """With an image, the runtime check runs `true` in it as the job account,
    the way a session job does (home copy, mounts, cleanup)."""
    from binderhub_hpc.registry import SIFRegistry
    from binderhub_hpc.spawner.runtime import make_runtime
    from binderhub_hpc_testing.repo import publish_podman_image

    path = publish_podman_image(SIFRegistry(root=str(site)), "probe/base:1", base_image)
    rt = make_runtime(name)
    status, msg = health.check_runtime(rt, str(path), cluster.service_user, cluster.full_env())
    assert status == OK and "as a session job does" in msg, msg
    # by name, as `doctor --image probe/base:1` resolves it: the registry
    # entry's session image, whose header is not read again
    by_name = health.Deployment(registry_root=str(site), runtime=name, image="probe/base:1", scheduler="slurm")
    status, msg = health.check_runtime(rt, by_name.session_image(), cluster.service_user, cluster.full_env())
    assert status == OK and str(path) in msg, msg
    status, msg = health.check_runtime(rt, str(site / "missing.sif"), cluster.service_user, cluster.full_env())
    assert status == FAIL and "missing.sif" in msg
    broken = site / "broken.sif"
    broken.write_bytes(b"SIF_MAGIC but not a SIF")
    status, msg = health.check_runtime(rt, str(broken), cluster.service_user, cluster.full_env())
    assert status == FAIL and "not a usable SIF" in msg


# ------------------------------------------------------------- BinderHub /health


@pytest.fixture
def health_app():
    """BinderHub's /health with our handler, in a tornado app of its own;
    `/hub/api/health` stands in for the hub (upstream's own check)."""
    pytest.importorskip("binderhub")
    import socket

    from tornado import web
    from tornado.httpserver import HTTPServer
    from traitlets.config import Config, LoggingConfigurable

    from binderhub_hpc.binderhub import SIFDockerRegistry, SIFHealthHandler

    class HubHealth(web.RequestHandler):
        def get(self):
            self.write({})

    servers = []

    def make(**conf):
        cfg = Config()
        for key, value in conf.items():
            section, trait = key.split("__")
            cfg[section][trait] = value
        parent = LoggingConfigurable(config=cfg)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        url = f"http://127.0.0.1:{port}/"
        app = web.Application(
            [("/health", SIFHealthHandler, {"hub_url": url}), ("/hub/api/health", HubHealth)],
            auth_enabled=False,
            traitlets_config=cfg,
            traitlets_parent=parent,
            use_registry=True,
            registry=SIFDockerRegistry(parent=parent),
            image_prefix="binderhub-hpc/binder-",
        )
        server = HTTPServer(app)
        server.listen(port, "127.0.0.1")
        servers.append(server)
        return url + "health"

    yield make
    for s in servers:
        s.stop()


async def _get(url):
    from tornado.httpclient import AsyncHTTPClient

    r = await AsyncHTTPClient().fetch(url, raise_error=False, request_timeout=120)
    return r.code, {c["service"]: c for c in json.loads(r.body)["checks"]}


@pytest.mark.cluster
async def test_health_green_then_red(cluster, site, health_app):
    url = health_app(SIFRegistry__root=str(site), HealthChecks__partition="interactive")
    code, checks = await _get(url)
    assert code == 200, checks
    assert {"SIF registry", "Build engine", "Scheduler", "Docker registry", "JupyterHub API"} <= set(checks)
    assert "free" in checks["SIF registry"]["message"]
    assert checks["Scheduler"]["ok"] and "interactive" in checks["Scheduler"]["message"]

    code, checks = await _get(health_app(SIFRegistry__root=str(site / "gone")))
    assert code == 503 and not checks["SIF registry"]["ok"]
    assert "does not exist" in checks["SIF registry"]["message"]

    code, checks = await _get(health_app(SIFRegistry__root=str(site), HealthChecks__partition="nope"))
    assert code == 503 and not checks["Scheduler"]["ok"]
    assert "'nope' does not exist" in checks["Scheduler"]["message"]


@pytest.mark.cluster
async def test_health_results_are_cached(cluster, site, health_app, monkeypatch):
    url = health_app(SIFRegistry__root=str(site), HealthChecks__cache_seconds=60.0)
    code, _ = await _get(url)
    assert code == 200
    calls = []
    monkeypatch.setattr(health, "check_build_engine", lambda *a, **k: calls.append(a) or (FAIL, "x"))
    monkeypatch.setattr(health, "check_scheduler", lambda *a, **k: calls.append(a) or (FAIL, "x"))
    code, _ = await _get(url)
    assert code == 200 and not calls


# ------------------------------------------------------------- on the PBS dev cluster


@pytest.fixture
def pbs_site(pbs_cluster):
    root = pbs_cluster.site.root / "test-registries" / ("doctor-pbs-" + uuid.uuid4().hex[:8])
    root.mkdir(parents=True)
    os.chmod(root.parent, 0o755)
    shutil.chown(root, pbs_cluster.service_user, pbs_cluster.service_user)
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pbs_hub(pbs_cluster, pbs_site, tmp_path):
    h = Hub(str(tmp_path), spawner_config(pbs_site, pbs=pbs_cluster), env=pbs_cluster.env)
    h.start()
    yield h
    h.stop()


@pytest.mark.cluster
def test_pbs_healthy_deployment_is_all_green(pbs_cluster, pbs_hub):
    """The deployment's own file with the PBS spawner: the doctor finds PBS's
    commands beside the configured qstat, and its test job (qsub -W
    block=true, as the service account) reaches the hub."""
    rc, res = run_doctor(pbs_cluster, pbs_hub)
    # PBS's node is this machine (the Slurm cluster's head, or the hub's own
    # host), which has no compute node firewall: its jobs reach BinderHub's
    # port, and the doctor says so (red across hosts, a warning on one)
    status, msg = res.pop("BinderHub from compute node")
    assert status in (FAIL, WARN) and "connected to BinderHub" in msg, msg
    assert all(s == OK for s, _ in res.values()), {k: v for k, v in res.items() if v[0] != OK}
    assert rc == (1 if status == FAIL else 0)
    assert f"PBS server {pbs_cluster.server} answers" in res["scheduler"][1]
    assert "interactive" in res["scheduler"][1] and "batch" in res["scheduler"][1]
    assert "Queue 'interactive' is enabled and started; 1 node(s) up" in res["partition"][1]
    assert "reached the hub" in res["hub from compute node"][1]


@pytest.mark.cluster
def test_pbs_missing_disabled_and_stopped_queues(pbs_cluster, pbs_hub):
    rc, res = run_doctor(pbs_cluster, pbs_hub, "--partition", "no-such-queue", "--no-job")
    assert rc == 1
    status, msg = res["partition"]
    assert status == FAIL and "'no-such-queue' does not exist" in msg and "interactive" in msg, msg
    assert res["scheduler"][0] == OK
    try:
        pbs_cluster.qmgr("set queue bench started = False")
        rc, res = run_doctor(pbs_cluster, pbs_hub, "--partition", "bench", "--no-job")
        assert res["partition"][0] == FAIL and "'bench' is stopped" in res["partition"][1], res["partition"]
        pbs_cluster.qmgr("set queue bench enabled = False")
        rc, res = run_doctor(pbs_cluster, pbs_hub, "--partition", "bench", "--no-job")
        assert res["partition"][0] == FAIL and "'bench' is disabled" in res["partition"][1], res["partition"]
    finally:
        pbs_cluster.qmgr("set queue bench enabled = True")
        pbs_cluster.qmgr("set queue bench started = True")


@pytest.mark.cluster
def test_pbs_server_not_answering(pbs_cluster, tmp_path):
    conf = tmp_path / "pbs.conf"
    conf.write_text(f"PBS_EXEC={pbs_cluster.prefix}\nPBS_HOME=/var/spool/pbs\nPBS_SERVER=no-such-server.invalid\n")
    env = pbs_cluster.full_env(PBS_CONF_FILE=str(conf))
    status, msg = health.check_scheduler("pbs", env, qstat=pbs_cluster.bin("qstat"))
    assert status == FAIL and "PBS does not answer" in msg and str(conf) in msg, msg
    status, msg = health.check_scheduler("pbs", env, qstat="/nonexistent/bin/qstat")
    assert status == FAIL and "is not installed" in msg


@pytest.mark.cluster
async def test_pbs_health_green_then_red(pbs_cluster, pbs_site, health_app):
    qstat = pbs_cluster.bin("qstat")
    code, checks = await _get(
        health_app(
            SIFRegistry__root=str(pbs_site),
            HealthChecks__scheduler="pbs",
            HealthChecks__partition="interactive",
            PBSQueue__qstat=qstat,
        )
    )
    assert code == 200, checks
    assert checks["Scheduler"]["ok"] and "'interactive' is enabled and started" in checks["Scheduler"]["message"]
    code, checks = await _get(
        health_app(
            SIFRegistry__root=str(pbs_site),
            HealthChecks__scheduler="pbs",
            HealthChecks__partition="nope",
            PBSQueue__qstat=qstat,
        )
    )
    assert code == 503 and "'nope' does not exist" in checks["Scheduler"]["message"]
