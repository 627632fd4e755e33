"""Where a build runs: here, on a build node over SSH, or as a batch job.

All three run the same pipeline; the remote ones run it through the CLI
(``binderhub-hpc build ... --json-logs``) on the build node, as the build
account, and relay its JSON log lines as they are written, so the BinderHub
side sees the same progress whichever runner is used.

What the remote build prints is not trusted: a repository's build output,
its git server's replies, its URL pass through it. So (see
:mod:`.protocol`) every line is relayed as a plain log line, stderr is
kept apart and shown as text, never parsed, and the result counts only
when it is signed with a key made for this build: the runner hands the key
to the remote CLI privately, as the first line of its stdin (SSH) or of a
file only the build account can read (batch job), followed by the git
credentials; neither is ever on a command line or in a job script. A
success counts only once the image is really in the registry.

``SlurmBatchRunner``'s job files (script, stdin, output, error) live in a
private directory per build under ``job_dir``, on the shared filesystem
(the build node writes the output there, BinderHub reads it as it grows),
and are removed when the build ends, however it ends. The job is submitted
with ``--export=NONE`` (BinderHub's environment, its hub token included,
never reaches the job) and ``--no-requeue`` (a build whose node died fails
and says so; the next request submits a new one).
"""

import os
import pwd
import queue
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from traitlets import Float, List, Unicode, validate
from traitlets.config import LoggingConfigurable

from .. import metrics
from ..registry import InvalidImageName
from ..scheduler import slurm
from .environment import build_environment
from .pipeline import BuildResult
from .process import BuildCancelled, BuildTimeout, kill_group, run_streaming
from .protocol import LOG, Relay, failed_line, log_line, new_result_key


class BuildRunner(LoggingConfigurable):
    """Where a build runs: ``run(pipeline, request, progress, stop_event)``
    returns a BuildResult (the base of every runner SIFBuildExecutor takes)."""

    def run(self, pipeline, request, progress, stop_event=None):
        raise NotImplementedError


class LocalRunner(BuildRunner):
    """Run the pipeline in this process (a thread of BinderHub's build pool)."""

    def run(self, pipeline, request, progress, stop_event=None):
        return pipeline.run(request, progress, stop_event=stop_event)


def _count(result):
    """The metrics of a build that ran elsewhere (its process counted them
    there, where nobody scrapes them): outcome and step durations."""
    metrics.BUILDS.labels(outcome=result.outcome).inc()
    for step, seconds in (result.metadata.get("durations") or {}).items():
        if step in ("repo2docker", "export", "convert", "publish") and isinstance(seconds, (int, float)):
            metrics.BUILD_STEP_SECONDS.labels(step=step).observe(seconds)
    return result


def _stopped(relay, request, e):
    """The result of a remote build stopped on request or by its timeout."""
    outcome = "timeout" if isinstance(e, BuildTimeout) else "cancelled"
    relay.progress(LOG, failed_line(f"Build stopped: {e}"))
    return _count(BuildResult(outcome, request.image, error=str(e)))


def _build_result(relay, pipeline, request, error):
    """The remote build's signed result, or a failure saying `error` (why
    none came). A success counts only when the image is in the registry;
    a failure's reason, which the result carries, is said here, once."""
    r = relay.result
    if r is None:
        why = error or "no signed result came back"
        if relay.dropped:
            why += f" ({relay.dropped} result lines without a valid signature were ignored)"
        relay.progress(LOG, failed_line(f"Build failed: {why}"))
        return _count(BuildResult("failure", request.image, error=why))
    outcome, metadata = r["outcome"], r.get("metadata") or {}
    if outcome in ("success", "cached"):
        try:
            path = pipeline.registry.lookup(request.image)
        except InvalidImageName:
            path = None
        if path is None:
            why = f"the build reported {outcome}, but {request.image} is not in the registry"
            relay.progress(LOG, failed_line(f"Build failed: {why}"))
            return _count(BuildResult("failure", request.image, metadata=metadata, error=why))
        return _count(BuildResult(outcome, request.image, str(path), metadata))
    error = r.get("error") or outcome
    relay.progress(LOG, failed_line(f"Build failed: {error}"))
    return _count(BuildResult(outcome, request.image, metadata=metadata, error=error))


