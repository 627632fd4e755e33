"""The launch side without a hub: Slurm queue parsing on real squeue output,
reasons and descriptions, the shared queue reflector against the dev
cluster's squeue, and the job script the Slurm spawner renders."""

import asyncio
import http.server
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid

import pytest
from jupyterhub.objects import Hub, Server
from tornado import web

from binderhub_hpc.scheduler.jobs import GONE, MAX_SHOWN_WAIT, PENDING, RUNNING, UNKNOWN, JobInfo, plain_reason
from binderhub_hpc.scheduler.reflector import QueueReflector
from binderhub_hpc.scheduler.slurm import SlurmQueue
from binderhub_hpc.spawner.runtime import SessionImage
from binderhub_hpc.spawner.spawner import SlurmBinderSpawner

from spawnerutil import StubUser

#: the job account in rendering tests: this process's own (it must exist)
ME = pwd.getpwuid(os.getuid()).pw_name
API_TOKEN = "apitoken-" + uuid.uuid4().hex
BINDER_TOKEN = "bindertoken-" + uuid.uuid4().hex


# ================================================================= Slurm queue
class Jobs:
    """Jobs this module submits as the service account; only these are cancelled."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.ids = []
        self.tag = uuid.uuid4().hex[:6]

    def submit(self, name, *args, command="sleep 300"):
        out = subprocess.run(
            [
                "runuser",
                "-u",
                self.cluster.service_user,
                "--",
                "env",
                f"SLURM_CONF={self.cluster.slurm_conf}",
                "sbatch",
                "--parsable",
                f"--job-name=units-{name}-{self.tag}",
                "--output=/dev/null",
                "--chdir=/tmp",
                *args,
                f"--wrap={command}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        job_id = out.split(";")[0]
        self.ids.append(job_id)
        return job_id

    def state(self, job_id):
        return subprocess.run(
            ["squeue", "--noheader", "-j", job_id, "--format=%T"],
            env=self.cluster.full_env(),
            capture_output=True,
            text=True,
        ).stdout.strip()

    def wait_running(self, job_id, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(job_id) == "RUNNING":
                return
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not start")

    def cancel_all(self):
        if self.ids:
            subprocess.run(["scancel", *self.ids], env=self.cluster.full_env(), check=False)


@pytest.fixture(scope="module")
def jobs(cluster):
    j = Jobs(cluster)
    yield j
    j.cancel_all()


@pytest.fixture(scope="module")
def queue_jobs(jobs):
    """One running job and two pending ones in `interactive`: `low` submitted
    first with --nice=100, `high` after it. Both pending on a start time an
    hour out, so that other people's jobs cannot start them."""
    running = jobs.submit("run", "--partition=interactive")
    low = jobs.submit("low", "--partition=interactive", "--begin=now+1hour", "--nice=100")
    high = jobs.submit("high", "--partition=interactive", "--begin=now+1hour")
    jobs.wait_running(running)
    return running, low, high


def real_squeue(cluster):
    """What SlurmQueue.snapshot runs, run here and kept as text as it
    keeps it (a job comment need not be UTF-8)."""
    out = subprocess.run(SlurmQueue().argv(), env=cluster.full_env(), capture_output=True, check=True).stdout
    return out.decode(errors="replace")


def test_parse_real_squeue(cluster, queue_jobs):
    running, low, high = queue_jobs
    out = real_squeue(cluster)
    jobs = SlurmQueue().parse(out)
    assert {running, low, high} <= set(jobs)

    r = jobs[running]
    assert (r.state, r.raw_state, r.partition, r.reason) == (RUNNING, "RUNNING", "interactive", "")
    assert r.node in cluster.compute_nodes
    assert r.start_time and abs(r.start_time - time.time()) < 600
    assert r.position is None

    lo, hi = jobs[low], jobs[high]
    for j in (lo, hi):
        assert (j.state, j.raw_state, j.partition, j.node, j.reason) == (
            PENDING,
            "PENDING",
            "interactive",
            "",
            "BeginTime",
        )
        assert 3000 < j.start_time - time.time() < 3700  # --begin=now+1hour
        assert abs(j.submit_time - time.time()) < 600
    # the nice job was submitted first but has the lower priority
    assert hi.priority > lo.priority
    assert hi.position < lo.position
    pending = [j for j in jobs.values() if j.state == PENDING and j.partition == "interactive"]
    assert sorted(j.position for j in pending) == list(range(1, len(pending) + 1))
    assert {j.pending_in_partition for j in pending} == {len(pending)}
    msg = hi.describe()
    assert f"Job {high} is waiting in the interactive queue (position {hi.position} of {len(pending)})" in msg
    assert "its start time has not come yet" in msg and "Expected start" in msg and "(in about 6" in msg


