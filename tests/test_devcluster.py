"""The dev cluster is a real Slurm cluster (hub, build and compute nodes,
or this machine alone) plus podman."""

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from binderhub_hpc_testing.cluster import DevCluster, DevClusterError

from hubutil import fill_batch_partition

pytestmark = pytest.mark.cluster


def sh(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def as_binder(cluster, cmd, **kw):
    """Run cmd as the service account with the environment jobs get."""
    return cluster.as_service_user(cmd, **kw)


def squeue_job(cluster, job_id):
    out = sh(["squeue", "--json", "-t", "all", "-j", str(job_id)], env=cluster.full_env()).stdout
    jobs = [j for j in json.loads(out)["jobs"] if str(j["job_id"]) == str(job_id)]
    return jobs[0] if jobs else None


def wait_state(cluster, job_id, states, timeout=60):
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = squeue_job(cluster, job_id)
        if job and job["job_state"] in states:
            return job
        if job and job["job_state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            raise AssertionError(
                f"job {job_id} ended {job['job_state']} (cancelled by another test run?), expected {states}"
            )
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {job}")


def sbatch(cluster, *args):
    out = as_binder(cluster, ["sbatch", "--parsable", *args]).stdout
    return out.strip().split(";")[0]


def test_env_points_to_generated_conf(cluster):
    assert cluster.env["SLURM_CONF"] == str(cluster.slurm_conf)
    assert os.environ["SLURM_CONF"] == str(cluster.slurm_conf)
    conf = cluster.slurm_conf.read_text()
    assert "ClusterName=binderhpc" in conf
    assert "PartitionName=interactive" in conf and "PartitionName=batch" in conf


def test_job_as_service_account_completes(cluster):
    out = cluster.jobs_dir / f"test-{uuid.uuid4().hex[:8]}.out"
    job_id = sbatch(cluster, "-p", "interactive", "-o", str(out), "--wrap", "id -un; echo hello")
    job = wait_state(cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED"})
    assert job["job_state"] == "COMPLETED", job
    assert job["user_name"] == cluster.service_user
    text = out.read_text()
    assert text.split() == [cluster.service_user, "hello"]
    out.unlink()


def test_full_batch_partition_makes_next_job_pend(cluster):
    # every core of every node taken (session jobs of other tests may hold some)
    blockers = fill_batch_partition(cluster)
    second = None
    try:
        second = sbatch(cluster, "-p", "batch", "-c", "1", "-o", "/dev/null", "--wrap", "true")
        # the scheduler gives the reason on its next pass
        deadline = time.monotonic() + 30
        job = None
        while time.monotonic() < deadline:
            job = squeue_job(cluster, second)
            if job["job_state"] == "PENDING" and job["state_reason"] in ("Resources", "Priority"):
                break
            time.sleep(0.5)
        assert job["job_state"] == "PENDING", job
        assert job["state_reason"] in ("Resources", "Priority"), job["state_reason"]
    finally:
        ids = blockers + ([second] if second else [])
        sh(["scancel", *ids], env=cluster.full_env(), check=False)


def test_interactive_partition_oversubscribes(cluster):
    cpus = os.cpu_count()
    ids = [
        sbatch(cluster, "-p", "interactive", "-c", str(cpus), "-o", "/dev/null", "--wrap", "sleep 60") for _ in range(2)
    ]
    try:
        for j in ids:
            wait_state(cluster, j, {"RUNNING"}, timeout=60)
    finally:
        sh(["scancel", *ids], env=cluster.full_env(), check=False)


def test_up_is_idempotent(cluster):
    before = cluster.status()["daemons"]
    again = DevCluster(state_dir=cluster.state_dir).up()
    after = again.status()["daemons"]
    assert {k: v["pid"] for k, v in before.items()} == {k: v["pid"] for k, v in after.items()}
    for node in cluster.compute_nodes:
        assert (cluster.node_state(node) or "").rstrip("*") in ("idle", "mixed", "allocated", "completing"), node


def test_status_reports_daemons_and_env(cluster):
    st = cluster.status()
    assert all(d["pid"] for d in st["daemons"].values()), st
    assert "interactive" in st["sinfo"] and "batch" in st["sinfo"]
    assert st["env"] == f"export SLURM_CONF={cluster.slurm_conf}"
    assert st["podman_root"] and st["podman_rootless"]


def test_service_account_and_dirs(cluster):
    import pwd
    import stat

    pw = pwd.getpwnam(cluster.service_user)
    assert pw.pw_uid != 0 and pw.pw_dir == str(cluster.service_home)
    assert any(line.startswith(f"{cluster.service_user}:") for line in open("/etc/subuid"))
    st = cluster.jobs_dir.stat()
    assert st.st_uid == pw.pw_uid and stat.S_IMODE(st.st_mode) == 0o700
    reg = cluster.registry_dir.stat()
    assert reg.st_uid == 0 and stat.S_IMODE(reg.st_mode) & 0o005 == 0o005
    # the service account reads the registry but cannot write to it
    assert as_binder(cluster, ["test", "-w", str(cluster.registry_dir)], check=False).returncode != 0
    assert as_binder(cluster, ["ls", str(cluster.registry_dir)], check=False).returncode == 0


def test_base_image_has_singleuser_and_jovyan(cluster, base_image):
    out = sh(
        [
            "podman",
            "run",
            "--rm",
            base_image,
            "sh",
            "-c",
            "command -v jupyterhub-singleuser; id -u; id -un; echo $HOME; pwd",
        ]
    ).stdout.split()
    assert out == ["/opt/venv/bin/jupyterhub-singleuser", "1000", "jovyan", "/home/jovyan", "/home/jovyan"]


def test_rootless_podman_runs_as_service_account(cluster, base_image):
    cluster.ensure_base_image(rootless=True)
    p = as_binder(cluster, ["podman", "run", "--rm", "--network", "host", base_image, "id", "-u"], check=False)
    assert p.returncode == 0, p.stdout
    assert p.stdout.strip().splitlines()[-1] == "1000"


def test_rootless_podman_inside_a_slurm_job(cluster, base_image):
    """What a session job does on a podman site: rootless podman in the job."""
    cluster.ensure_base_image(rootless=True)
    out = cluster.jobs_dir / f"test-{uuid.uuid4().hex[:8]}.out"
    job_id = sbatch(cluster, "-o", str(out), "--wrap", f"podman run --rm --network host {base_image} id -un")
    job = wait_state(cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED"})
    text = out.read_text()
    out.unlink()
    assert job["job_state"] == "COMPLETED", text
    assert text.strip().splitlines()[-1] == "jovyan"


@pytest.mark.parametrize("private", ["/tmp", "/var/tmp"])
def test_a_multi_host_cluster_refuses_a_state_directory_the_hosts_cannot_all_see(private):
    state = Path(private) / f"bhpc-test-{uuid.uuid4().hex[:8]}" / "dc"
    other = DevCluster(state_dir=state, slurmctld_port=16837, slurmd_port=16838, nodes=4)
    with pytest.raises(DevClusterError, match="private copy"):
        other.up()
    assert not state.parent.exists()


def test_second_cluster_up_down_leaves_others_alone(cluster, tmp_path):
    """down() stops only what that DevCluster started (here: a second
    cluster of one node on other ports beside the session's; munged is
    shared)."""
    other = DevCluster(state_dir=tmp_path / "dc", slurmctld_port=16837, slurmd_port=16838, nodes=1)
    other.up()
    try:
        st = other.status()["daemons"]
        assert st["slurmctld"]["started_by_devcluster"] and st["slurmd"]["started_by_devcluster"]
        assert not st["munged"]["started_by_devcluster"]
    finally:
        assert sorted(other.down()) == ["slurmctld", "slurmd"]
    st = other.status()["daemons"]
    assert st["slurmctld"]["pid"] is None and st["slurmd"]["pid"] is None
    assert all(d["pid"] for d in cluster.status()["daemons"].values())
    assert other.down() == []
