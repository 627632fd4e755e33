"""Concurrent launches: N simultaneous launches of one cached image.

For N = 10, 25, 50 (``--quick``: 5, 10) both hubs of the warm-launch
benchmark get N start requests at once; each launch is timed from its own
start request to its server answering through the proxy. Reported per N:

- launch time p50/p95 over every launch (all must succeed), against plain
  batchspawner ``SlurmSpawner`` with the same N;
- scheduler queries per second while the launches are under way (calls of a
  counting ``squeue`` shim, from the first request to the last server
  answering): our spawners share one query per `queue_poll_interval`
  (target: flat as N grows, at most 1/interval); batchspawner issues one
  ``squeue`` per spawner per ``startup_poll_interval``;
- hub CPU (utime+stime of the hub process over the same window, as a
  fraction of one core).

The bursts run on the ``bench`` partition (oversubscribed 64-fold), which
other users of the dev cluster do not submit to.
"""

import time
from concurrent.futures import ThreadPoolExecutor

from .cluster import log
from .common import Row, Stats, Target
from .launch import subjects, warm

NAME = "concurrent"
SIZES = (10, 25, 50)
QUICK_SIZES = (5, 10)


def add_arguments(parser):
    g = parser.add_argument_group("concurrent")
    g.add_argument(
        "--concurrency",
        default=None,
        help=f"numbers of simultaneous launches (default: {','.join(map(str, SIZES))}; "
        f"--quick {','.join(map(str, QUICK_SIZES))})",
    )
    g.add_argument(
        "--bursts", type=int, default=None, help="bursts per N and subject (default: 2 up to N=25, then 1; --quick 1)"
    )


def burst(subject, n):
    """N launches at once; returns (durations, failures, squeue/s, hub CPU share, wall)."""
    hub = subject.hub
    servers = [subject.new_server() for _ in range(n)]
    cpu0, t0 = hub.cpu_seconds(), time.time()

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda spec: hub.timed_launch(spec, 60), servers))
    t1, cpu1 = time.time(), hub.cpu_seconds()
    wall = t1 - t0
    queries = subject.squeue.between(t0, t1)
    durations = [d for d, err, _ in results if d is not None]
    failures = [err for d, err, _ in results if d is None]
    with ThreadPoolExecutor(min(n, 16)) as pool:
        list(pool.map(lambda r: subject.stop_server(r[2], timeout=180), results))
    return durations, failures, queries / wall, (cpu1 - cpu0) / wall, wall


def run(args):
    quick = getattr(args, "quick", False)
    sizes = getattr(args, "concurrency", None)
    sizes = [int(x) for x in sizes.split(",")] if sizes else list(QUICK_SIZES if quick else SIZES)
    # the sites' runtime against the baseline (the warm-launch benchmark has both)
    subs = subjects(args, "concurrent-", runtimes=("apptainer",))
    rows = []
    try:
        for s in subs:
            log(f"warm-up launch: {s.label}")
            warm(s)
        for n in sizes:
            bursts = getattr(args, "bursts", None) or (1 if quick or n > 25 else 2)
            res = {s.name: {"d": [], "fail": [], "q": [], "cpu": [], "wall": []} for s in subs}
            for b in range(bursts):
                for s in subs if b % 2 == 0 else reversed(subs):
                    d, fail, q, cpu, wall = burst(s, n)
                    r = res[s.name]
                    r["d"] += d
                    r["fail"] += fail
                    r["q"].append(q)
                    r["cpu"].append(cpu)
                    r["wall"].append(wall)
                    log(
                        f"{s.name} N={n} burst {b + 1}/{bursts}: {len(d)}/{n} ok in {wall:.1f} s, "
                        f"{q:.2f} squeue/s, hub CPU {cpu:.0%}" + (f"; failures: {fail[:2]}" if fail else "")
                    )
            ours, base = res["ours-apptainer"], res["baseline"]
            total = n * bursts
            ok = f"{len(ours['d'])}/{total} ok (baseline {len(base['d'])}/{total})"
            if ours["d"]:
                rows.append(
                    Row(
                        NAME,
                        f"N={n}: launch time",
                        n,
                        Stats.of(ours["d"]),
                        baseline=Stats.of(base["d"]) if base["d"] else None,
                        note=ok + "; every launch timed from its own start request",
                        extra={
                            "failures": ours["fail"][:5],
                            "baseline_failures": base["fail"][:5],
                            "wall_s": ours["wall"],
                            "baseline_wall_s": base["wall"],
                        },
                    )
                )
            interval = subs[0].interval
            rows.append(
                Row(
                    NAME,
                    f"N={n}: squeue calls/s",
                    n,
                    Stats.of(ours["q"]),
                    baseline=Stats.of(base["q"]),
                    target=Target("median", 1 / interval, unit="cmd/s"),
                    unit="cmd/s",
                    note=f"one shared query per {interval:g} s; baseline: one per spawner per 0.25 s poll",
                )
            )
            rows.append(
                Row(
                    NAME,
                    f"N={n}: hub CPU",
                    n,
                    Stats.of([100 * c for c in ours["cpu"]]),
                    baseline=Stats.of([100 * c for c in base["cpu"]]),
                    unit="% core",
                    note="hub process utime+stime / wall, first request to last answer",
                )
            )
            if ours["fail"]:
                rows[-3 if ours["d"] else -2].note += f"; FAILED: {ours['fail'][0][:80]}"
        return rows
    finally:
        for s in subs:
            s.stop()
