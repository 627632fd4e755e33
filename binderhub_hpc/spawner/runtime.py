"""Container runtimes on compute nodes: how a job runs the image.

Both runtimes run the same SIF file from the registry and give a session
the same workspace, as on mybinder:

- the image is read-only; ``/home/jovyan`` (the repository) is a copy of the
  image's home in the session's scratch directory on the node, writable, so
  notebooks save and ``pip install --user`` works, bounded by node-local
  scratch rather than by Apptainer's 64 MB session directory;
- ``/tmp`` is the session's scratch too; both go when the job ends;
- the session has its own PID and IPC namespaces and a clean environment:
  another session of the same account (anonymous users share one) can
  neither see nor signal its processes, nor read its environment, scratch
  or tokens; the job account's home is never mounted;
- the scheduler's job variables (``SLURM_*``, ``PBS_*``) and the session's
  limits (``MEM_LIMIT``, ``CPU_LIMIT``, ``BINDER_JOB_END_TIME``) are visible
  inside.

Each runtime turns (image, command, names of environment variables) into
one command line. Values never appear in it: secrets travel in the job's
environment, and only their *names* are listed, so the command line that
``ps``, ``scontrol show job`` or the spool shows carries no token.
"""

import shlex
import shutil
from dataclasses import dataclass

from traitlets import Bool, Integer, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .templates import render_setup

