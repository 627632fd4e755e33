# JupyterHub for Binder on an HPC cluster: sessions are batch jobs (Slurm or
# PBS) running the image from the SIF registry; BinderHub is a hub service.
#
#   jupyterhub -f /etc/binderhub-hpc/jupyterhub_config.py
#
# run by systemd/jupyterhub.service as the non-root account `jupyterhub`.
# Copy to /etc/binderhub-hpc/ and edit. Secrets come from the environment
# (/etc/binderhub-hpc/secrets.env, root-only): BINDERHUB_API_TOKEN, and
# BINDERHUB_HPC_JOB_TAG_KEY, the key of the quota tag each session job carries
# (c.JobTags.key_env names it; BinderHub needs the same value to count them).
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
# the registry (c.SIFRegistry.root), shared with BinderHub
load_subconfig(os.path.join(here, "binderhub_hpc_config.py"))

# Binder mode, the same variable as binderhub_config.py reads:
#   anonymous (default): temporary hub users, jobs run as one service account;
#   authenticated ("1"): users log in with their cluster account (PAM) and
#   their jobs run under their own uid.
authenticated = os.environ.get("BINDERHUB_HPC_AUTHENTICATED") == "1"
public_url = os.environ.get("BINDERHUB_HPC_PUBLIC_URL", "https://binder.example.org/")

# -- network -----------------------------------------------------------------------------
# The proxy (configurable-http-proxy, started by the hub) listens here; nginx
# terminates TLS in front of it (nginx/binder.conf).
c.JupyterHub.bind_url = "http://127.0.0.1:8000/"
# The hub's own API must be reachable from compute nodes: each session job
# reports its port to it. Listen on the cluster-internal interface ...
c.JupyterHub.hub_bind_url = "http://0.0.0.0:8081"
# ... and tell jobs the address compute nodes reach this host by
# (check it with `binderhub-hpc doctor`, which submits a job that calls it).
c.JupyterHub.hub_connect_ip = "10.0.0.5"
c.JupyterHub.db_url = "sqlite:////var/lib/jupyterhub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "/var/lib/jupyterhub/jupyterhub_cookie_secret"
# jobs outlive hub restarts: the hub reconnects to them
c.JupyterHub.cleanup_servers = False
# the Binder UI is the front page
c.JupyterHub.default_url = "/services/binder/"
# BinderHub's launcher expects the start request to return at once and
# follows the progress stream (where the queue position shows up)
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
# Prometheus: /hub/metrics (launch, queue and scheduler metrics of binderhub-hpc)
c.JupyterHub.authenticate_prometheus = True

# -- the spawner: sessions as batch jobs ---------------------------------------------
c.JupyterHub.spawner_class = "binderhub_hpc.spawner.SlurmBinderSpawner"
# PBS Pro / OpenPBS instead:
# c.JupyterHub.spawner_class = "binderhub_hpc.spawner.PBSBinderSpawner"
# Settings on BinderBatchMixin apply to either spawner.
spawner = c.BinderBatchMixin

spawner.req_partition = "jupyter"  # Slurm partition
spawner.req_queue = "jupyter"  # PBS queue
spawner.req_runtime = "04:00:00"
spawner.req_memory = "4G"
spawner.req_nprocs = "2"
# spawner.req_account = "binder"
# spawner.req_qos = "interactive"
# spawner.req_ngpus = "1"          # --gres=gpu:1 and apptainer --nv
# Site lines before the session starts (module loads, ...): see templates/
spawner.req_prologue = open(os.path.join(here, "templates", "prologue.sh")).read()
# The job script itself is binderhub_hpc.spawner.templates.SLURM_SCRIPT /
# PBS_SCRIPT; override only when req_* and the prologue are not enough:
# spawner.batch_script = open(os.path.join(here, "templates", "slurm-batch-script.j2")).read()

# The container runtime on compute nodes: 'apptainer' (or 'singularity')
# runs the SIF; 'podman' runs the OCI archive (add 'oci-archive' to
# c.SIFRegistry.formats then).
spawner.container_runtime = "apptainer"
# c.ApptainerRuntime.extra_args = ["--bind", "/scratch"]
# Python on compute nodes, outside the container (picks the port, reports
# it to the hub; standard library only). Not a virtualenv under /root.
spawner.host_python = "/usr/bin/python3"
# job output and working directory, private to the job account
spawner.job_dir = "/shared/binder/jobs/{username}"
# per-session scratch on the node, mounted at /tmp and removed at the end
spawner.scratch_root = ""  # $TMPDIR, else /tmp
# one squeue/qstat per interval for all sessions
spawner.queue_poll_interval = 2.0
c.Spawner.poll_interval = 30
# queue wait + container start; keep it below BinderHub's launch_timeout
c.Spawner.start_timeout = 900
c.Spawner.http_timeout = 120
spawner.cors_allow_origin = ""  # "*" to let other sites embed sessions

