"""The classes BinderHub loads: a build executor and a registry over SIF files.

The only module of binderhub-hpc that imports ``binderhub``. In
``binderhub_config.py``::

    c.BinderHub.use_registry = True
    c.BinderHub.image_prefix = "binderhub-hpc/binder-"   # must contain a '/'
    c.BinderHub.build_class = "binderhub_hpc.binderhub.SIFBuildExecutor"
    c.BinderHub.registry_class = "binderhub_hpc.binderhub.SIFDockerRegistry"
    c.SIFRegistry.root = "/shared/binder/registry"

Both are thin adapters over :class:`~binderhub_hpc.builder.pipeline.BuildPipeline`
and :class:`~binderhub_hpc.registry.SIFRegistry`.

Image names: BinderHub asks the registry about ``image_without_tag`` with the
first path component (the registry host) cut off, unless the name looks like a
Docker Hub name. The full name is what the build executor publishes under, so
:class:`SIFDockerRegistry` puts the prefix's first component back. With an
``image_prefix`` without '/' BinderHub would pass an empty name: use one with
a '/' (any word; nothing is pushed anywhere).
"""

import re
import time

from binderhub.build import BuildExecutor, ProgressEvent
from binderhub.health import HealthHandler
from binderhub.quota import LaunchQuota, LaunchQuotaExceeded, ServerQuotaCheck
from binderhub.registry import DockerRegistry
from traitlets import Enum, Float, Instance, Type, Unicode, default

from . import __version__, metrics
from .builder.pipeline import BuildPipeline, BuildRequest
from .builder.protocol import LOG, binderhub_log, failed_line
from .builder.repo2docker import repo2docker_version
from .builder.runners import BuildRunner, LocalRunner
from .health import HealthChecks
from .registry import InvalidImageName, SIFRegistry
from .scheduler.pbs import PBSQueue
from .scheduler.reflector import QueueReflector
from .scheduler.slurm import SlurmQueue
from .scheduler.tags import JobTags, count_sessions

_DOCKERHUB_NAME = re.compile(r"[a-z0-9]{4,40}/[a-z0-9._-]{2,255}")


class SIFBuildExecutor(BuildExecutor):
    """Builds with repo2docker on podman and publishes a SIF to the registry."""

    pipeline = Instance(BuildPipeline)

    @default("pipeline")
    def _default_pipeline(self):
        return BuildPipeline(parent=self)

    runner_class = Type(
        LocalRunner,
        klass=BuildRunner,
        help="""Where the build runs: LocalRunner (this host),
        binderhub_hpc.builder.runners.SSHRunner (a build node),
        binderhub_hpc.builder.runners.SlurmBatchRunner (a job on a build partition).""",
    ).tag(config=True)

    build_timeout = Float(3600, help="Seconds for a whole build before it is stopped.").tag(config=True)

    @default("builder_info")
    def _default_builder_info(self):
        pipeline = self.pipeline
        return {
            "builder": "binderhub-hpc",
            "binderhub-hpc-version": __version__,
            "repo2docker-version": repo2docker_version(),
            "engine": pipeline.repo2docker.engine,
            "converter": pipeline.converter,
            "registry": pipeline.registry.root,
            "runner": self.runner_class.__name__,
        }

    def _status(self, status):
        self.progress(ProgressEvent.Kind.BUILD_STATUS_CHANGE, status)

    def submit(self):
        """Run the build (in BinderHub's build thread pool)."""
        self._status(ProgressEvent.BuildStatus.PENDING)
        self.pipeline.build_timeout = self.build_timeout
        request = BuildRequest(
            repo_url=self.repo_url,
            ref=self.ref,
            image=self.image_name,
            git_credentials=self.git_credentials or "",
            appendix=self.appendix,
            extra_args=list(self.repo2docker_extra_args),
        )
        self._status(ProgressEvent.BuildStatus.RUNNING)

        def progress(kind, payload):
            # BinderHub sends it on to the browser as it is: only a plain
            # log line (see protocol.binderhub_log), never a 'ready' with a url
            if kind == LOG:
                self.progress(ProgressEvent.Kind.LOG_MESSAGE, binderhub_log(payload))

        try:
            result = self.runner_class(parent=self).run(self.pipeline, request, progress, stop_event=self.stop_event)
        except Exception as e:  # noqa: BLE001 - reported to the user, then failed
            self.log.exception("Build of %s failed", self.image_name)
            self.progress(ProgressEvent.Kind.LOG_MESSAGE, failed_line(f"Build failed: {e}"))
            self._status(ProgressEvent.BuildStatus.FAILED)
            return
        if result.ok:
            self._status(ProgressEvent.BuildStatus.BUILT)
        else:
            # the pipeline already logged a 'failed' phase line with the reason
            self._status(ProgressEvent.BuildStatus.FAILED)
        return result

    def stream_logs(self):
        # log lines are posted by submit() as they arrive
        pass