class _RemoteCLI(BuildRunner):
    """A runner that runs ``binderhub-hpc build`` on a build host; its
    metrics are counted here, where BinderHub serves them."""

    cli = List(
        Unicode(),
        ["binderhub-hpc"],
        help="""The CLI on the build host, as the build account runs it (e.g.
        ['/opt/binderhub-hpc/bin/binderhub-hpc'], a site virtualenv).""",
    ).tag(config=True)

    remote_config = Unicode("", help="--config file on the build host (same registry as BinderHub's).").tag(config=True)

    timeout = Float(7200, help="Seconds before the remote build is abandoned.").tag(config=True)

    @validate("cli")
    def _validate_cli(self, proposal):
        if not proposal["value"]:
            raise ValueError(f"{self.__class__.__name__}.cli cannot be empty")
        return proposal["value"]

    def build_argv(self, request):
        argv = list(self.cli) + [
            "build",
            "--json-logs",
            "--stop-with-parent",
            "--result-key-stdin",
            "--image",
            request.image,
        ]
        if self.remote_config:
            argv += ["--config", self.remote_config]
        if request.git_credentials:
            argv.append("--git-credentials-stdin")
        # `--` so a repository or ref can never be read as an option
        return argv + ["--", request.repo_url, request.ref]

    @staticmethod
    def stdin_text(key, request):
        """What the remote CLI reads on its stdin: the result key (first
        line), then the git credentials."""
        return key + "\n" + (request.git_credentials or "")

    def run(self, pipeline, request, progress, stop_event=None):
        metrics.BUILDS_RUNNING.inc()
        try:
            key = new_result_key()
            relay = Relay(progress, key, request.image, log=self.log)
            return self._run_remote(pipeline, request, relay, key, stop_event)
        finally:
            metrics.BUILDS_RUNNING.dec()

    def _run_remote(self, pipeline, request, relay, key, stop_event):
        raise NotImplementedError


