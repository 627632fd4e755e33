"""BinderHub's launch quotas counted in the batch queue: quota tags only
the service can make (keyed, bound to the job's account), the count over a
queue snapshot, real jobs on the dev cluster tagged as our spawner tags
them, and BinderHub's own rules and messages (total_quota, per_repo_quota)."""

import asyncio
import subprocess
import time
import uuid

import pytest

from binderhub_hpc.config import ConfigError, check_config
from binderhub_hpc.scheduler.jobs import GONE, PENDING, RUNNING, UNKNOWN, JobInfo
from binderhub_hpc.scheduler.slurm import SlurmQueue
from binderhub_hpc.scheduler.tags import JobTags, MissingTagKey, count_sessions, repository_of
from binderhub_hpc_testing.hostile import public_tag

IMAGE = "binderhub-hpc/binder-example-2dquota-abc123:" + "a" * 40
OTHER = "binderhub-hpc/binder-other-def456:" + "a" * 40
KEY_ENV = "BINDERHUB_HPC_JOB_TAG_KEY"


@pytest.fixture
def tags():
    return JobTags()


# ----------------------------------------------------------------- the tags
def test_a_tag_names_the_repository_not_the_ref(tags):
    assert tags.repository_id(IMAGE) == tags.repository_id(IMAGE.rsplit(":", 1)[0] + ":" + "b" * 40)
    assert tags.repository_id(IMAGE) != tags.repository_id(OTHER)
    assert tags.verify(tags.new_tag(IMAGE, "binder"), "binder") == tags.repository_id(IMAGE)
    assert repository_of("registry.example:5000/binder-x") == "registry.example:5000/binder-x"
    assert repository_of("registry.example:5000/binder-x:abc") == "registry.example:5000/binder-x"


def test_a_tag_verifies_only_for_the_account_it_was_made_for(tags):
    tag = tags.new_tag(IMAGE, "binder")
    assert tags.verify(tag, "binder") is not None
    assert tags.verify(tag, "mallory") is None
    assert tags.verify(tag, "") is None


def test_no_tag_made_without_the_key_verifies(tags, monkeypatch):
    tag = tags.new_tag(IMAGE, "binder")
    repo, nonce, mac = tag[len("binder-image:") :].split(".")
    forged = [
        public_tag(IMAGE),  # the old, public hash
        tag[:-1] + ("0" if tag[-1] != "0" else "1"),  # one digit changed
        f"binder-image:{tags.repository_id(OTHER)}.{nonce}.{mac}",  # another repository's id
        f"binder-image:{repo}.{'0' * 12}.{mac}",
        tag + "0",
        tag.upper(),
        " " + tag,
        "",
    ]
    assert [tags.verify(t, "binder") for t in forged] == [None] * len(forged)
    # made with another key: nothing
    monkeypatch.setenv(KEY_ENV, "b" * 64)
    assert tags.verify(tag, "binder") is None


@pytest.mark.parametrize("value", [None, "", "short-key"])
def test_without_a_key_no_tag_is_made_or_checked(tags, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(KEY_ENV)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    for call in (lambda: tags.new_tag(IMAGE, "binder"), lambda: tags.verify("binder-image:x", "binder")):
        with pytest.raises(MissingTagKey, match=f"{KEY_ENV} (is not set|holds only 9 characters)"):
            call()


def test_the_key_is_named_not_configured(monkeypatch):
    monkeypatch.setenv("SITE_TAG_KEY", "s" * 40)
    assert JobTags(key_env="SITE_TAG_KEY").key() == b"s" * 40
    with pytest.raises(Exception, match="not an environment variable name"):
        JobTags(key_env="$(id)")


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("JupyterHub", "spawner_class", "binderhub_hpc.spawner.SlurmBinderSpawner"),
        ("JupyterHub", "spawner_class", "binderhub_hpc.spawner.PBSBinderSpawner"),
        ("BinderHub", "launch_quota_class", "binderhub_hpc.binderhub.SchedulerLaunchQuota"),
    ],
)
def test_a_configuration_that_tags_or_counts_jobs_is_refused_without_the_key(monkeypatch, section, key, value):
    from traitlets.config import Config

    c = Config()
    c[section][key] = value
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"needs the quota tags' key: \\${KEY_ENV} is not set"):
        check_config(c)
    monkeypatch.setenv(KEY_ENV, "k" * 32)
    assert check_config(c) is c
    # a process that neither tags nor counts (a build node's CLI) needs none
    monkeypatch.delenv(KEY_ENV)
    assert check_config(Config({"SIFRegistry": {"root": "/shared/registry"}}))


