"""Registry lookup: what BinderHub's ``get_image_manifest(name, tag)`` costs.

Before every launch BinderHub asks the registry whether the image exists; our
registry class answers with ``SIFRegistry.exists(image)``. Measured for hits
and misses with 10, 1 000 and 10 000 images in the registry, against the
floor: a bare ``os.path.isfile`` on a path computed beforehand. Target: p99
<= 1 ms at 10 000 images.

The registry is built in a temporary directory (``--workdir`` puts it on
another filesystem, e.g. the cluster's shared one, where it belongs).
"""

import hashlib
import json
import os
import random
import shutil
import tempfile

from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc.sif import minimal_sif

from .common import Row, Stats, Target, interleaved, time_each

NAME = "registry"
SIZES = (10, 1_000, 10_000)
TARGET = Target("p99", 1e-3)
PREFIX = "binderhub-hpc/binder-"
TAGS_PER_REPO = 4  # several refs of one repository share a directory


def add_arguments(parser):
    g = parser.add_argument_group("registry")
    g.add_argument(
        "--registry-sizes",
        default=",".join(map(str, SIZES)),
        help="numbers of images in the registry (default: %(default)s)",
    )
    g.add_argument(
        "--workdir",
        default=None,
        help="directory to build the registries in (default: a temporary one)",
    )


def image_name(repo, tag):
    """An image name shaped like BinderHub's: prefix + escaped slug : ref."""
    slug = f"org{repo % 97}-2drepo-2d{repo}-{hashlib.sha1(str(repo).encode()).hexdigest()[:6]}"
    return f"{PREFIX}{slug}:{hashlib.sha1(f'{repo}/{tag}'.encode()).hexdigest()}"


def populate(reg, n):
    """Put `n` small images (complete SIFs and metadata) into `reg`; returns
    their names.

    Written directly, in the layout publish() leaves: fsyncing 10 000
    publishes would time the disk, not the lookup.
    """
    images = []
    sif = minimal_sif(b"SIF")
    for i in range(n):
        image = image_name(i // TAGS_PER_REPO, i % TAGS_PER_REPO)
        p = reg.path(image)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(sif)
        reg.metadata_path(image).write_text(json.dumps({"image": image}))
        images.append(image)
    return images


def misses_for(n, count, rnd):
    """Names not in a registry of `n` images: half new refs of known
    repositories (their directory exists), half unknown repositories."""
    repos = max(1, n // TAGS_PER_REPO)
    out = []
    for i in range(count):
        if i % 2:
            out.append(image_name(rnd.randrange(repos), TAGS_PER_REPO + rnd.randrange(10**6)))
        else:
            out.append(image_name(repos + 1 + rnd.randrange(10**6), 0))
    return out


def measure(reg, images, calls, rounds):
    """Stats for reg.exists(image) and the baseline, over `images` (cycled)."""
    seq = [images[i % len(images)] for i in range(calls)]
    paths = [str(reg.path(image)) for image in seq]
    isfile = os.path.isfile
    exists = reg.exists
    samples = interleaved(
        {
            "baseline": lambda: time_each(isfile, paths),
            "exists": lambda: time_each(exists, seq),
        },
        rounds=rounds,
    )
    return samples, {image: exists(image) for image in set(seq)}


def run(args):
    sizes = [int(s) for s in str(getattr(args, "registry_sizes", None) or ",".join(map(str, SIZES))).split(",")]
    quick = getattr(args, "quick", False)
    calls, rounds = (1_000, 3) if quick else (4_000, 5)
    rnd = random.Random(1)
    rows = []
    workdir = tempfile.mkdtemp(prefix="bench-registry-", dir=getattr(args, "workdir", None))
    try:
        for n in sizes:
            reg = SIFRegistry(root=os.path.join(workdir, str(n)))
            images = populate(reg, n)
            for case, names, expect in (
                ("exists() hit", rnd.sample(images, len(images)), True),
                ("exists() miss", misses_for(n, min(calls, 2_000), rnd), False),
            ):
                samples, answers = measure(reg, names, calls, rounds)
                wrong = [i for i, a in answers.items() if a is not expect]
                if wrong:
                    raise AssertionError(f"{case}: exists() answered {not expect} for {wrong[:3]}")
                rows.append(
                    Row(
                        NAME,
                        case,
                        n,
                        Stats.of(samples["exists"]),
                        baseline=Stats.of(samples["baseline"]),
                        target=TARGET,
                        note="baseline: os.path.isfile(precomputed path)",
                        extra={"workdir_fs": _fs_type(workdir)},
                    )
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _fs_type(path):
    """The filesystem type of `path`, from /proc/mounts (Linux), or ''."""
    try:
        best, fstype = "", ""
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, typ
        return fstype
    except OSError:
        return ""
