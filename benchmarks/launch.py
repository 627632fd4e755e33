"""Warm launch: from the hub API start request to the server answering
through the proxy, with the image already in the registry, on an idle
partition.

Subjects: our ``SlurmBinderSpawner`` (the registry's SIF in an Apptainer
job, and the same SIF in a rootless podman job; Binder token, shared queue
reflector, the launch ending at the job's port report). Baseline, measured
in the same run and interleaved with them: plain batchspawner
``SlurmSpawner`` starting ``jupyterhub-singleuser`` from a host virtualenv,
no container.
Both hubs use the same hub settings (``startup_poll_interval`` 0.25 s) and
the same partition; the clock stops when ``api/status`` answers 200 through
configurable-http-proxy after the progress stream said ready, as BinderHub's
launcher sees it.

Targets: median <= 2.5 s, ratio <= 0.8. Breakdown (from the spawners' own
timeline, see ``cluster.TIMELINE_CONFIG``): request -> job submitted,
submitted -> job known to run (seen in the queue, or its port reported,
whichever comes first), running -> port reported, port -> answering.
"""

import secrets
import time

from binderhub_hpc_testing.hub import spawner_config

from .cluster import (
    PARTITION,
    BenchHub,
    CommandCounter,
    baseline_venv,
    dev_cluster,
    launch_registry,
    log,
    scancel_ours,
    workdir,
)
from .common import Row, Stats, Target

NAME = "launch"
#: seconds between our reflector's squeue calls (the charts-free default is 2)
QUEUE_POLL_INTERVAL = 1.0
PHASES = ("request → submitted", "submitted → running", "running → port", "port → answering")
RUNTIMES = ("apptainer", "podman")


def add_arguments(parser):
    g = parser.add_argument_group("launch, concurrent")
    g.add_argument("--launch-repeat", type=int, default=None, help="warm launches per subject (default: 12, --quick 3)")
    g.add_argument(
        "--queue-poll-interval",
        type=float,
        default=QUEUE_POLL_INTERVAL,
        help="our spawner's queue_poll_interval (default: %(default)s)",
    )


# ----------------------------------------------------------------- subjects


class Subject:
    """One hub and how to start a server on it."""

    name = ""
    label = ""

    def __init__(self, cluster, directory, squeue, interval):
        self.cluster = cluster
        self.dir = directory
        self.squeue = squeue
        self.interval = interval
        self.hub = BenchHub(directory, self.spawner_config(), env=cluster.env)
        self._n = 0

    def start(self):
        self.hub.start()
        return self

    def stop(self):
        jobs = self.hub.job_ids()
        try:
            self.hub.stop()
        finally:
            scancel_ours(jobs)

    def new_server(self):
        """(user, server name, options, token, url path) of a fresh server."""
        raise NotImplementedError

    def launch(self, timeout=600):
        """Start one server and wait until it answers through the proxy.

        Returns (seconds, server key, t_request)."""
        user, server, opts, token, path = self.new_server()
        t0 = time.time()
        r = self.hub.start_server(user, server, opts)
        if r.status_code not in (201, 202):
            raise RuntimeError(f"{self.name}: start refused: {r.status_code} {r.text[:300]}")
        ready, ev = self.hub.wait_ready(user, server, timeout=timeout)
        if not ready:
            raise RuntimeError(f"{self.name}: launch failed: {ev.get('message')}\n{self.hub.log_tail(30)}")
        self.hub.proxied(path, token)
        return time.time() - t0, f"{user}/{server}", t0

    def stop_server(self, key, timeout=120):
        user, server = key.split("/", 1)
        self.hub.stop_server(user, server)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.hub.request("GET", f"/users/{user}")
            if r.status_code == 200 and server not in r.json().get("servers", {}):
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name}: server {key} did not stop")

    def phases(self, key, t_request, t_end):
        """Breakdown of one launch from the hub's timeline."""
        ev = {}
        for e in self.hub.timeline():
            if e["server"] == key and e["t"] >= t_request - 1:
                ev.setdefault(e["event"], e["t"])
        if not all(k in ev for k in ("submitted", "port")):
            return None
        # the job is known to run when the queue says so or when it reports
        # its port, whichever comes first
        running = min(ev.get("running", ev["port"]), ev["port"])
        port = ev["port"]
        return {
            PHASES[0]: ev["submitted"] - t_request,
            PHASES[1]: running - ev["submitted"],
            PHASES[2]: port - running,
            PHASES[3]: t_end - port,
        }


class Ours(Subject):
    def __init__(self, cluster, directory, squeue, interval, registry, image, runtime="apptainer"):
        self.registry, self.image, self.runtime = registry, image, runtime
        self.name = f"ours-{runtime}"
        self.label = f"SlurmBinderSpawner ({runtime} job)"
        super().__init__(cluster, directory, squeue, interval)

    def spawner_config(self):
        return """
from binderhub_hpc.spawner.spawner import SlurmBinderSpawner
c.JupyterHub.spawner_class = _timed(SlurmBinderSpawner)
""" + spawner_config(
            self.registry.root,
            partition=PARTITION,
            interval=self.interval,
            runtime=self.runtime,
            extra=f"c.SlurmQueue.squeue = {str(self.squeue.path)!r}\n",
        )

    def new_server(self):
        user = self.hub.create_user("bench-" + secrets.token_hex(4))
        token = secrets.token_hex(16)
        opts = {
            "image": self.image,
            "token": token,
            "repo_url": "https://example.org/bench.git",
            "binder_ref_url": "https://example.org/bench/tree/main",
            "binder_launch_host": "https://binder.example.org/",
            "binder_request": "v2/gh/example/bench/main",
            "binder_persistent_request": "v2/gh/example/bench/main",
        }
        return user, "", opts, token, f"/user/{user}/"


