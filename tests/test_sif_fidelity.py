"""Our SIF is Apptainer's SIF: for one image (ENV, PATH, labels, ENTRYPOINT
and CMD), the file our converter makes (mksquashfs + siftool from the
mounted image) and the one `apptainer build` makes from the image's OCI
archive agree in what a session sees: the environment scripts, `apptainer
exec env`, the user, the image's labels and what `apptainer run` does with
and without arguments. And `c.BuildPipeline.converter = "apptainer"` builds
a repository for real."""

import json
import os
import shutil
import subprocess
import uuid

import pytest

from binderhub_hpc.builder.convert import ApptainerConverter, ConversionSource, SquashfsSIFConverter
from binderhub_hpc.builder.export import PodmanImage
from binderhub_hpc.sif import root_partition

from build_fixtures import make_pipeline

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not shutil.which("apptainer"), reason="apptainer is not installed"),
]

CONTAINERFILE = """\
FROM {base}
ENV GREETING="hello world" \\
    DATA_DIR=/srv/data
ENV PATH=/opt/tools/bin:$PATH
LABEL org.example.purpose="fidelity" org.example.quote="it's \\"quoted\\""
ENTRYPOINT ["/bin/sh", "-c", "echo entry:\\"$0\\" \\"$@\\" GREETING=$GREETING"]
CMD ["default-arg"]
"""


@pytest.fixture(scope="module")
def sifs(cluster, base_image, tmp_path_factory):
    """(ours, apptainer's) SIF of one image, readable by the job account."""
    ctx = tmp_path_factory.mktemp("fidelity")
    (ctx / "Containerfile").write_text(CONTAINERFILE.format(base=base_image))
    tag = "localhost/binderhub-hpc-fidelity:" + uuid.uuid4().hex[:8]
    subprocess.run(["podman", "build", "-q", "--pull=never", "-t", tag, str(ctx)], check=True, capture_output=True)
    d = cluster.root / "test-registries" / ("fidelity-" + uuid.uuid4().hex[:8])
    d.mkdir(parents=True)
    for p in (d, d.parent):
        os.chmod(p, 0o755)
    podman = PodmanImage(rootless=False)
    config = podman.inspect(tag)
    ours, theirs, archive = d / "ours.sif", d / "apptainer.sif", d / "image.oci.tar"
    try:
        ours.touch()
        SquashfsSIFConverter().convert(ConversionSource(tag, config, podman), ours)
        podman.save_oci_archive(tag, archive)
        theirs.touch()
        ApptainerConverter().convert(ConversionSource(tag, config, podman, archive), theirs)
        for p in (ours, theirs):
            os.chmod(p, 0o644)
        yield ours, theirs
    finally:
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def apptainer(cluster, *args):
    """apptainer as the job account (root here lacks capabilities it asks for)."""
    p = cluster.as_service_user(["apptainer", *args], check=False, timeout=300)
    assert p.returncode == 0, p.stdout
    return p.stdout


def env_of(cluster, sif):
    out = apptainer(cluster, "exec", "--containall", "--cleanenv", str(sif), "env")
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    # what names the container file itself differs, by construction
    return {
        k: v
        for k, v in env.items()
        if not k.startswith(("APPTAINER_CONTAINER", "APPTAINER_NAME", "SINGULARITY_CONTAINER", "SINGULARITY_NAME"))
        and k not in ("SHLVL", "_", "PWD")
    }


def test_the_session_environment_is_the_same(cluster, sifs):
    ours, theirs = sifs
    mine, apptainers = env_of(cluster, ours), env_of(cluster, theirs)
    assert mine == apptainers
    assert mine["PATH"].startswith("/opt/tools/bin:/opt/venv/bin:")
    assert mine["GREETING"] == "hello world" and mine["DATA_DIR"] == "/srv/data"
    # the Dockerfile's ENV comes from the same script, line for line
    script = "/.singularity.d/env/10-docker2singularity.sh"
    assert apptainer(cluster, "exec", str(ours), "cat", script) == apptainer(
        cluster, "exec", str(theirs), "cat", script
    )
    assert apptainer(cluster, "exec", str(ours), "id", "-u") == apptainer(cluster, "exec", str(theirs), "id", "-u")


def test_run_does_the_same_with_and_without_arguments(cluster, sifs):
    ours, theirs = sifs
    for args in ((), ("a1", "b 2")):
        mine = apptainer(cluster, "run", "--containall", "--cleanenv", str(ours), *args)
        apptainers = apptainer(cluster, "run", "--containall", "--cleanenv", str(theirs), *args)
        assert mine == apptainers, args
    assert mine.strip() == "entry:a1 b 2 GREETING=hello world"
    # Apptainer's own runscript passes run's arguments through the shell
    # again unless APPTAINER_NO_EVAL is set; ours never does (what docker
    # and podman do with ENTRYPOINT and CMD). With it set, both agree on
    # arguments holding shell syntax too.
    no_eval = ["env", "APPTAINER_NO_EVAL=1"]
    outs = [
        cluster.as_service_user(
            [*no_eval, "apptainer", "run", "--containall", str(sif), "$HOME", "a;b"], check=False, timeout=300
        ).stdout
        for sif in (ours, theirs)
    ]
    assert outs[0] == outs[1] == "entry:$HOME a;b GREETING=hello world\n", outs


def test_the_images_labels_are_kept(cluster, sifs):
    ours, theirs = sifs

    def labels(sif):
        return json.loads(apptainer(cluster, "inspect", "--json", "--labels", str(sif)))["data"]["attributes"]["labels"]

    mine, apptainers = labels(ours), labels(theirs)
    image_labels = {k: v for k, v in apptainers.items() if not k.startswith("org.label-schema.")}
    # Apptainer adds its build's own org.label-schema.* labels; we add the image name
    assert {k: v for k, v in mine.items() if k in image_labels} == image_labels
    assert image_labels["org.example.quote"] == 'it\'s "quoted"'
    assert mine["org.binderhub-hpc.image"].startswith("localhost/binderhub-hpc-fidelity:")


def test_both_have_a_root_partition_our_podman_sessions_can_mount(sifs):
    for sif in sifs:
        part = root_partition(sif)
        with open(sif, "rb") as f:
            f.seek(part.offset)
            assert f.read(4) == b"hsqs"  # squashfs magic at the offset we give squashfuse


def test_the_apptainer_converter_builds_a_repository_for_real(cluster, fixture_repo, registry_root):
    from binderhub_hpc.builder.pipeline import BuildRequest

    url, sha = fixture_repo
    image = f"binderhub-hpc/test-apptainer-converter:{sha}"
    result = make_pipeline(registry_root, BuildPipeline__converter="apptainer").run(BuildRequest(url, sha, image))
    assert result.ok, result.message
    from binderhub_hpc.registry import SIFRegistry

    path = SIFRegistry(root=str(registry_root)).lookup(image)
    assert path is not None and root_partition(path).size > 0
    assert "apptainer" in path.with_suffix(".json").read_text()  # the metadata names the converter
    listing = subprocess.run(
        ["apptainer", "exec", "--userns", str(path), "ls", "/home/jovyan"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "hello.ipynb" in listing
