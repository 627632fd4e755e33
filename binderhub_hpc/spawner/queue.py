"""What the batch scheduler says about our jobs, asked once for all of them.

kubespawner watches every pod with one shared reflector instead of one poll
per spawner; we do the same for batch jobs. A :class:`QueueReflector` holds
the latest snapshot of the queue; every spawner asks it, and it runs at most
one scheduler query per `interval`, shared by all concurrent askers. The
scheduler's load stays flat however many launches are pending.

The snapshot covers the whole partition (not just our jobs), so a pending
launch can tell the user where it stands in the queue.
"""

import asyncio
import json
import re
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime

from traitlets import Float, Integer, List, Unicode
from traitlets.config import LoggingConfigurable

from .. import metrics
from ..proc import CommandError, run

#: the job tag's prefix: Slurm's job comment (PBS: the BINDER_JOB_TAG
#: variable) of a session job is TAG_PREFIX + a hash of the image name
TAG_PREFIX = "binder-image:"


def job_tag(image):
    """What a session job carries to say which repository it runs: a hash of
    its image name without the tag (BinderHub's per-repository quotas count
    images that way), safe in a job script and a scheduler's output."""
    import hashlib

    return TAG_PREFIX + hashlib.sha256(image.rsplit(":", 1)[0].encode()).hexdigest()[:16]


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
    state: str  # PENDING, RUNNING (normalised), or GONE
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
    tag: str = ""  # what our spawner put on the job (see job_tag): which image it runs
    extra: dict = field(default_factory=dict)

    @property
    def is_binder(self):
        """A session job of our spawner (named binder-*, tagged)."""
        return self.name.startswith("binder-") and self.tag.startswith(TAG_PREFIX)

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


class SlurmQueue(Scheduler):
    name = "slurm"

    squeue = Unicode("squeue", help="The squeue executable.").tag(config=True)

    #: job id | state | reason | nodes | start | partition | priority |
    #: submit | user | name | comment (free text last: a '|' in another
    #: job's name or comment cannot move the fields before it)
    _FORMAT = "%i|%T|%r|%N|%S|%P|%Q|%V|%u|%j|%k"

    def argv(self):
        argv = [self.squeue, "--noheader", "--format=" + self._FORMAT]
        if self.partitions:
            argv.append("--partition=" + ",".join(self.partitions))
        return argv

    async def snapshot(self, env=None):
        out = await run(self.argv(), env=env, timeout=self.command_timeout, label="squeue")
        return self.parse(out)

    def parse(self, out):
        jobs = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 8:
                continue
            job_id, raw, reason, nodes, start, part, prio, submit = parts[:8]
            user = parts[8] if len(parts) > 8 else ""
            name = "|".join(parts[9:-1]) if len(parts) > 10 else ""
            comment = parts[-1] if len(parts) > 10 else ""
            if raw in (
                "PENDING",
                "CONFIGURING",
                "REQUEUED",
                "REQUEUE_HOLD",
                "REQUEUE_FED",
                "RESV_DEL_HOLD",
                "SUSPENDED",
            ):
                state = PENDING
            elif raw in ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"):
                state = RUNNING
            else:
                state = GONE
            try:
                prio = int(prio)
            except ValueError:
                prio = 0
            jobs[job_id] = JobInfo(
                job_id=job_id,
                state=state,
                raw_state=raw,
                reason=reason if state == PENDING else "",
                node=nodes.split(",")[0] if state == RUNNING else "",
                partition=part,
                start_time=_parse_time(start),
                submit_time=_parse_time(submit),
                priority=prio,
                user=user,
                name=name,
                tag=comment if comment.startswith(TAG_PREFIX) else "",
            )
        _positions(jobs)
        return jobs


