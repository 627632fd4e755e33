"""The build pipeline: repository -> podman image -> SIF in the registry.

Steps, each a plain object of its own module:

1. lock      one build per image across threads, processes and hosts
             (:class:`~binderhub_hpc.lock.ImageLock` on the registry's lock
             file); whoever gets the lock first checks whether the image
             appeared meanwhile (then it is a cache hit), and removes
             temporaries a killed builder left behind.
2. repo2docker  :class:`~.repo2docker.Repo2Docker` on podman.
3. export    :class:`~.export.PodmanImage`: inspect; OCI archive only if the
             registry publishes one or the converter needs one.
4. convert   a :mod:`~.sif` converter into a registry temporary file.
5. publish   :meth:`SIFRegistry.publish`: atomic rename, metadata.
6. cleanup   remove the podman image (configurable).

Every build is bounded (:class:`~.limits.BuildLimits`: memory, CPUs, scratch
disk, image and published size) and runs with an allowlisted environment.
Under its lock a build also removes what killed builders of this host left:
their scratch directories, and podman images of this registry whose SIF got
published before the builder could remove them (``gc`` does the same).

Progress goes to ``progress(kind, payload)`` with kind ``"status"``
(payload ``"pending"``, ``"running"``, ``"built"``, ``"failed"``) or
``"log"`` (payload: a JSON string with ``phase`` and ``message``, as
repo2docker's ``--json-logs``), which the BinderHub adapter maps onto
``ProgressEvent``. Every exit path removes temporaries and unmounts.
"""

import os
import re
import socket
import time
from dataclasses import dataclass, field

from traitlets import Bool, Enum, Float, Instance, default
from traitlets.config import LoggingConfigurable

from .. import metrics
from ..faults import fault_point
from ..lock import LockTimeout
from ..registry import RegistryFull, SIFRegistry
from .convert import ConversionSource, DiskFullError, make_converter
from .export import PodmanImage
from .limits import BuildLimitExceeded, BuildLimits
from .process import BuildCancelled, BuildTimeout
from .protocol import LOG, STATUS, log_line  # noqa: F401  (STATUS: the progress kinds)
from .repo2docker import Repo2Docker, repo2docker_version

#: what git says when a server wants credentials it did not get
_AUTH_REFUSED = re.compile(
    r"could not read (Username|Password)|Authentication failed|"
    r"requested URL returned error: 40[13]"
)
#: labels of every podman image a build makes: which image, which registry
#: (so leftovers are found, and only ours)
LABEL_IMAGE = "org.binderhub-hpc.image"
LABEL_REGISTRY = "org.binderhub-hpc.registry"


@dataclass
class BuildRequest:
    repo_url: str
    ref: str
    image: str
    git_credentials: str = ""
    appendix: str = ""
    extra_args: list = field(default_factory=list)


@dataclass
class BuildResult:
    outcome: str  # success, cached, failure, cancelled, timeout
    image: str
    path: str = ""
    metadata: dict = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self):
        return self.outcome in ("success", "cached")


class BuildFailed(RuntimeError):
    pass


