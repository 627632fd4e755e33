"""The tests' JupyterHub: :class:`binderhub_hpc_testing.hub.DevHub` plus waiting
helpers. Servers outlive a stopped hub, so a test can restart the hub under
running jobs. On a multi-node dev cluster the hub runs on its hub node."""

import re
import subprocess
import time

from binderhub_hpc_testing.hub import DevHub, free_port  # noqa: F401  (free_port: re-exported)

#: the dev cluster of this test session (set by conftest's `cluster` fixture)
CLUSTER = None


class Hub(DevHub):
    """`here`: on this machine even on the multi-node cluster (the PBS dev
    cluster's server and node are this machine, outside the hub node's
    network)."""

    def __init__(self, workdir, extra_config="", env=None, here=False):
        host = CLUSTER.hub_host if CLUSTER is not None and not here else None
        super().__init__(workdir, extra_config, env=env, cleanup_servers=False, host=host)
        self.workdir = str(workdir)

    def wait_for(self, predicate, timeout=120, interval=0.5, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}; hub log:\n{self.log_tail()}")

    def server_ready(self, name):
        s = self.user(name).get("servers", {}).get("")
        return s if s and s.get("ready") else None


def session_scratch(cluster, job_id):
    """(node, path on this machine) of a running session's scratch directory,
    from its job's log ('server port N on NODE, scratch PATH')."""
    log = (cluster.jobs_dir / f"{job_id}.log").read_text()
    m = re.search(r"server port \d+ on (\S+), scratch (\S+)", log)
    assert m, log
    node, path = m.groups()
    return node, cluster.host_path(node, path)


def fill_batch_partition(cluster):
    """One whole-node job per compute node in the non-oversubscribed
    partition (every core, whatever other tests hold); their ids, running."""
    ids = []
    for node in cluster.compute_nodes:
        ids.append(
            cluster.as_service_user(
                [
                    "sbatch",
                    "--parsable",
                    "--partition=batch",
                    f"--nodelist={node}",
                    "--exclusive",
                    "--job-name=blocker",
                    "--output=/dev/null",
                    "--wrap=sleep 600",
                ],
            ).stdout.strip()
        )
    for job_id in ids:
        cluster_wait_running(cluster, job_id)
    return ids


def cluster_wait_running(cluster, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = subprocess.run(
            ["squeue", "--noheader", "-j", job_id, "--format=%T"],
            env=cluster.full_env(),
            capture_output=True,
            text=True,
        ).stdout.strip()
        if st == "RUNNING":
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not start")
