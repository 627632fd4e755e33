"""The Slurm queue as data: SlurmQueue.parse on what `squeue --json` printed.

tests/data/slurm-22.05/ is recorded on the dev cluster's Slurm 22.05
(``python3 -m binderhub_hpc_testing.slurmrecord``): a running, a pending
and a held job of the service account, and the stranger's held jobs whose
names and comments carry forged records of them (every Unicode line break,
'|', 10 KB, squeue's own JSON, bytes that are not UTF-8).
tests/data/slurm-24.11/ is derived from Slurm 24.11's documented schema
(data_parser v0.0.42) until a 24.11 site records one: its meta.json says so.
"""

import json
from pathlib import Path

import pytest

from binderhub_hpc.scheduler.jobs import PENDING, RUNNING
from binderhub_hpc.scheduler.slurm import SlurmQueue
from binderhub_hpc_testing.hostile import FORGED_REASON, LINE_BREAKS, hostile_jobs

DATA = Path(__file__).parent / "data"
VERSIONS = sorted(p.name[len("slurm-") :] for p in DATA.glob("slurm-*") if (p / "meta.json").is_file())


class Recorded:
    def __init__(self, version):
        self.dir = DATA / f"slurm-{version}"
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.derived = self.meta.get("recorded_with") is None

    def raw(self, name="queue"):
        return (self.dir / f"{name}.json").read_bytes()

    def jobs(self, name="queue", **config):
        # as SlurmQueue.snapshot reads squeue's output (proc.run)
        return SlurmQueue(**config).parse(self.raw(name).decode(errors="replace"))

    def role(self, name):
        return self.jobs()[self.meta["jobs"][name]]


@pytest.fixture(params=VERSIONS)
def rec(request):
    return Recorded(request.param)


def test_both_shapes_are_pinned():
    assert {"22.05", "24.11"} <= set(VERSIONS)
    assert Recorded("22.05").meta["slurm_version"].startswith("slurm-wlm 22.05")
    assert not Recorded("22.05").derived
    # until a real 24.11 recording replaces it, the sample says what it is
    sample = Recorded("24.11")
    assert sample.derived and "derived" in sample.meta["status"]
    assert "NOT RECORDED" in json.loads(sample.raw())["_note"]


def test_the_service_accounts_jobs(rec):
    run, pending = rec.role("running"), rec.role("pending")
    user, tag = rec.meta["service_user"], rec.meta["tag"]
    assert (run.state, run.raw_state, run.user, run.tag, run.reason) == (RUNNING, "RUNNING", user, tag, "")
    assert run.node in ("c1", "c2") and run.partition == "interactive" and run.start_time
    assert (pending.state, pending.user, pending.tag, pending.reason) == (PENDING, user, tag, "BeginTime")
    assert pending.start_time > pending.submit_time + 3000  # --begin=now+1hour
    if "held" in rec.meta["jobs"]:
        held = rec.role("held")
        assert (held.state, held.reason, held.priority) == (PENDING, "JobHeldUser", 0)


def test_the_strangers_jobs_are_one_record_each_and_their_own(rec):
    jobs = rec.jobs()
    theirs = rec.meta["stranger_jobs"]
    assert theirs, "the recording has the stranger's jobs"
    for label, job_id in theirs.items():
        j = jobs[job_id]
        assert (j.user, j.state, j.reason) == (rec.meta["stranger"], PENDING, "JobHeldUser"), label
    # nothing they wrote became a job, a state or a reason
    ours = set(rec.meta["jobs"].values())
    assert {j.job_id for j in jobs.values() if j.user == rec.meta["service_user"]} >= ours
    assert not [j for j in jobs.values() if int(j.job_id) >= 9000000]
    assert not [j for j in jobs.values() if FORGED_REASON in j.reason]
    assert rec.role("running").state == RUNNING and rec.role("pending").state == PENDING


def test_names_and_comments_arrive_whole(rec):
    """What the stranger wrote is theirs, byte for byte where it was text:
    every line break kept inside the name or the comment."""
    meta = rec.meta
    jobs = rec.jobs()
    if rec.derived:
        comment = jobs[meta["stranger_jobs"]["comment-LS"]].tag
        assert "\u2028" in comment and f"{meta['jobs']['running']}|CANCELLED|" in comment
        assert "\n" in jobs[meta["stranger_jobs"]["name-LF"]].name
        return
    hostile = {
        label: (name, comment)
        for label, name, comment in hostile_jobs(
            meta["jobs"]["running"], meta["jobs"]["pending"], meta["tag"], meta["image"], meta["service_user"]
        )
    }
    for label, job_id in meta["stranger_jobs"].items():
        name, comment = hostile[label]
        j = jobs[job_id]
        if isinstance(comment, str):
            assert j.tag == comment, label
        if isinstance(name, str):
            assert j.name == name, label
    for label in LINE_BREAKS:
        # the forged records are there, for a parser that would read lines
        comment = jobs[meta["stranger_jobs"][f"comment-{label}"]].tag
        assert any(line.startswith(f"{meta['jobs']['running']}|CANCELLED|") for line in comment.splitlines())


def test_22_05_ignores_squeues_filters_so_the_parser_applies_them():
    rec = Recorded("22.05")
    everything = rec.jobs("partition-filter")
    assert {j.partition for j in everything.values()} > {"interactive"}, "22.05 printed every partition"
    only = rec.jobs("partition-filter", partitions=["interactive"])
    assert only and {j.partition for j in only.values()} == {"interactive"}
    assert rec.meta["jobs"]["running"] in only and rec.meta["jobs"]["pending"] not in only


def test_24_11_state_lists_and_number_objects():
    rec = Recorded("24.11")
    jobs = rec.jobs()
    ids = rec.meta["jobs"]
    assert (jobs[ids["requeued"]].state, jobs[ids["requeued"]].raw_state) == (PENDING, "REQUEUED")
    assert (jobs[ids["completing"]].state, jobs[ids["completing"]].raw_state) == (RUNNING, "COMPLETING")
    assert jobs[ids["two_nodes"]].node == "c1"
    assert jobs[ids["infinite_priority"]].priority == 0
    assert jobs[ids["pending"]].priority == 4294901700
    # pending jobs in batch, by priority then submission
    pending = sorted((j for j in jobs.values() if j.state == PENDING), key=lambda j: j.position)
    assert pending[0].job_id == ids["pending"] and pending[0].pending_in_partition == len(pending)
