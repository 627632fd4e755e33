"""The PBS dev cluster (binderhub_hpc_testing.pbs): an installed OpenPBS made
the dev cluster's scheduler, beside Slurm. Tests that need OpenPBS are
skipped where it is not installed."""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from binderhub_hpc_testing import pbs as pbs_mod
from binderhub_hpc_testing.cluster import DevClusterError
from binderhub_hpc_testing.pbs import HOSTS_MARK, PBSDevCluster, find_prefix, installed_prefixes


# ------------------------------------------------------------------ finding OpenPBS (no PBS needed)
def fake_prefix(path, mtime):
    for sub in ("bin", "libexec"):
        (path / sub).mkdir(parents=True)
    for f in ("bin/qsub", "bin/qstat", "libexec/pbs_init.d"):
        (path / f).write_text("#!/bin/sh\n")
        os.chmod(path / f, 0o755)
    os.utime(path / "bin" / "qstat", (mtime, mtime))
    return path


def test_prefix_from_argument_env_path_or_newest_under_opt(tmp_path, monkeypatch):
    old = fake_prefix(tmp_path / "pbs-old", 1000)
    new = fake_prefix(tmp_path / "pbs-new", 2000)
    monkeypatch.setattr(pbs_mod, "PREFIX_GLOBS", (str(tmp_path / "pbs"), str(tmp_path / "pbs-*")))
    monkeypatch.delenv("PBS_EXEC", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert installed_prefixes() == [new, old]
    assert find_prefix() == new  # the last installed
    monkeypatch.setenv("PATH", f"{old / 'bin'}:/usr/bin:/bin")
    assert find_prefix() == old  # qsub on PATH
    monkeypatch.setenv("PBS_EXEC", str(new))
    assert find_prefix() == new  # $PBS_EXEC over PATH
    assert find_prefix(str(old)) == old  # the argument over all
    with pytest.raises(DevClusterError, match="not an OpenPBS installation"):
        find_prefix(str(tmp_path))
    monkeypatch.setenv("PBS_EXEC", str(tmp_path / "nothing"))
    with pytest.raises(DevClusterError, match=r"\$PBS_EXEC="):
        find_prefix()


def test_no_openpbs_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pbs_mod, "PREFIX_GLOBS", (str(tmp_path / "pbs*"),))
    monkeypatch.delenv("PBS_EXEC", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    c = PBSDevCluster()
    assert c.prefix is None
    with pytest.raises(DevClusterError, match="OpenPBS is not installed"):
        c.up()
    assert "not installed" in c.format_status()


def test_pbs_conf_names_this_host(tmp_path):
    c = PBSDevCluster(prefix=str(fake_prefix(tmp_path / "pbs", 1)))
    conf = c.conf_text(c.prefix)
    assert conf.startswith("# written by binderhub-hpc devcluster")
    for line in (
        f"PBS_EXEC={c.prefix}",
        "PBS_HOME=/var/spool/pbs",
        "PBS_SERVER=pbsdev",
        "PBS_LEAF_NAME=pbsdev",
        "PBS_MOM_NODE_NAME=pbsdev",
        "PBS_START_MOM=1",
    ):
        assert line in conf.splitlines()
    assert f"/{c.prefix.name}/bin/qsub -f" in c.spawner_config()


# ------------------------------------------------------------------ on a real OpenPBS
pbs = pytest.mark.cluster


def qstat(c, *args):
    return subprocess.run([c.bin("qstat"), *args], env=c.full_env(), capture_output=True, text=True, check=True).stdout


@pbs
def test_pbs_is_up_under_a_name_of_this_hosts_own_address(pbs_cluster):
    c = pbs_cluster
    assert c.is_up()
    hosts = Path("/etc/hosts").read_text().splitlines()
    (line,) = [h for h in hosts if h.endswith(HOSTS_MARK)]
    address, name = line.split()[:2]
    assert name == c.server and not address.startswith("127.")
    assert c.conf_is_ours() and f"PBS_EXEC={c.prefix}" in c.conf.read_text()
    assert c.running_prefix() == c.prefix
    assert "$usecp *:/ /" in (c.home / "mom_priv" / "config").read_text()
    assert c.node_state() == "free"


@pbs
def test_queues_history_and_limits(pbs_cluster):
    server = qstat(pbs_cluster, "-Bf")
    assert "default_queue = interactive" in server and "job_history_enable = True" in server
    queues = qstat(pbs_cluster, "-Qf")
    cpus = os.cpu_count()
    for name in ("interactive", "batch", "bench"):
        assert f"Queue: {name}\n" in queues
    batch = queues.split("Queue: batch\n")[1].split("Queue: ")[0]
    assert f"resources_available.ncpus = {cpus}" in batch and "enabled = True" in batch


@pbs
def test_a_job_runs_as_the_service_account_and_is_in_history(pbs_cluster):
    c = pbs_cluster
    out = c.site.jobs_dir / f"pbs-test-{uuid.uuid4().hex[:8]}.out"
    jid = c.as_service_user(
        [c.bin("qsub"), "-f", "-N", "smoke", "-o", str(out), "-j", "oe", "--", "/bin/sh", "-c", "id -un; echo hello"],
        timeout=60,
    ).stdout.strip()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and " F " not in qstat(c, "-x", jid):
        time.sleep(0.5)
    assert " F " in qstat(c, "-x", jid)
    assert "Exit_status = 0" in qstat(c, "-x", "-f", jid)
    assert out.read_text().split() == [c.service_user, "hello"]
    out.unlink()


@pbs
def test_root_cannot_submit(pbs_cluster):
    """The server does not take root's jobs (no acl_roots): jobs are the
    service account's."""
    p = subprocess.run(
        [pbs_cluster.bin("qsub"), "-f", "--", "/bin/true"],
        env=pbs_cluster.full_env(),
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    assert p.returncode != 0 and "Bad UID" in p.stderr


@pbs
def test_up_is_idempotent_and_slurm_is_left_alone(pbs_cluster, cluster):
    before = pbs_cluster.daemons()
    slurm = {k: v["pid"] for k, v in cluster.status()["daemons"].items()}
    PBSDevCluster(prefix=pbs_cluster.prefix).up()
    assert pbs_cluster.daemons() == before
    assert {k: v["pid"] for k, v in cluster.status()["daemons"].items()} == slurm


@pbs
def test_down_removes_what_up_made_and_up_makes_it_again(pbs_cluster, cluster):
    c = pbs_cluster
    slurm = {k: v["pid"] for k, v in cluster.status()["daemons"].items()}
    done = c.down()
    try:
        assert any(d.startswith("OpenPBS") for d in done) and "hosts line" in done
        assert not c.daemons() and not c._datastore_pids()
        assert not c.conf.exists() and not c.home.exists()
        assert not [h for h in Path("/etc/hosts").read_text().splitlines() if h.endswith(HOSTS_MARK)]
        assert c.prefix.is_dir() and (c.prefix / "bin" / "qsub").is_file()  # the installation stays
        assert {k: v["pid"] for k, v in cluster.status()["daemons"].items()} == slurm
        assert c.down() == []
    finally:
        c.up()
    assert c.is_up()


@pbs
def test_cli_status_and_env(pbs_cluster):
    env = dict(os.environ, PBS_EXEC=str(pbs_cluster.prefix))
    p = subprocess.run(
        [sys.executable, "-m", "binderhub_hpc.cli", "devcluster", "status", "--scheduler", "pbs"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"node {pbs_cluster.server}: free" in p.stdout and "interactive" in p.stdout
    p = subprocess.run(
        [sys.executable, "-m", "binderhub_hpc.cli", "devcluster", "env", "--scheduler", "pbs"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert p.stdout.splitlines() == [
        f"export PBS_CONF_FILE={pbs_cluster.conf}",
        f'export PATH="{pbs_cluster.prefix}/bin:$PATH"',
    ]
