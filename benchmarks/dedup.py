"""Build deduplication: 20 concurrent requests for one unbuilt repository.

Twenty threads (as BinderHub's build thread pool would run them), each with
its own ``BuildPipeline`` on one registry, ask for the same image at once.
Counted: repo2docker runs (a counting shim as ``Repo2Docker.command``),
target 1; timed: from the requests to the last one answered, against a
single build of an equal repository in the same run.
"""

import threading
import time

from .buildutil import Fixtures, make_pipeline
from .cluster import CommandCounter, log
from .common import Row, Stats, Target

NAME = "dedup"


def add_arguments(parser):
    g = parser.add_argument_group("dedup")
    g.add_argument("--dedup-requests", type=int, default=20, help="concurrent requests (default: 20)")
    g.add_argument("--dedup-repeat", type=int, default=None, help="rounds (default: 3, --quick 1)")


def run(args):
    from binderhub_hpc.builder.pipeline import BuildRequest

    quick = getattr(args, "quick", False)
    n = getattr(args, "dedup_requests", None) or 20
    repeat = getattr(args, "dedup_repeat", None) or (1 if quick else 3)
    fx = Fixtures("dedup-")
    try:
        counter = CommandCounter(fx.dir, "jupyter-repo2docker")
        kw = dict(SquashfsSIFConverter__compressor="zstd", Repo2Docker__command=[str(counter.path)])
        last, first, single, started, outcomes = [], [], [], [], []
        log("warm-up build")
        root = fx.registry_root()
        url, sha, image = fx.repo()
        make_pipeline(root, **kw).run(BuildRequest(url, sha, image))
        for i in range(repeat):
            # one build alone
            root = fx.registry_root()
            url, sha, image = fx.repo()
            t0 = time.monotonic()
            res = make_pipeline(root, **kw).run(BuildRequest(url, sha, image))
            single.append(time.monotonic() - t0)
            if res.outcome != "success":
                raise RuntimeError(f"single build failed: {res.error}")
            # n at once
            root = fx.registry_root()
            url, sha, image = fx.repo()
            pipelines = [make_pipeline(root, **kw) for _ in range(n)]
            results, done = [None] * n, [0.0] * n
            calls0 = len(counter.calls())
            barrier = threading.Barrier(n + 1)

            def one(k, barrier, pipeline, request, results, done):
                barrier.wait()
                results[k] = pipeline.run(request)
                done[k] = time.monotonic()

            request = BuildRequest(url, sha, image)
            threads = [
                threading.Thread(target=one, args=(k, barrier, pipelines[k], request, results, done)) for k in range(n)
            ]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.monotonic()
            for t in threads:
                t.join()
            last.append(max(done) - t0)
            builder = next(k for k, r in enumerate(results) if r.outcome == "success")
            first.append(done[builder] - t0)
            started.append(len(counter.calls()) - calls0)
            counts = {}
            for r in results:
                counts[r.outcome] = counts.get(r.outcome, 0) + 1
            outcomes.append(counts)
            log(
                f"dedup {i + 1}/{repeat}: {started[-1]} build(s) for {n} requests, last answered after "
                f"{last[-1]:.2f} s, the builder after {first[-1]:.2f} s (single build {single[-1]:.2f} s); "
                f"outcomes {counts}"
            )
        ok = all(c.get("success", 0) + c.get("cached", 0) == n for c in outcomes)
        return [
            Row(
                NAME,
                f"{n} requests: builds started",
                n,
                Stats.of(started),
                target=Target("median", 1, unit="builds"),
                unit="builds",
                note=f"outcomes {outcomes[-1]}" + ("" if ok else " (NOT all succeeded)"),
            ),
            Row(
                NAME,
                f"{n} requests: last answered",
                n,
                Stats.of(last),
                baseline=Stats.of(single),
                note="baseline: one build of an equal repository alone",
                extra={"outcomes": outcomes, "builder_answered_s": first},
            ),
        ]
    finally:
        fx.cleanup()
