"""JupyterHub spawners that run Binder images as batch jobs.

Built on batchspawner: its `req_*` traits and templated `batch_script` work as
its users know them. What we add is what Binder on a cluster needs:

- the image named in BinderHub's `user_options` is resolved to a file in the
  shared registry (refusing anything else) and run with a container runtime;
- anonymous Binder users, who have no Unix account, run as one service
  account (or, with `jobs_as_hub_user`, authenticated users as themselves);
- no secret is ever written into the job script or a command line;
- one scheduler query per interval for all spawners (`QueueReflector`),
  and progress messages that say where a pending job stands in the queue.
"""

import asyncio
import os
import pwd
import re
import shlex
import socket
import time
from secrets import token_hex as secrets_token

import batchspawner
from batchspawner import JobStatus
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from traitlets import Any, Bool, Enum, Float, Instance, List, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from .. import metrics
from ..proc import CommandError, run
from ..registry import InvalidImageName, SIFRegistry
from ..scheduler.jobs import GONE, PENDING, RUNNING, UNKNOWN, JobInfo, parse_memory, parse_walltime
from ..scheduler.pbs import TAG_VARIABLE, PBSQueue, qsub_v_problem
from ..scheduler.reflector import QueueReflector, shared_reflector
from ..scheduler.slurm import SlurmQueue
from ..scheduler.tags import JobTags, MissingTagKey
from . import api, templates
from .runtime import RUNTIMES, ContainerRuntime, make_runtime

# jobs report their port to the hub through our restricted handler, not
# batchspawner's (which sets any spawner attribute): registered while
# JupyterHub loads its configuration, as batchspawner registers its own
api.install()

#: user_options keys BinderHub sends; anything else is refused
BINDER_OPTIONS = (
    "image",
    "token",
    "repo_url",
    "binder_ref_url",
    "binder_launch_host",
    "binder_request",
    "binder_persistent_request",
    # sent by BinderHub since March 2026 (its mixin exports it as BINDER_CLIENT_IP)
    "binder_client_ip",
)
#: the largest user_options value accepted (the kernel refuses one
#: environment string over 128 KiB with E2BIG)
MAX_OPTION_BYTES = 64 * 1024
_USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_SHELL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


async def _same_host(a, b):
    """Whether host names `a` and `b` are one host: equal (ignoring case),
    or resolving to the same addresses (a node's short name and its fully
    qualified one). A name that does not resolve is no host."""
    if a.lower() == b.lower():
        return True
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.gather(*(loop.getaddrinfo(h, None, type=socket.SOCK_STREAM) for h in (a, b)))
    except OSError:
        return False
    first, second = ({i[4][0] for i in found} for found in infos)
    return bool(first) and first == second


