"""Apptainer / SingularityCE as the runtime of Binder jobs: the exact command
line and exports the job script gets, runtime detection, and (where apptainer
or singularity is on PATH) a real SIF run with our flags.

Neither Apptainer nor SingularityCE is in any registry reachable on the
development machine, so the real run is skipped there.
"""

import os
import shlex
import shutil
import subprocess
import uuid

import pytest

from binderhub_hpc.spawner import runtime as runtime_mod
from binderhub_hpc.spawner.runtime import ApptainerRuntime, PodmanRuntime, detect_runtime, make_runtime

SERVER = ["jupyter", "notebook", "--ip=0.0.0.0", "--NotebookApp.base_url=/user/alice/"]
IMAGE = "/shared/registry/binder/x/abc.sif"
CONTAINED = ["exec", "--contain", "--cleanenv", "--no-home", "--writable-tmpfs", "--pwd", "/home/jovyan",
             "--bind", "$BINDER_SCRATCH:/tmp", "--env", "HOME=/home/jovyan"]


def test_exact_argv():
    rt = ApptainerRuntime(executable="/usr/bin/apptainer")
    assert rt.command(IMAGE, SERVER) == ["/usr/bin/apptainer", *CONTAINED, IMAGE, *SERVER]


def test_exact_argv_with_gpus_and_site_args():
    rt = ApptainerRuntime(executable="apptainer", extra_args=["--bind", "/scratch/datasets:/data:ro"])
    assert rt.command(IMAGE, SERVER, gpus=True) == [
        "apptainer", *CONTAINED, "--nv", "--bind", "/scratch/datasets:/data:ro", IMAGE, *SERVER]


def test_without_writable_tmpfs_and_other_workdir():
    rt = ApptainerRuntime(executable="apptainer", writable_tmpfs=False, workdir="/srv/repo")
    argv = rt.command(IMAGE, SERVER, scratch="/tmp/s")
    assert "--writable-tmpfs" not in argv
    assert argv[:11] == ["apptainer", "exec", "--contain", "--cleanenv", "--no-home", "--pwd", "/srv/repo",
                         "--bind", "/tmp/s:/tmp", "--env", "HOME=/srv/repo"]


