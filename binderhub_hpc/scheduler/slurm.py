"""Slurm: the queue as ``squeue --json`` prints it (every version's shape),
and the other questions the service asks Slurm (partitions, a build job's
end)."""

import json
import re

from traitlets import Unicode

from ..proc import run
from .jobs import GONE, PENDING, RUNNING, UNKNOWN, JobInfo, Scheduler, _positions, one_record_per_job

# -- the queue: `squeue --json` ------------------------------------------------------
#
# Any account can give its jobs a name and a comment of any text (newlines,
# every other Unicode line break, '|'), and squeue prints them beside ours:
# text split into lines or fields can be made to say anything about any
# job. squeue's JSON keeps every string inside its record, so the queue is
# read as data, and each record is checked: its fields of the right types,
# one record per job id.
#
# Two shapes are in use:
# - Slurm 22.05 (OpenAPI v0.0.38 writer): job_state a word ("RUNNING"),
#   times and priority bare integers (0: not set), and every job the
#   controller remembers, finished ones included: squeue ignores its
#   filters (--partition, --states, --user, --jobs) with --json, so the
#   partition filter is applied here.
# - Slurm 23.02 onwards (data_parser v0.0.39+; 24.11 prints v0.0.42):
#   job_state a list of a base state and flags (["PENDING", "REQUEUED"]),
#   times and priority {"set", "infinite", "number"} objects (bare numbers,
#   "Infinity" or null with the data parser's `+complex` flag); since 24.05
#   squeue applies its filters, and shows no finished jobs by default.

#: squeue's state words (22.05's job_state, %T): waiting to start ...
_PENDING_STATES = {
    "PENDING",
    "CONFIGURING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESV_DEL_HOLD",
    "SUSPENDED",
}
#: ... and holding a node
_RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
#: the flags of a state list in the order Slurm's job_state_string() (what
#: %T and 22.05's job_state print) lets them name the state; else the base state
_STATE_FLAGS = (
    "COMPLETING",
    "STAGE_OUT",
    "CONFIGURING",
    "RESIZING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
    "STOPPED",
    "REVOKED",
    "RESV_DEL_HOLD",
    "SIGNALING",
)


class _BadRecord(ValueError):
    """A job record whose fields are not of the types squeue prints."""


def _text(job, key):
    value = job.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRecord(f"{key} is not text")
    return value


def _number(job, key):
    """An integer field of either shape; None when unset or infinite."""
    value = job.get(key)
    if isinstance(value, dict):
        n = value.get("number")
        if value.get("infinite") is True or value.get("set") is not True:
            return None
        value = n
    if value is None or value == "Infinity":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadRecord(f"{key} is not a number")
    return value


def _time(job, key):
    value = _number(job, key)
    return float(value) if value else None