async def _server_listening(ip, port, timeout=3):
    """True if something listens at ip:port, False if the host refuses the
    connection, None if it cannot be reached (no route, no answer)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except ConnectionRefusedError:
        return False
    except (OSError, asyncio.TimeoutError):
        return None
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class BinderBatchMixin(Configurable):
    """Binder behaviour for a batchspawner spawner (see module docstring)."""

    # -- the image ------------------------------------------------------------

    registry = Instance(SIFRegistry, help="The SIF registry images are resolved in.")

    @default("registry")
    def _default_registry(self):
        return SIFRegistry(parent=self)

    container_runtime = Enum(
        ["", *RUNTIMES],
        "",
        help="""Container runtime on compute nodes: 'apptainer', 'singularity'
        or 'podman'. Empty: apptainer if found on the hub host, else podman.""",
    ).tag(config=True)

    runtime = Instance(ContainerRuntime, help="The runtime object (built from `container_runtime`).")

    @default("runtime")
    def _default_runtime(self):
        return make_runtime(self.container_runtime or None, parent=self)

    # -- Binder modes -------------------------------------------------------------

    auth_enabled = Bool(
        False,
        help="""Authenticated Binder: run `jupyterhub-singleuser` (hub login)
        instead of a token-protected `jupyter` server for anonymous users.""",
    ).tag(config=True)

    cors_allow_origin = Unicode("", help="Access-Control-Allow-Origin for the spawned servers ('*' for any).").tag(
        config=True
    )

    noauth_cmd = List(
        Unicode(),
        ["jupyter", "notebook"],
        help="""Server command for anonymous Binder sessions, as BinderHub
        runs it. Port and token reach it through JUPYTER_PORT and
        JUPYTER_TOKEN, never the command line.""",
    ).tag(config=True)

    # -- accounts and places ---------------------------------------------------

    job_user = Unicode(
        "",
        help="""Account that submits (and so runs) jobs for anonymous Binder
        users. Empty: the account the hub runs as.""",
    ).tag(config=True)

    jobs_as_hub_user = Bool(
        False,
        help="""Authenticated mode: submit each user's jobs as their own Unix
        account (the hub user's name), through `exec_prefix` (sudo).""",
    ).tag(config=True)

    job_dir = Unicode(
        "/var/lib/binderhub-hpc/jobs",
        help="""Directory for job output files and the job's working
        directory; writable by the job account only. `{username}` is
        replaced by the job account.""",
    ).tag(config=True)

    account_home_mount = Unicode(
        "",
        help="""Authenticated mode (`jobs_as_hub_user`): where in the session
        the user's own home (the job account's, from the compute node's
        passwd) is mounted, writable, e.g. '/home/{username}' (`{username}`:
        the account). The session still starts in the repository
        (/home/jovyan); `BINDER_ACCOUNT_HOME_MOUNT` tells it where the home
        is. Empty (the default): not mounted. Apptainer only. Refused for
        anonymous sessions, which share the service account.""",
    ).tag(config=True)

    scratch_root = Unicode(
        "",
        help="""Parent of the per-session scratch directory on the compute
        node (mounted at /tmp in the container, removed when the job ends).
        Empty: $TMPDIR, else /tmp.""",
    ).tag(config=True)

    host_python = Unicode(
        "python3",
        help="""Python on compute nodes (host side, outside the container)
        used to pick the port and report it to the hub. Standard library only.""",
    ).tag(config=True)

    # -- the scheduler -------------------------------------------------------------

    queue_poll_interval = Float(
        2.0,
        help="""Seconds between scheduler queries, shared by all spawners
        (one `squeue`/`qstat` per interval, whatever the number of jobs).""",
    ).tag(config=True)

    server_poll_interval = Float(
        0.05,
        help="""Seconds between checks that a newly started server answers
        HTTP, before the launch is handed back to the hub (0: leave it to the
        hub's own checks, which back off exponentially up to seconds).""",
    ).tag(config=True)

    scheduler_env = Any(None, help="Environment for scheduler queries (None: the hub's).").tag(config=True)

    job_tags = Instance(JobTags, help="Makes the quota tag each session job carries (configured as c.JobTags).")

    @default("job_tags")
    def _default_job_tags(self):
        return JobTags(parent=self)

    secrets_in_file = Bool(
        False,
        help="""Hand the session's tokens to the job in a file (mode 0600, in
        the job account's private `job_dir`, read and deleted by the job's
        first lines) instead of the submit command's environment. Needed
        where the scheduler shows a job's environment to other users: PBS
        prints `qsub -v` values in `qstat -f` (Variable_List). The file is
        written through `exec_prefix` with `install -m 600 /dev/null PATH`
        and `tee PATH` (allow both in sudoers besides the scheduler
        commands).""",
    ).tag(config=True)

    #: environment variables that carry secrets
    SECRET_ENV = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "JUPYTER_TOKEN")

    _job_info = None
    _submitted_at = None
    #: the quota tag of the current submission
    _job_tag = ""
    #: whether the job gets its tag as a variable too (PBS: BINDER_JOB_TAG)
    _tag_variable = False
    #: what a job script must use (templates.check_script)
    _required_script_vars = templates.REQUIRED_VARS
    #: the unit of a bare number in req_memory (Slurm: MB)
    _memory_unit = "m"
    _running_at = None
    _reported_node = ""

    # ---------------------------------------------------------------------------
    # batchspawner hooks

    @default("req_username")
    def _req_username_default(self):
        return self._job_account()

    @default("req_homedir")
    def _req_homedir_default(self):
        return self.job_dir.replace("{username}", self._job_account())

    @default("env_keep")
    def _default_env_keep(self):
        keep = ["PATH", "LANG", "LC_ALL", "SLURM_CONF", "PBS_CONF_FILE"]
        return keep

    def _job_account(self):
        if self.jobs_as_hub_user:
            name = self.user.name
        else:
            name = self.job_user or pwd.getpwuid(os.getuid()).pw_name
        if not _USERNAME_RE.fullmatch(name):
            raise web.HTTPError(400, f"{name!r} cannot be a Unix account name for a job.")
        return name

    def user_env(self, env):
        """USER/HOME of the job account; batchspawner's would look up the
        hub user, who for Binder has no Unix account."""
        account = self._job_account()
        env["USER"] = account
        try:
            pw = pwd.getpwnam(account)
        except KeyError:
            raise web.HTTPError(500, f"Job account {account!r} does not exist on the hub host.") from None
        # the account's own home, on the host side only: runtimes never mount it
        env["HOME"] = pw.pw_dir
        env["SHELL"] = pw.pw_shell or "/bin/bash"
        return env

    def plain_env(self):
        """Environment for scheduler commands other than submit (cancel):
        the hub's `env_keep` variables and the job account's USER/HOME, no
        token. Only the submit command carries secrets, because the
        scheduler copies its environment into the job; any other command
        run through `exec_prefix` as the shared job account would expose
        them to that account's processes for nothing."""
        env = {k: os.environ[k] for k in self.env_keep if k in os.environ}
        return self.user_env(env)

    def get_env(self):
        env = super().get_env()
        opts = self.user_options or {}
        if "repo_url" in opts:
            env["BINDER_REPO_URL"] = opts["repo_url"]
        for key in BINDER_OPTIONS:
            if key.startswith("binder_") and key in opts:
                env[key.upper()] = opts[key]
        if not self.auth_enabled and "token" in opts:
            env["JUPYTER_TOKEN"] = opts["token"]
        if self._home_mount():
            env["BINDER_ACCOUNT_HOME_MOUNT"] = self._home_mount()
        return env

    def _home_mount(self):
        """Where the account's home is mounted in the session ('': nowhere)."""
        if not self.account_home_mount:
            return ""
        if not self.jobs_as_hub_user:
            raise web.HTTPError(
                500,
                "c.BinderBatchMixin.account_home_mount is for authenticated sessions "
                "(jobs_as_hub_user): anonymous sessions share the service account's home.",
            )
        return self.account_home_mount.replace("{username}", self._job_account())

    def container_env_names(self):
        """Variables handed into the container (by name, values from the job env)."""
        names = [n for n in self.get_env() if n.startswith(("JUPYTERHUB_", "JUPYTER_", "BINDER_"))]
        names += ["JUPYTER_PORT", "JUPYTER_PORT_RETRIES", "JUPYTER_RUNTIME_DIR"]
        return sorted(set(names) - {"JPY_API_TOKEN"})

    def server_argv(self):
        if self.auth_enabled:
            return list(self.cmd) + self.get_args()
        args = [
            "--ip=0.0.0.0",
            f"--NotebookApp.base_url={self.server.base_url}",
            "--NotebookApp.trust_xheaders=True",
            "--NotebookApp.open_browser=False",
        ]
        if self.default_url:
            args.append(f"--NotebookApp.default_url={self.default_url}")
        if self.cors_allow_origin:
            args.append("--NotebookApp.allow_origin=" + self.cors_allow_origin)
        if self.cors_allow_origin == "*":
            args.append("--NotebookApp.allow_origin_pat=.*")
        args += list(self.args)
        args += [a.replace("--NotebookApp.", "--ServerApp.") for a in args if a.startswith("--NotebookApp.")]
        return list(self.noauth_cmd) + args

    def cmd_formatted_for_batch(self):
        """The container command line that the job script runs."""
        try:
            return self.runtime.shell_command(
                self._image_path,
                self.server_argv(),
                self.container_env_names(),
                gpus=self._wants_gpus(),
                home_mount=self._home_mount(),
            )
        except ValueError as e:
            raise web.HTTPError(500, str(e)) from None

    def _wants_gpus(self):
        return bool(getattr(self, "req_ngpus", "") not in ("", "0"))

    def job_name(self):
        return self.job_name_for(self.user.name)

    @staticmethod
    def job_name_for(user_name):
        """The job name of a hub user's session: `binder-<name>`, in the
        characters every scheduler takes (PBS: a letter, then letters,
        digits and `._-`), at most 64 of them."""
        return re.sub(r"[^A-Za-z0-9_.-]", "-", f"binder-{user_name}")[:64]

    def template_vars(self):
        """What the job script template sees: req_* traits (admin config)
        and our own pieces, never raw user_options."""
        subvars = self.get_req_subvars()
        subvars["job_name"] = self.job_name()
        subvars["job_tag"] = self._job_tag or self._new_job_tag()
        subvars["cmd"] = self.cmd_formatted_for_batch()
        if self.secrets_in_file:
            in_file = self.file_env_names(self.get_env())
            keep = [n for n in subvars["keepvars"].split(",") if n and n not in self.SECRET_ENV and n not in in_file]
            subvars["keepvars"] = ",".join(keep)
        subvars["binder_setup"] = templates.render_setup(
            host_python=shlex.quote(self.host_python),
            scratch_root=self.scratch_root,
            env_exports="\n".join(self.runtime.env_exports(self.container_env_names())),
            remove=self.runtime.remove_command(),
            stop=self.runtime.stop_command(),
            secrets_file=shlex.quote(self._secrets_path()) if self.secrets_in_file else "",
            prepare="\n".join(self._account_home_lines() + self.runtime.prepare(self._image_path)),
            limits=self.session_limits(),
        )
        return subvars

    def _account_home_lines(self):
        """Script lines that find the account's home on the node (for
        `account_home_mount`)."""
        if not self._home_mount():
            return []
        return [
            'BINDER_ACCOUNT_HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"',
            '[ -n "$BINDER_ACCOUNT_HOME" ] && [ -d "$BINDER_ACCOUNT_HOME" ] || '
            '{ echo "binderhub-hpc: the account\'s home is missing on $(hostname)" >&2; exit 1; }',
        ]

    def session_limits(self):
        """(name, value) of the limits the session sees: MEM_LIMIT (bytes)
        and CPU_LIMIT as mybinder sets them (jupyter-resource-usage shows
        them), and the walltime, from which the job computes
        BINDER_JOB_END_TIME. Only numbers, so they are safe in the script."""
        limits = []
        mem = parse_memory(getattr(self, "req_memory", ""), self._memory_unit)
        if mem:
            limits.append(("MEM_LIMIT", mem))
        cpus = str(getattr(self, "req_nprocs", "") or "")
        if cpus.isdigit() and int(cpus) > 0:
            limits.append(("CPU_LIMIT", int(cpus)))
        walltime = parse_walltime(getattr(self, "req_runtime", ""))
        if walltime:
            limits.append(("BINDER_WALLTIME_SECONDS", walltime))
        return limits

    def _new_job_tag(self):
        """A fresh quota tag for this session's image and job account."""
        if not getattr(self, "image", ""):
            return ""
        try:
            return self.job_tags.new_tag(self.image, self._job_account())
        except MissingTagKey as e:
            raise web.HTTPError(500, f"Session jobs cannot be tagged for the launch quotas: {e}") from None

    def _secrets_path(self):
        if getattr(self, "_secrets_file", None) is None:
            self._secrets_file = os.path.join(self.req_homedir, f".binder-secrets.{secrets_token()}")
        return self._secrets_file

    def file_env_names(self, env):
        """The names in `env` whose values reach the job in the private file
        (with `secrets_in_file`) instead of the submit command: the tokens."""
        return {n for n in self.SECRET_ENV if n in env}

    def _secrets_text(self, env):
        """The private file: `NAME='value'` lines the job script sources,
        every value shell-quoted, so any text (quotes, backslashes,
        newlines, trailing blanks, non-ASCII) arrives as it was."""
        lines = []
        for n in sorted(self.file_env_names(env)):
            if not _SHELL_NAME_RE.fullmatch(n):
                raise web.HTTPError(500, f"The environment variable name {n!r} cannot be handed to a job.")
            lines.append(f"{n}={shlex.quote(env[n])}\n")
        return "".join(lines)

    async def _write_secrets(self, subvars, env):
        """Write the tokens where only the job account can read them."""
        prefix, _ = self._command_argv("", subvars)
        path = self._secrets_path()
        # create it private first, then fill it from stdin (tee keeps the
        # mode; /dev/stdin cannot be reopened across the account switch)
        await run(prefix + ["install", "-m", "600", "/dev/null", path], env=self.plain_env(), label="install")
        await run(prefix + ["tee", path], input=self._secrets_text(env), env=self.plain_env(), label="tee")

    async def _remove_secrets(self, subvars):
        prefix, _ = self._command_argv("", subvars)
        try:
            await run(prefix + ["rm", "-f", "--", self._secrets_path()], env=self.plain_env(), label="rm")
        except CommandError as e:
            self.log.warning("Could not remove %s: %s", self._secrets_path(), e)

    def _command_argv(self, template, subvars):
        """exec_prefix + a scheduler command as an argv (no shell)."""
        prefix = self.exec_prefix.replace("{username}", shlex.quote(subvars["username"]))
        return shlex.split(prefix), shlex.split(template.format(**subvars))

    async def submit_batch_script(self):
        """Submit the rendered script on stdin; the secrets go in the
        environment of the submit command, which the scheduler copies to the
        job (names only in `--export`)."""
        self._secrets_file = None
        self._reported = False
        self._reported_node = ""
        self._running_at = None
        self._submitted_at = None
        self._port_reported().clear()
        self._job_tag = ""
        self._job_tag = self._new_job_tag()
        subvars = self.template_vars()
        script = await self._get_batch_script(**subvars)
        prefix, cmd = self._command_argv(self.batch_submit_cmd, subvars)
        argv = prefix + cmd
        env = self.get_env()
        if self._tag_variable and self._job_tag:
            env[TAG_VARIABLE] = self._job_tag
        submit_env = env
        if self.secrets_in_file:
            in_file = self.file_env_names(env)
            submit_env = {k: v for k, v in env.items() if k not in self.SECRET_ENV and k not in in_file}
        self.check_submit_env(submit_env, subvars)
        if self.secrets_in_file:
            await self._write_secrets(subvars, env)
        env = submit_env
        self.log.info("Submitting Binder job for %s: %s", self.user.name, shlex.join(argv))
        self.log.debug("Job script:\n%s", script)
        try:
            out = await run(argv, input=script, env=env, label=os.path.basename(cmd[0]))
            self.job_id = self.parse_job_id(out.strip())
        except BaseException:
            if self.secrets_in_file:
                await self._remove_secrets(subvars)
            raise
        self._submitted_at = time.monotonic()
        self._submitted_wall = time.time()
        return self.job_id

    def check_submit_env(self, env, subvars):
        """Refuse, before the submit command runs, a value it would not hand
        to the job as it is (nothing to refuse for Slurm's --export)."""

    async def _get_batch_script(self, **subvars):
        return templates.render_script(self.batch_script, subvars)

    def template_names(self):
        """Every name a job script template may use."""
        return {t[4:] for t in self.trait_names() if t.startswith("req_")} | set(templates.SPAWNER_VARS)

    @validate("batch_script")
    def _validate_batch_script(self, proposal):
        problem = templates.check_script(proposal.value, self.template_names(), self._required_script_vars)
        if problem:
            raise TraitError(f"c.{type(self).__name__}.batch_script {problem}.")
        return proposal.value

    # -- queue state through the shared reflector ------------------------------

    def _scheduler(self):
        raise NotImplementedError

    def _reflector(self):
        """The hub's reflector for this spawner's scheduler query (shared by
        every spawner configured alike)."""
        if getattr(self, "_scheduler_obj", None) is None:
            self._scheduler_obj = self._scheduler()
        scheduler = self._scheduler_obj

        def factory():
            return QueueReflector(scheduler, env=self.scheduler_env, interval=self.queue_poll_interval, parent=self)

        key = (type(self).__name__, self.queue_poll_interval, tuple(scheduler.argv()))
        return shared_reflector(key, factory)

    async def query_job_status(self):
        if not self.job_id:
            self.job_status = ""
            return JobStatus.NOTFOUND
        newer = self._submitted_at if self._submitted_at and self._job_info is None else None
        info = self._trusted(await self._reflector().job(self.job_id, newer_than=newer))
        self._observe_transition(self._job_info, info)
        changed = self._job_info is None or self._job_info.describe() != info.describe()
        self._job_info = info
        if changed:
            self._progress_changed().set()
        self.job_status = f"{info.raw_state or info.state} {info.node}".strip()
        return {
            RUNNING: JobStatus.RUNNING,
            PENDING: JobStatus.PENDING,
            UNKNOWN: JobStatus.UNKNOWN,
        }.get(info.state, JobStatus.NOTFOUND)

    def _trusted(self, info):
        """`info` if it is a record of our job account's, else UNKNOWN: a
        record of our job id that another account's job stands behind (a
        forgery, or an id reused after a restart of the controller) is
        never our job, and never its end."""
        listed = bool(info.raw_state or info.user or info.name)  # a record, not "not in the queue"
        if info.state != UNKNOWN and listed and info.user != self._job_account():
            self.log.warning(
                "Queue record of job %s belongs to %r, not the job account: not trusted", self.job_id, info.user
            )
            return JobInfo(info.job_id, UNKNOWN, reason="its queue record is not the job account's")
        return info

    def _observe_transition(self, old, new):
        if new.state == RUNNING and (old is None or old.state != RUNNING):
            self._observe_running(new.partition)

    def _observe_running(self, partition):
        """The job runs (seen in the queue or reported by the job): once per launch."""
        if self._running_at is None and self._submitted_at:
            self._running_at = time.monotonic()
            metrics.LAUNCH_QUEUE_SECONDS.labels(self._scheduler_name, partition or "default").observe(
                self._running_at - self._submitted_at
            )

    def state_ispending(self):
        return bool(self._job_info and self._job_info.state == PENDING)

    def state_isrunning(self):
        return bool(self._job_info and self._job_info.state == RUNNING)

    def state_isunknown(self):
        return bool(self._job_info and self._job_info.state == UNKNOWN)

    def state_gethost(self):
        return self._job_info.node if self._job_info else ""

    async def cancel_batch_job(self):
        subvars = self.get_req_subvars()
        subvars["job_id"] = self.job_id
        prefix, cmd = self._command_argv(self.batch_cancel_cmd, subvars)
        argv = prefix + cmd
        self.log.info("Cancelling job %s: %s", self.job_id, shlex.join(argv))
        try:
            await run(argv, env=self.plain_env(), label=os.path.basename(cmd[0]))
        except CommandError as e:
            # already gone is what we wanted
            self.log.warning("Cancel of job %s: %s", self.job_id, e)
        if self.secrets_in_file and getattr(self, "_secrets_file", None):
            # a job cancelled before it started never read (and deleted) it
            await self._remove_secrets(subvars)

    # -- start / progress ---------------------------------------------------------

    def validate_user_options(self):
        opts = dict(self.user_options or {})
        unknown = sorted(set(opts) - set(BINDER_OPTIONS))
        if unknown:
            raise web.HTTPError(400, f"Unknown launch options: {', '.join(map(repr, unknown))[:200]}")
        for k, v in opts.items():
            if not isinstance(v, str):
                raise web.HTTPError(400, f"Launch option {k!r} must be a string.")
            # values travel in the job's environment: no NUL, valid UTF-8,
            # and well below the kernel's 128 KiB limit for one variable
            if "\0" in v:
                raise web.HTTPError(400, f"Launch option {k!r} contains a NUL character.")
            try:
                size = len(v.encode("utf-8"))
            except UnicodeEncodeError:
                raise web.HTTPError(400, f"Launch option {k!r} is not valid text (a lone surrogate).") from None
            if size > MAX_OPTION_BYTES:
                raise web.HTTPError(400, f"Launch option {k!r} is longer than {MAX_OPTION_BYTES // 1024} KiB.")
        if not self.auth_enabled and not opts.get("token"):
            raise web.HTTPError(400, "A Binder launch needs a token.")
        if "image" not in opts:
            raise web.HTTPError(400, "A Binder launch needs an image.")
        return opts

    def resolve_image(self, image):
        """The image compute nodes will run, or a clear HTTP 400/404."""
        fmt = self.runtime.image_format
        try:
            # one header read tells a whole SIF and where its root starts
            session_image = self.registry.entry(image).session_image(fmt)
        except InvalidImageName as e:
            metrics.REGISTRY_LOOKUPS.labels("invalid").inc()
            raise web.HTTPError(400, f"Invalid image name: {e}") from None
        if session_image is None:
            metrics.REGISTRY_LOOKUPS.labels("miss").inc()
            raise web.HTTPError(
                404, f"Image {image[:200]!r} is not in the registry ({fmt}); it may still be building or was removed."
            )
        metrics.REGISTRY_LOOKUPS.labels("hit").inc()
        # the use is recorded by BinderHub's lookup (the hub's account may
        # not write the registry)
        return session_image

    #: what no user name that reaches a job, a path or a log may hold
    _CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

    async def start(self):
        if self._CONTROL_RE.search(self.user.name):
            # the hub's username_pattern refuses these at creation; a hub
            # configured without it still never submits such a job
            raise RuntimeError(f"The user name {self.user.name[:100]!r} has control characters: no session for it.")
        opts = self.validate_user_options()
        self._job_info = None
        self._image_path = self.resolve_image(opts["image"])
        self.image = opts["image"]
        try:
            ip_port = await self._start_job()
        except BaseException as e:
            outcome = "cancelled" if isinstance(e, asyncio.CancelledError) else "failure"
            metrics.LAUNCHES.labels(outcome, self._scheduler_name).inc()
            raise
        if getattr(self, "_running_at", None):
            metrics.LAUNCH_READY_SECONDS.labels(self._scheduler_name).observe(time.monotonic() - self._running_at)
        metrics.LAUNCHES.labels("success", self._scheduler_name).inc()
        return ip_port

    async def _start_job(self):
        """Submit, then wait for the job's own report of its port (and node).

        batchspawner polls the queue until the job runs and then waits for
        the port; a job that reports its port is running, so the report ends
        the wait at once, whenever the shared queue query comes. The queue
        is still asked (through the shared reflector) for what the user
        sees while the job waits, and to notice a job that dies.
        """
        self.ip = self.traits()["ip"].default_value
        self.port = 0
        if self.server:
            self.server.port = self.port
        await self.submit_batch_script()
        if not self.job_id:
            raise RuntimeError("The job was not submitted: the scheduler gave no job id.")
        reported = self._port_reported()
        while not self.port:
            query = asyncio.ensure_future(self.query_job_status())
            report = asyncio.ensure_future(reported.wait())
            # a shared queue query may be a whole interval away: the report
            # wins (the query goes on for everyone else who waits for it)
            await asyncio.wait({query, report}, return_when=asyncio.FIRST_COMPLETED)
            report.cancel()
            if self.port:
                break
            if query.result() == JobStatus.NOTFOUND:
                self.log.warning("Job %s neither pending nor running: %s", self.job_id, self.job_status)
                self.clear_state()
                raise RuntimeError(
                    "The session's batch job has disappeared while pending in the queue "
                    "or died immediately after starting."
                )
            try:
                await asyncio.wait_for(reported.wait(), timeout=self.startup_poll_interval)
            except asyncio.TimeoutError:
                pass
        self.ip = await self._agreed_node() or self.ip
        self._observe_running(self._job_info.partition if self._job_info else "")
        self._progress_changed().set()
        await self._wait_for_server()
        self.log.info("Binder job %s started at %s:%s", self.job_id, self.ip, self.port)
        return self.ip, self.port

    async def _agreed_node(self):
        """The node the hub connects to: where the queue says our job runs,
        under the name the job reported when the two agree.

        Whoever holds the server's token can report, and the hub then
        connects to and routes the user to the reported address; the queue
        is the scheduler's word on where the job runs. So the report is
        taken only when both name the same host, else the job is cancelled
        and the launch fails, saying why. A job runs on one node all its
        life, so any snapshot that shows it running will do; otherwise a
        fresh one is awaited, which costs nothing a user sees: the container
        is still starting meanwhile.
        """
        reflector = self._reflector()
        info = self._trusted(reflector.jobs.get(self.job_id) or JobInfo(self.job_id, PENDING))
        while not (info.state == RUNNING and info.node):
            if info.state == GONE:
                self.clear_state()
                raise RuntimeError("The session's batch job ended as soon as it started.")
            info = self._trusted(await reflector.job(self.job_id, newer_than=time.monotonic()))
            if not (info.state == RUNNING and info.node) and info.state != GONE:
                await asyncio.sleep(self.startup_poll_interval)
        self._job_info = info
        reported = self._reported_node
        if not reported or await _same_host(reported, info.node):
            return reported or info.node
        self.log.warning(
            "Job %s reported node %r, but the queue runs it on %r: launch refused", self.job_id, reported, info.node
        )
        await self.cancel_batch_job()
        raise RuntimeError(
            f"The session's job reported that it runs on {reported!r}, but the scheduler runs it on "
            f"{info.node!r}: the launch is refused."
        )

    async def _wait_for_server(self):
        """Return once the server answers HTTP at its address, or gave up.

        JupyterHub checks a new server with exponential backoff (0.2, 0.4,
        0.8, 1.6 s ...), so a server that is up after 1.5 s is seen after
        3 s. Asked every `server_poll_interval` here, it is seen when it is
        up; the hub's own first check then passes at once. Giving up (the
        job ended, or `http_timeout`) returns too: the hub's check then
        reports the failure as it always does.
        """
        if not self.server_poll_interval:
            return
        url = f"http://{self.ip}:{self.port}{self.server.base_url if self.server else '/'}api"
        client = AsyncHTTPClient()
        deadline = time.monotonic() + self.http_timeout
        while time.monotonic() < deadline:
            try:
                await client.fetch(url, request_timeout=2, connect_timeout=1, raise_error=False, follow_redirects=False)
                return  # any HTTP answer: the server is up
            except (OSError, HTTPClientError):
                pass
            info = self._job_info
            if info is not None and info.state == GONE:
                return
            await asyncio.sleep(self.server_poll_interval)

    async def poll(self):
        """batchspawner's poll (the job, through the shared queue query),
        plus: is the server still there? A node whose slurmd died with its
        sessions stays RUNNING in the queue until the scheduler times the
        node out (minutes); its server refuses connections at once. So a
        refused connection ends the session now, and a node that cannot be
        reached at all ends it at the second poll in a row."""
        status = await super().poll()
        if status is not None or not (self.state_isrunning() and self.ip and self.port):
            self._unreachable = 0
            return status
        alive = await _server_listening(self.ip, self.port)
        if alive is None:
            self._unreachable = getattr(self, "_unreachable", 0) + 1
        else:
            self._unreachable = 0
        if alive is False or self._unreachable >= 2:
            why = "refuses connections" if alive is False else "cannot be reached"
            self.log.warning("Server of job %s at %s:%s %s: the session ended", self.job_id, self.ip, self.port, why)
            await self.cancel_batch_job()
            self.clear_state()
            return 1
        return None

    def _port_reported(self):
        """Set when the job reports its port (see accept_job_report)."""
        if getattr(self, "_report_event", None) is None:
            self._report_event = asyncio.Event()
        return self._report_event

    #: a Slurm/PBS node or host name as a job may report it
    _NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")

    def accept_job_report(self, data):
        """What the job reports to ``POST /hub/api/batchspawner``: its port
        and node, once per launch, while the spawn is pending. The job
        script reports before it starts the container, so a session
        cannot report in its place (see ``binderhub_hpc.spawner.api``).
        On a busy hub the report can come before the submit command's
        output has been read: the launch is pending from the moment the
        script is submitted, job id or not."""
        if self.port or getattr(self, "_reported", True):
            raise web.HTTPError(409, "This session's job has reported already.")
        unknown = sorted(set(data) - {"port", "node"})
        port, node = data.get("port"), data.get("node", "")
        if unknown:
            raise web.HTTPError(
                400, f"A job reports only its port and node, not {', '.join(map(repr, unknown))[:100]}."
            )
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise web.HTTPError(400, "The port must be a number from 1 to 65535.")
        if not isinstance(node, str) or (node and not self._NODE_RE.fullmatch(node)):
            raise web.HTTPError(400, "The node must be a host name.")
        self._reported = True
        self._reported_node = node
        self.port = port
        # the job runs: say so now, not at the next queue query
        old = self._job_info
        self._job_info = JobInfo(
            self.job_id,
            RUNNING,
            raw_state="RUNNING",
            node=node or (old.node if old else ""),
            partition=old.partition if old else "",
        )
        self._observe_transition(old, self._job_info)
        self._port_reported().set()
        self._progress_changed().set()

    async def progress(self):
        """Queue-aware progress: reason, position, expected start, node."""
        last = None
        percent = 10
        while True:
            info = self._job_info
            if info is not None:
                msg = info.describe()
                if info.state == RUNNING:
                    msg = f"Job {info.job_id} is running on {info.node}; starting the server."
                    percent = 60
                if msg != last:
                    yield {"progress": percent, "message": msg}
                    last = msg
                if info.state == GONE or (info.state == RUNNING and self.port):
                    return
            elif self.job_id and last is None:
                yield {"progress": 5, "message": f"Submitted job {self.job_id}."}
                last = ""
            changed = self._progress_changed()
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), timeout=self.queue_poll_interval)
            except asyncio.TimeoutError:
                pass

    def _progress_changed(self):
        """Set when the job's description changes, so progress() says so at once."""
        if getattr(self, "_progress_event", None) is None:
            self._progress_event = asyncio.Event()
        return self._progress_event

    def get_state(self):
        state = super().get_state()
        if getattr(self, "image", None):
            state["image"] = self.image
        if getattr(self, "_secrets_file", None):
            state["secrets_file"] = self._secrets_file
        return state

    def load_state(self, state):
        super().load_state(state)
        self.image = state.get("image", "")
        self._secrets_file = state.get("secrets_file") or None


