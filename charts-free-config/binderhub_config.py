# BinderHub (upstream, unmodified) on an HPC cluster: no Kubernetes, builds
# into SIF files, launches through JupyterHub's batch spawner.
#
#   python3 -m binderhub --config=/etc/binderhub-hpc/binderhub_config.py
#
# run by systemd/binderhub.service as the non-root account `binderhub`
# (an external JupyterHub service), or started by JupyterHub itself as a
# managed service (see jupyterhub_config.py). Copy to /etc/binderhub-hpc/.
import os

here = os.path.dirname(os.path.abspath(__file__))
# the registry and build settings shared with JupyterHub
load_subconfig(os.path.join(here, "binderhub_hpc_config.py"))

# -- Builder and registry: ours ----------------------------------------------------
c.BinderHub.build_class = "binderhub_hpc.binderhub.SIFBuildExecutor"
c.BinderHub.registry_class = "binderhub_hpc.binderhub.SIFDockerRegistry"
# "image exists" = its SIF is published in the registry: skip the build
c.BinderHub.use_registry = True
# no Kubernetes: nothing to check for builder pods
c.BinderHub.builder_required = False
# Launch quotas counted in the batch queue (BinderHub's own counts pods):
# sessions pending or running, the whole BinderHub and per repository, with
# BinderHub's rules and messages; one scheduler query per interval at most
c.BinderHub.launch_quota_class = "binderhub_hpc.binderhub.SchedulerLaunchQuota"
c.SchedulerLaunchQuota.scheduler = "slurm"  # or "pbs"
# a job counts only if its quota tag verifies: keyed by a secret only the hub
# and BinderHub hold, $BINDERHUB_HPC_JOB_TAG_KEY from secrets.env (the same
# value for both; c.JobTags.key_env names another variable). Without it this
# file is refused.
c.SchedulerLaunchQuota.total_quota = 200
# per repository (repositories in BinderHub's spec_config may get per_repo_quota_higher)
c.BinderHub.per_repo_quota = 50
# image names are <prefix><slug>:<ref>; the prefix must contain a '/' (any
# word before it; nothing is pushed anywhere)
c.BinderHub.image_prefix = "binderhub-hpc/binder-"
# /health reports the registry, podman and the scheduler as well
c.BinderHub.health_handler_class = "binderhub_hpc.binderhub.SIFHealthHandler"
c.HealthChecks.scheduler = "slurm"  # 'pbs', or '' when BinderHub's host has no scheduler clients
c.HealthChecks.partition = "jupyter"  # the spawner's req_partition (PBS: req_queue)
c.HealthChecks.cache_seconds = 30

# -- where builds run ----------------------------------------------------------------
# LocalRunner: on this host (podman rootless as `binderhub`). A RUN step then
# runs beside BinderHub and the hub: prefer a build node (README: "What a
# site must do") with its egress firewall.
c.SIFBuildExecutor.runner_class = "binderhub_hpc.builder.runners.LocalRunner"
# a build node over SSH, as `binderhub` there (binderhub-hpc in
# /opt/binderhub-hpc, same registry mount):
# c.SIFBuildExecutor.runner_class = "binderhub_hpc.builder.runners.SSHRunner"
# c.SSHRunner.host = "binderhub@build01"
# c.SSHRunner.cli = ["/opt/binderhub-hpc/bin/binderhub-hpc"]
# c.SSHRunner.ssh = ["ssh", "-o", "BatchMode=yes", "-T", "-i", "/var/lib/binderhub/.ssh/id_ed25519",
#                    "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
# c.SSHRunner.remote_config = "/etc/binderhub-hpc/binderhub_hpc_config.py"
# or a batch job on a build partition (job files in <registry>/.build-jobs,
# or c.SlurmBatchRunner.job_dir on the shared filesystem):
# c.SIFBuildExecutor.runner_class = "binderhub_hpc.builder.runners.SlurmBatchRunner"
# c.SlurmBatchRunner.partition = "build"
# c.SlurmBatchRunner.cli = ["/opt/binderhub-hpc/bin/binderhub-hpc"]
# c.SlurmBatchRunner.extra_sbatch_args = ["--cpus-per-task=4", "--mem=8G", "--time=01:00:00"]
# c.SlurmBatchRunner.remote_config = "/etc/binderhub-hpc/binderhub_hpc_config.py"
c.SIFBuildExecutor.build_timeout = 3600
# concurrent builds in this process (BinderHub's build thread pool)
c.BinderHub.concurrent_build_limit = 4