def test_parse_ties_broken_by_submit_time(cluster, queue_jobs):
    """Same priority: the earlier submission goes first (then the lower id)."""
    running, low, high = queue_jobs
    data = json.loads(real_squeue(cluster))
    ours = [j for j in data["jobs"] if str(j["job_id"]) in (low, high)]
    for j in ours:
        j["priority"] = 1000
    by_id = {str(j["job_id"]): j for j in ours}
    by_id[low]["submit_time"], by_id[high]["submit_time"] = 1893492000, 1893492005
    jobs = SlurmQueue().parse(json.dumps(dict(data, jobs=ours)))
    assert (jobs[low].position, jobs[high].position) == (1, 2)
    by_id[low]["submit_time"] = by_id[high]["submit_time"] = 1893492000
    jobs = SlurmQueue().parse(json.dumps(dict(data, jobs=ours)))
    assert (jobs[low].position, jobs[high].position) == ((1, 2) if int(low) < int(high) else (2, 1))


def squeue_json(*records):
    """squeue --json output holding `records` (each a job's fields)."""
    return json.dumps({"meta": {}, "errors": [], "jobs": list(records)})


def record(job_id=77, state="PENDING", **fields):
    return {"job_id": job_id, "job_state": state, "user_name": "binder", **fields}


@pytest.mark.parametrize(
    "raw, state",
    [
        ("PENDING", PENDING),
        ("CONFIGURING", PENDING),
        ("REQUEUED", PENDING),
        ("SUSPENDED", PENDING),
        ("RUNNING", RUNNING),
        ("COMPLETING", RUNNING),
        ("COMPLETED", GONE),
        ("CANCELLED", GONE),
        ("FAILED", GONE),
        ("TIMEOUT", GONE),
        ("OUT_OF_MEMORY", GONE),
        ("NODE_FAIL", GONE),
        ("PREEMPTED", GONE),
    ],
)
def test_parse_states(raw, state):
    """22.05 prints the state as one word; 23.02 onwards as a list of the
    base state and its flags, read as the word %T would print."""
    nodes = "n[1-2]" if state == RUNNING else ""
    as_list = {"CONFIGURING": ["PENDING", "CONFIGURING"], "REQUEUED": ["PENDING", "REQUEUED"]}.get(raw, [raw])
    if raw == "COMPLETING":
        as_list = ["COMPLETED", "COMPLETING"]
    for shape in (raw, as_list):
        job = SlurmQueue().parse(squeue_json(record(state=shape, nodes=nodes, state_reason="None")))["77"]
        assert (job.state, job.raw_state) == (state, raw)
        assert job.node == ("n1" if state == RUNNING else "")
        assert job.start_time is None


def test_parse_numbers_of_both_shapes():
    """Times and priorities: bare numbers (22.05, or a data parser's
    `+complex`), or {set, infinite, number} objects (23.02 onwards)."""
    for start, submit, prio in [
        (1893492000, 1893491000, 5),
        (
            {"set": True, "infinite": False, "number": 1893492000},
            {"set": True, "infinite": False, "number": 1893491000},
            {"set": True, "infinite": False, "number": 5},
        ),
    ]:
        job = SlurmQueue().parse(squeue_json(record(start_time=start, submit_time=submit, priority=prio)))["77"]
        assert (job.start_time, job.submit_time, job.priority) == (1893492000.0, 1893491000.0, 5)
    for unset in (0, None, "Infinity", {"set": False, "infinite": False, "number": 0}, {"set": True, "infinite": True}):
        job = SlurmQueue().parse(squeue_json(record(start_time=unset, priority=unset)))["77"]
        assert (job.start_time, job.priority) == (None, 0)