class SlurmBinderSpawner(BinderBatchMixin, batchspawner.SlurmSpawner):
    """Binder images as Slurm jobs."""

    _scheduler_name = "slurm"
    _required_script_vars = (*templates.REQUIRED_VARS, "job_tag")

    batch_script = Unicode(templates.SLURM_SCRIPT, help="Template (Jinja2) of the job script.").tag(config=True)
    batch_submit_cmd = Unicode("sbatch --parsable", help="Submit command; the script is on its stdin.").tag(config=True)
    batch_cancel_cmd = Unicode("scancel {job_id}", help="Cancel command.").tag(config=True)
    exec_prefix = Unicode(
        "",
        help="""Prefix for scheduler commands, e.g. 'sudo -E -u {username}'
        when the hub submits as another account. Empty: submit as the hub's
        own account.""",
    ).tag(config=True)
    req_srun = Unicode("", help="Prefix for the container command inside the job (e.g. 'srun').").tag(config=True)

    def _scheduler(self):
        return SlurmQueue(parent=self)


class PBSBinderSpawner(BinderBatchMixin, batchspawner.UserEnvMixin, batchspawner.PBSSpawner):
    """Binder images as PBS Pro / OpenPBS jobs."""

    _scheduler_name = "pbs"
    _memory_unit = ""
    # qstat has no comment a job's owner sets: the tag is a variable of the
    # job (qsub -v BINDER_JOB_TAG, shown in Variable_List)
    _tag_variable = True
    _required_script_vars = (*templates.REQUIRED_VARS, "keepvars")

    batch_script = Unicode(templates.PBS_SCRIPT, help="Template (Jinja2) of the job script.").tag(config=True)
    batch_submit_cmd = Unicode(
        "qsub -f",
        help="""Submit command; the script is on its stdin. `-f`: in the
        foreground. Without it qsub hands the job to a background qsub of the
        account that lives for a minute after its last job; a submission as
        it quits fails with "Failed to recv data from background qsub",
        having perhaps submitted the job (seen with OpenPBS 23.06.06).""",
    ).tag(config=True)
    secrets_in_file = Bool(
        True,
        help="""The job's environment reaches it in a private file (mode 0600 in
        the job account's `job_dir`, sourced and deleted by the job's first
        lines): the tokens, every value derived from the user (BINDER_*,
        JUPYTERHUB_* with user names and URLs) and any value `qsub -v` would
        change. `qsub -v` puts values in the job's Variable_List, which
        `qstat -f` shows to other users, and cannot carry quotes,
        backslashes or trailing white space (JupyterHub's JSON scope lists
        have quotes). Off: everything goes through `qsub -v`, and a launch
        with a value it cannot carry is refused before `qsub`.""",
    ).tag(config=True)
    batch_cancel_cmd = Unicode("qdel {job_id}", help="Cancel command.").tag(config=True)
    exec_prefix = Unicode(
        "",
        help="""Prefix for scheduler commands, e.g. 'sudo -E -u {username}'.
        Empty: submit as the hub's own account.""",
    ).tag(config=True)

    #: what `qsub -v` carries with `secrets_in_file`: the hub's own kept
    #: variables, the job account's identity and the quota tag, when qsub
    #: carries them intact
    _SUBMIT_ENV = ("USER", "HOME", "SHELL", TAG_VARIABLE)

    def file_env_names(self, env):
        names = super().file_env_names(env)
        plain = set(self.env_keep) | set(self._SUBMIT_ENV)
        return names | {n for n, v in env.items() if n not in plain or qsub_v_problem(v)}

    #: not handed to the job: PBS starts it in a login shell, whose profile
    #: sets the compute node's own PATH over whatever `qsub -v` carried
    _NODE_OWN = ("PATH",)

    def template_vars(self):
        subvars = super().template_vars()
        keep = [n for n in subvars["keepvars"].split(",") if n and n not in self._NODE_OWN and n != TAG_VARIABLE]
        if subvars["job_tag"]:
            keep.append(TAG_VARIABLE)
        subvars["keepvars"] = ",".join(keep)
        return subvars

    def check_submit_env(self, env, subvars):
        for name in subvars["keepvars"].split(","):
            if name not in env:
                continue
            problem = qsub_v_problem(env[name])
            if problem:
                code = 400 if name.startswith("BINDER_") else 500
                raise web.HTTPError(
                    code,
                    f"{name} cannot be handed to the PBS job through qsub -v: {problem}. "
                    "c.PBSBinderSpawner.secrets_in_file = True (the default) hands every value over "
                    "in a private file instead.",
                )

    def parse_job_id(self, output):
        job_id = output.strip().splitlines()[-1].strip() if output.strip() else ""
        if not re.match(r"^\d+(\[\d*\])?(\.[\w.-]+)?$", job_id):
            raise RuntimeError(f"qsub printed no job id: {output[:200]!r}")
        return job_id

    def _scheduler(self):
        return PBSQueue(parent=self)
