"""Builds are bounded: memory, CPUs, scratch disk, image size and published
size, each with a real build that goes over it and a clear message in the
Binder log; nothing of such a build is published."""

import json
import uuid

import pytest
from traitlets import TraitError

from binderhub_hpc.builder.limits import BuildLimits, parse_size
from binderhub_hpc.builder.pipeline import BuildRequest
from binderhub_hpc_testing.repo import dockerfile, make_repo

from build_fixtures import make_pipeline

FAST = {"SquashfsSIFConverter__compressor": "lz4"}


def build(tmp_path, base, extra, **limits):
    """Build a repository whose Dockerfile ends with `extra` under `limits`
    (BuildLimits traits); returns (result, log text, pipeline, image)."""
    name = uuid.uuid4().hex[:8]
    sha = make_repo(tmp_path / f"repo-{name}", base, files={"Dockerfile": dockerfile(base, name) + extra})
    cfg = dict(FAST, **{f"BuildLimits__{k}": v for k, v in limits.items()})
    pipeline = make_pipeline(tmp_path / "registry", **cfg)
    image = f"binderhub-hpc/test-limits-{name}:{sha}"
    log = []
    result = pipeline.run(
        BuildRequest(f"file://{tmp_path}/repo-{name}", sha, image),
        lambda kind, payload: log.append(json.loads(payload)),
    )
    return result, "".join(d.get("message", "") for d in log), pipeline, image


def assert_failed_clearly(result, text, pipeline, image, words):
    assert result.outcome == "failure", result
    assert words in result.error, result.error
    # the Binder log says why, in its last line
    assert text.rstrip().splitlines()[-1].startswith("Build failed: ") and words in text.splitlines()[-1]
    assert not pipeline.registry.exists(image) and not pipeline.registry.path(image).exists()
    assert not list(pipeline.registry.path(image).parent.glob(".*.tmp"))
    assert not pipeline.podman.exists(image)


def test_sizes_are_bytes_or_human_sizes_and_never_negative():
    assert BuildLimits(memory="512M").memory == 512 * 1024**2
    assert BuildLimits(scratch="1.5G").scratch == int(1.5 * 1024**3)
    assert BuildLimits(image_size=1000).image_size == 1000
    for bad in ("-1", -1, "lots", True):
        with pytest.raises(TraitError):
            BuildLimits(memory=bad)
    with pytest.raises(TraitError):
        BuildLimits(cpus=-1)
    with pytest.raises(TraitError):
        BuildLimits(poll_interval=0)
    assert parse_size("2g") == 2 * 1024**3


@pytest.mark.cluster
def test_a_run_step_over_the_memory_limit_stops_the_build(build_base, tmp_path):
    result, text, pipeline, image = build(
        tmp_path,
        build_base,
        "RUN python3 -c \"import time; x = bytearray(400 * 2**20); x[::4096] = b'x' * len(x[::4096]); "
        "print('allocated', flush=True); time.sleep(120)\"\n",
        memory="200M",
        poll_interval=0.5,
    )
    assert_failed_clearly(result, text, pipeline, image, "more than the 210 MB a build may use")
    assert "of memory" in result.error and "c.BuildLimits.memory" in result.error


@pytest.mark.cluster
def test_a_build_sees_only_the_cpus_it_may_use(build_base, tmp_path):
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to show a limit of 1")
    result, text, pipeline, image = build(tmp_path, build_base, 'RUN echo "cpus: $(nproc)"\n', cpus=1)
    assert result.outcome == "success", result.error
    assert "cpus: 1\n" in text
    result, text, *_ = build(tmp_path, build_base, 'RUN echo "cpus: $(nproc)"\n')
    assert f"cpus: {len(os.sched_getaffinity(0))}\n" in text


@pytest.mark.cluster
def test_a_run_step_writing_over_the_scratch_limit_stops_the_build(build_base, tmp_path):
    result, text, pipeline, image = build(
        tmp_path,
        build_base,
        "RUN dd if=/dev/zero of=/home/jovyan/big bs=1M count=600 status=none && echo written && sleep 120\n",
        scratch="100M",
        poll_interval=0.5,
    )
    assert_failed_clearly(result, text, pipeline, image, "more than the 105 MB a build may use")
    assert "scratch disk" in result.error and "c.BuildLimits.scratch" in result.error


@pytest.mark.cluster
def test_an_image_over_the_size_limit_is_not_converted(build_base, tmp_path):
    result, text, pipeline, image = build(tmp_path, build_base, "", image_size="100M")
    assert_failed_clearly(result, text, pipeline, image, "more than the 105 MB an image may be")
    assert "Converting" not in text


@pytest.mark.cluster
def test_files_over_the_published_size_limit_are_not_published(build_base, tmp_path):
    result, text, pipeline, image = build(tmp_path, build_base, "", published_size="10M")
    assert_failed_clearly(result, text, pipeline, image, "more than the 10.5 MB the registry takes")
    assert "Converting" in text


@pytest.mark.cluster
def test_a_build_within_every_limit_builds_and_records_its_peaks(build_base, tmp_path):
    result, text, pipeline, image = build(
        tmp_path, build_base, "", memory="4G", scratch="8G", cpus=1, image_size="4G", published_size="4G"
    )
    assert result.outcome == "success", result.error
    meta = pipeline.registry.metadata(image)
    assert 0 < meta["peak_memory"] <= 4 * 1024**3 and 0 <= meta["peak_scratch"] <= 8 * 1024**3
