"""What a batch scheduler says about a job, in one shape for every
scheduler: job records, their states, the tag our session jobs carry, the
scheduler's reasons in plain words, and the units of memory and walltime.

A scheduler (:mod:`.slurm`, :mod:`.pbs`) turns its own output into
:class:`JobInfo` records; the spawner, the quota and the health checks only
ever read those.
"""

import re
import time
from dataclasses import dataclass, field
from datetime import datetime

from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable

#: the job tag's prefix: Slurm's job comment (PBS: the job's BINDER_JOB_TAG
#: variable) of a session job is TAG_PREFIX + a keyed code that only the
#: service can make (:mod:`.tags`)
TAG_PREFIX = "binder-image:"


PENDING = "pending"
RUNNING = "running"
GONE = "gone"
UNKNOWN = "unknown"
#: expected start times further out than this are not shown (seconds)
MAX_SHOWN_WAIT = 7 * 24 * 3600


@dataclass
class JobInfo:
    """One job as the scheduler last described it."""

    job_id: str
    state: str  # PENDING, RUNNING (normalised), GONE, or UNKNOWN (the record cannot be trusted)
    raw_state: str = ""
    reason: str = ""  # scheduler's pending reason (code or comment)
    node: str = ""
    partition: str = ""
    start_time: float = None  # expected start while pending, actual once running
    submit_time: float = None
    priority: int = 0
    position: int = None  # 1-based place among pending jobs in the partition
    pending_in_partition: int = None
    user: str = ""  # the account the job runs as
    name: str = ""
    tag: str = ""  # what the job carries as its quota tag (.tags): checked only by JobTags.verify
    extra: dict = field(default_factory=dict)

    def describe(self):
        """A sentence for the person waiting for this job."""
        if self.state == RUNNING:
            return f"Job {self.job_id} is running on {self.node or 'a compute node'}; starting the server."
        if self.state == UNKNOWN:
            return (
                f"Job {self.job_id}: the scheduler cannot be asked about it right now ({self.reason or 'no answer'})."
            )
        if self.state != PENDING:
            return f"Job {self.job_id} is {self.raw_state.lower() or 'not in the queue'}."
        words = [f"Job {self.job_id} is waiting in the {self.partition or 'default'} queue"]
        if self.position:
            words.append(f"(position {self.position} of {self.pending_in_partition})")
        msg = " ".join(words) + ": " + plain_reason(self.reason) + "."
        wait = (self.start_time or 0) - time.time()
        # Slurm puts jobs blocked by jobs without a time limit a year out:
        # that is no estimate worth showing
        if 0 < wait < MAX_SHOWN_WAIT:
            when = time.localtime(self.start_time)
            fmt = "%H:%M" if when[:3] == time.localtime()[:3] else "%a %d %b %H:%M"
            msg += f" Expected start: {time.strftime(fmt, when)} (in about {_human(wait)})."
        return msg


def _human(seconds):
    seconds = int(max(seconds, 0))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


_SLURM_REASONS = {
    "None": "waiting to be scheduled",
    "Resources": "waiting for free resources (the partition is full)",
    "Priority": "waiting behind jobs with higher priority",
    "Dependency": "waiting for another job to finish",
    "BeginTime": "its start time has not come yet",
    "JobHeldUser": "held by its owner",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "the nodes it needs are unavailable (down, drained or reserved)",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows",
    "PartitionTimeLimit": "its time limit exceeds the partition's",
    "QOSMaxJobsPerUserLimit": "the service account has reached its limit of running jobs",
    "QOSGrpCpuLimit": "the group's CPU limit is reached",
    "AssocGrpCpuLimit": "the account's CPU limit is reached",
    "AssocMaxJobsLimit": "the account's job limit is reached",
    "Reservation": "waiting for its reservation to start",
    "NodeDown": "a node it needs is down",
    "Cleaning": "the node is being cleaned up after a previous job",
    "launch failed requeued held": "its launch failed and it was held",
}


