"""Build overhead: ``BuildPipeline.run`` on a fixture repository against the
same steps run by hand as plain commands, in the same run, interleaved.

Each build gets a fresh repository (a Dockerfile FROM the local base image
plus a notebook, unique content) so neither side hits a cache beyond the
base image's layers. By hand: ``jupyter-repo2docker`` with the pipeline's
own options, ``podman image mount``, ``mksquashfs`` (same compressor),
``siftool new`` + ``siftool add``, ``mv`` into place, ``podman rmi``. The
pipeline adds the image lock, ``podman image inspect``, the Apptainer
metadata (a mksquashfs pseudo file), the atomic publish with metadata and
fsync. Target: ratio <= 1.05.
"""

from .buildutil import Fixtures, by_hand, make_pipeline
from .cluster import log
from .common import Row, Stats, Target

NAME = "build"
TARGET = Target("ratio", 1.05)


def add_arguments(parser):
    g = parser.add_argument_group("build")
    g.add_argument("--build-repeat", type=int, default=None, help="builds per side (default: 6, --quick 1)")


def run(args):
    from binderhub_hpc.builder.pipeline import BuildRequest

    quick = getattr(args, "quick", False)
    repeat = getattr(args, "build_repeat", None) or (1 if quick else 6)
    fx = Fixtures("build-")
    try:
        reg_root = fx.registry_root()
        pipeline = make_pipeline(reg_root, SquashfsSIFConverter__compressor="zstd")
        compressor = pipeline._converter().compression_args()
        ours, base, steps_ours, steps_hand = [], [], {}, {}

        def pipeline_build():
            url, sha, image = fx.repo()
            res = pipeline.run(BuildRequest(url, sha, image))
            if res.outcome != "success":
                raise RuntimeError(f"pipeline build failed: {res.error}")
            for k, v in res.metadata.get("durations", {}).items():
                steps_ours.setdefault(k, []).append(v)
            return res

        def hand_build():
            url, sha, image = fx.repo()
            steps = by_hand(url, sha, image, reg_root / f"by-hand-{len(base)}.sif", compressor)
            for k, v in steps.items():
                steps_hand.setdefault(k, []).append(v)

        import time

        log("warm-up build (base image layers, repo2docker imports)")
        pipeline_build()
        for i in range(repeat):
            order = (("ours", pipeline_build), ("hand", hand_build))
            for side, fn in order if i % 2 == 0 else reversed(order):
                t0 = time.monotonic()
                fn()
                dt = time.monotonic() - t0
                (ours if side == "ours" else base).append(dt)
                log(f"build {side} {i + 1}/{repeat}: {dt:.2f} s")
        mean = lambda xs: round(sum(xs) / len(xs), 3)  # noqa: E731
        return [
            Row(
                NAME,
                "fixture repo → SIF in registry (zstd)",
                None,
                Stats.of(ours),
                baseline=Stats.of(base),
                target=TARGET,
                note="baseline: repo2docker CLI, podman image mount, mksquashfs, siftool, mv, rmi",
                extra={
                    "steps_ours_mean_s": {k: mean(v) for k, v in steps_ours.items()},
                    "steps_by_hand_mean_s": {k: mean(v) for k, v in steps_hand.items()},
                    "compressor": compressor,
                },
            ),
        ]
    finally:
        fx.cleanup()
