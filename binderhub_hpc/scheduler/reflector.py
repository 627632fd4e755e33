"""The queue, asked once for all: one shared snapshot per hub.

kubespawner watches every pod with one shared reflector instead of one poll
per spawner; we do the same for batch jobs. A :class:`QueueReflector` holds
the latest snapshot of the queue; every spawner asks it, and it runs at most
one scheduler query per `interval`, shared by all concurrent askers. The
scheduler's load stays flat however many launches are pending.

The snapshot covers the whole partition (not just our jobs), so a pending
launch can tell the user where it stands in the queue.
"""

import asyncio
import time
import weakref

from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

from .. import metrics
from ..proc import CommandError
from .jobs import GONE, PENDING, RUNNING, UNKNOWN, JobInfo


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