def test_shell_command_quotes_everything_but_the_scratch():
    rt = ApptainerRuntime(executable="/opt/apptainer 1.3/bin/apptainer",
                          extra_args=["--bind", "$BINDER_SCRATCH/home:/home/user"])
    argv = SERVER + ["--x=$(touch /tmp/p)", "it's", "$BINDER_SCRATCH"]
    line = rt.shell_command(IMAGE, argv)
    assert line.startswith("'/opt/apptainer 1.3/bin/apptainer' exec --contain")
    assert '--bind "$BINDER_SCRATCH":/tmp' in line
    assert '--bind "$BINDER_SCRATCH"/home:/home/user' in line  # the admin's words may use it
    # the server's words are literal, even a script variable's name
    out = subprocess.run(["bash", "-c", f'BINDER_SCRATCH=/S; for w in {line}; do printf "%s\\n" "$w"; done'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-len(argv):] == argv
    assert out[:len(CONTAINED) + 1] == ["/opt/apptainer 1.3/bin/apptainer", *CONTAINED[:8], "/S:/tmp",
                                        *CONTAINED[9:]]
    assert "/S/home:/home/user" in out


def test_env_exports_by_reference():
    rt = ApptainerRuntime(executable="/usr/bin/apptainer")
    assert rt.env_exports(["JUPYTERHUB_API_TOKEN", "JUPYTER_PORT"]) == [
        'export APPTAINERENV_JUPYTERHUB_API_TOKEN="${JUPYTERHUB_API_TOKEN:-}"',
        'export APPTAINERENV_JUPYTER_PORT="${JUPYTER_PORT:-}"',
    ]
    env = {"JUPYTERHUB_API_TOKEN": "s3cret value; $(id)", "PATH": os.environ["PATH"]}
    script = "\n".join(rt.env_exports(["JUPYTERHUB_API_TOKEN", "UNSET_ONE"])) + "\nenv"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert "APPTAINERENV_JUPYTERHUB_API_TOKEN=s3cret value; $(id)" in out.splitlines()
    assert "APPTAINERENV_UNSET_ONE=" in out.splitlines()


@pytest.mark.parametrize("exe, prefix", [
    ("/usr/bin/apptainer", "APPTAINERENV_"),
    ("apptainer", "APPTAINERENV_"),
    ("/usr/local/bin/singularity", "SINGULARITYENV_"),
    ("singularity", "SINGULARITYENV_"),
])
def test_singularity_naming(exe, prefix):
    rt = ApptainerRuntime(executable=exe)
    assert rt.env_exports(["JUPYTER_TOKEN"]) == [f'export {prefix}JUPYTER_TOKEN="${{JUPYTER_TOKEN:-}}"']
    assert rt.command(IMAGE, SERVER)[0] == exe


def fake_which(present):
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.mark.parametrize("present, name", [
    ({"apptainer", "singularity", "podman"}, "apptainer"),
    ({"singularity", "podman"}, "apptainer"),
    ({"podman"}, "podman"),
    (set(), "apptainer"),
])
def test_detect_runtime(monkeypatch, present, name):
    monkeypatch.setattr(runtime_mod.shutil, "which", fake_which(present))
    assert detect_runtime() == name


def test_make_runtime(monkeypatch):
    monkeypatch.setattr(runtime_mod.shutil, "which", fake_which({"singularity", "podman"}))
    rt = make_runtime("singularity")
    assert isinstance(rt, ApptainerRuntime) and rt.executable == "/usr/bin/singularity"
    assert rt.env_exports(["X"]) == ['export SINGULARITYENV_X="${X:-}"']
    rt = make_runtime("apptainer")
    assert rt.executable == "/usr/bin/singularity"  # apptainer missing: the singularity it replaces
    rt = make_runtime("singularity", executable="/opt/sing/bin/singularity")
    assert rt.executable == "/opt/sing/bin/singularity"
    assert isinstance(make_runtime("podman"), PodmanRuntime)
    assert isinstance(make_runtime(None), ApptainerRuntime)
    assert make_runtime("apptainer").image_format == "sif" and make_runtime("podman").image_format == "oci-archive"
    with pytest.raises(ValueError, match="unknown container runtime 'docker'"):
        make_runtime("docker")
    monkeypatch.setattr(runtime_mod.shutil, "which", fake_which(set()))
    assert make_runtime("apptainer").executable == "apptainer"
    assert make_runtime("singularity").executable == "singularity"


def test_apptainer_needs_no_stop_or_special_removal():
    rt = ApptainerRuntime(executable="apptainer")
    assert rt.stop_command() == ""  # the container is a child of the job script
    assert rt.remove_command() == "rm -rf --"


# ---------------------------------------------------------------- real SIF
def apptainer_exe():
    return shutil.which("apptainer") or shutil.which("singularity")


@pytest.fixture(scope="module")
def sif(cluster):
    """The dev cluster's base image as a SIF, made by our own converter, in
    a directory the job account can read (pytest's temporaries are private)."""
    from binderhub_hpc.build.export import PodmanImage
    from binderhub_hpc.build.sif import ConversionSource, SquashfsSIFConverter

    for tool in ("mksquashfs", "siftool"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    image = cluster.ensure_base_image()
    podman = PodmanImage(rootless=False)
    d = cluster.root / "test-registries" / uuid.uuid4().hex[:8]
    d.mkdir(parents=True)
    for p in (d, d.parent):
        os.chmod(p, 0o755)
    dest = d / "base.sif"
    dest.touch()
    try:
        SquashfsSIFConverter().convert(ConversionSource(image, podman.inspect(image), podman), dest)
        os.chmod(dest, 0o644)
        yield dest
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.cluster
@pytest.mark.skipif(not apptainer_exe(), reason="neither apptainer nor singularity is on PATH")
def test_real_sif_with_our_flags(cluster, sif, tmp_path):
    """As the job account: the session opens in /home/jovyan with the
    repository's files, can write there, and sees nothing of the account's
    own home."""
    rt = ApptainerRuntime(executable=apptainer_exe())
    marker = cluster.service_home / f"private-{uuid.uuid4().hex[:6]}"
    marker.write_text("private")
    probe = ("pwd; echo HOME=$HOME; ls -a /home/jovyan; touch /home/jovyan/written && echo WROTE; "
             f"ls {shlex.quote(str(cluster.service_home))} 2>&1; touch /tmp/in-scratch; echo TOKEN=$JUPYTER_TOKEN")
    line = rt.shell_command(str(sif), ["sh", "-c", probe])
    script = ('set -eu; BINDER_SCRATCH="$(mktemp -d)"; export JUPYTER_TOKEN=tok123; '
              + "\n".join(rt.env_exports(["JUPYTER_TOKEN"])) + f"\n{line}\nls \"$BINDER_SCRATCH\"; "
              'rm -rf "$BINDER_SCRATCH"')
    try:
        proc = cluster.as_service_user(["bash", "-c", script], check=False)
    finally:
        marker.unlink()
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    lines = out.splitlines()
    assert lines[0] == "/home/jovyan" and "HOME=/home/jovyan" in lines
    assert "WROTE" in lines
    assert marker.name not in out
    assert "TOKEN=tok123" in lines
    assert lines[-1] == "in-scratch"  # /tmp in the container is the session scratch
