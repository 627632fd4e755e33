import os

import pytest

# the build tests' fixtures, for every test module
from build_fixtures import build_base, fixture_repo, registry_root  # noqa: F401

#: fixtures that need the dev cluster: a test using one is marked `cluster`
#: whether or not its module says so, so `-m "not cluster"` runs offline
CLUSTER_FIXTURES = {"cluster", "base_image", "build_base", "fixture_repo", "pbs_cluster", "pbs_base_image"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


# ------------------------------------------------------------ dev cluster
# The same code as `binderhub-hpc devcluster up`: the tests run against a
# real single-node Slurm cluster and podman on this machine.
@pytest.fixture(scope="session")
def cluster():
    from binderhub_hpc.dev.cluster import DevCluster

    if os.geteuid() != 0:
        pytest.skip("the dev cluster needs root")
    c = DevCluster().up()
    os.environ.update(c.env)
    yield c


@pytest.fixture(scope="session")
def base_image(cluster):
    """Name of the local base image (python3, /opt/venv with jupyterhub, jovyan)."""
    yield cluster.ensure_base_image()


# ------------------------------------------------------------ PBS dev cluster
# An OpenPBS installed on this machine ($PBS_EXEC, qsub on PATH, or the
# newest of /opt/pbs, /opt/pbs-*) as the dev cluster's scheduler. Where none
# is installed (CI), every test that needs it is skipped, saying so.
@pytest.fixture(scope="session")
def pbs_cluster():
    from binderhub_hpc.dev.cluster import DevClusterError
    from binderhub_hpc.dev.pbs import PBSDevCluster, find_prefix

    if os.geteuid() != 0:
        pytest.skip("the PBS dev cluster needs root")
    try:
        prefix = find_prefix()
    except DevClusterError as e:
        pytest.skip(f"OpenPBS: {e}")
    if prefix is None:
        pytest.skip("OpenPBS is not installed (no $PBS_EXEC, no qsub on PATH, no /opt/pbs or /opt/pbs-*): "
                    "the tests against a real PBS server are skipped")
    c = PBSDevCluster(prefix=prefix)
    was_up = c.is_up()
    c.up()
    yield c
    if not was_up:
        c.down()


@pytest.fixture(scope="session")
def pbs_base_image(pbs_cluster):
    yield pbs_cluster.site.ensure_base_image()