@pytest.mark.parametrize(
    "fields",
    [
        {"job_state": 3},
        {"job_state": []},
        {"job_state": ["RUNNING", 1]},
        {"user_name": ["binder"]},
        {"comment": {"a": 1}},
        {"priority": "high"},
        {"start_time": True},
        {"nodes": 7},
    ],
)
def test_a_record_of_the_wrong_shape_is_unknown(fields):
    job = SlurmQueue().parse(squeue_json(record(**fields)))["77"]
    assert job.state == UNKNOWN and "malformed" in job.reason


def test_a_job_id_listed_twice_is_unknown_never_gone_or_either_record():
    """squeue prints each job once: two records of one id cannot both be
    true, and which one is cannot be told."""
    out = squeue_json(
        record(77, "RUNNING", nodes="c1"),
        record(77, "CANCELLED"),
        record(78, "PENDING", state_reason="Priority"),
    )
    jobs = SlurmQueue().parse(out)
    assert jobs["77"].state == UNKNOWN and "2 records" in jobs["77"].reason
    assert jobs["78"].state == PENDING


def test_records_tied_to_no_job_are_ignored():
    out = squeue_json(record(job_id="77"), record(job_id=True), record(job_id=-1), "not a record", record(job_id=78))
    assert list(SlurmQueue().parse(out)) == ["78"]


@pytest.mark.parametrize(
    "out, message",
    [
        ("77|RUNNING|None|c1|N/A|batch|5|N/A", "no JSON"),
        ("", "no JSON"),
        ("[]", "no list of jobs"),
        ('{"jobs": {}}', "no list of jobs"),
        ('{"jobs": [], "errors": [{"error": "Unable to contact slurm controller"}]}', "Unable to contact"),
    ],
)
def test_output_that_is_not_squeues_json_is_a_failed_query(out, message):
    with pytest.raises(ValueError, match=message):
        SlurmQueue().parse(out)


def test_the_partition_filter_applies_to_what_squeue_prints():
    """22.05 ignores --partition with --json: the parser filters (a job
    submitted to several partitions is in each of them)."""
    out = squeue_json(record(1, partition="batch"), record(2, partition="gpu"), record(3, partition="gpu,batch"))
    assert sorted(SlurmQueue(partitions=["batch"]).parse(out)) == ["1", "3"]
    assert sorted(SlurmQueue().parse(out)) == ["1", "2", "3"]


def test_squeue_argv():
    assert SlurmQueue().argv() == ["squeue", "--json"]
    assert SlurmQueue(partitions=["a", "b"]).argv()[-1] == "--partition=a,b"


# ======================================================= reasons, descriptions
@pytest.mark.parametrize(
    "code, words",
    [
        ("", "waiting to be scheduled"),
        ("None", "waiting to be scheduled"),
        ("Resources", "waiting for free resources (the partition is full)"),
        ("Priority", "waiting behind jobs with higher priority"),
        ("Dependency", "waiting for another job to finish"),
        ("BeginTime", "its start time has not come yet"),
        ("JobHeldUser", "held by its owner"),
        ("JobHeldAdmin", "held by an administrator"),
        ("ReqNodeNotAvail", "the nodes it needs are unavailable (down, drained or reserved)"),
        ("PartitionDown", "the partition is down"),
        ("QOSMaxJobsPerUserLimit", "the service account has reached its limit of running jobs"),
        ("AssocGrpCpuLimit", "the account's CPU limit is reached"),
        ("launch failed requeued held", "its launch failed and it was held"),
        ("AssocGrpGRESMinutes", "assoc grp gresminutes"),  # unknown codes read as words
        ("QOSGrpNodeLimit", "qosgrp node limit"),
    ],
)
def test_plain_reason_slurm(code, words):
    assert plain_reason(code) == words