def _int(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


# -- OpenPBS's `qstat -f -F json`, as each version prints it -------------------
#
# Two JSON writers are in use, and neither prints every value as it is:
#
# - OpenPBS up to 23.06 writes JSON by hand (src/lib/Libcmds/pbs_json.c), one
#   attribute per line, 4-space indents, `"key":value`. Any value strtod()
#   reads whole is printed bare, as typed: `inf`, `nan`, `1.`, `+5`, `00`,
#   `-007`, `.5` (not JSON), `NaN`, `1e5` (JSON, but numbers now). A
#   backslash in a value that PBS does not escape itself (Submit_arguments)
#   is printed raw (`\s`, and a trailing one escapes the closing quote).
#   Every byte >= 0x80 goes through show_nonprint_chars() with a signed
#   char and comes out as '^' + (byte + 0x40) mod 256: not UTF-8, and a
#   lead byte 0xE2 becomes `^"`, a quote inside the string.
# - OpenPBS master writes with cJSON (tab-indented `"key":\tvalue`): valid,
#   UTF-8 JSON. But number-like strings become numbers first (`0123` -> 123,
#   `1e5` -> 100000, `-007` -> -7, `1.` -> 1, `00` -> 0; `true`/`null` bare),
#   so their text is lost; and Variable_List values keep PBS's own escaping
#   (`\"`, `\'`, `\\`, `\,`), which cJSON escapes again.
#
# Both: a Variable_List value that ends in a backslash, or is empty (`qsub
# -V`), swallows the next variable; that is in the server already.
#
# The parser reads both: it restores the UTF-8 bytes, re-encodes lines that
# are not JSON as strings, keeps the text of every bare number, and undoes
# PBS's escaping in cJSON's Variable_List. What it cannot restore (cJSON's
# numbers) it reads as the text cJSON printed.

#: one `"key":value` line of the hand-written JSON (a comma unless last)
_PBS_JSON_LINE = re.compile(r'^(\s*"[^"]*":)(.*?)(,?)$')
_JSON_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
#: a UTF-8 character as show_nonprint_chars() mangles it: '^' + lead byte
#: (0xC2-0xF4) + 0x40 mod 256, then '^' + each continuation byte + 0x40
_CARET_UTF8 = re.compile(rb"\^([\x02-\x34])((?:\^[\xc0-\xff]){1,3})")
#: cJSON's layout: tab indents, a tab after the colon
_CJSON_LAYOUT = re.compile(r'^\t+"[^"\n]*":\t', re.M)
#: PBS's escaping inside a Variable_List value
_PBS_ESCAPE = re.compile(r"\\([\"'\\,])")


class _Int(int):
    """A JSON integer that remembers how it was printed."""

    text = ""


class _Float(float):
    """A JSON number (or NaN/Infinity) that remembers how it was printed."""

    text = ""


def _keep_text(cls, convert=None):
    def hook(token):
        n = cls(convert(token) if convert else token)
        n.text = token
        return n

    return hook


_NUMBER_HOOKS = {
    "parse_int": _keep_text(_Int),
    "parse_float": _keep_text(_Float),
    "parse_constant": _keep_text(_Float, {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get),
}


def pbs_text(value):
    """A scalar of `qstat -F json` as the text PBS printed (numbers as
    typed, true/false/null as words)."""
    if isinstance(value, str):
        return value
    if getattr(value, "text", ""):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def restore_utf8(raw):
    """`qstat` output as text: UTF-8 as it is; the hand-written writer's
    '^'-mangled bytes turned back into the UTF-8 characters they were."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass

    def sub(m):
        mangled = m.group(1) + m.group(2)[1::2]
        original = bytes((b + 0xC0) & 0xFF for b in mangled)
        try:
            original.decode("utf-8")
        except UnicodeDecodeError:
            return m.group(0)
        return original

    return _CARET_UTF8.sub(sub, raw).decode("utf-8", errors="replace")


def _pbs_unescape(text):
    """A value as OpenPBS meant it: its valid JSON escapes decoded, anything
    else (a lone backslash, an unescaped quote) taken literally."""

    def sub(m):
        esc = m.group(1)
        if esc[0] == "u":
            return chr(int(esc[1:], 16))
        return _JSON_ESCAPES[esc]

    return re.sub(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])', sub, text)


def _repair_pbs_json(text):
    """Re-encode every value line that is not valid JSON as a JSON string."""
    lines = []
    for line in text.splitlines():
        m = _PBS_JSON_LINE.match(line)
        if m and m.group(2) not in ("{", "["):
            key, value, comma = m.groups()
            try:
                json.loads(value, strict=False)
            except ValueError:
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                line = key + json.dumps(_pbs_unescape(value)) + comma
        lines.append(line)
    return "\n".join(lines)


def load_pbs_json(out):
    """`qstat -f -F json` output (bytes or text) of any OpenPBS version as
    a dict; Variable_List values are the strings the job was given.
    Raises ValueError when even the repaired output is not JSON."""
    text = restore_utf8(out)
    if not text.strip():
        return {}
    try:
        data = json.loads(text, strict=False, **_NUMBER_HOOKS)
    except json.JSONDecodeError as e:
        try:
            data = json.loads(_repair_pbs_json(text), strict=False, **_NUMBER_HOOKS)
        except json.JSONDecodeError:
            raise ValueError(f"qstat printed JSON that cannot be read, even repaired: {e}") from None
    cjson = bool(_CJSON_LAYOUT.search(text[:4096]))
    for job in (data.get("Jobs") or {}).values():
        variables = job.get("Variable_List")
        if isinstance(variables, dict):
            for k, v in variables.items():
                v = pbs_text(v)
                variables[k] = _PBS_ESCAPE.sub(r"\1", v) if cjson else v
    return data


class PBSQueue(Scheduler):
    """PBS Pro / OpenPBS through `qstat -f -F json` (see load_pbs_json)."""

    name = "pbs"

    qstat = Unicode("qstat", help="The qstat executable.").tag(config=True)

    _TIME_FMT = "%a %b %d %H:%M:%S %Y"

    def argv(self):
        argv = [self.qstat, "-f", "-F", "json"]
        argv += list(self.partitions)
        return argv

    async def snapshot(self, env=None):
        # bytes: OpenPBS 23.06 prints some as they are not UTF-8
        out = await run(self.argv(), env=env, timeout=self.command_timeout, label="qstat", binary=True)
        return self.parse(out)

    @staticmethod
    def _loads(out):
        return load_pbs_json(out)

    def _time(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _parse_time(pbs_text(value) if value is not None else None, self._TIME_FMT)

    def parse(self, out):
        data = self._loads(out)
        jobs = {}
        for job_id, j in (data.get("Jobs") or {}).items():
            raw = pbs_text(j.get("job_state", ""))
            if raw in ("Q", "H", "W", "T", "S", "U"):
                state = PENDING
            elif raw in ("R", "E", "B"):
                state = RUNNING
            else:
                state = GONE
            host = pbs_text(j.get("exec_host") or "")
            node = host.split("+")[0].split("/")[0] if state == RUNNING else ""
            est = j.get("estimated") or {}
            start = j.get("stime") if state == RUNNING else (est.get("start_time") if isinstance(est, dict) else None)
            reason = pbs_text(j.get("comment", "")) if state == PENDING else ""
            if raw == "H":
                # the comment only says who held it and when
                holds = pbs_text(j.get("Hold_Types", ""))
                reason = "JobHeldAdmin" if ("o" in holds or "s" in holds) else "JobHeldUser"
            jobs[job_id] = JobInfo(
                job_id=job_id,
                state=state,
                raw_state={
                    "Q": "QUEUED",
                    "H": "HELD",
                    "W": "WAITING",
                    "R": "RUNNING",
                    "E": "EXITING",
                    "F": "FINISHED",
                }.get(raw, raw),
                reason=reason,
                node=node,
                partition=pbs_text(j.get("queue", "")),
                start_time=self._time(start),
                submit_time=self._time(j.get("qtime")),
                priority=_int(j.get("Priority", 0)),
                extra={"name": pbs_text(j.get("Job_Name", "")), "owner": pbs_text(j.get("Job_Owner", ""))},
            )
        _positions(jobs)
        return jobs


class QueueReflector(LoggingConfigurable):
    """The latest queue snapshot, shared by every spawner of one hub.

    At most one scheduler query runs at a time and at most one starts per
    `interval`; askers that need a fresher view than the current one wait for
    the next query instead of starting their own.
    """

    interval = Float(
        2.0,
        help="Minimum seconds between two scheduler queries (shared by all spawners).",
    ).tag(config=True)

    failure_limit = Integer(
        5,
        help="Consecutive failed queries after which jobs are reported unknown, not gone.",
    ).tag(config=True)

    def __init__(self, scheduler=None, env=None, **kwargs):
        super().__init__(**kwargs)
        self.scheduler = scheduler
        self.env = env
        self.jobs = {}
        self.taken_at = 0.0  # monotonic time the current snapshot's query started
        self.failures = 0
        self.queries = 0
        self.attempted_at = 0.0  # monotonic start of the latest query, failed or not
        self._error = None  # what the latest query raised, if it failed
        self._lock = asyncio.Lock()

    async def _query(self):
        started = time.monotonic()
        self.queries += 1
        self.attempted_at = started
        try:
            jobs = await self.scheduler.snapshot(env=self.env)
        except (CommandError, asyncio.TimeoutError, OSError, ValueError) as e:
            self.failures += 1
            self._error = e
            self.log.warning("Scheduler query failed (%d in a row): %s", self.failures, e)
            raise
        self._error = None
        self.failures = 0
        self.jobs = jobs
        self.taken_at = started
        self._update_gauges()
        return jobs

    def _update_gauges(self):
        counts = {}
        for j in self.jobs.values():
            if j.state in (PENDING, RUNNING):
                counts[(j.state, j.partition)] = counts.get((j.state, j.partition), 0) + 1
        metrics.JOBS.clear()
        for (state, part), n in counts.items():
            metrics.JOBS.labels(state, part).set(n)

    async def refresh(self, newer_than=0.0):
        """Make sure the snapshot was taken after `newer_than` (monotonic).

        Failed queries are shared and spaced like successful ones: while the
        scheduler fails, askers wait for the next attempt (at most one per
        `interval`), and once `failure_limit` attempts in a row have failed,
        an attempt newer than `newer_than` answers every waiting asker with
        its error instead of each asker querying the struggling scheduler
        again.
        """
        while self.taken_at <= newer_than:
            async with self._lock:
                if self.taken_at > newer_than:
                    break
                if self._error is not None and self.failures >= self.failure_limit and self.attempted_at > newer_than:
                    raise self._error
                last = max(self.taken_at, self.attempted_at)
                wait = last + self.interval - time.monotonic()
                if wait > 0 and last:
                    await asyncio.sleep(wait)
                try:
                    await self._query()
                except Exception:
                    if self.failures >= self.failure_limit:
                        raise
        return self.jobs

    async def job(self, job_id, newer_than=None):
        """The JobInfo of `job_id` from a snapshot newer than `newer_than`.

        Without `newer_than`, any snapshot younger than `interval` will do.
        Returns a JobInfo with state UNKNOWN if the scheduler cannot be asked.
        """
        if newer_than is None:
            newer_than = time.monotonic() - self.interval
        try:
            await self.refresh(newer_than)
        except Exception as e:
            return JobInfo(job_id, UNKNOWN, reason=str(e))
        return self.jobs.get(job_id) or JobInfo(job_id, GONE)


#: event loop -> {key: reflector}; a loop's reflectors go with it (an id()
#: of a closed loop can come back for a new one)
_reflectors = weakref.WeakKeyDictionary()


def shared_reflector(key, factory):
    """One reflector per (scheduler kind, config) and event loop in this process."""
    per_loop = _reflectors.setdefault(asyncio.get_running_loop(), {})
    r = per_loop.get(key)
    if r is None:
        r = per_loop[key] = factory()
    return r
