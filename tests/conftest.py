import os
import secrets

import pytest

# the build tests' fixtures, for every test module
from build_fixtures import build_base, fixture_repo, git_server, registry_root, served_repo  # noqa: F401

# The quota tags' key (c.JobTags.key_env), which a site's secrets.env gives
# the hub and BinderHub: the spawners and quotas tests build in this process
# tag and count with it (the hubs they start get their own, DevHub.tag_key).
os.environ.setdefault("BINDERHUB_HPC_JOB_TAG_KEY", secrets.token_hex(32))

#: fixtures that need the dev cluster: a test using one is marked `cluster`
#: whether or not its module says so, so `-m "not cluster"` runs offline
CLUSTER_FIXTURES = {
    "cluster",
    "base_image",
    "build_base",
    "fixture_repo",
    "git_server",
    "served_repo",
    "build_node",
    "pbs_cluster",
    "pbs_base_image",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


# ------------------------------------------------------------ dev cluster
# The same code as `binderhub-hpc devcluster up`: the tests run against the
# real Slurm cluster, podman and Apptainer on this machine, in the topology
# that runs (one node, or hub, build and compute nodes of their own).
@pytest.fixture(scope="session")
def cluster():
    from binderhub_hpc_testing.cluster import DevCluster

    import hubutil

    if os.geteuid() != 0:
        pytest.skip("the dev cluster needs root")
    c = DevCluster().up()
    os.environ.update(c.env)
    hubutil.CLUSTER = c
    yield c


@pytest.fixture
def site_registry(cluster):
    """A fresh registry inside the cluster's, readable by every job account,
    which compute nodes see at their own path (compute_root)."""
    import shutil
    import uuid

    from binderhub_hpc.registry import SIFRegistry

    roots = []

    def make(prefix="test"):
        root, compute_root = cluster.site_registry(f"{prefix}-{uuid.uuid4().hex[:8]}")
        roots.append(root)
        return SIFRegistry(root=str(root), compute_root=compute_root)

    yield make
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def base_image(cluster):
    """Name of the local base image (python3, /opt/venv with jupyterhub, jovyan)."""
    yield cluster.ensure_base_image()


@pytest.fixture(scope="session")
def build_node(cluster, base_image):
    """The multi-node cluster's build node, its build account holding the
    base image in its own rootless storage (skipped on a single node)."""
    if not cluster.multi:
        pytest.skip("needs the multi-node dev cluster (a build node of its own)")
    cluster.ensure_build_image(base_image)
    yield cluster


# ------------------------------------------------------------ PBS dev cluster
# An OpenPBS installed on this machine ($PBS_EXEC, qsub on PATH, or the
# newest of /opt/pbs, /opt/pbs-*) as the dev cluster's scheduler. Where none
# is installed (CI), every test that needs it is skipped, saying so.
@pytest.fixture(scope="session")
def pbs_cluster():
    from binderhub_hpc_testing.cluster import DevClusterError
    from binderhub_hpc_testing.pbs import PBSDevCluster, find_prefix

    if os.geteuid() != 0:
        pytest.skip("the PBS dev cluster needs root")
    try:
        prefix = find_prefix()
    except DevClusterError as e:
        pytest.skip(f"OpenPBS: {e}")
    if prefix is None:
        pytest.skip(
            "OpenPBS is not installed (no $PBS_EXEC, no qsub on PATH, no /opt/pbs or /opt/pbs-*): "
            "the tests against a real PBS server are skipped"
        )
    c = PBSDevCluster(prefix=prefix)
    was_up = c.is_up()
    c.up()
    yield c
    if not was_up:
        c.down()


@pytest.fixture(scope="session")
def pbs_base_image(pbs_cluster):
    yield pbs_cluster.site.ensure_base_image()


@pytest.fixture(params=["apptainer", "podman"])
def runtime(request):
    """Every end-to-end launch runs in both runtimes."""
    return request.param