@pytest.mark.parametrize(
    "comment, words",
    [
        (
            "Not Running: Insufficient amount of resource: ncpus (R: 2 A: 0 T: 2)",
            "waiting for free resources (ncpus: it needs 2, 0 of 2 are free)",
        ),
        (
            "Not Running: Insufficient amount of queue resource: ncpus (R: 1 A: 0 T: 2)",
            "waiting for free resources (ncpus: it needs 1, 0 of 2 are free in its queue)",
        ),
        (
            "Not Running: Insufficient amount of server resource: mem (R: 4gb A: 1gb T: 8gb)",
            "waiting for free resources (mem: it needs 4gb, 1gb of 8gb are free on the server)",
        ),
        (
            "Not Running: Job would conflict with reservation or top job.",
            "Job would conflict with reservation or top job",
        ),
        (
            "Not Running: Queue workq per-user limit reached on resource ncpus",
            "Queue workq per-user limit reached on resource ncpus",
        ),
        (
            "Can Never Run: Insufficient amount of queue resource: ncpus (R: 64 A: 8 T: 8)",
            "it can never run as requested: ncpus: it needs 64, 8 of 8 are free in its queue",
        ),
        ("Job held by binder on Thu Apr 25 10:40:12 2024", "Job held by binder on Thu Apr 25 10:40:12 2024"),
    ],
)
def test_plain_reason_pbs(comment, words):
    assert plain_reason(comment) == words


def pending(**kw):
    kw.setdefault("reason", "Resources")
    kw.setdefault("partition", "batch")
    return JobInfo(job_id="42", state=PENDING, raw_state="PENDING", position=2, pending_in_partition=5, **kw)


def test_describe_pending_without_estimate():
    assert pending().describe() == (
        "Job 42 is waiting in the batch queue (position 2 of 5): waiting for free resources (the partition is full)."
    )


def test_describe_no_estimate_a_year_out():
    # Slurm puts jobs blocked by jobs without a time limit a year out
    msg = pending(start_time=time.time() + 365 * 24 * 3600).describe()
    assert "Expected start" not in msg
    assert "Expected start" not in pending(start_time=time.time() + MAX_SHOWN_WAIT + 60).describe()
    assert "Expected start" not in pending(start_time=time.time() - 60).describe()


def test_describe_estimate_within_a_week():
    start = time.time() + 3 * 24 * 3600
    msg = pending(start_time=start).describe()
    assert f"Expected start: {time.strftime('%a %d %b %H:%M', time.localtime(start))} (in about 72.0 h)." in msg
    soon = time.time() + 20 * 60
    msg = pending(start_time=soon).describe()
    fmt = "%H:%M" if time.localtime(soon)[:3] == time.localtime()[:3] else "%a %d %b %H:%M"
    assert f"Expected start: {time.strftime(fmt, time.localtime(soon))} (in about 20 min)." in msg


def test_describe_other_states():
    assert JobInfo("7", RUNNING, "RUNNING", node="n3").describe() == "Job 7 is running on n3; starting the server."
    assert JobInfo("7", GONE).describe() == "Job 7 is not in the queue."
    assert JobInfo("7", GONE, "CANCELLED").describe() == "Job 7 is cancelled."
    msg = JobInfo("7", UNKNOWN, reason="squeue exited 1: timeout").describe()
    assert "cannot be asked" in msg and "not in the queue" not in msg
    assert "default queue" in JobInfo("7", PENDING, "PENDING").describe()


# ============================================================ queue reflector
def reflector(cluster, **kw):
    return QueueReflector(SlurmQueue(), env=cluster.full_env(), **kw)


async def test_reflector_concurrent_askers_share_one_query(cluster, queue_jobs):
    running, low, high = queue_jobs
    r = reflector(cluster, interval=5)
    infos = await asyncio.gather(*(r.job(j) for j in [running, low, high] * 16 + ["999999999", running]))
    assert r.queries == 1
    assert [i.state for i in infos[:3]] == [RUNNING, PENDING, PENDING]
    assert infos[-2].state == GONE
    # within the interval: the snapshot serves again, no query
    for _ in range(20):
        assert (await r.job(low)).state == PENDING
    assert r.queries == 1


