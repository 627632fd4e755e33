"""Cold click → notebook with podman: a repository never built before, from
the build request to its server answering through the proxy, as a first
Binder click sees it (build, publish, then launch).

Subjects, interleaved in the same run, each on a fresh repository:

- ``sif``: the registry publishes one file per image, the SIF; the podman
  job runs it (squashfuse mount of its root partition, ``run --rootfs``);
- ``sif + oci-archive``: what podman sites published before podman ran
  from the SIF: the same build plus ``podman save`` of an OCI archive
  beside the SIF (the launch is the same SIF launch, so the difference is
  the second format's cost alone).

Rows: the whole time and its build part, and the registry's bytes per image.
"""

import os
import time

from binderhub_hpc_testing.hub import spawner_config

from .buildutil import Fixtures, make_pipeline
from .cluster import PARTITION, CommandCounter, dev_cluster, log, workdir
from .common import Row, Stats
from .launch import QUEUE_POLL_INTERVAL, Ours

NAME = "cold"
SUBJECTS = {"sif": ["sif"], "sif + oci-archive": ["sif", "oci-archive"]}


def add_arguments(parser):
    g = parser.add_argument_group("cold")
    g.add_argument("--cold-repeat", type=int, default=None, help="cold launches per subject (default: 4, --quick 1)")


class ColdHub(Ours):
    """Our podman hub on a registry of its own."""

    def spawner_config(self):
        return """
from binderhub_hpc.spawner.spawner import SlurmBinderSpawner
c.JupyterHub.spawner_class = _timed(SlurmBinderSpawner)
""" + spawner_config(
            self.registry.root,
            partition=PARTITION,
            interval=self.interval,
            runtime="podman",
            formats=self.registry.formats,
            extra=f"c.SlurmQueue.squeue = {str(self.squeue.path)!r}\n",
        )


def _registry_bytes(root):
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def run(args):
    from binderhub_hpc.builder.pipeline import BuildRequest

    quick = getattr(args, "quick", False)
    repeat = getattr(args, "cold_repeat", None) or (1 if quick else 4)
    cluster = dev_cluster()
    fx = Fixtures("cold-")
    hubs, pipelines = {}, {}
    try:
        for name, formats in SUBJECTS.items():
            root = fx.registry_root()
            for d in (root, root.parent):
                os.chmod(d, 0o755)
            pipelines[name] = pipeline = make_pipeline(
                root, SIFRegistry__formats=formats, SquashfsSIFConverter__compressor="zstd"
            )
            d = workdir("cold-hub-")
            hubs[name] = ColdHub(
                cluster, d, CommandCounter(d, "squeue"), QUEUE_POLL_INTERVAL, pipeline.registry, None, runtime="podman"
            ).start()
        total = {n: [] for n in SUBJECTS}
        build = {n: [] for n in SUBJECTS}
        size = {n: [] for n in SUBJECTS}

        def cold(name):
            pipeline, hub = pipelines[name], hubs[name]
            url, sha, image = fx.repo()
            before = _registry_bytes(pipeline.registry.root)
            t0 = time.time()
            res = pipeline.run(BuildRequest(url, sha, image))
            if res.outcome != "success":
                raise RuntimeError(f"cold build failed: {res.error}")
            t_built = time.time()
            hub.image = image
            dt, key, _ = hub.launch()
            total[name].append(t_built - t0 + dt)
            build[name].append(t_built - t0)
            size[name].append(_registry_bytes(pipeline.registry.root) - before)
            hub.stop_server(key)
            log(f"cold {name}: build {t_built - t0:.2f} s, launch {dt:.2f} s")

        for i in range(repeat):
            for name in SUBJECTS if i % 2 == 0 else reversed(list(SUBJECTS)):
                cold(name)
        base_name = "sif + oci-archive"
        rows = []
        for name in SUBJECTS:
            if name == base_name:
                continue
            rows.append(
                Row(
                    NAME,
                    f"click → notebook, podman, registry {name}",
                    None,
                    Stats.of(total[name]),
                    baseline=Stats.of(total[base_name]),
                    note=f"baseline: {base_name} (before podman ran from the SIF)",
                )
            )
            rows.append(
                Row(NAME, f"  build part, {name}", None, Stats.of(build[name]), baseline=Stats.of(build[base_name]))
            )
            rows.append(
                Row(
                    NAME,
                    f"  registry bytes per image, {name}",
                    None,
                    Stats.of([s / 1e6 for s in size[name]]),
                    baseline=Stats.of([s / 1e6 for s in size[base_name]]),
                    unit="MB",
                )
            )
        return rows
    finally:
        for hub in hubs.values():
            hub.stop()
        fx.cleanup()
