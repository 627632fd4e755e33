"""BinderHub's launch quotas counted in the batch queue: real jobs on the dev
cluster, tagged as our spawner tags them, and BinderHub's own rules and
messages (total_quota, per_repo_quota)."""

import asyncio
import subprocess
import time
import uuid

import pytest

from binderhub_hpc.scheduler.jobs import job_tag

IMAGE = "binderhub-hpc/binder-example-2dquota-abc123:" + "a" * 40


def test_the_job_tag_names_the_repository_not_the_ref():
    assert job_tag(IMAGE) == job_tag(IMAGE.rsplit(":", 1)[0] + ":" + "b" * 40)
    assert job_tag(IMAGE) != job_tag("binderhub-hpc/binder-other-def456:" + "a" * 40)
    assert job_tag(IMAGE).startswith("binder-image:") and job_tag(IMAGE)[13:].isalnum()


@pytest.fixture
def quota(cluster):
    pytest.importorskip("binderhub")
    from binderhub_hpc.binderhub import SchedulerLaunchQuota

    return SchedulerLaunchQuota(job_user=cluster.service_user, interval=0.1)


@pytest.fixture
def jobs(cluster):
    ids = []

    def submit(name, tag=None, user=None):
        args = [
            "sbatch",
            "--parsable",
            "-p",
            "bench",
            f"--job-name={name}",
            "--output=/dev/null",
            "--chdir=/tmp",
            "--wrap=sleep 300",
        ]
        if tag:
            args.insert(2, f"--comment={tag}")
        if user:
            out = subprocess.run(
                ["runuser", "-u", user, "--", "env", f"SLURM_CONF={cluster.slurm_conf}", *args],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        else:
            out = cluster.as_service_user(args).stdout
        ids.append(out.strip().split(";")[0])
        return ids[-1]

    yield submit
    subprocess.run(["scancel", *ids], env=cluster.full_env(), check=False)


def check(quota, total=None, repo=None, image=IMAGE):
    from binderhub.quota import LaunchQuotaExceeded

    quota.total_quota = total
    quota._admitted = []  # each check on its own: what the queue shows (see the burst test)
    try:
        return asyncio.run(quota.check_repo_quota(image, {"quota": repo} if repo else {}, "https://example.org/r.git"))
    except LaunchQuotaExceeded as e:
        return e


def test_quotas_count_binder_jobs_of_the_service_account_by_repository(cluster, quota, jobs):
    from binderhub.quota import LaunchQuotaExceeded, ServerQuotaCheck

    tag, other = job_tag(IMAGE), job_tag("binderhub-hpc/binder-other-def456:x")
    base_total, base_matching = asyncio.run(quota.count(IMAGE))
    mark = uuid.uuid4().hex[:6]
    jobs(f"binder-q1-{mark}", tag)
    jobs(f"binder-q2-{mark}", tag)
    jobs(f"binder-q3-{mark}", other)
    jobs(f"not-binder-{mark}", tag)  # not a session job: no binder- name
    jobs(f"binder-untagged-{mark}")  # submitted by hand: no tag
    time.sleep(2 * quota.interval)  # a snapshot is reused for `interval`
    assert asyncio.run(quota.count(IMAGE)) == (base_total + 3, base_matching + 2)

    # no quota configured: no check at all (and no query)
    assert check(quota) is None
    # under both quotas: BinderHub's ServerQuotaCheck
    ok = check(quota, total=base_total + 10, repo=base_matching + 3)
    assert isinstance(ok, ServerQuotaCheck) and (ok.total, ok.matching) == (base_total + 3, base_matching + 2)
    # the repository's quota reached: BinderHub's own message for it
    e = check(quota, total=base_total + 10, repo=base_matching + 2)
    assert isinstance(e, LaunchQuotaExceeded) and e.status == "repo_quota"
    assert e.message == "Too many users running https://example.org/r.git! Try again soon."
    # another repository is not held back by this one's sessions
    assert not isinstance(
        check(quota, total=base_total + 10, repo=1, image="binderhub-hpc/binder-new-0000:a"), LaunchQuotaExceeded
    )
    # the whole BinderHub full
    e = check(quota, total=base_total + 3)
    assert isinstance(e, LaunchQuotaExceeded) and e.status == "pod_quota"
    assert e.message == "Too many users on this BinderHub! Try again soon." and e.used == base_total + 3


def test_a_burst_of_checks_shares_one_scheduler_query(cluster, quota):
    quota.total_quota = 10**6
    queries = quota.reflector.queries

    async def burst():
        await asyncio.gather(*(quota.check_repo_quota(IMAGE, {}, "r") for _ in range(50)))

    asyncio.run(burst())
    assert quota.reflector.queries - queries <= 2


def test_a_burst_within_one_snapshot_is_held_to_the_quota(cluster, quota):
    """Checks faster than the queue can show the jobs they admit: the
    launches this BinderHub admitted since the snapshot count too."""
    from binderhub.quota import LaunchQuotaExceeded

    quota.interval = quota.reflector.interval = 60  # one snapshot for the whole burst
    base, _ = asyncio.run(quota.count(IMAGE))
    quota.total_quota = base + 5

    async def burst():
        out = []
        for _ in range(12):
            try:
                await quota.check_repo_quota(IMAGE, {}, "r")
                out.append("admitted")
            except LaunchQuotaExceeded as e:
                out.append(e.status)
        return out

    outcomes = asyncio.run(burst())
    assert outcomes == ["admitted"] * 5 + ["pod_quota"] * 7