# -- JupyterHub ------------------------------------------------------------------------
# The public URL users' browsers use for the hub (through nginx) ...
c.BinderHub.hub_url = os.environ.get("BINDERHUB_HPC_PUBLIC_URL", "https://binder.example.org/")
# ... and how BinderHub reaches it on this host (the proxy, without TLS)
c.BinderHub.hub_url_local = "http://127.0.0.1:8000/"
# The hub API token: JupyterHub sets JUPYTERHUB_API_TOKEN for a managed
# service; for the systemd unit it comes from the root-only env file
# /etc/binderhub-hpc/secrets.env (BINDERHUB_API_TOKEN=..., the value
# jupyterhub_config.py registers). Never put it in this file or on a command line.
c.BinderHub.hub_api_token = os.environ.get("JUPYTERHUB_API_TOKEN") or os.environ.get("BINDERHUB_API_TOKEN", "")

# Served by JupyterHub's proxy at /services/binder/ (JupyterHub sets
# JUPYTERHUB_SERVICE_PREFIX for a managed service)
c.BinderHub.base_url = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/binder/")
# BinderHub listens on every interface at this port: firewall it, nginx is
# the way in (the hub's service entry and nginx/binder.conf point here;
# binderhub-hpc.env may move it for both services)
c.BinderHub.port = int(os.environ.get("BINDERHUB_HPC_BINDER_PORT", "8585"))
# 'Launch' must not wait behind a long queue forever: the launcher gives up
# after this many seconds (queue wait included)
c.Launcher.launch_timeout = 900

# Anonymous Binder (default): BinderHub creates a temporary hub user per
# launch. Authenticated: users log in to the hub (PAM, their cluster account)
# and their sessions run under their own uid; set the same variable for
# JupyterHub (systemd/binderhub-hpc.env).
# anonymous sessions all run as the service account: count its jobs
c.SchedulerLaunchQuota.job_user = "binder"
if os.environ.get("BINDERHUB_HPC_AUTHENTICATED") == "1":
    c.BinderHub.auth_enabled = True
    # users run their own jobs: count every account's Binder jobs
    c.SchedulerLaunchQuota.job_user = ""
    # the login (OAuth with the hub) uses the same token; the other
    # JUPYTERHUB_* variables it needs are set in systemd/binderhub.service
    c.HubOAuth.api_token = c.BinderHub.hub_api_token
    # each launch starts a named server of the user's (named after the
    # repository), as the hub allows (allow_named_servers in
    # jupyterhub_config.py): without it BinderHub uses the user's default
    # server and a second launch fails ("already has a running server")
    c.Launcher.allow_named_servers = True
    # keep equal to the hub's c.JupyterHub.named_server_limit_per_user (0: none)
    c.Launcher.named_server_limit_per_user = 0

# -- standalone alternative ------------------------------------------------------------
# BinderHub needs no managed-service setup: any JupyterHub running our
# spawner works, given hub_url(_local) above and a token registered there
# for a service with the scopes listed in jupyterhub_config.py. Serve it
# at its own path (nginx/binder.conf) instead of /services/binder/:
# c.BinderHub.base_url = "/"

c.BinderHub.about_message = "Binder on the cluster: sessions run as batch jobs."

# -- local values last ------------------------------------------------------------------
# the same site-local overrides as jupyterhub_config.py reads
if os.environ.get("BINDERHUB_HPC_EXTRA_CONFIG"):
    load_subconfig(os.environ["BINDERHUB_HPC_EXTRA_CONFIG"])

# A misspelt or invalid binderhub-hpc setting stops BinderHub here, named.
from binderhub_hpc.config import check_config  # noqa: E402

check_config(c)