class SIFDockerRegistry(DockerRegistry):
    """BinderHub's view of the SIF registry: an image exists when its SIF does."""

    sif_registry = Instance(SIFRegistry)

    @default("sif_registry")
    def _default_sif_registry(self):
        return SIFRegistry(parent=self)

    @default("url")
    def _default_url(self):
        return "file://" + self.sif_registry.root

    def _candidates(self, image, tag):
        prefix = getattr(self.parent, "image_prefix", "") or ""
        names = []
        if "/" in prefix:
            host = prefix.split("/", 1)[0]
            names.append(f"{host}/{image}:{tag}")
        if image and (not names or _DOCKERHUB_NAME.fullmatch(image)):
            names.append(f"{image}:{tag}")
        return names

    async def get_image_manifest(self, image, tag):
        for name in self._candidates(image, tag):
            try:
                entry = self.sif_registry.entry(name)
                path = entry.lookup()
            except InvalidImageName:
                metrics.REGISTRY_LOOKUPS.labels(result="invalid").inc()
                return None
            if path is not None:
                metrics.REGISTRY_LOOKUPS.labels(result="hit").inc()
                # BinderHub asks before every launch and runs as the account
                # that owns the registry (the hub's account cannot write it):
                # the launch's use of the image is recorded here, for gc
                entry.touch(min_interval=60)
                meta = entry.metadata()
                return {
                    "schemaVersion": 2,
                    "name": name,
                    "path": str(path),
                    "size": meta.get("size"),
                    "created": meta.get("created"),
                }
        metrics.REGISTRY_LOOKUPS.labels(result="miss").inc()
        return None

    async def get_credentials(self, image, tag):
        return None


class SIFHealthHandler(HealthHandler):
    """BinderHub's ``/health`` plus what a cluster deployment needs: the
    registry (readable, writable, free space), the build engine (``podman
    info``, when builds run on this host) and the scheduler (one cheap query),
    each cached (``c.HealthChecks.cache_seconds``). The checks are
    ``binderhub-hpc doctor``'s. Install with
    ``c.BinderHub.health_handler_class = "binderhub_hpc.binderhub.SIFHealthHandler"``.
    """

    _checks = {}

    def _health_checks(self):
        parent = self.settings.get("traitlets_parent")
        key = id(parent)
        if key not in SIFHealthHandler._checks:
            SIFHealthHandler._checks[key] = (
                HealthChecks(parent=parent)
                if parent is not None
                else HealthChecks(config=self.settings.get("traitlets_config"))
            )
        return SIFHealthHandler._checks[key]

    def get_checks(self, checks):
        super().get_checks(checks)
        hc = self._health_checks()
        registry = self.settings.get("registry")
        sif = getattr(registry, "sif_registry", None) or SIFRegistry(config=self.settings.get("traitlets_config"))
        checks["SIF registry"] = hc.registry(sif.root)
        builder = self.settings.get("example_builder")
        runner = getattr(builder, "runner_class", LocalRunner)
        if hc.check_build_engine == "yes" or (hc.check_build_engine == "auto" and issubclass(runner, LocalRunner)):
            podman = builder.pipeline.podman.podman if builder is not None else "podman"
            checks["Build engine"] = hc.build_engine(podman)
        if hc.scheduler:
            checks["Scheduler"] = hc.scheduler_status()