class Baseline(Subject):
    name = "baseline"
    label = "batchspawner SlurmSpawner (host venv)"

    def __init__(self, cluster, directory, squeue, interval, venv):
        self.venv = venv
        super().__init__(cluster, directory, squeue, interval)

    def spawner_config(self):
        bin_ = self.venv / "bin"
        return f"""
from batchspawner import SlurmSpawner
c.JupyterHub.spawner_class = _timed(SlurmSpawner)
c.SlurmSpawner.exec_prefix = "sudo -E -u {{username}}"
c.SlurmSpawner.req_srun = ""
c.SlurmSpawner.req_partition = {PARTITION!r}
c.SlurmSpawner.req_runtime = "00:30:00"
c.SlurmSpawner.batchspawner_singleuser_cmd = {str(bin_ / "batchspawner-singleuser")!r}
c.SlurmSpawner.cmd = [{str(bin_ / "jupyterhub-singleuser")!r}]
c.SlurmSpawner.env_keep = ["PATH", "LANG", "LC_ALL", "SLURM_CONF"]
c.SlurmSpawner.batch_query_cmd = {str(self.squeue.path) + " -h -j {job_id} -o '%T %B'"!r}
"""

    def new_server(self):
        # the hub user must be a Unix account for plain batchspawner: the
        # service account, one named server per launch
        user = self.hub.create_user(self.cluster.service_user)
        self._n += 1
        server = f"s{self._n}-{secrets.token_hex(2)}"
        return user, server, {}, self.hub.token, f"/user/{user}/{server}/"

    def stop(self):
        jobs = self.hub.job_ids()
        super().stop()
        # batchspawner's job logs land in the account's home: remove ours
        for j in jobs:
            p = self.cluster.service_home / f"jupyterhub_slurmspawner_{j}.log"
            p.unlink(missing_ok=True)


def subjects(args, prefix, runtimes=RUNTIMES, baseline=True):
    """Our hubs (one per runtime) and the baseline's, started, sharing
    nothing but the cluster."""
    cluster = dev_cluster()
    registry, image = launch_registry(cluster)
    venv = baseline_venv() if baseline else None
    interval = getattr(args, "queue_poll_interval", None) or QUEUE_POLL_INTERVAL
    out = []
    for runtime in runtimes:
        d = workdir(f"{prefix}ours-{runtime}-")
        out.append(Ours(cluster, d, CommandCounter(d, "squeue"), interval, registry, image, runtime))
    if baseline:
        d = workdir(prefix + "baseline-")
        out.append(Baseline(cluster, d, CommandCounter(d, "squeue"), interval, venv))
    for s in out:
        s.start()
    return out


def warm(subject):
    """One untimed launch: the image's pages are in the node's cache,
    Python's caches are warm."""
    _, key, _ = subject.launch()
    subject.stop_server(key)


def run(args):
    quick = getattr(args, "quick", False)
    repeat = getattr(args, "launch_repeat", None) or (3 if quick else 12)
    subs = subjects(args, "launch-")
    try:
        samples = {s.name: [] for s in subs}
        phases = {s.name: {p: [] for p in PHASES} for s in subs}
        for s in subs:
            log(f"warm-up launch: {s.label}")
            warm(s)
        for i in range(repeat):
            for s in subs if i % 2 == 0 else reversed(subs):
                dt, key, t0 = s.launch()
                br = s.phases(key, t0, t0 + dt)
                s.stop_server(key)
                samples[s.name].append(dt)
                if br:
                    for p, v in br.items():
                        phases[s.name][p].append(v)
                log(f"{s.name} launch {i + 1}/{repeat}: {dt:.2f} s")
        base = Stats.of(samples["baseline"])
        rows = []
        for s in subs:
            if s.name == "baseline":
                continue
            rows.append(
                Row(
                    NAME,
                    f"warm launch, {s.runtime} (start → answering via proxy)",
                    None,
                    Stats.of(samples[s.name]),
                    baseline=base,
                    target=(Target("median", 2.5), Target("ratio", 0.8)),
                    note="baseline: batchspawner SlurmSpawner, host venv, no container",
                    extra={"queue_poll_interval": s.interval, "partition": PARTITION},
                )
            )
            for p in PHASES:
                a, b = phases[s.name][p], phases["baseline"][p]
                if a and b:
                    rows.append(Row(NAME, f"  {s.runtime}: {p}", None, Stats.of(a), baseline=Stats.of(b)))
        return rows
    finally:
        for s in subs:
            s.stop()