class SSHRunner(_RemoteCLI):
    """``ssh <host> binderhub-hpc build ...`` on a build node.

    Log lines arrive as the remote build prints them (ssh's stderr, the
    remote CLI's with ssh's own, is shown as text). A stop or timeout
    closes the connection; the remote CLI (``--stop-with-parent``) then
    stops its build, removing what it started. A connection lost (the build
    node died) fails the build with ssh's message.
    """

    host = Unicode("", help="Build host (user@host).").tag(config=True)
    ssh = List(
        Unicode(),
        ["ssh", "-o", "BatchMode=yes", "-T", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"],
        help="""ssh command prefix (add -i KEY, -o UserKnownHostsFile=...). The
        keepalives notice a build node that vanished without closing the
        connection.""",
    ).tag(config=True)

    @validate("host")
    def _validate_host(self, proposal):
        if proposal["value"].startswith("-"):
            raise ValueError("SSHRunner.host cannot start with '-'")
        return proposal["value"]

    def argv(self, request):
        # ssh joins its arguments into one string for the remote shell:
        # quote every argument ourselves and pass exactly one
        remote = shlex.join(self.build_argv(request))
        return list(self.ssh) + ["--", self.host, remote]

    def _run_remote(self, pipeline, request, relay, key, stop_event):
        if not self.host:
            raise ValueError("SSHRunner.host is not set")
        try:
            rc = run_streaming(
                self.argv(request),
                relay,
                on_stderr=relay.text,
                stop_event=stop_event,
                timeout=self.timeout,
                what="ssh build",
                stdin=self.stdin_text(key, request),
                env=build_environment(keep=("SSH_AUTH_SOCK",)),
            )
        except (BuildCancelled, BuildTimeout) as e:
            return _stopped(relay, request, e)
        why = (
            f"the connection to the build host {self.host} failed or was lost (ssh exit 255)"
            if rc == 255
            else f"the remote build exited with {rc} and no signed result"
        )
        return _build_result(relay, pipeline, request, why)


class SlurmBatchRunner(_RemoteCLI):
    """A batch job on a build partition that runs the same CLI.

    Submitted with ``sbatch --wait``; its output file is followed as it
    grows and each JSON log line relayed as it arrives, its error file
    (``--error``, apart) shown as text. On stop or timeout the job is
    cancelled (``scancel``), on every exit its job files removed.
    """

    partition = Unicode("build", help="Slurm partition for builds.").tag(config=True)
    sbatch = Unicode("sbatch", help="The sbatch executable on BinderHub's host.").tag(config=True)
    scancel = Unicode("scancel", help="The scancel executable on BinderHub's host.").tag(config=True)
    scontrol = Unicode("scontrol", help="The scontrol executable (asked why a job ended without a result).").tag(
        config=True
    )
    extra_sbatch_args = List(Unicode(), help="e.g. ['--cpus-per-task=4', '--mem=8G']").tag(config=True)
    job_dir = Unicode(
        "",
        help="""Directory on the shared filesystem (BinderHub's host and the
        build nodes) for the jobs' scripts and output: one private directory
        per build inside it, removed afterwards. Default: `.build-jobs` in
        the registry's root (which both already share).""",
    ).tag(config=True)
    job_user = Unicode(
        "",
        help="""The account build jobs run as when BinderHub runs as root
        (``sbatch --uid``; the dev cluster's demo). Empty: BinderHub's own
        account, as systemd/binderhub.service runs it.""",
    ).tag(config=True)
    poll_interval = Float(0.2, help="Seconds between reads of a growing job output file.").tag(config=True)
    env_keep = List(
        Unicode(),
        help="""Variables of BinderHub's environment sbatch itself needs besides
        SLURM_CONF and the usual PATH/HOME (the job gets none of them:
        --export=NONE).""",
    ).tag(config=True)

    @validate("job_user")
    def _validate_job_user(self, proposal):
        user = proposal["value"]
        if user:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise ValueError(f"SlurmBatchRunner.job_user: no account {user!r}") from None
        return user

    def script(self, request, stdin_file):
        """The job script; the build's argv is quoted, its stdin (the result
        key, the credentials) comes from a file readable only by the build
        account (never in the script)."""
        cmd = shlex.join(self.build_argv(request)) + f" < {shlex.quote(str(stdin_file))}"
        return "\n".join(
            [
                "#!/bin/sh",
                "#SBATCH --job-name=binder-build",
                f"#SBATCH --partition={self.partition}",
                f"exec {cmd}",
                "",
            ]
        )

    def submit_argv(self, script_path, output_path, workdir=None, error_path=None):
        argv = [self.sbatch, "--wait", "--parsable", "--no-requeue", "--export=NONE", f"--output={output_path}"]
        if error_path:
            argv.append(f"--error={error_path}")
        if workdir:
            argv.append(f"--chdir={workdir}")
        if self.job_user:
            pw = pwd.getpwnam(self.job_user)
            argv += [f"--uid={pw.pw_uid}", f"--gid={pw.pw_gid}"]
        return argv + [*self.extra_sbatch_args, script_path]

    # -- job files ------------------------------------------------------------------

    def job_root(self, pipeline):
        root = Path(self.job_dir or Path(pipeline.registry.root) / ".build-jobs")
        owner = self._owner()
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = root.lstat()
            if root.is_symlink() or not root.is_dir():
                raise OSError(f"{root} is not a directory")
            if owner and st.st_uid != owner.pw_uid and os.geteuid() == 0:
                os.chown(root, owner.pw_uid, owner.pw_gid)
            os.chmod(root, 0o700)
        except OSError as e:
            raise RuntimeError(f"build job directory {root}: {e}") from None
        return root

    def _owner(self):
        if not self.job_user:
            return None
        if os.geteuid() != 0:
            raise RuntimeError(
                "SlurmBatchRunner.job_user needs BinderHub to run as root (sbatch --uid); "
                "leave it empty where BinderHub runs as the build account"
            )
        return pwd.getpwnam(self.job_user)

    def _job_files(self, pipeline, request, key):
        """A private directory with the script and the job's stdin (the result
        key and credentials) for one build."""
        d = Path(tempfile.mkdtemp(prefix="build-", dir=self.job_root(pipeline)))
        owner = self._owner()
        stdin = d / "stdin"
        fd = os.open(stdin, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.stdin_text(key, request))
        script = d / "job.sh"
        script.write_text(self.script(request, stdin))
        os.chmod(script, 0o600)
        if owner:
            for p in (d, script, stdin):
                os.chown(p, owner.pw_uid, owner.pw_gid)
        return d, script

    # -- running --------------------------------------------------------------------

    def _run_remote(self, pipeline, request, relay, key, stop_event):
        d, script = self._job_files(pipeline, request, key)
        try:
            try:
                rc, job_id, said = self._run_job(d, script, relay, stop_event)
            except (BuildCancelled, BuildTimeout) as e:
                return _stopped(relay, request, e)
            why = "" if relay.result is not None else self._why(job_id, rc, said)
            return _build_result(relay, pipeline, request, why)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _run_job(self, d, script, relay, stop_event):
        """Submit, relay the output as it grows, wait for the end.
        Returns (sbatch's exit code, job id or None, sbatch's other lines)."""
        env = build_environment(keep=("SLURM_CONF", *self.env_keep))
        output, errors = d / "job.out", d / "job.err"
        proc = subprocess.Popen(
            self.submit_argv(str(script), str(output), str(d), str(errors)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(d),
            start_new_session=True,
            text=True,
        )
        said = queue.Queue()

        def read_sbatch():
            for line in proc.stdout:
                said.put(line.strip())

        reader = threading.Thread(target=read_sbatch, daemon=True, name="sbatch-output")
        reader.start()
        job_id, other = None, []
        follower, error_follower = _Follower(output), _Follower(errors)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                ended = proc.poll() is not None
                if ended:
                    reader.join(10)
                while not said.empty():
                    line = said.get_nowait()
                    if job_id is None and line.split(";")[0].isdigit():
                        job_id = line.split(";")[0]
                        relay.progress(
                            LOG, log_line(f"Submitted build job {job_id} to partition {self.partition!r}\n", "waiting")
                        )
                    elif line:
                        other.append(line)
                for line in error_follower.new_lines(final=ended):
                    relay.text(line)
                for line in follower.new_lines(final=ended):
                    relay(line)
                if ended:
                    return proc.returncode, job_id, other
                if relay.result is not None:
                    # the signed result is the build's last word: no need to
                    # wait for sbatch to poll the job's end (seconds)
                    for line in error_follower.new_lines(final=True):
                        relay.text(line)
                    kill_group(proc, 1)
                    return 0, job_id, other
                if stop_event is not None and stop_event.is_set():
                    raise BuildCancelled("build job stopped on request")
                if time.monotonic() > deadline:
                    raise BuildTimeout(f"build job timed out after {self.timeout:.0f} s")
                time.sleep(self.poll_interval)
        except BaseException:
            self._cancel(job_id)
            kill_group(proc, 1)
            raise
        finally:
            follower.close()
            error_follower.close()
            reader.join(1)
            proc.stdout.close()

    def _cancel(self, job_id):
        if not job_id:
            return
        env = build_environment(keep=("SLURM_CONF", *self.env_keep))
        p = subprocess.run(
            slurm.cancel_argv(job_id, self.scancel),
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        if p.returncode:
            self.log.warning("scancel %s: %s", job_id, p.stderr.strip())

    def _why(self, job_id, rc, said=()):
        """Why a job ended without a result, in words (its state and reason)."""
        if not job_id:
            return f"sbatch failed ({rc}): {' '.join(said)[-500:]}"
        env = build_environment(keep=("SLURM_CONF", *self.env_keep))
        p = subprocess.run(
            slurm.job_record_argv(job_id, self.scontrol),
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        fields = slurm.parse_job_record(p.stdout)
        state, reason, node = fields.get("JobState"), fields.get("Reason"), fields.get("NodeList")
        if state == "NODE_FAIL":
            return (
                f"the build node {node} stopped answering during build job {job_id} "
                "(NODE_FAIL): nothing was published; try again"
            )
        if state:
            return (
                f"build job {job_id} ended {state}"
                + (f" ({reason})" if reason not in (None, "None") else "")
                + f" on {node} without a result (exit {rc})"
            )
        return f"build job {job_id} ended without a result (sbatch exit {rc})"


class _Follower:
    """Complete lines appended to a file that may not exist yet."""

    def __init__(self, path):
        self.path = path
        self._f = None
        self._partial = ""

    def new_lines(self, final=False):
        if self._f is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return []
            self._f = os.fdopen(fd, "r", errors="replace")
        text = self._partial + self._f.read()
        lines = text.split("\n")
        self._partial = "" if final else lines.pop()
        if final and lines and lines[-1] == "":
            lines.pop()
        return [line + "\n" for line in lines]

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None