class BuildPipeline(LoggingConfigurable):
    """Compose the build steps for one image at a time (thread-safe)."""

    registry = Instance(SIFRegistry)

    @default("registry")
    def _default_registry(self):
        return SIFRegistry(parent=self)

    repo2docker = Instance(Repo2Docker)

    @default("repo2docker")
    def _default_repo2docker(self):
        return Repo2Docker(parent=self)

    podman = Instance(PodmanImage)

    @default("podman")
    def _default_podman(self):
        return PodmanImage(parent=self)

    limits = Instance(BuildLimits)

    @default("limits")
    def _default_limits(self):
        return BuildLimits(parent=self)

    converter = Enum(
        ["auto", "squashfs", "apptainer"],
        "auto",
        help="""SIF converter: 'squashfs' (mksquashfs + siftool from the
        mounted image, no copy), 'apptainer' (`apptainer build` from an OCI
        archive), or 'auto' (squashfs when its tools are installed, else
        apptainer).""",
    ).tag(config=True)

    remove_podman_image = Bool(
        True,
        help="""Remove the podman image once its SIF is published. Keeping it
        speeds up rebuilds of similar repositories (layer cache) at the cost
        of build-node disk.""",
    ).tag(config=True)

    build_timeout = Float(3600, help="Seconds for a whole build (repo2docker + conversion).").tag(config=True)

    lock_timeout = Float(
        0,
        help="Seconds to wait for another build of the same image (0: as long as it takes).",
    ).tag(config=True)

    def _converter(self):
        return make_converter(self.converter, parent=self)

    # -- the pipeline -----------------------------------------------------------

    def run(self, request, progress=None, stop_event=None):
        """Build `request.image` unless it is published. Returns a BuildResult."""
        progress = progress or (lambda kind, payload: None)
        image = request.image

        def log(message, phase="building"):
            progress(LOG, log_line(message, phase))

        if self.registry.exists(image):
            metrics.BUILDS.labels(outcome="cached").inc()
            log(f"Found built image {image}\n")
            return BuildResult("cached", image, str(self.registry.lookup(image)), self.registry.metadata(image))

        lock = self.registry.lock(image)

        def on_wait(holder):
            metrics.BUILD_LOCK_WAITS.inc()
            who = f" on {holder.get('host')} (pid {holder.get('pid')})" if holder else ""
            log(f"Waiting for another build of this image{who}...\n", "waiting")

        try:
            got = lock.acquire(
                timeout=self.lock_timeout or None,
                stop_event=stop_event,
                on_wait=on_wait,
                unneeded=lambda: self.registry.exists(image),
            )
            if got is None:
                metrics.BUILDS.labels(outcome="cached").inc()
                log(f"Image {image} was built meanwhile\n")
                return BuildResult("cached", image, str(self.registry.lookup(image)), self.registry.metadata(image))
            if not got:
                metrics.BUILDS.labels(outcome="cancelled").inc()
                return BuildResult("cancelled", image, error="stopped while waiting")
        except LockTimeout as e:
            metrics.BUILDS.labels(outcome="timeout").inc()
            log(f"{e}\n", "failed")
            return BuildResult("timeout", image, error=str(e))

        try:
            if self.registry.exists(image):
                metrics.BUILDS.labels(outcome="cached").inc()
                log(f"Image {image} was built meanwhile\n")
                return BuildResult("cached", image, str(self.registry.lookup(image)), self.registry.metadata(image))
            fault_point("locked")
            self._discard_stale(image)
            metrics.BUILDS_RUNNING.inc()
            try:
                return self._build(request, progress, log, stop_event)
            finally:
                metrics.BUILDS_RUNNING.dec()
        finally:
            lock.release()

    def _discard_stale(self, image):
        """Remove temporaries of `image` left by a builder that died, and
        what dead builders of this host left for other images.

        Only called with the image lock held: no living builder owns them.
        """
        for fmt in ("sif", "oci-archive"):
            final = self.registry.path(image, fmt)
            if final.parent.is_dir():
                for p in final.parent.glob(f".{final.name}.*.tmp"):
                    self.log.info("Removing %s left by an interrupted build", p)
                    self.registry.discard(p)
        self.repo2docker.remove_stale_scratch()
        self.remove_leftover_images(skip={image})

    def remove_leftover_images(self, skip=()):
        """Remove podman images this registry's builds made whose SIF is
        published and which no build holds: a builder killed between
        publishing and ``podman rmi`` leaves one, and the next request for
        that image is a cache hit that builds (and removes) nothing.
        Images not yet published stay: the next build of that image reuses
        them. Returns the names removed."""
        if not self.remove_podman_image:
            return []
        removed = []
        for _id, _names, labels in self.podman.labelled(LABEL_REGISTRY, self.registry.root):
            name = labels.get(LABEL_IMAGE, "")
            if not name or name in skip or not self.registry.exists(name):
                continue
            lock = self.registry.lock(name)
            if not lock.try_acquire():
                continue  # being built (or removed) right now
            try:
                if self.podman.remove(name):
                    self.log.info("Removed podman image %s left by an interrupted build", name)
                    removed.append(name)
            finally:
                lock.release()
        return removed

    def remove_stale_working_containers(self, older_than=None):
        """Remove buildah working containers older than `older_than` seconds
        (default: the build timeout, which no living build outlasts): a
        builder killed during a RUN step leaves its working container in
        podman's storage, holding its layers, and nothing else removes it.
        Returns how many."""
        older_than = self.build_timeout if older_than is None else older_than
        now = time.time()
        removed = 0
        for cid, created, names in self.podman.working_containers():
            if created and now - created > older_than and self.podman.remove_container(cid):
                self.log.info("Removed stale working container %s (%s)", cid[:12], ", ".join(names))
                removed += 1
        return removed

    def _watch_factory(self, watches):
        """The watchdog maker for repo2docker (None when no limit needs one)."""
        limits = self.limits
        if not (limits.memory or limits.scratch):
            return None
        paths = [self.podman.graphroot()] if limits.scratch and not limits.scratch_paths else []

        def make(scratch):
            watch = limits.watchdog([p for p in paths if p] + [scratch])
            watches.append(watch)
            return watch

        return make

    def _build(self, request, progress, log, stop_event):
        image = request.image
        deadline = time.monotonic() + self.build_timeout
        durations = {}
        temps = []
        outcome, error = "failure", ""
        podman_image_made = False

        def remaining():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BuildTimeout(f"build timed out after {self.build_timeout:.0f} s")
            return left

        def step(name):
            return _Step(name, durations)

        watches = []
        refused = []

        def r2d_log(line):
            if not refused and _AUTH_REFUSED.search(line):
                refused.append(line)
            progress(LOG, line)

        try:
            # repo2docker ------------------------------------------------------
            with step("repo2docker"):
                podman_image_made = True  # or part of one: removed on every exit
                result = self.repo2docker.run(
                    request.repo_url,
                    request.ref,
                    image,
                    r2d_log,
                    appendix=request.appendix,
                    extra_args=request.extra_args,
                    git_credentials=request.git_credentials,
                    stop_event=stop_event,
                    timeout=remaining(),
                    labels={LABEL_IMAGE: image, LABEL_REGISTRY: self.registry.root},
                    cpus=self.limits.cpu_list(),
                    watch_factory=self._watch_factory(watches),
                )
            if result.returncode != 0 and refused:
                raise BuildFailed(
                    f"the git server of {request.repo_url!r} asks for credentials and "
                    + (
                        "refused those given (BinderHub's git_credentials)"
                        if request.git_credentials
                        else "none were given: a private repository needs BinderHub's git_credentials"
                    )
                )
            if result.returncode != 0:
                raise BuildFailed(f"repo2docker failed with exit code {result.returncode}")

            # export -------------------------------------------------------------
            converter = self._converter()
            with step("export"):
                config = self.podman.inspect(image)
                self.limits.check_image(config.size)
                archive = None
                if "oci-archive" in self.registry.formats or converter.needs_oci_archive:
                    archive = self.registry.tempfile(image, "oci-archive")
                    temps.append(archive)
                    log("Exporting OCI archive...\n")
                    self.podman.save_oci_archive(image, archive)

            fault_point("export")

            # convert ------------------------------------------------------------
            sif = self.registry.tempfile(image, "sif")
            temps.append(sif)
            log(f"Converting to SIF ({converter.name})...\n")
            converter.timeout = remaining()
            with step("convert"):
                info = converter.convert(
                    ConversionSource(image, config, self.podman, archive),
                    sif,
                    on_log=lambda line: self.log.debug("convert: %s", line.rstrip()),
                    stop_event=stop_event,
                )

            # publish ------------------------------------------------------------
            files = {"sif": sif}
            if "oci-archive" in self.registry.formats and archive is not None:
                files["oci-archive"] = archive
            for fmt, path in files.items():
                # a tool may exit 0 over a short write (NFS reports some late)
                if not self.registry.complete(os.fspath(path), fmt):
                    raise BuildFailed(f"the {fmt} file of {image} is incomplete: not published")
            self.limits.check_published(sum(os.path.getsize(p) for p in files.values()))
            meta = {
                "repo_url": request.repo_url,
                "ref": request.ref,
                "resolved_ref": config.labels.get("repo2docker.ref", request.ref),
                "repo2docker_version": repo2docker_version(),
                "engine": self.repo2docker.engine,
                "image_size": config.size,
                "podman_image_id": config.id,
                "build_host": socket.gethostname(),
                "conversion": info,
                "env": config.env,
                "working_dir": config.working_dir,
                "user": config.user,
            }
            for watch in watches:
                meta.update(watch.figures())
            fault_point("publish")
            with step("publish"):
                meta["durations"] = dict(durations)
                path = self.registry.publish(image, files, meta)
            temps = [t for t in temps if t not in files.values()]
            meta = self.registry.metadata(image)
            outcome = "success"
            log(f"Built {image} ({meta.get('size', 0) / 1e6:.0f} MB SIF) in {sum(durations.values()):.1f} s\n")
            return BuildResult("success", image, str(path), meta)
        except BuildCancelled as e:
            outcome, error = "cancelled", str(e)
        except BuildTimeout as e:
            outcome, error = "timeout", str(e)
        except (DiskFullError, RegistryFull, BuildLimitExceeded) as e:
            error = str(e)
        except BuildFailed as e:
            # its message may quote the repository's URL: escaped in the log
            error = str(e)
            self.log.warning("Build of %s failed: %r", image, error)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            self.log.exception("Build of %s failed", image)
            error = f"{e.__class__.__name__}: {e}"
        finally:
            self.registry.discard(*temps)
            metrics.BUILDS.labels(outcome=outcome).inc()
            if podman_image_made and self.remove_podman_image:
                fault_point("cleanup")
                self.podman.remove(image)
        log(f"Build failed: {error}\n", "failed")
        return BuildResult(outcome, image, error=error, metadata={"durations": durations})


class _Step:
    """Time a step into metrics.BUILD_STEP_SECONDS and `durations`."""

    def __init__(self, name, durations):
        self.name = name
        self.durations = durations

    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        seconds = time.monotonic() - self.start
        self.durations[self.name] = round(seconds, 3)
        metrics.BUILD_STEP_SECONDS.labels(step=self.name).observe(seconds)
