"""Scale: up to 100 concurrent launches over the compute nodes of the
multi-node dev cluster (``binderhub-hpc devcluster up --nodes 4``).

Our SlurmBinderSpawner (Apptainer sessions) on the hub node; for N = 25, 50,
100 (``--quick``: 10, 25) simultaneous launches of one cached image:

- how many succeed, and how the sessions spread over the compute nodes;
- scheduler queries per second while the launches run (a counting
  ``squeue`` shim): one shared query per interval, flat as N grows;
- hub CPU seconds per launch (the hub process's utime+stime over the burst);
- with a launch quota below N (``SchedulerLaunchQuota.total_quota`` = N/2,
  checked before each start request as BinderHub checks it, requests
  arriving together): how many are refused.
"""

import asyncio
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from .cluster import dev_cluster, log
from .common import Row, Stats, Target
from .launch import subjects, warm

NAME = "scale"
SIZES = (25, 50, 100)
QUICK_SIZES = (10, 25)


def add_arguments(parser):
    g = parser.add_argument_group("scale")
    g.add_argument(
        "--scale", default=None, help=f"numbers of simultaneous launches (default: {','.join(map(str, SIZES))})"
    )


def _nodes_of(cluster, job_ids):
    if not job_ids:
        return {}
    out = subprocess.run(
        ["squeue", "-h", "-o", "%N", "-j", ",".join(job_ids)], env=cluster.full_env(), capture_output=True, text=True
    ).stdout.split()
    spread = {}
    for node in out:
        spread[node] = spread.get(node, 0) + 1
    return spread


def burst(cluster, subject, n, quota=None):
    """N launch requests at once; returns a dict of what happened."""
    hub = subject.hub
    specs = [subject.new_server() for _ in range(n)]
    refused = 0
    admitted = specs
    if quota is not None:
        # BinderHub checks the quota as each request arrives, one event loop
        loop = asyncio.new_event_loop()
        admitted = []
        for spec in specs:
            try:
                loop.run_until_complete(quota.check_repo_quota(subject.image, {}, "https://example.org/bench.git"))
                admitted.append(spec)
            except Exception as e:  # noqa: BLE001  (LaunchQuotaExceeded: counted)
                if type(e).__name__ != "LaunchQuotaExceeded":
                    raise
                refused += 1
        loop.close()
    jobs_before = set(hub.job_ids())
    cpu0, t0 = hub.cpu_seconds(), time.time()

    with ThreadPoolExecutor(max(1, len(admitted))) as pool:
        results = list(pool.map(lambda spec: hub.timed_launch(spec, 120), admitted))
    t1, cpu1 = time.time(), hub.cpu_seconds()
    spread = _nodes_of(cluster, sorted(set(hub.job_ids()) - jobs_before))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda r: subject.stop_server(r[2], timeout=300), results))
    ok = [d for d, err, _ in results if d is not None]
    return {
        "ok": ok,
        "failures": [err for d, err, _ in results if d is None],
        "refused": refused,
        "qps": subject.squeue.between(t0, t1) / (t1 - t0),
        "cpu_per_launch": (cpu1 - cpu0) / max(1, len(ok)),
        "wall": t1 - t0,
        "spread": spread,
    }


def run(args):
    cluster = dev_cluster()
    if not cluster.multi:
        raise RuntimeError("the scale benchmark needs the multi-node dev cluster (devcluster up --nodes 4)")
    quick = getattr(args, "quick", False)
    sizes = getattr(args, "scale", None)
    sizes = [int(x) for x in sizes.split(",")] if sizes else list(QUICK_SIZES if quick else SIZES)
    subs = subjects(args, "scale-", runtimes=("apptainer",), baseline=False)
    (ours,) = subs
    rows = []
    try:
        warm(ours)
        interval = ours.interval
        for n in sizes:
            r = burst(cluster, ours, n)
            log(
                f"N={n}: {len(r['ok'])}/{n} ok in {r['wall']:.0f} s, {r['qps']:.2f} squeue/s, "
                f"{r['cpu_per_launch']:.2f} hub CPU s/launch, nodes {r['spread']}"
            )
            if r["ok"]:
                rows.append(
                    Row(
                        NAME,
                        f"N={n}: launch time",
                        n,
                        Stats.of(r["ok"]),
                        note=f"{len(r['ok'])}/{n} ok; sessions per node {r['spread']}"
                        + (f"; FAILED: {r['failures'][0][:80]}" if r["failures"] else ""),
                        extra={"failures": r["failures"][:5], "spread": r["spread"], "wall_s": r["wall"]},
                    )
                )
            rows.append(
                Row(
                    NAME,
                    f"N={n}: squeue calls/s",
                    n,
                    Stats.of([r["qps"]]),
                    unit="cmd/s",
                    target=Target("median", 1 / interval, unit="cmd/s"),
                    note=f"one shared query per {interval:g} s, whatever N",
                )
            )
            rows.append(
                Row(
                    NAME,
                    f"N={n}: hub CPU per launch",
                    n,
                    Stats.of([r["cpu_per_launch"]]),
                    unit="s",
                    note="hub process utime+stime over the burst / launches that succeeded",
                )
            )
        try:
            from binderhub_hpc.binderhub import SchedulerLaunchQuota
        except ImportError:
            log("BinderHub is not importable: no quota run")
            return rows
        n = sizes[-1]
        quota = SchedulerLaunchQuota(total_quota=n // 2, job_user=cluster.service_user, interval=interval)
        r = burst(cluster, ours, n, quota=quota)
        log(f"quota {n // 2}, N={n}: {r['refused']} refused, {len(r['ok'])} ok")
        rows.append(
            Row(
                NAME,
                f"N={n}, quota {n // 2}: refused",
                n,
                Stats.of([r["refused"]]),
                unit="launches",
                note=f"{len(r['ok'])} admitted and ready, {r['refused']} refused with BinderHub's message",
            )
        )
        return rows
    finally:
        ours.stop()
