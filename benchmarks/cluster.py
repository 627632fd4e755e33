"""What the benchmarks on the dev cluster share.

- :func:`dev_cluster`: the running dev cluster (started if needed);
- :func:`bench_root`: a directory the service account can read, for hub
  state, shims and the benchmark registry;
- :func:`launch_registry`: a notebook image in a benchmark registry (a SIF
  made by our converter, what both runtimes run), made once and reused;
- :func:`baseline_venv`: a host virtualenv with JupyterHub and batchspawner
  made from Debian's ``/usr/bin/python3``, which the service account can run
  (the machine's own Python lives under ``/root``);
- :class:`CommandCounter`: a shim in front of a command that records each
  call, so scheduler queries are counted however they are issued;
- :class:`BenchHub`: a real JupyterHub (and configurable-http-proxy) in a
  subprocess, driven through the REST API as BinderHub's launcher drives it.

Only processes and jobs these objects started are ever stopped.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from binderhub_hpc_testing.hub import DevHub

ROOT = Path("/var/lib/binderhub-hpc")
BENCH_VENV = ROOT / "bench-venv"
BENCH_IMAGE_TAG = "localhost/binderhub-hpc-bench-notebook:latest"
#: the registry name of the benchmark launch image (fixed: reused across runs)
BENCH_IMAGE = "binderhub-hpc-bench/binder-2dbench-2dnotebook-0001:" + "b" * 40
PARTITION = "bench"

NOTEBOOK = {
    "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# benchmark"]}],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def log(msg):
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dev_cluster():
    """The dev cluster, up; SLURM_CONF exported for our own Slurm clients."""
    from binderhub_hpc_testing.cluster import DevCluster

    if os.geteuid() != 0:
        raise RuntimeError("the cluster benchmarks need root (the dev cluster, podman as root)")
    c = DevCluster()
    if not c.is_up() or PARTITION not in (c.status().get("sinfo") or ""):
        c.up()
    os.environ.update(c.env)
    return c


def bench_root():
    d = ROOT / "bench"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    return d


def workdir(prefix):
    """A fresh directory below bench_root(), traversable by the service account."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=bench_root()))
    os.chmod(d, 0o755)
    return d


def _run(argv, **kw):
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run([str(a) for a in argv], **kw)


# ----------------------------------------------------------------- images


def ensure_bench_image(cluster):
    """The podman image (root storage) the launch and conversion benchmarks use."""
    if _run(["podman", "image", "exists", BENCH_IMAGE_TAG], check=False).returncode == 0:
        return BENCH_IMAGE_TAG
    base = cluster.ensure_base_image()
    with tempfile.TemporaryDirectory(prefix="bench-image-") as ctx:
        (Path(ctx) / "hello.ipynb").write_text(json.dumps(NOTEBOOK))
        (Path(ctx) / "Containerfile").write_text(
            f"FROM {base}\nCOPY --chown=1000:1000 hello.ipynb /home/jovyan/hello.ipynb\n"
        )
        _run(["podman", "build", "-q", "--pull=never", "-t", BENCH_IMAGE_TAG, ctx])
    return BENCH_IMAGE_TAG


def launch_registry(cluster):
    """(SIFRegistry, image name): the benchmark image published as a SIF in
    a registry below bench_root(), made once."""
    from binderhub_hpc.registry import SIFRegistry
    from binderhub_hpc_testing.repo import publish_podman_image

    root = bench_root() / "registry"
    root.mkdir(exist_ok=True)
    os.chmod(root, 0o755)
    reg = SIFRegistry(root=str(root))
    if reg.lookup(BENCH_IMAGE) is None:
        publish_podman_image(
            reg, BENCH_IMAGE, ensure_bench_image(cluster), {"repo_url": "https://example.org/bench.git"}
        )
    return reg, BENCH_IMAGE


def baseline_venv():
    """A host virtualenv (Debian's python3) with jupyterhub + batchspawner,
    the same versions as the hub's; made once, then reused."""
    import batchspawner
    import jupyterhub

    done = BENCH_VENV / ".complete"
    want = f"jupyterhub=={jupyterhub.__version__} batchspawner=={batchspawner.__version__}"
    marker = want + " jupyter_server notebook"
    if done.exists() and done.read_text().strip() == marker:
        return BENCH_VENV
    log(f"making the baseline virtualenv {BENCH_VENV} ({want})")
    shutil.rmtree(BENCH_VENV, ignore_errors=True)
    _run(["/usr/bin/python3", "-m", "venv", BENCH_VENV])
    # the same server software as the benchmark image, so the ratio measures
    # what we add (container, registry, shared queue), not the notebook app
    _run(
        [
            BENCH_VENV / "bin" / "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *want.split(),
            "jupyter_server",
            "notebook",
        ],
        timeout=1200,
    )
    _run(["chmod", "-R", "a+rX", BENCH_VENV])
    done.write_text(marker + "\n")
    return BENCH_VENV


# ----------------------------------------------------------------- counting


