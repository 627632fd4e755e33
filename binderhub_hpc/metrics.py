"""Every Prometheus metric of binderhub-hpc, in one place.

Build-side metrics are registered in the process that loads our BinderHub
classes and appear on BinderHub's ``/metrics``; launch-side metrics are
registered in the hub and appear on JupyterHub's ``/hub/metrics``. Both use
the default registry, which is what those endpoints serve.
"""

from prometheus_client import Counter, Gauge, Histogram, Info

from . import __version__

_BUILD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
_LAUNCH_BUCKETS = (0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))
_CMD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))

# -- the software ---------------------------------------------------------------
INFO = Info("binderhub_hpc", "The binderhub-hpc version running in this process.")
INFO.info({"version": __version__})

# -- builds -------------------------------------------------------------------
BUILDS = Counter(
    "binderhub_hpc_builds_total",
    "Builds finished, by outcome (success, failure, cancelled, timeout, cached).",
    ["outcome"],
)
BUILD_STEP_SECONDS = Histogram(
    "binderhub_hpc_build_step_duration_seconds",
    "Wall time of each build step (repo2docker, export, convert, publish).",
    ["step"],
    buckets=_BUILD_BUCKETS,
)
BUILDS_RUNNING = Gauge("binderhub_hpc_builds_running", "Builds running in this process.")
BUILD_LOCK_WAITS = Counter(
    "binderhub_hpc_build_lock_waits_total",
    "Build requests that waited for another build of the same image.",
)

# -- registry -------------------------------------------------------------------
REGISTRY_LOOKUPS = Counter(
    "binderhub_hpc_registry_lookups_total",
    "Image lookups in the SIF registry, by result (hit, miss, invalid).",
    ["result"],
)
REGISTRY_IMAGES = Gauge("binderhub_hpc_registry_images", "Images in the SIF registry (at last scan).")
REGISTRY_BYTES = Gauge("binderhub_hpc_registry_bytes", "Bytes used by the SIF registry (at last scan).")
REGISTRY_EVICTIONS = Counter("binderhub_hpc_registry_evictions_total", "Images evicted from the SIF registry.")

# -- launches -------------------------------------------------------------------
LAUNCHES = Counter(
    "binderhub_hpc_launches_total",
    "Server launches by outcome (success, failure, cancelled) and scheduler.",
    ["outcome", "scheduler"],
)
LAUNCH_QUEUE_SECONDS = Histogram(
    "binderhub_hpc_launch_queue_seconds",
    "Time from job submission until the job runs.",
    ["scheduler", "partition"],
    buckets=_LAUNCH_BUCKETS,
)
LAUNCH_READY_SECONDS = Histogram(
    "binderhub_hpc_launch_ready_seconds",
    "Time from the job starting until the server reports its port.",
    ["scheduler"],
    buckets=_LAUNCH_BUCKETS,
)
JOBS = Gauge(
    "binderhub_hpc_jobs",
    "Binder jobs known to the hub by state (pending, running) and partition.",
    ["state", "partition"],
)
SCHEDULER_COMMAND_SECONDS = Histogram(
    "binderhub_hpc_scheduler_command_duration_seconds",
    "Latency of scheduler commands (sbatch, squeue, scancel, qsub, qstat, qdel).",
    ["command"],
    buckets=_CMD_BUCKETS,
)
SCHEDULER_COMMAND_ERRORS = Counter(
    "binderhub_hpc_scheduler_command_errors_total",
    "Scheduler commands that failed or timed out.",
    ["command"],
)