@pytest.mark.parametrize("pollers", [10, 25, 50])
async def test_reflector_load_stays_flat(cluster, queue_jobs, pollers):
    """N concurrent spawners polling as fast as they like: at most one
    squeue per interval, whatever N."""
    running, low, high = queue_jobs
    interval, duration = 0.5, 3.0
    r = reflector(cluster, interval=interval)
    seen = []

    async def poller(i):
        job_id = (running, low, high)[i % 3]
        end = time.monotonic() + duration
        while time.monotonic() < end:
            # half of them ask for a snapshot newer than "now", like a
            # spawner that has just submitted
            newer = time.monotonic() if i % 2 else None
            seen.append((await r.job(job_id, newer_than=newer)).state)
            await asyncio.sleep(0.01 * (i % 5))

    t0 = time.monotonic()
    await asyncio.gather(*(poller(i) for i in range(pollers)))
    elapsed = time.monotonic() - t0
    assert r.queries <= elapsed / interval + 1, (r.queries, elapsed)
    assert r.queries >= 2
    assert GONE not in seen and UNKNOWN not in seen


async def test_reflector_sees_a_job_submitted_after_its_snapshot(cluster, jobs, queue_jobs):
    r = reflector(cluster, interval=1.0)
    await r.job(queue_jobs[0])
    before = r.queries
    job_id = jobs.submit("late", "--partition=interactive", "--begin=now+1hour")
    submitted = time.monotonic()
    # the current snapshot predates the job: without newer_than it is "gone"
    assert (await r.job(job_id)).state == GONE
    info = await r.job(job_id, newer_than=submitted)
    assert info.state == PENDING and info.reason == "BeginTime"
    assert r.queries == before + 1


async def test_reflector_failing_scheduler_is_unknown_not_gone(cluster, queue_jobs):
    q = SlurmQueue(squeue="/bin/false")
    r = QueueReflector(q, env=cluster.full_env(), interval=0.05, failure_limit=3)
    info = await r.job(queue_jobs[0])
    assert info.state == UNKNOWN and "exited 1" in info.reason
    assert r.queries == 3  # retried until the failure limit, one attempt per interval
    # many askers right after: they share the last failed attempt
    infos = await asyncio.gather(*(r.job(queue_jobs[0]) for _ in range(50)))
    assert {i.state for i in infos} == {UNKNOWN}
    assert r.queries <= 4
    # the scheduler answers again: so does the reflector
    q.squeue = "squeue"
    await asyncio.sleep(0.06)
    assert (await r.job(queue_jobs[0])).state == RUNNING
    assert r.failures == 0


async def test_reflector_failures_do_not_multiply_queries(cluster):
    """50 askers against a scheduler that keeps failing: attempts stay one
    per interval, not one per asker."""
    r = QueueReflector(SlurmQueue(squeue="/bin/false"), env=cluster.full_env(), interval=0.2, failure_limit=2)
    t0 = time.monotonic()
    infos = await asyncio.gather(*(r.job("1") for _ in range(50)))
    elapsed = time.monotonic() - t0
    assert {i.state for i in infos} == {UNKNOWN}
    assert r.queries <= elapsed / 0.2 + 1, (r.queries, elapsed)


async def test_reflector_missing_executable_is_unknown():
    r = QueueReflector(SlurmQueue(squeue="/nonexistent/squeue"), interval=0.01, failure_limit=1)
    info = await r.job("5")
    assert info.state == UNKNOWN


# ============================================================ Slurm job script
def make_spawner(name="alice", base_url=None, hub_port=8081, **config):
    config.setdefault("job_user", ME)
    config.setdefault("container_runtime", "apptainer")
    sp = SlurmBinderSpawner(
        user=StubUser(name),
        hub=Hub(ip="127.0.0.1", port=hub_port, base_url="/hub/"),
        api_token=API_TOKEN,
        oauth_client_id=f"jupyterhub-user-{name}",
        **config,
    )
    sp.server = Server(base_url=base_url or f"/user/{name}/")
    sp.user_options = {"image": "binder/x:abc", "token": BINDER_TOKEN, "repo_url": "https://example.org/r.git"}
    sp._image_path = SessionImage("/shared/registry/binder/x/abc.sif", 36864)
    sp.image = "binder/x:abc"  # as start() sets it
    return sp


def render(sp):
    return asyncio.run(sp._get_batch_script(**sp.template_vars()))