# user names reach job names, paths, logs and the scheduler's records: one
# with a control character or a line break (NUL, newline, U+2028 ...) is
# refused with a 400 when BinderHub or an admin creates it
c.Authenticator.username_pattern = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]+\Z"

if not authenticated:
    # -- anonymous Binder ----------------------------------------------------------
    # BinderHub creates a temporary hub user per launch; no login.
    c.JupyterHub.authenticator_class = "null"
    # Every job is submitted by (and runs as) this service account. The hub
    # runs as `jupyterhub` and submits through sudo (sudoers/binderhub-hpc),
    # so sessions running strangers' code cannot read the hub's state.
    spawner.job_user = "binder"
    spawner.exec_prefix = "sudo -E -u {username}"
    spawner.auth_enabled = False
else:
    # -- authenticated Binder ------------------------------------------------------
    # Users log in with their cluster account; jobs run under their own uid.
    # PAM as a non-root hub needs read access to /etc/shadow (group shadow)
    # or a PAM service that allows it; see JupyterHub's "Using sudo to run
    # JupyterHub without root privileges".
    c.JupyterHub.authenticator_class = "pam"
    c.PAMAuthenticator.allowed_groups = {"binder-users"}
    spawner.auth_enabled = True
    spawner.jobs_as_hub_user = True
    spawner.exec_prefix = "sudo -E -u {username}"
    spawner.cmd = ["jupyterhub-singleuser"]
    c.JupyterHub.allow_named_servers = True

# -- services: BinderHub and the idle culler ---------------------------------------------
binder_token = os.environ["BINDERHUB_API_TOKEN"]  # from secrets.env; never in this file
c.JupyterHub.services = [
    {
        "name": "binder",
        # an external service: systemd/binderhub.service runs it
        "url": "http://127.0.0.1:" + os.environ.get("BINDERHUB_HPC_BINDER_PORT", "8585"),
        "api_token": binder_token,
        "oauth_no_confirm": True,
        # or a managed service, started and stopped by the hub instead:
        # "command": [sys.executable, "-m", "binderhub",
        #             "--config=" + os.path.join(here, "binderhub_config.py")],
        # "environment": {"BINDERHUB_HPC_PUBLIC_URL": public_url,
        #                 "BINDERHUB_HPC_JOB_TAG_KEY": os.environ["BINDERHUB_HPC_JOB_TAG_KEY"]},
    },
    {
        # stop idle sessions (cancelling their jobs) and, in anonymous mode,
        # delete the temporary users BinderHub created
        "name": "idle-culler",
        "command": [
            sys.executable,
            "-m",
            "jupyterhub_idle_culler",
            # seconds without activity (binderhub-hpc.env may set it)
            "--timeout=" + os.environ.get("BINDERHUB_HPC_IDLE_TIMEOUT", "3600"),
            # with a value: jupyterhub-idle-culler >= 2 takes no bare flags
            # ("--remove-named-servers: expected one argument"), 1.x takes both
            "--remove-named-servers=True",
            *([] if authenticated else ["--cull-users=True"]),
        ],
    },
]
roles = [
    {
        # what BinderHub does: create (temporary) users, start and stop their
        # servers, follow progress, read their state
        "name": "binder",
        "services": ["binder"],
        "scopes": ["admin:users", "admin:servers", "access:servers", "read:users"],
    },
    {
        "name": "idle-culler",
        "services": ["idle-culler"],
        "scopes": [
            "list:users",
            "read:users:activity",
            "read:servers",
            "delete:servers",
            *([] if authenticated else ["admin:users"]),
        ],
    },
    {
        # Prometheus scrapes /hub/metrics with this service's token
        "name": "prometheus",
        "services": ["prometheus"],
        "scopes": ["read:metrics"],
    },
]
if authenticated:
    # logged-in users may use BinderHub (its OAuth login with the hub)
    roles.append({"name": "user", "scopes": ["self", "access:services!service=binder"]})
if os.environ.get("PROMETHEUS_API_TOKEN"):
    c.JupyterHub.services.append({"name": "prometheus", "api_token": os.environ["PROMETHEUS_API_TOKEN"]})
else:
    roles = [r for r in roles if r["name"] != "prometheus"]
c.JupyterHub.load_roles = roles

# -- local values last ------------------------------------------------------------------
# A file of site-local overrides named by $BINDERHUB_HPC_EXTRA_CONFIG (the dev
# cluster's demo and tests put their ports, paths and partitions there; most
# sites edit this file instead).
if os.environ.get("BINDERHUB_HPC_EXTRA_CONFIG"):
    load_subconfig(os.environ["BINDERHUB_HPC_EXTRA_CONFIG"])

# A misspelt or invalid binderhub-hpc setting stops the hub here, named.
from binderhub_hpc.config import check_config  # noqa: E402

check_config(c)