class SchedulerLaunchQuota(LaunchQuota):
    """BinderHub's launch quotas, counted in the batch queue: the session
    jobs our spawner submitted, pending or running.

    The same rules and messages as BinderHub's quotas on Kubernetes:
    ``total_quota`` for the whole BinderHub, and a repository's own quota
    (``per_repo_quota``, or ``per_repo_quota_higher`` for the repositories
    BinderHub's spec_config lists) for the sessions of one repository. Only
    jobs whose quota tag verifies count: the tag each session job carries
    (its Slurm comment, its PBS variable BINDER_JOB_TAG) is keyed by a
    secret only the hub and BinderHub hold (c.JobTags.key_env) and bound to
    the job's account, so no other account's job counts
    (:func:`binderhub_hpc.scheduler.tags.count_sessions` counts; this class
    adapts it to BinderHub). One scheduler query per `interval` serves
    every check in this process (a QueueReflector, as for the spawners), so
    a burst of clicks does not become a burst of queries. Install with
    ``c.BinderHub.launch_quota_class = "binderhub_hpc.binderhub.SchedulerLaunchQuota"``.
    """

    scheduler = Enum(["slurm", "pbs"], "slurm", help="The batch scheduler the sessions run on.").tag(config=True)

    job_user = Unicode(
        "",
        help="""Count only jobs of this account: the service account anonymous
        sessions run as (the spawner's job_user). Empty: every account's
        session jobs (authenticated Binder, where users run their own); a
        job counts only if its quota tag verifies for its own account either
        way.""",
    ).tag(config=True)

    interval = Float(
        2.0, help="Seconds a queue snapshot is reused for quota checks (one query per interval at most)."
    ).tag(config=True)

    reflector = Instance(QueueReflector, help="The shared queue snapshot.")

    @default("reflector")
    def _default_reflector(self):
        scheduler = (SlurmQueue if self.scheduler == "slurm" else PBSQueue)(parent=self)
        return QueueReflector(scheduler, interval=self.interval, parent=self)

    tags = Instance(JobTags, help="Checks the jobs' quota tags (configured as c.JobTags).")

    @default("tags")
    def _default_tags(self):
        return JobTags(parent=self)

    async def count(self, image_name):
        """(sessions pending or running, those of `image_name`'s repository),
        counting the launches this process admitted since the snapshot's
        query began, which it cannot show yet: a burst of clicks within one
        interval does not all pass a quota the snapshot says is free."""
        repo = self.tags.repository_id(image_name)  # no key: refused before the query
        jobs = await self.reflector.refresh(time.monotonic() - self.interval)
        total, matching = count_sessions(jobs.values(), self.tags, image_name, self.job_user)
        since = self.reflector.taken_at
        self._admitted = [(t, a) for t, a in getattr(self, "_admitted", []) if t >= since]
        return total + len(self._admitted), matching + sum(1 for _, a in self._admitted if a == repo)

    async def check_repo_quota(self, image_name, repo_config, repo_url):
        repo_quota = repo_config.get("quota")
        total_quota = self.total_quota
        if total_quota is None and not repo_quota:
            return None
        total, matching = await self.count(image_name)
        if total_quota is not None and total >= total_quota:
            self.log.error(f"BinderHub is full: {total}/{total_quota}")
            raise LaunchQuotaExceeded(
                "Too many users on this BinderHub! Try again soon.", quota=total_quota, used=total, status="pod_quota"
            )
        if repo_quota and matching >= repo_quota:
            self.log.error(f"{repo_url} has exceeded quota: {matching}/{repo_quota} ({total} total)")
            raise LaunchQuotaExceeded(
                f"Too many users running {repo_url}! Try again soon.",
                quota=repo_quota,
                used=matching,
                status="repo_quota",
            )
        self._admitted.append((time.monotonic(), self.tags.repository_id(image_name)))
        return ServerQuotaCheck(total=total, matching=matching, quota=repo_quota)