# ----------------------------------------------------------------- the count
def job(job_id, tags, user="binder", state=RUNNING, image=IMAGE, tag=None):
    return JobInfo(str(job_id), state, user=user, tag=tags.new_tag(image, user) if tag is None else tag)


def test_only_pending_or_running_jobs_with_tags_that_verify_count(tags):
    jobs = [
        job(1, tags),
        job(2, tags, state=PENDING),
        job(3, tags, image=OTHER),
        job(4, tags, state=GONE),
        job(5, tags, state=UNKNOWN),
        job(6, tags, tag=public_tag(IMAGE)),
        job(7, tags, tag=""),
        job(8, tags, user="alice"),  # authenticated: a user's own session
    ]
    assert count_sessions(jobs, tags, IMAGE) == (4, 3)
    assert count_sessions(jobs, tags, OTHER) == (4, 1)
    assert count_sessions(jobs, tags, IMAGE, job_user="binder") == (3, 2)


def test_copied_tags_count_for_nothing_or_once(tags):
    """Another account copying a session's tag gains nothing; the job
    account submitting copies of its own counts once per tag."""
    real = job(1, tags)
    copies = [JobInfo(str(10 + i), PENDING, user="mallory", tag=real.tag) for i in range(5)]
    own_copies = [JobInfo(str(20 + i), PENDING, user="binder", tag=real.tag) for i in range(5)]
    assert count_sessions([real, *copies], tags, IMAGE) == (1, 1)
    assert count_sessions([real, *own_copies], tags, IMAGE) == (1, 1)


# ------------------------------------------------------------------ real jobs
@pytest.fixture
def jobs(cluster):
    ids = []

    def submit(name, tag=None, user=None, partition="bench"):
        args = [
            "sbatch",
            "--parsable",
            "--hold",
            f"--partition={partition}",
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


def snapshot(cluster):
    out = subprocess.run(["squeue", "--json"], env=cluster.full_env(), capture_output=True, check=True).stdout
    return SlurmQueue().parse(out.decode(errors="replace"))


def test_sessions_are_counted_in_a_real_queue(cluster, jobs, tags):
    """Held jobs of the service account, tagged as the spawner tags them,
    counted in what squeue --json says: by repository, and nothing the
    stranger submits, however named and tagged."""
    user = cluster.service_user
    stranger = cluster.ensure_stranger()
    mine = tags.new_tag(IMAGE, user)
    before = count_sessions(snapshot(cluster).values(), tags, IMAGE, user)
    mark = uuid.uuid4().hex[:6]
    jobs(f"binder-q1-{mark}", mine)
    jobs(f"binder-q2-{mark}", tags.new_tag(IMAGE, user))
    jobs(f"binder-q3-{mark}", tags.new_tag(OTHER, user))
    jobs(f"binder-untagged-{mark}")
    jobs(f"binder-public-{mark}", public_tag(IMAGE))
    for name, tag in [("binder-copy", mine), ("binder-public", public_tag(IMAGE)), ("binder-own", None)]:
        jobs(f"{name}-{mark}", tag or tags.new_tag(IMAGE, user), user=stranger)
    jobs_now = snapshot(cluster)
    for job_user in (user, ""):
        total, matching = count_sessions(jobs_now.values(), tags, IMAGE, job_user)
        assert (total - before[0], matching - before[1]) == (3, 2), job_user


# ------------------------------------------------------- BinderHub's adapter
@pytest.fixture
def quota(cluster):
    pytest.importorskip("binderhub")
    from binderhub_hpc.binderhub import SchedulerLaunchQuota

    return SchedulerLaunchQuota(job_user=cluster.service_user, interval=0.1)


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

    tags, user = quota.tags, cluster.service_user
    base_total, base_matching = asyncio.run(quota.count(IMAGE))
    mark = uuid.uuid4().hex[:6]
    jobs(f"binder-q1-{mark}", tags.new_tag(IMAGE, user))
    jobs(f"binder-q2-{mark}", tags.new_tag(IMAGE, user))
    jobs(f"binder-q3-{mark}", tags.new_tag(OTHER, user))
    jobs(f"binder-untagged-{mark}")  # submitted by hand: no tag
    jobs(f"binder-public-{mark}", public_tag(IMAGE))  # the old, public tag
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


def test_without_the_key_a_quota_check_fails_closed(cluster, quota, monkeypatch):
    quota.total_quota = 10**6
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MissingTagKey):
        asyncio.run(quota.check_repo_quota(IMAGE, {}, "r"))


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