class CommandCounter:
    """A shim script that appends a timestamp per call, then runs `target`.

    Readable and writable by every account, since scheduler commands may
    run as the service account.
    """

    def __init__(self, directory, target):
        self.directory = Path(directory)
        real = shutil.which(target) or target
        self.log = self.directory / f"{Path(target).name}.calls"
        self.path = self.directory / f"{Path(target).name}-counted"
        self.log.touch()
        os.chmod(self.log, 0o666)
        self.path.write_text(f'#!/bin/sh\ndate +%s.%N >> "{self.log}"\nexec "{real}" "$@"\n')
        os.chmod(self.path, 0o755)

    def calls(self):
        try:
            return [float(x) for x in self.log.read_text().split()]
        except (OSError, ValueError):
            return []

    def between(self, t0, t1):
        return sum(1 for t in self.calls() if t0 <= t <= t1)


def proc_cpu_seconds(pid):
    """utime + stime of `pid` (its own, not its children's), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- the hub

#: jupyterhub_config.py prelude: spawners that write a timeline of each
#: launch (submitted, seen running, port reported, start() returned) to
#: BENCH_TIMELINE. The subclasses only observe; behaviour is the parent's.
TIMELINE_CONFIG = """
import json as _json, time as _time
from batchspawner import JobStatus as _JobStatus
from traitlets import observe as _observe

def _timed(base):
    class Timed(base):
        def _bench(self, event, **kw):
            rec = {"server": f"{self.user.name}/{self.name}", "event": event, "t": _time.time(), **kw}
            with open(BENCH_TIMELINE, "a") as f:
                f.write(_json.dumps(rec) + "\\n")

        async def submit_batch_script(self):
            self._bench("submit")
            out = await super().submit_batch_script()
            self._bench("submitted", job_id=self.job_id)
            return out

        async def query_job_status(self):
            status = await super().query_job_status()
            if status == _JobStatus.RUNNING and not getattr(self, "_bench_running", False):
                self._bench_running = True
                self._bench("running", job_id=self.job_id)
            return status

        @_observe("port")
        def _bench_port(self, change):
            if change.new and getattr(self, "_bench_running", None) is not None:
                self._bench("port", job_id=self.job_id, port=change.new)

        async def start(self):
            self._bench_running = False
            self._bench("start")
            out = await super().start()
            self._bench("started", job_id=self.job_id)
            return out

    Timed.__name__ = "Timed" + base.__name__
    return Timed
"""


class BenchHub(DevHub):
    """The benchmarks' JupyterHub: servers stop with it, launches get long
    timeouts, and each launch's phases go to a timeline file.

    `spawner_config`: the config lines choosing and configuring the spawner
    (they may use ``_timed(cls)`` from TIMELINE_CONFIG).
    """

    start_timeout = 600
    http_timeout = 300

    def __init__(self, directory, spawner_config, env=None):
        # on the hub node of a multi-node dev cluster, like the tests' hub
        super().__init__(directory, spawner_config, env=env, cleanup_servers=True, host=dev_cluster().hub_host)
        self.timeline_path = self.dir / "timeline.jsonl"

    def config_text(self):
        return f"BENCH_TIMELINE = {str(self.timeline_path)!r}\n" + TIMELINE_CONFIG + super().config_text()

    def cpu_seconds(self):
        return proc_cpu_seconds(self.proc.pid)

    def start_server(self, user, server="", options=None):
        return super().start_server(user, options, server)

    def wait_ready(self, user, server="", timeout=600):
        """Follow the progress stream (as BinderHub's launcher does) until
        ready; returns (ready?, last event)."""
        events = self.progress(user, server, timeout=timeout)
        ev = events[-1] if events else {}
        return bool(ev.get("ready")), ev

    def proxied(self, url_path, token, timeout=30):
        """GET `url_path`api/status through the proxy until the server answers 200."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                r = requests.get(
                    self.url + url_path + "api/status",
                    timeout=10,
                    allow_redirects=False,
                    headers={"Authorization": f"token {token}"},
                )
                if r.status_code == 200:
                    return True
                last = r.status_code
            except requests.RequestException as e:
                last = e
            time.sleep(0.02)
        raise RuntimeError(f"{url_path} did not answer through the proxy: {last}")

    def timed_launch(self, spec, proxy_timeout=60):
        """Launch the server `spec` (user, server, options, token, url path)
        and wait until it answers through the proxy: (seconds or None,
        failure or None, "user/server")."""
        user, server, opts, token, path = spec
        key = f"{user}/{server}"
        start = time.time()
        r = self.start_server(user, server, opts)
        if r.status_code not in (201, 202):
            return None, f"start refused: {r.status_code} {r.text[:200]}", key
        ready, ev = self.wait_ready(user, server)
        if not ready:
            return None, ev.get("message", "failed"), key
        try:
            self.proxied(path, token, timeout=proxy_timeout)
        except RuntimeError as e:
            return None, str(e), key
        return time.time() - start, None, key

    def timeline(self):
        out = []
        try:
            for line in self.timeline_path.read_text().splitlines():
                out.append(json.loads(line))
        except OSError:
            pass
        return out

    def job_ids(self):
        return sorted({e["job_id"] for e in self.timeline() if e.get("job_id")})


def scancel_ours(job_ids):
    """Cancel jobs these benchmarks submitted (and only those) still queued."""
    if not job_ids:
        return
    out = _run(["squeue", "--noheader", "--format=%i"], check=False).stdout.split()
    left = [j for j in job_ids if j in set(out)]
    if left:
        _run(["scancel", *left], check=False)