def state_word(value):
    """A job_state of either shape as the one word %T prints."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        for flag in _STATE_FLAGS:
            if flag in value:
                return flag
        return next((v for v in value if v not in _STATE_FLAGS), value[0])
    raise _BadRecord("job_state is neither a word nor a list of words")


_HOSTLIST_HEAD = re.compile(r"^([^,\[]*)(?:\[(\d+))?")


def first_node(nodes):
    """The first host of a Slurm hostlist ("c[1-2],d3" -> "c1")."""
    m = _HOSTLIST_HEAD.match(nodes or "")
    return (m.group(1) + (m.group(2) or "")) if m else ""


def _state(raw):
    if raw in _PENDING_STATES:
        return PENDING
    if raw in _RUNNING_STATES:
        return RUNNING
    return GONE


class SlurmQueue(Scheduler):
    name = "slurm"

    squeue = Unicode("squeue", help="The squeue executable.").tag(config=True)

    def argv(self):
        argv = [self.squeue, "--json"]
        if self.partitions:
            # honoured by squeue since 24.05; parse() filters for older ones
            argv.append("--partition=" + ",".join(self.partitions))
        return argv

    async def snapshot(self, env=None):
        out = await run(self.argv(), env=env, timeout=self.command_timeout, label="squeue")
        return self.parse(out)

    def parse(self, out):
        """{job_id: JobInfo} of `squeue --json` output. Raises ValueError
        when the output is not squeue's JSON or reports an error."""
        try:
            data = json.loads(out)
        except ValueError as e:
            raise ValueError(f"squeue printed no JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
            raise ValueError("squeue printed no list of jobs")
        errors = data.get("errors") or []
        if errors:
            first = errors[0] if isinstance(errors[0], dict) else {"error": errors[0]}
            what = first.get("description") or first.get("error") or first
            raise ValueError(f"squeue reported an error: {str(what)[:200]!r}")
        records = []
        for job in data["jobs"]:
            if not isinstance(job, dict):
                continue
            job_id = job.get("job_id")
            if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id <= 0:
                continue  # tied to no job: nothing it says can concern one
            job_id = str(job_id)
            try:
                info = self._record(job_id, job)
            except _BadRecord as e:
                info = JobInfo(job_id, UNKNOWN, reason=f"its queue record is malformed: {e}")
            records.append((job_id, info))
        jobs = one_record_per_job(records)
        if self.partitions:
            wanted = set(self.partitions)
            jobs = {i: j for i, j in jobs.items() if j.state == UNKNOWN or wanted & set(j.partition.split(","))}
        _positions(jobs)
        return jobs

    @staticmethod
    def _record(job_id, job):
        raw = state_word(job.get("job_state"))
        state = _state(raw)
        # what %r prints: the details when Slurm gives them
        # ("ReqNodeNotAvail, UnavailableNodes:c1"), else the reason's code
        reason = _text(job, "state_description") or _text(job, "state_reason")
        nodes = _text(job, "nodes")
        return JobInfo(
            job_id=job_id,
            state=state,
            raw_state=raw,
            reason=reason if state == PENDING else "",
            node=first_node(nodes) if state == RUNNING else "",
            partition=_text(job, "partition"),
            start_time=_time(job, "start_time"),
            submit_time=_time(job, "submit_time"),
            priority=int(_number(job, "priority") or 0),
            user=_text(job, "user_name"),
            name=_text(job, "name"),
            tag=_text(job, "comment"),
        )


# -- probes: partitions, nodes, a short job, a build job's end ---------------------


def partitions_argv(sinfo="sinfo"):
    return [sinfo, "--noheader", "--format=%R|%a|%D"]


def parse_partitions(out):
    """{partition: (availability, nodes)} of `sinfo --format=%R|%a|%D`."""
    parts = {}
    for line in out.splitlines():
        name, avail, nodes = (line.split("|") + ["", ""])[:3]
        if name:
            prev = parts.get(name, ("", 0))[1]
            parts[name] = (avail, prev + int(nodes or 0))
    return parts


def nodes_argv(sinfo="sinfo"):
    return [sinfo, "--noheader", "--Node", "--format=%N"]


def parse_nodes(out):
    return set(out.split())


def probe_job_argv(wrap, name, partition="", walltime_min=2, sbatch="sbatch"):
    """sbatch of a short shell command `wrap`, waiting for its end (its
    exit code is sbatch's)."""
    argv = [
        sbatch,
        "--wait",
        "--parsable",
        f"--job-name={name}",
        "--output=/dev/null",
        "--chdir=/tmp",
        f"--time={walltime_min}",
    ]
    if partition:
        argv.append(f"--partition={partition}")
    return argv + ["--wrap", wrap]


def named_jobs_argv(name, squeue="squeue"):
    return [squeue, "--noheader", f"--name={name}", "--format=%i|%T|%r"]


def parse_named_jobs(out):
    """(job id, state, reason) of each line of named_jobs_argv's output."""
    return [tuple((line.split("|") + ["", ""])[:3]) for line in out.splitlines()]


def cancel_argv(job_id, scancel="scancel"):
    return [scancel, job_id]


def job_record_argv(job_id, scontrol="scontrol"):
    return [scontrol, "show", "job", "-o", job_id]


def parse_job_record(out):
    """`scontrol show job -o` as {field: value}."""
    return dict(f.split("=", 1) for f in out.split() if "=" in f)