#: shell variables the job script defines and runtimes may refer to
SCRIPT_VARS = ("$BINDER_SCRATCH", "$BINDER_HOME", "$BINDER_ROOTFS", "$BINDER_CONTAINER", "$BINDER_ACCOUNT_HOME")
#: job variables passed into the session, by prefix (the scheduler's own)
JOB_VAR_PREFIXES = ("SLURM_", "PBS_")
#: and by name: limits the session's tools read (jupyter-resource-usage reads
#: MEM_LIMIT and CPU_LIMIT, as on mybinder), the walltime's end, GPUs
JOB_VARS = ("MEM_LIMIT", "CPU_LIMIT", "BINDER_JOB_END_TIME", "NCPUS", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class SessionImage:
    """The image a session runs: its path on compute nodes, and where its
    root filesystem starts in the file (for runtimes that mount it)."""

    path: str
    root_offset: int = 0


class ContainerRuntime(LoggingConfigurable):
    """How a batch job runs a registry image. Subclasses fill the hooks."""

    name = ""
    #: the registry format this runtime reads (see SIFRegistry.formats)
    image_format = "sif"

    executable = Unicode(help="The runtime's executable on compute nodes.").tag(config=True)

    extra_args = List(
        Unicode(),
        help="Extra arguments placed before the image, e.g. site bind mounts.",
    ).tag(config=True)

    workdir = Unicode(
        "/home/jovyan",
        help="""The repository's directory in the image (repo2docker's
        --user-name jovyan home): copied to the session's scratch, mounted
        writable at the same place, where the server starts.""",
    ).tag(config=True)

    def prepare(self, image):
        """Shell lines that set the session up before the server starts
        (after $BINDER_SCRATCH and $BINDER_HOME exist): the writable copy of
        the image's home."""
        return []

    def options(self, image, env_names=(), gpus=False, home_mount=""):
        """The runtime's own words, up to the image: they may refer to the
        job script's variables (SCRIPT_VARS). `home_mount`: where the job
        account's home ($BINDER_ACCOUNT_HOME) is mounted, writable ('': not)."""
        raise NotImplementedError

    def image_words(self, image):
        """Words naming the image, quoted whole."""
        return [image.path]

    def command(self, image, argv, env_names=(), gpus=False, home_mount=""):
        """The argv that runs `argv` in the image."""
        return self.options(image, env_names, gpus, home_mount) + self.image_words(image) + list(argv)

    def shell_command(self, image, argv, env_names=(), gpus=False, home_mount=""):
        """`command` as one line for the job script.

        Every word is shell-quoted. Only in the runtime's own words (its
        options and the admin's `extra_args`) do the job script's variables
        expand; the image reference and the server's argv, which carry
        strangers' strings (user names in URLs), are quoted whole, so even
        those variable names stay literal.
        """
        head = self.options(image, env_names, gpus, home_mount)
        tail = self.image_words(image) + list(argv)
        return " ".join([_quote_keeping_vars(w) for w in head] + [shlex.quote(w) for w in tail])

    def env_exports(self, env_names):
        """Script lines that hand named variables into the container."""
        return []

    def check_script(self, image, argv=("true",), scratch_root="/tmp", env_names=(), after=()):
        """A bash script that runs `argv` in `image` the way a session job
        does: what `binderhub-hpc doctor` runs as the job account.

        It is rendered from the session's own setup
        (:func:`~binderhub_hpc.spawner.templates.render_setup`: the same
        scratch, home copy, variables, signal handling and cleanup, with
        this runtime's commands) and runs the same command line, started and
        waited for as the job script does, so what the doctor checks is what
        sessions run, not a copy that could drift. It differs where the
        doctor is not a job the hub launched:

        - no port report: no hub waits for this server (the doctor checks
          from a compute node that the hub answers, check_hub_from_compute);
        - no tokens file, no limits: there is no session to take them from;
        - the scratch is ``binder-check.*`` under `scratch_root` (on the host
          the doctor runs on; a shell word in double quotes, as the spawner's
          scratch_root) and the cleanup prints nothing, so the script's last
          line of output is the command's, which the doctor reports.

        `after`: lines run once the container exited, before the cleanup."""
        setup = render_setup(
            scratch_root=scratch_root,
            env_exports="\n".join(self.env_exports(env_names)),
            remove=self.remove_command(),
            stop=self.stop_command(),
            prepare="\n".join(self.prepare(image)),
            session=False,
        )
        # the job scripts' own lines around the setup (templates.SLURM_SCRIPT)
        command = self.shell_command(image, list(argv), env_names)
        return "\n".join(["set -euo pipefail", setup, f"{command} &", "binder_wait $!", *after]) + "\n"

    def remove_command(self):
        """Shell words that delete the session scratch, whoever in the
        container wrote into it."""
        return "rm -rf --"

    def stop_command(self):
        """A shell line that stops the session's container and releases what
        `prepare` set up, for runtimes whose processes leave the job's
        process tree (the scheduler would not kill them). Empty when the
        scheduler's own signals suffice."""
        return ""


def _quote_keeping_vars(word):
    """Shell-quote `word`, leaving only our own script variables to expand."""
    parts = [word]
    for var in SCRIPT_VARS:
        parts = [p for chunk in parts for p in _split_keep(chunk, var)]
    return "".join(f'"{p}"' if p in SCRIPT_VARS else shlex.quote(p) for p in parts if p)


def _split_keep(text, sep):
    if text in SCRIPT_VARS:
        return [text]
    pieces = text.split(sep)
    out = []
    for i, piece in enumerate(pieces):
        if i:
            out.append(sep)
        out.append(piece)
    return out


class ApptainerRuntime(ContainerRuntime):
    """Apptainer (or SingularityCE) running the SIF file directly.

    Apptainer binds $HOME and the working directory by default, which would
    hide the repository in /home/jovyan and expose the job account's home;
    and unprivileged, it cannot write the image's files, which belong to
    the image's user. So the session is contained (``--containall``: own
    PID and IPC namespaces, clean environment, nothing of the host's
    filesystem) and gets its home as a copy on the node's scratch, mounted
    where the repository was.
    """

    name = "apptainer"

    @default("executable")
    def _default_exe(self):
        return shutil.which("apptainer") or shutil.which("singularity") or "apptainer"

    no_eval = Bool(
        True,
        help="""Run with `--no-eval` (Apptainer >= 1.1, SingularityCE >= 3.10):
        the session's variables reach it as they are. Without it Apptainer
        evaluates each APPTAINERENV_ value as a double-quoted shell word in
        the container: `$(...)` in a repository URL or a user name runs,
        `${HOME}` expands. Turn off only for an older runtime.""",
    ).tag(config=True)

    @property
    def _env_prefix(self):
        base = self.executable.rsplit("/", 1)[-1]
        return "SINGULARITYENV_" if base.startswith("singularity") else "APPTAINERENV_"

    def prepare(self, image):
        # the image's home, copied by the image's own cp (no tools needed on
        # the node); the session's files are then the job account's
        copy = [
            self.executable,
            "exec",
            "--containall",
            "--no-home",
            "--pwd",
            "/",
            "--bind",
            "$BINDER_HOME:/binder-home",
            *self.extra_args,
            image.path,
            "cp",
            "-a",
            f"{self.workdir.rstrip('/')}/.",
            "/binder-home/",
        ]
        head, tail = copy[:-5], copy[-5:]
        return [" ".join([_quote_keeping_vars(w) for w in head] + [shlex.quote(w) for w in tail])]

    def options(self, image, env_names=(), gpus=False, home_mount=""):
        cmd = [self.executable, "exec", "--containall", "--cleanenv"]
        if self.no_eval:
            cmd.append("--no-eval")
        cmd += ["--home", f"$BINDER_HOME:{self.workdir}", "--pwd", self.workdir]
        cmd += ["--bind", "$BINDER_SCRATCH:/tmp"]
        if home_mount:
            cmd += ["--bind", f"$BINDER_ACCOUNT_HOME:{home_mount}"]
        if gpus:
            cmd.append("--nv")
        return cmd + list(self.extra_args)

    def env_exports(self, env_names):
        # APPTAINERENV_X is passed into a --cleanenv container as X; we copy
        # by reference so the script text holds no value
        lines = [f'export {self._env_prefix}{n}="${{{n}:-}}"' for n in env_names]
        prefixes = "|".join(f"{p}*" for p in JOB_VAR_PREFIXES) + "|" + "|".join(JOB_VARS)
        lines.append(
            f'for binder_v in $(compgen -e); do case "$binder_v" in {prefixes}) '
            f'export "{self._env_prefix}$binder_v=${{!binder_v}}";; esac; done'
        )
        return lines


class PodmanRuntime(ContainerRuntime):
    """Rootless podman running the same SIF: its root filesystem partition
    mounted read-only with squashfuse inside podman's user namespace (so the
    image's owners map as they would for a podman image), under a
    throw-away overlay, ``podman run --rootfs``. No second copy of the image
    in the registry.

    Host networking, so the hub reaches the server at the node's address and
    port like any batchspawner job; the container starts as the image's user
    (jovyan) in its own PID namespace.
    """

    name = "podman"

    @default("executable")
    def _default_exe(self):
        return shutil.which("podman") or "podman"

    squashfuse = Unicode(
        "squashfuse_ll", help="squashfuse (or squashfuse_ll) on compute nodes, which mounts the SIF's root."
    ).tag(config=True)

    fusermount = Unicode("fusermount3", help="fusermount on compute nodes, to unmount it.").tag(config=True)

    user = Unicode(
        "1000:1000",
        help="""uid:gid the server runs as in the container: the image's user
        (BinderHub's repo2docker --user-id, 1000).""",
    ).tag(config=True)

    stop_timeout = Integer(
        3,
        help="""Seconds podman gives the server to stop before killing it;
        keep it below the scheduler's KillWait.""",
    ).tag(config=True)

    no_new_privileges = Bool(
        True, help="Run the session with no-new-privileges (setuid programs in the image gain nothing)."
    ).tag(config=True)

    #: the image's ENV, which `--rootfs` does not read: the SIF keeps it in
    #: Apptainer's environment scripts
    ENV_WRAPPER = 'for f in /.singularity.d/env/*.sh; do [ -r "$f" ] && . "$f"; done; exec "$@"'

    def prepare(self, image):
        exe = shlex.quote(self.executable)
        mount = (
            f'{exe} unshare sh -c \'mkdir -p "$1" && {shlex.quote(self.squashfuse)} -o ro,offset={int(image.root_offset)} '
            f'"$2" "$1" && cp -a "$1"{shlex.quote(self.workdir.rstrip("/"))}/. "$3"/ && chown {shlex.quote(self.user)} "$3"\' '
            f'binder-mount "$BINDER_ROOTFS" {shlex.quote(image.path)} "$BINDER_HOME"'
        )
        return ['BINDER_ROOTFS="$binder_scratch_base/rootfs"', mount]

    def options(self, image, env_names=(), gpus=False, home_mount=""):
        if home_mount:
            # the account's files are root's in podman's user namespace, and
            # the session runs as the image's user: it could not write them
            raise ValueError("mounting the account's home (account_home_mount) needs the apptainer runtime")
        cmd = [
            self.executable,
            "run",
            "--rm",
            "--name=$BINDER_CONTAINER",
            "--network=host",
            f"--user={self.user}",
            f"--workdir={self.workdir}",
            f"--volume=$BINDER_HOME:{self.workdir}:rw",
            "--volume=$BINDER_SCRATCH:/tmp:rw",
            "--cap-drop=all",
        ]
        if self.no_new_privileges:
            cmd.append("--security-opt=no-new-privileges")
        for n in env_names:
            # `--env NAME` takes the value from podman's own environment
            cmd.append(f"--env={n}")
        cmd += [f"--env={p}*" for p in JOB_VAR_PREFIXES] + [f"--env={n}" for n in JOB_VARS]
        if gpus:
            cmd.append("--device=nvidia.com/gpu=all")
        cmd += list(self.extra_args)
        cmd += ["--rootfs", "$BINDER_ROOTFS:O"]
        return cmd

    def image_words(self, image):
        # the rootfs is an option above; the image's environment comes first
        return ["/bin/sh", "-c", self.ENV_WRAPPER, "binder-session"]

    def env_exports(self, env_names):
        # rootless podman keeps its runtime state here; batch jobs have no
        # login session to create it
        return [
            'export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}"',
            '[ -d "$XDG_RUNTIME_DIR" ] && [ -w "$XDG_RUNTIME_DIR" ] || '
            'export XDG_RUNTIME_DIR="$binder_scratch_base/run" && mkdir -p "$XDG_RUNTIME_DIR"',
        ]

    def stop_command(self):
        # conmon double-forks away from the job, so a scheduler tracking
        # processes by parentage (Slurm's proctrack/linuxproc, PBS) would
        # leave the container running after the job ends; the squashfuse
        # mount lives in podman's namespace, not the job's
        exe = shlex.quote(self.executable)
        return (
            f'{exe} rm --force --time {int(self.stop_timeout)} "$BINDER_CONTAINER" >/dev/null 2>&1 || true; '
            f'{exe} unshare {shlex.quote(self.fusermount)} -uz "$binder_scratch_base/rootfs" >/dev/null 2>&1 || true'
        )

    def remove_command(self):
        # files the container's users wrote belong to subordinate uids, which
        # the job account can only remove inside its user namespace
        return f"{shlex.quote(self.executable)} unshare rm -rf --"


RUNTIMES = {"apptainer": ApptainerRuntime, "singularity": ApptainerRuntime, "podman": PodmanRuntime}


def detect_runtime():
    """The runtime name to use when none is configured: apptainer if present."""
    if shutil.which("apptainer") or shutil.which("singularity"):
        return "apptainer"
    if shutil.which("podman"):
        return "podman"
    return "apptainer"


def make_runtime(name=None, **kwargs):
    name = name or detect_runtime()
    try:
        cls = RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown container runtime {name!r}; choose from {sorted(RUNTIMES)}") from None
    rt = cls(**kwargs)
    if name == "singularity" and "executable" not in kwargs:
        rt.executable = shutil.which("singularity") or "singularity"
    return rt
