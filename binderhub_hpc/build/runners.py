"""Where a build runs: here, on a build node over SSH, or as a batch job.

All three run the same pipeline; the remote ones run it through the CLI
(``binderhub-hpc build ... --json-logs``) and relay its JSON log lines, so
the BinderHub side sees the same progress whichever runner is used. Git
credentials go to the remote CLI on stdin, never on a command line.

``LocalRunner`` is complete. ``SSHRunner`` and ``SlurmBatchRunner`` build and
run exact command lines (tested as such); the batch runner submits with
``sbatch --wait`` and follows the job's output file.
"""

import json
import os
import shlex
import tempfile
import threading
import time

from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable

from .pipeline import LOG, BuildResult
from .repo2docker import run_streaming


class LocalRunner(LoggingConfigurable):
    """Run the pipeline in this process (a thread of BinderHub's build pool)."""

    def run(self, pipeline, request, progress, stop_event=None):
        return pipeline.run(request, progress, stop_event=stop_event)


class _RemoteCLI(LoggingConfigurable):
    cli = List(Unicode(), ["binderhub-hpc"], help="The CLI on the build host.").tag(config=True)

    remote_config = Unicode(
        "", help="--config file on the build host (same registry as BinderHub's)."
    ).tag(config=True)

    timeout = Float(7200, help="Seconds before the remote build is abandoned.").tag(config=True)

    def build_argv(self, request):
        argv = list(self.cli) + ["build", "--json-logs", "--image", request.image]
        if self.remote_config:
            argv += ["--config", self.remote_config]
        if request.git_credentials:
            argv.append("--git-credentials-stdin")
        # `--` so a repository or ref can never be read as an option
        return argv + ["--", request.repo_url, request.ref]

    def _relay(self, argv, request, progress, stop_event):
        result = {}

        def on_line(line):
            try:
                data = json.loads(line)
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("phase") == "result":
                result.update(data.get("result") or {})
                return
            if isinstance(data, dict):
                progress(LOG, line.rstrip("\n"))
            else:
                progress(LOG, json.dumps({"phase": "unknown", "message": line}))

        rc = run_streaming(
            argv, on_line, stop_event=stop_event, timeout=self.timeout,
            what=self.__class__.__name__, stdin=request.git_credentials or None,
        )
        if result:
            return BuildResult(result.get("outcome", "failure"), request.image,
                               result.get("path", ""), result.get("metadata", {}),
                               result.get("error", ""))
        return BuildResult("failure", request.image, error=f"remote build exited with {rc}")


class SSHRunner(_RemoteCLI):
    """``ssh <host> binderhub-hpc build ...`` on a build node."""

    host = Unicode("", help="Build host (user@host).").tag(config=True)
    ssh = List(
        Unicode(), ["ssh", "-o", "BatchMode=yes", "-T"], help="ssh command prefix."
    ).tag(config=True)

    def argv(self, request):
        # ssh joins its arguments into one string for the remote shell:
        # quote every argument ourselves and pass exactly one
        remote = shlex.join(self.build_argv(request))
        return list(self.ssh) + ["--", self.host, remote]

    def run(self, pipeline, request, progress, stop_event=None):
        return self._relay(self.argv(request), request, progress, stop_event)


class SlurmBatchRunner(_RemoteCLI):
    """A batch job on a build partition that runs the same CLI."""

    partition = Unicode("build", help="Slurm partition for builds.").tag(config=True)
    sbatch = Unicode("sbatch", help="The sbatch executable on BinderHub's host.").tag(config=True)
    extra_sbatch_args = List(Unicode(), help="e.g. ['--cpus-per-task=4', '--mem=8G']").tag(
        config=True
    )
    job_dir = Unicode("", help="Directory for job scripts and output (default: a temp dir).").tag(
        config=True
    )

    def script(self, request, credentials_file=None):
        """The job script; the build's argv is quoted, credentials come from a
        file readable only by the service account (never in the script)."""
        cmd = shlex.join(self.build_argv(request))
        if credentials_file:
            cmd += f" < {shlex.quote(credentials_file)}"
        return "\n".join([
            "#!/bin/sh",
            "#SBATCH --job-name=binder-build",
            f"#SBATCH --partition={self.partition}",
            "set -e",
            f"exec {cmd}",
            "",
        ])

    def submit_argv(self, script_path, output_path):
        return [
            self.sbatch, "--wait", "--parsable", f"--output={output_path}",
            *self.extra_sbatch_args, script_path,
        ]

    def run(self, pipeline, request, progress, stop_event=None):
        job_dir = self.job_dir or tempfile.mkdtemp(prefix="binder-build-")
        fd, script = tempfile.mkstemp(dir=job_dir, suffix=".sh")
        creds = None
        if request.git_credentials:
            cfd, creds = tempfile.mkstemp(dir=job_dir, suffix=".cred")
            with os.fdopen(cfd, "w") as f:
                f.write(request.git_credentials)
        with os.fdopen(fd, "w") as f:
            f.write(self.script(request, creds))
        output = script[:-3] + ".out"
        open(output, "a").close()
        done = threading.Event()
        lines = []

        def follow():
            with open(output) as f:
                while not done.is_set():
                    line = f.readline()
                    if line:
                        lines.append(line)
                    else:
                        time.sleep(0.2)
                lines.extend(f.readlines())

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        try:
            rc = run_streaming(self.submit_argv(script, output), lambda line: None,
                               stop_event=stop_event, timeout=self.timeout, what="sbatch")
        finally:
            done.set()
            t.join(5)
            for p in (script, creds):
                if p:
                    os.unlink(p)
        result = {}
        for line in lines:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("phase") == "result":
                result = data.get("result") or {}
            elif isinstance(data, dict):
                progress(LOG, line.rstrip("\n"))
        if result:
            return BuildResult(result.get("outcome", "failure"), request.image,
                               result.get("path", ""), result.get("metadata", {}),
                               result.get("error", ""))
        return BuildResult("failure", request.image, error=f"build job exited with {rc}")