def sbatch_lines(script):
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_script_holds_no_secret_and_exports_names_only():
    sp = make_spawner()
    script = render(sp)
    assert API_TOKEN not in script and BINDER_TOKEN not in script
    (export,) = [line for line in sbatch_lines(script) if line.startswith("#SBATCH --export=")]
    names = export.split("=", 1)[1].split(",")
    assert "JUPYTERHUB_API_TOKEN" in names and "JUPYTER_TOKEN" in names and "BINDER_REPO_URL" in names
    assert all(n.isidentifier() for n in names), names
    assert set(names) == set(sp.get_env())
    assert "#SBATCH --job-name=binder-alice" in script
    assert f"#SBATCH --chdir={sp.req_homedir}" in script
    # into the container by reference only
    assert 'export APPTAINERENV_JUPYTERHUB_API_TOKEN="${JUPYTERHUB_API_TOKEN:-}"' in script
    assert 'export APPTAINERENV_JUPYTER_TOKEN="${JUPYTER_TOKEN:-}"' in script
    assert "APPTAINERENV_JPY_API_TOKEN" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_defaults_request_nothing_extra():
    lines = sbatch_lines(render(make_spawner()))
    assert [line.split("=")[0] for line in lines] == [
        "#SBATCH --job-name",
        "#SBATCH --comment",
        "#SBATCH --output",
        "#SBATCH --chdir",
        "#SBATCH --export",
    ]


def test_the_job_carries_a_quota_tag_only_the_service_can_make():
    sp = make_spawner()
    (tag,) = [line.split("=", 1)[1] for line in sbatch_lines(render(sp)) if line.startswith("#SBATCH --comment=")]
    assert sp.job_tags.verify(tag, ME) == sp.job_tags.repository_id("binder/x:abc")
    # made for this job account: on another account's job it counts for nothing
    assert sp.job_tags.verify(tag, "mallory") is None
    # each submission its own
    assert tag != [x for x in sbatch_lines(render(sp)) if x.startswith("#SBATCH --comment=")][0].split("=", 1)[1]


def test_without_the_tag_key_no_job_is_submitted(monkeypatch):
    """Fail closed: an untagged job would never count toward the quotas."""
    sp = make_spawner()
    monkeypatch.delenv("BINDERHUB_HPC_JOB_TAG_KEY")
    with pytest.raises(web.HTTPError) as e:
        render(sp)
    assert e.value.status_code == 500 and "BINDERHUB_HPC_JOB_TAG_KEY is not set" in e.value.log_message


def test_admin_requests():
    sp = make_spawner(
        req_partition="gpu",
        req_account="proj42",
        req_qos="high",
        req_runtime="01:30:00",
        req_memory="4G",
        req_nprocs="2",
        req_ngpus="1",
        req_reservation="binder",
        req_options="--constraint=ib",
        req_prologue="module load cuda/12",
        req_epilogue="echo done-epilogue",
    )
    script = render(sp)
    lines = sbatch_lines(script)
    for expect in [
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --time=01:30:00",
        "#SBATCH --mem=4G",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --reservation=binder",
        "#SBATCH --constraint=ib",
    ]:
        assert expect in lines, (expect, lines)
    body = script.splitlines()
    cmd = [line for line in body if "exec --containall --cleanenv" in line][0]
    assert " --nv " in cmd
    # the limits the session sees: bytes, CPUs, the walltime in seconds
    for expect in ("export MEM_LIMIT=4294967296", "export CPU_LIMIT=2", "export BINDER_WALLTIME_SECONDS=5400"):
        assert expect in body, expect
    # the prologue runs before the session setup, the epilogue after the server
    assert body.index("module load cuda/12") < body.index("# --- binderhub-hpc session setup ---")
    assert body.index("echo done-epilogue") > body.index(cmd)


def test_gres_without_gpus_and_srun():
    sp = make_spawner(req_gres="license:matlab:1", req_srun="srun --cpu-bind=none")
    script = render(sp)
    assert "#SBATCH --gres=license:matlab:1" in sbatch_lines(script)
    assert " --nv " not in script
    assert any(re.match(r"srun --cpu-bind=none \S*apptainer exec ", line) for line in script.splitlines())


