"""Container runtimes on compute nodes: how a job runs the image.

Each runtime turns (image file, command, names of environment variables) into
one argv. Values never appear in it: secrets travel in the job's
environment, and only their *names* are listed, so the command line that
`ps`, `scontrol show job` or the spool shows carries no token.
"""

import shlex
import shutil

from traitlets import Bool, Integer, List, Unicode, default
from traitlets.config import LoggingConfigurable


class ContainerRuntime(LoggingConfigurable):
    """How a batch job runs a registry image. Subclasses fill `command`."""

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
        help="""Directory the server starts in: where repo2docker puts the
        repository's files (its --user-name jovyan home).""",
    ).tag(config=True)

    def command(self, image_path, argv, env_names=(), scratch="$BINDER_SCRATCH", gpus=False):
        """The argv that runs `argv` in the image.

        `scratch` is the per-session scratch directory on the node (a shell
        variable reference, expanded by the job script), mounted at /tmp.
        """
        raise NotImplementedError

    def shell_command(self, *args, **kwargs):
        """`command` as one line for the job script.

        Every word is shell-quoted. Only in the runtime's own words (its
        options and the admin's `extra_args`) do the job script's variables
        ($BINDER_SCRATCH, $BINDER_CONTAINER) expand; the image reference and
        the server's argv, which carry strangers' strings (user names in
        URLs), are quoted whole, so even those variable names stay literal.
        """
        words = self.command(*args, **kwargs)
        argv = args[1] if len(args) > 1 else kwargs.get("argv", ())
        n_literal = len(argv) + 1  # the image reference, then the argv
        head, tail = words[:-n_literal], words[-n_literal:]
        return " ".join([_quote_keeping_scratch(w) for w in head] + [shlex.quote(w) for w in tail])

    def env_exports(self, env_names):
        """Script lines that hand named variables into the container."""
        return []

    def remove_command(self):
        """Shell words that delete the session scratch, whoever in the
        container wrote into it."""
        return "rm -rf --"

    def stop_command(self):
        """A shell line that stops the session's container, for runtimes
        whose containers leave the job's process tree (the scheduler would
        not kill them). Empty when the scheduler's own signals suffice."""
        return ""


#: shell variables the job script defines and runtimes may refer to
SCRIPT_VARS = ("$BINDER_SCRATCH", "$BINDER_CONTAINER")


def _quote_keeping_scratch(word):
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
    hide the repository in /home/jovyan and expose the job account's home.
    We contain the session: no home bind, a clean environment, an in-memory
    writable overlay so the repository's files are editable, and a private
    scratch directory at /tmp.
    """

    name = "apptainer"

    @default("executable")
    def _default_exe(self):
        return shutil.which("apptainer") or shutil.which("singularity") or "apptainer"

    writable_tmpfs = Bool(
        True,
        help="""Give the session a writable in-memory overlay (--writable-tmpfs),
        so users can edit the repository's files. Its size is bounded by
        'sessiondir max size' in apptainer.conf.""",
    ).tag(config=True)

    @property
    def _env_prefix(self):
        base = self.executable.rsplit("/", 1)[-1]
        return "SINGULARITYENV_" if base.startswith("singularity") else "APPTAINERENV_"

    def command(self, image_path, argv, env_names=(), scratch="$BINDER_SCRATCH", gpus=False):
        cmd = [self.executable, "exec", "--contain", "--cleanenv", "--no-home"]
        if self.writable_tmpfs:
            cmd.append("--writable-tmpfs")
        cmd += ["--pwd", self.workdir, "--bind", f"{scratch}:/tmp"]
        cmd += ["--env", f"HOME={self.workdir}"]
        if gpus:
            cmd.append("--nv")
        cmd += list(self.extra_args)
        cmd.append(str(image_path))
        cmd += list(argv)
        return cmd

    def env_exports(self, env_names):
        # APPTAINERENV_X is passed into a --cleanenv container as X; we copy
        # by reference so the script text holds no value.
        return [f'export {self._env_prefix}{n}="${{{n}:-}}"' for n in env_names]


class PodmanRuntime(ContainerRuntime):
    """Rootless podman running the image from its OCI archive in the registry.

    Host networking, so the hub reaches the server at the node's address and
    port like any batchspawner job. The container starts as the image's user
    (jovyan), in its home, with the repository's files; nothing of the job
    account's home is mounted.
    """

    name = "podman"
    image_format = "oci-archive"

    @default("executable")
    def _default_exe(self):
        return shutil.which("podman") or "podman"

    def env_exports(self, env_names):
        # rootless podman keeps its runtime state here; batch jobs have no
        # login session to create it
        return [
            'export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}"',
            '[ -d "$XDG_RUNTIME_DIR" ] && [ -w "$XDG_RUNTIME_DIR" ] || '
            'export XDG_RUNTIME_DIR="$binder_scratch_base/run" && mkdir -p "$XDG_RUNTIME_DIR"',
        ]

    stop_timeout = Integer(
        3,
        help="""Seconds podman gives the server to stop before killing it;
        keep it below the scheduler's KillWait.""",
    ).tag(config=True)

    def stop_command(self):
        # conmon double-forks away from the job, so a scheduler tracking
        # processes by parentage (Slurm's proctrack/linuxproc, PBS) would
        # leave the container running after the job ends
        exe = shlex.quote(self.executable)
        return f'{exe} rm --force --time {int(self.stop_timeout)} "$BINDER_CONTAINER" >/dev/null 2>&1 || true'

    def remove_command(self):
        # files the container's users wrote belong to subordinate uids, which
        # the job account can only remove inside its user namespace
        return f"{shlex.quote(self.executable)} unshare rm -rf --"

    def command(self, image_path, argv, env_names=(), scratch="$BINDER_SCRATCH", gpus=False):
        cmd = [
            self.executable,
            "run",
            "--rm",
            "--name=$BINDER_CONTAINER",
            "--network=host",
            f"--workdir={self.workdir}",
            f"--volume={scratch}:/tmp:rw",
        ]
        for n in env_names:
            # `--env NAME` takes the value from podman's own environment
            cmd.append(f"--env={n}")
        if gpus:
            cmd.append("--device=nvidia.com/gpu=all")
        cmd += list(self.extra_args)
        ref = str(image_path)
        cmd.append(f"oci-archive:{ref}" if ref.startswith("/") else ref)
        cmd += list(argv)
        return cmd


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