def plain_reason(reason):
    """The scheduler's pending reason in plain words."""
    if not reason:
        return "waiting to be scheduled"
    if reason in _SLURM_REASONS:
        return _SLURM_REASONS[reason]
    # Slurm adds details after a comma: "ReqNodeNotAvail, UnavailableNodes:c[1-2]"
    code, _, detail = reason.partition(",")
    if code in _SLURM_REASONS:
        nodes = detail.strip().partition("UnavailableNodes:")[2]
        return _SLURM_REASONS[code] + (f": {nodes}" if nodes else "")
    if reason.startswith("Not Running:"):  # PBS scheduler comments
        text = reason[len("Not Running:") :].strip().rstrip(".")
        short = _pbs_short_of(text)
        return f"waiting for free resources ({short})" if short else text
    if reason.startswith("Can Never Run:"):
        text = reason[len("Can Never Run:") :].strip().rstrip(".")
        return "it can never run as requested: " + (_pbs_short_of(text) or text)
    if " " in reason.strip():
        # a sentence already (PBS comments such as "Job held by ..."): keep it
        return reason.strip().rstrip(".")
    # unknown codes: split CamelCase so it reads as words
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", reason).lower()


#: PBS's "Insufficient amount of [queue|server] resource: ncpus (R: 1 A: 0 T: 2)"
_PBS_SHORT = re.compile(r"^Insufficient amount of (?:(queue|server) )?resource: (\S+) \(R: (\S+) A: (\S+) T: (\S+)\)$")


def _pbs_short_of(text):
    """A PBS "Insufficient amount of resource" comment in words, or None."""
    m = _PBS_SHORT.match(text)
    if not m:
        return None
    where, resource, asked, free, total = m.groups()
    place = {"queue": " in its queue", "server": " on the server"}.get(where, "")
    return f"{resource}: it needs {asked}, {free} of {total} are free{place}"


def _positions(jobs):
    """Fill in each pending job's place in its partition's queue."""
    by_part = {}
    for j in jobs.values():
        if j.state == PENDING:
            by_part.setdefault(j.partition, []).append(j)
    for queue in by_part.values():
        queue.sort(key=lambda j: (-j.priority, j.submit_time or 0, _id_key(j.job_id)))
        for i, j in enumerate(queue, 1):
            j.position = i
            j.pending_in_partition = len(queue)


def one_record_per_job(records):
    """{job_id: JobInfo} of a scheduler's (job_id, JobInfo) records, checked:
    a job id given more than once is UNKNOWN, never one of its records (nor
    GONE): the scheduler prints each job once, so a second record is a
    forgery or a fault, and which one is true cannot be told."""
    jobs, seen = {}, {}
    for job_id, info in records:
        seen[job_id] = seen.get(job_id, 0) + 1
        jobs[job_id] = info
    for job_id, n in seen.items():
        if n > 1:
            jobs[job_id] = JobInfo(job_id, UNKNOWN, reason=f"the queue shows {n} records for it")
    return jobs


def _id_key(job_id):
    m = re.match(r"\d+", job_id)
    return (int(m.group()) if m else 0, job_id)


class Scheduler(LoggingConfigurable):
    """Queries one kind of batch scheduler for every job it knows."""

    name = ""

    partitions = List(
        Unicode(),
        help="""Only ask about these partitions/queues (empty: all). Positions
        in the queue are computed within each partition.""",
    ).tag(config=True)

    command_timeout = Float(30, help="Seconds before a scheduler query is abandoned.").tag(config=True)

    async def snapshot(self, env=None):
        """{job_id: JobInfo} for every job in the queue."""
        raise NotImplementedError


def _parse_time(text, fmt=None):
    if not text or text in ("N/A", "Unknown", "None", "(null)"):
        return None
    try:
        dt = datetime.strptime(text, fmt) if fmt else datetime.fromisoformat(text)
    except ValueError:
        return None
    return dt.timestamp()


# -- units ----------------------------------------------------------------------

_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.I)
_WALLTIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_memory(text, default_unit="m"):
    """Bytes of a Slurm --mem or PBS mem value ("4G", "4gb"), or None. A
    bare number is in `default_unit`: megabytes for Slurm, bytes ("") for PBS."""
    m = _MEMORY_RE.match(str(text or ""))
    if not m:
        return None
    unit = m.group(2).lower() or ("" if m.group(3) else default_unit)
    return int(float(m.group(1)) * 1024 ** " kmgtp".index(unit or " "))


def parse_walltime(text):
    """Seconds of a Slurm --time or PBS walltime value, or None. Slurm:
    minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]];
    PBS: hours:minutes:seconds."""
    m = _WALLTIME_RE.match(str(text or "").strip())
    if not m:
        return None
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # days-hours[:minutes[:seconds]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:
        return (a * 60 + b) * 60 + c
    if b is not None:
        return a * 60 + b
    return a * 60