def test_user_overridden_batch_script():
    template = (
        "#!/bin/bash\n#SBATCH --partition={{partition}}\n#SBATCH --export={{keepvars}}\n"
        "#SBATCH --comment={{job_tag}}\n#SBATCH --wckey=site-{{username}}\n"
        "set -eu\n{{binder_setup}}\n{{cmd}} &\nbinder_wait $!\n"
    )
    sp = make_spawner(batch_script=template, req_partition="short")
    script = render(sp)
    assert script.startswith("#!/bin/bash\n#SBATCH --partition=short\n")
    assert f"#SBATCH --wckey=site-{ME}" in script
    (tag,) = [line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH --comment=")]
    assert sp.job_tags.verify(tag, ME) == sp.job_tags.repository_id("binder/x:abc")
    assert "# --- binderhub-hpc session setup ---" in script and "apptainer exec" in script
    assert API_TOKEN not in script and BINDER_TOKEN not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_server_argv_quoted_as_single_words():
    sp = make_spawner()
    script = render(sp)
    cmd = [line for line in script.splitlines() if "exec --containall --cleanenv" in line][0].rstrip(" &")
    words = shlex.split(cmd.replace('"$BINDER_SCRATCH"', "SCRATCH").replace('"$BINDER_HOME"', "HOME"))
    assert words[: words.index("/shared/registry/binder/x/abc.sif")] == [
        sp.runtime.executable,
        "exec",
        "--containall",
        "--cleanenv",
        "--no-eval",
        "--home",
        "HOME:/home/jovyan",
        "--pwd",
        "/home/jovyan",
        "--bind",
        "SCRATCH:/tmp",
    ]
    assert words[words.index("/shared/registry/binder/x/abc.sif") + 1 :] == sp.server_argv()


HOSTILE = "x$(touch {marker})`touch {marker}`'\";touch {marker};$BINDER_SCRATCH"


def test_hostile_names_stay_inert_in_the_script(tmp_path):
    marker = tmp_path / "pwned"
    name = HOSTILE.format(marker=marker)
    sp = make_spawner(name=name, base_url=f"/user/{name}/")
    script = render(sp)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # the job name is reduced to safe characters
    (jn,) = [line for line in sbatch_lines(script) if line.startswith("#SBATCH --job-name=")]
    assert set(jn.split("=", 1)[1]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    # the server argv round-trips through the shell's quoting unchanged
    cmd = sp.cmd_formatted_for_batch()
    tail = shlex.split(cmd)[-len(sp.server_argv()) :]
    assert tail == sp.server_argv()
    assert f"--NotebookApp.base_url=/user/{name}/" in tail
    assert not marker.exists()


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers batchspawner's port report like the hub's API would."""

    posts = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        FakeHub.posts.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    FakeHub.posts = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()


def test_rendered_script_runs_and_hostile_names_never_execute(tmp_path, fake_hub):
    """Run the whole rendered job script with a fake hub API and a fake
    apptainer that records what it was given: the port is reported with
    the token from the environment, the container gets the exact argv
    (hostile strings as literal words) and the variables by reference, no
    hostile string runs, the scratch is removed."""
    marker = tmp_path / "pwned"
    name = HOSTILE.format(marker=marker)
    record = tmp_path / "apptainer-call.json"
    fake = tmp_path / "apptainer"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    scratch_root = tmp_path / "scratch"
    scratch_root.mkdir()
    sp = make_spawner(
        name=name,
        base_url=f"/user/{name}/",
        hub_port=fake_hub,
        host_python=sys.executable,
        scratch_root=str(scratch_root),
    )
    sp.runtime.executable = str(fake)
    script = render(sp)
    env = sp.get_env()
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()

    ((path, auth, body),) = FakeHub.posts
    assert path == "/hub/api/batchspawner" and auth == f"token {API_TOKEN}"
    port = body["port"]
    call = json.loads(record.read_text())
    argv = call["argv"]
    image_at = argv.index("/shared/registry/binder/x/abc.sif")
    assert argv[image_at + 1 :] == sp.server_argv()
    scratch = argv[argv.index("--bind") + 1]
    assert scratch.endswith("/tmp:/tmp") and scratch.startswith(str(scratch_root) + "/binder-session.")
    cenv = call["env"]
    assert cenv["APPTAINERENV_JUPYTERHUB_API_TOKEN"] == API_TOKEN
    assert cenv["APPTAINERENV_JUPYTER_TOKEN"] == BINDER_TOKEN
    assert cenv["APPTAINERENV_JUPYTER_PORT"] == str(port)
    assert cenv["APPTAINERENV_JUPYTERHUB_SERVICE_URL"] == f"http://0.0.0.0:{port}/user/{name}/"
    assert cenv["APPTAINERENV_JUPYTER_PORT_RETRIES"] == "0"
    assert "session ended, scratch removed" in proc.stdout
    assert list(scratch_root.iterdir()) == []


# ============================================================ user options
@pytest.mark.parametrize(
    "opts, message",
    [
        ({"image": "a/b:c", "token": "t", "cmd": "rm -rf /"}, "Unknown launch options: 'cmd'"),
        ({"image": "a/b:c", "token": "t", "env": {}, "zz": 1}, "Unknown launch options: 'env', 'zz'"),
        ({"image": "a/b:c", "token": 5}, "must be a string"),
        ({"image": ["a/b:c"], "token": "t"}, "must be a string"),
        ({"image": "a/b:c"}, "needs a token"),
        ({"image": "a/b:c", "token": ""}, "needs a token"),
        ({"token": "t"}, "needs an image"),
    ],
)
def test_validate_user_options_refusals(opts, message):
    sp = make_spawner()
    sp.user_options = opts
    with pytest.raises(web.HTTPError) as e:
        sp.validate_user_options()
    assert e.value.status_code == 400 and message in e.value.log_message


def test_validate_user_options_accepts_binderhubs():
    sp = make_spawner()
    sp.user_options = {
        k: "v"
        for k in (
            "image",
            "token",
            "repo_url",
            "binder_ref_url",
            "binder_launch_host",
            "binder_request",
            "binder_persistent_request",
        )
    }
    assert sp.validate_user_options() == sp.user_options
    sp = make_spawner(auth_enabled=True)
    sp.user_options = {"image": "a/b:c"}
    assert sp.validate_user_options()  # authenticated Binder: no token


# ============================================================ job accounts
@pytest.mark.parametrize("account", ["root;rm -rf /", "../etc", "Binder", "a b", "-u", "", "x" * 40, "bob\n", "$(id)"])
def test_job_account_refuses_bad_names(account):
    sp = make_spawner(job_user=account) if account else make_spawner(jobs_as_hub_user=True, name="")
    if account:
        with pytest.raises(web.HTTPError) as e:
            sp._job_account()
        assert e.value.status_code == 400
    sp = make_spawner(jobs_as_hub_user=True, name=account)
    with pytest.raises(web.HTTPError):
        sp._job_account()


def test_job_account_choices():
    assert make_spawner(job_user="binder")._job_account() == "binder"
    assert make_spawner(jobs_as_hub_user=True, name="carol.smith")._job_account() == "carol.smith"
    assert make_spawner(job_user="")._job_account() == ME


def test_missing_job_account_is_a_clear_error():
    sp = make_spawner(job_user="no-such-account-xyz")
    with pytest.raises(web.HTTPError) as e:
        sp.get_env()
    assert e.value.status_code == 500 and "does not exist" in e.value.log_message


# ============================================================ scheduler commands
def test_cancel_gets_no_secret(monkeypatch):
    from binderhub_hpc.spawner import spawner as spawner_mod

    calls = []

    async def fake_run(argv, input=None, env=None, timeout=30, label=None):
        calls.append((argv, input, env))
        return "4242\n"

    monkeypatch.setattr(spawner_mod, "run", fake_run)
    monkeypatch.setenv("SLURM_CONF", "/etc/site/slurm.conf")
    sp = make_spawner(exec_prefix="runuser -u {username} --")
    assert asyncio.run(sp.submit_batch_script()) == "4242"
    argv, script, env = calls[0]
    assert argv == ["runuser", "-u", ME, "--", "sbatch", "--parsable"]
    assert env["JUPYTERHUB_API_TOKEN"] == API_TOKEN and API_TOKEN not in script
    asyncio.run(sp.cancel_batch_job())
    argv, _, env = calls[1]
    assert argv == ["runuser", "-u", ME, "--", "scancel", "4242"]
    assert API_TOKEN not in json.dumps(env) and BINDER_TOKEN not in json.dumps(env)
    assert env["SLURM_CONF"] == "/etc/site/slurm.conf" and env["USER"] == ME
