"""Slurm: the queue as ``squeue`` prints it, and the other questions the
service asks Slurm (partitions, a build job's end)."""

from traitlets import Unicode

from ..proc import run
from .jobs import GONE, PENDING, RUNNING, TAG_PREFIX, JobInfo, Scheduler, _parse_time, _positions


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
