"""Conversion: a built podman image -> SIF, against the floor.

Subject: ``SquashfsSIFConverter.convert`` (podman image mount, the
Apptainer metadata as a mksquashfs pseudo file, mksquashfs, siftool, unmount).
Floor, in the same run and interleaved: ``mksquashfs`` alone on the same
mounted root filesystem with the same compressor (mounted outside its timer).
For gzip (mksquashfs's default, level 9) and zstd (level 3). Reported: time,
throughput (image size / median time) and SIF size against image size.
Target: ratio <= 1.2.

Against what a site would do by hand, where Apptainer is installed: ``podman
save`` to an OCI archive, then ``apptainer build x.sif oci-archive:...`` with
its defaults; ours with its default (zstd). Time and SIF size, same run.
"""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .buildutil import file_size, image_size
from .cluster import dev_cluster, ensure_bench_image, log
from .common import Row, Stats, Target

NAME = "convert"
TARGET = Target("ratio", 1.2)


def add_arguments(parser):
    g = parser.add_argument_group("convert")
    g.add_argument(
        "--convert-repeat",
        type=int,
        default=None,
        help="conversions per side and compressor (default: gzip 3, zstd 5; --quick 1)",
    )


def run(args):
    from binderhub_hpc.builder.convert import ConversionSource, SquashfsSIFConverter
    from binderhub_hpc.builder.export import PodmanImage

    quick = getattr(args, "quick", False)
    image = ensure_bench_image(dev_cluster())
    podman = PodmanImage(rootless=False)
    config = podman.inspect(image)
    size = image_size(image)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir="/var/tmp") as tmp:
        tmp = Path(tmp)
        for comp in ("gzip", "zstd"):
            repeat = getattr(args, "convert_repeat", None) or (1 if quick else (3 if comp == "gzip" else 5))
            conv = SquashfsSIFConverter(compressor=comp)
            floor_args = ["-comp", comp] + (["-Xcompression-level", "3"] if comp == "zstd" else [])
            ours, base, sif_size, sq_size = [], [], 0, 0
            for i in range(repeat):
                for side in ("ours", "floor") if i % 2 == 0 else ("floor", "ours"):
                    if side == "ours":
                        dest = tmp / "out.sif"
                        dest.touch()
                        t0 = time.monotonic()
                        conv.convert(ConversionSource(image, config, podman), dest)
                        ours.append(time.monotonic() - t0)
                        sif_size = file_size(dest)
                        dest.unlink()
                    else:
                        out = tmp / "floor.squashfs"
                        with podman.mount(image) as rootfs:
                            t0 = time.monotonic()
                            subprocess.run(
                                ["mksquashfs", str(rootfs), str(out), *floor_args, "-noappend", "-no-progress"],
                                check=True,
                                capture_output=True,
                            )
                            base.append(time.monotonic() - t0)
                        sq_size = file_size(out)
                        out.unlink()
                    log(f"convert {comp} {side} {i + 1}/{repeat}: {(ours if side == 'ours' else base)[-1]:.2f} s")
            st = Stats.of(ours)
            mbs = size / 1e6 / st.median
            rows.append(
                Row(
                    NAME,
                    f"image → SIF, {comp}",
                    None,
                    st,
                    baseline=Stats.of(base),
                    target=TARGET,
                    note=(
                        f"{mbs:.0f} MB/s; SIF {sif_size / 1e6:.0f} MB = {sif_size / size:.0%} of "
                        f"{size / 1e6:.0f} MB image; floor: mksquashfs alone"
                    ),
                    extra={
                        "image_bytes": size,
                        "sif_bytes": sif_size,
                        "floor_squashfs_bytes": sq_size,
                        "mb_per_s": mbs,
                        "floor_mb_per_s": size / 1e6 / Stats.of(base).median,
                    },
                )
            )
        if shutil.which("apptainer"):
            rows.append(_against_apptainer_build(args, image, config, podman, size, tmp))
    return rows


def _against_apptainer_build(args, image, config, podman, size, tmp):
    from binderhub_hpc.builder.convert import ConversionSource, SquashfsSIFConverter

    quick = getattr(args, "quick", False)
    repeat = getattr(args, "convert_repeat", None) or (1 if quick else 3)
    conv = SquashfsSIFConverter()
    ours, base, sizes = [], [], {}
    for i in range(repeat):
        for side in ("ours", "apptainer") if i % 2 == 0 else ("apptainer", "ours"):
            dest = tmp / f"{side}.sif"
            if side == "ours":
                dest.touch()
                t0 = time.monotonic()
                conv.convert(ConversionSource(image, config, podman), dest)
                ours.append(time.monotonic() - t0)
            else:
                archive = tmp / "image.oci.tar"
                t0 = time.monotonic()
                subprocess.run(
                    ["podman", "save", "--format", "oci-archive", "-o", str(archive), image],
                    check=True,
                    capture_output=True,
                )
                subprocess.run(
                    ["apptainer", "build", "--force", "--disable-cache", str(dest), f"oci-archive:{archive}"],
                    check=True,
                    capture_output=True,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp), "APPTAINER_TMPDIR": str(tmp)},
                )
                base.append(time.monotonic() - t0)
                archive.unlink()
            sizes[side] = file_size(dest)
            dest.unlink()
            log(f"convert vs apptainer build {side} {i + 1}/{repeat}: {(ours if side == 'ours' else base)[-1]:.2f} s")
    return Row(
        NAME,
        "image → SIF, ours vs apptainer build",
        None,
        Stats.of(ours),
        baseline=Stats.of(base),
        note=(
            f"baseline: podman save + apptainer build (its defaults); SIF {sizes['ours'] / 1e6:.0f} MB (ours, "
            f"zstd) vs {sizes['apptainer'] / 1e6:.0f} MB (apptainer) from a {size / 1e6:.0f} MB image"
        ),
        extra={"image_bytes": size, "sif_bytes": sizes["ours"], "apptainer_sif_bytes": sizes["apptainer"]},
    )
