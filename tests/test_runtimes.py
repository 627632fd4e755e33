"""The container runtimes of session jobs: the exact command lines and
exports a job script gets, and real runs of a SIF from our converter as the
job account, in Apptainer and in rootless podman, the way a job runs them."""

import json
import os
import shlex
import shutil
import subprocess
import uuid

import pytest

from binderhub_hpc import sif as sifformat
from binderhub_hpc.spawner import runtime as runtime_mod
from binderhub_hpc.spawner import templates
from binderhub_hpc.spawner.runtime import (
    ApptainerRuntime,
    PodmanRuntime,
    SessionImage,
    detect_runtime,
    make_runtime,
)

SERVER = ["jupyter", "notebook", "--ip=0.0.0.0", "--NotebookApp.base_url=/user/alice/"]
IMAGE = SessionImage("/shared/registry/images/binder-x/abc.sif", 36864)
APPTAINER = [
    "exec",
    "--containall",
    "--cleanenv",
    "--no-eval",
    "--home",
    "$BINDER_HOME:/home/jovyan",
    "--pwd",
    "/home/jovyan",
    "--bind",
    "$BINDER_SCRATCH:/tmp",
]


def test_apptainer_exact_argv():
    rt = ApptainerRuntime(executable="/usr/bin/apptainer")
    assert rt.command(IMAGE, SERVER) == ["/usr/bin/apptainer", *APPTAINER, IMAGE.path, *SERVER]


def test_apptainer_gpus_and_site_args():
    rt = ApptainerRuntime(executable="apptainer", extra_args=["--bind", "/scratch/datasets:/data:ro"])
    assert rt.command(IMAGE, SERVER, gpus=True) == [
        "apptainer",
        *APPTAINER,
        "--nv",
        "--bind",
        "/scratch/datasets:/data:ro",
        IMAGE.path,
        *SERVER,
    ]


def test_apptainer_copies_the_images_home_with_the_images_own_cp():
    rt = ApptainerRuntime(executable="/usr/bin/apptainer", workdir="/srv/repo")
    (line,) = rt.prepare(IMAGE)
    words = subprocess.run(
        ["bash", "-c", f'BINDER_HOME=/H; for w in {line}; do printf "%s\\n" "$w"; done'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert words == [
        "/usr/bin/apptainer",
        "exec",
        "--containall",
        "--no-home",
        "--pwd",
        "/",
        "--bind",
        "/H:/binder-home",
        IMAGE.path,
        "cp",
        "-a",
        "/srv/repo/.",
        "/binder-home/",
    ]


def test_podman_exact_argv_runs_the_sif_root_under_an_overlay():
    rt = PodmanRuntime(executable="/usr/bin/podman")
    argv = rt.command(IMAGE, SERVER, ["JUPYTER_TOKEN"], gpus=True)
    assert argv[:2] == ["/usr/bin/podman", "run"]
    assert argv[argv.index("--rootfs") + 1] == "$BINDER_ROOTFS:O"
    for word in (
        "--rm",
        "--name=$BINDER_CONTAINER",
        "--network=host",
        "--user=1000:1000",
        "--workdir=/home/jovyan",
        "--volume=$BINDER_HOME:/home/jovyan:rw",
        "--volume=$BINDER_SCRATCH:/tmp:rw",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        "--env=JUPYTER_TOKEN",
        "--env=SLURM_*",
        "--env=PBS_*",
        "--env=MEM_LIMIT",
        "--device=nvidia.com/gpu=all",
    ):
        assert word in argv, word
    # the image's ENV comes from its Apptainer environment scripts
    assert argv[-len(SERVER) - 4 :] == ["/bin/sh", "-c", PodmanRuntime.ENV_WRAPPER, "binder-session", *SERVER]
    assert "--device=nvidia.com/gpu=all" not in rt.command(IMAGE, SERVER)


def test_podman_mounts_the_root_partition_at_its_offset_in_its_user_namespace():
    rt = PodmanRuntime(executable="podman", squashfuse="squashfuse_ll")
    lines = rt.prepare(IMAGE)
    assert lines[0] == 'BINDER_ROOTFS="$binder_scratch_base/rootfs"'
    assert lines[1].startswith("podman unshare sh -c ")
    assert "squashfuse_ll -o ro,offset=36864" in lines[1]
    assert shlex.split(lines[1])[-3:] == ["$BINDER_ROOTFS", IMAGE.path, "$BINDER_HOME"]
    assert 'fusermount3 -uz "$binder_scratch_base/rootfs"' in rt.stop_command()
    assert rt.remove_command() == "podman unshare rm -rf --"


@pytest.mark.parametrize(
    "rt",
    [
        ApptainerRuntime(executable="/opt/apptainer 1.3/bin/apptainer"),
        PodmanRuntime(executable="/opt/podman 4/bin/podman"),
    ],
)
def test_shell_command_quotes_everything_but_our_variables(rt):
    rt.extra_args = ["--bind", "$BINDER_SCRATCH/data:/data"]
    argv = SERVER + ["--x=$(touch /tmp/p)", "it's", "$BINDER_SCRATCH"]
    line = rt.shell_command(IMAGE, argv)
    out = subprocess.run(
        [
            "bash",
            "-c",
            f"BINDER_SCRATCH=/S BINDER_HOME=/H BINDER_ROOTFS=/R BINDER_CONTAINER=c; "
            f'for w in {line}; do printf "%s\\n" "$w"; done',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    # the server's words are literal, even a script variable's name
    assert out[-len(argv) :] == argv
    assert out[0] == rt.executable
    assert "/S/data:/data" in out  # the admin's words may use our variables
    assert any("/S:/tmp" in w for w in out) and any("/H:/home/jovyan" in w for w in out)


def test_apptainer_env_exports_by_reference_and_the_jobs_variables():
    rt = ApptainerRuntime(executable="/usr/bin/apptainer")
    exports = rt.env_exports(["JUPYTERHUB_API_TOKEN", "JUPYTER_PORT"])
    assert exports[:2] == [
        'export APPTAINERENV_JUPYTERHUB_API_TOKEN="${JUPYTERHUB_API_TOKEN:-}"',
        'export APPTAINERENV_JUPYTER_PORT="${JUPYTER_PORT:-}"',
    ]
    env = {
        "JUPYTER_TOKEN": "s3cret value; $(id)",
        "PATH": os.environ["PATH"],
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_ON_NODE": "2",
        "MEM_LIMIT": "1073741824",
        "JUPYTERHUB_API_TOKEN": "hub-secret",
        "PBS_JOBID": "7.server",
        "OTHER": "x",
    }
    script = "\n".join(rt.env_exports(["JUPYTER_TOKEN", "UNSET_ONE"])) + "\nenv"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "APPTAINERENV_JUPYTER_TOKEN=s3cret value; $(id)" in lines
    assert "APPTAINERENV_UNSET_ONE=" in lines
    for name in ("SLURM_JOB_ID=42", "SLURM_CPUS_ON_NODE=2", "MEM_LIMIT=1073741824", "PBS_JOBID=7.server"):
        assert "APPTAINERENV_" + name in lines
    # only what is named or the scheduler's goes in
    assert not any(x.startswith(("APPTAINERENV_JUPYTERHUB_API_TOKEN", "APPTAINERENV_OTHER")) for x in lines)


@pytest.mark.parametrize(
    "exe, prefix",
    [
        ("/usr/bin/apptainer", "APPTAINERENV_"),
        ("apptainer", "APPTAINERENV_"),
        ("/usr/local/bin/singularity", "SINGULARITYENV_"),
        ("singularity", "SINGULARITYENV_"),
    ],
)
def test_singularity_naming(exe, prefix):
    rt = ApptainerRuntime(executable=exe)
    assert rt.env_exports(["JUPYTER_TOKEN"])[0] == f'export {prefix}JUPYTER_TOKEN="${{JUPYTER_TOKEN:-}}"'
    assert rt.command(IMAGE, SERVER)[0] == exe


def fake_which(present):
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.mark.parametrize(
    "present, name",
    [
        ({"apptainer", "singularity", "podman"}, "apptainer"),
        ({"singularity", "podman"}, "apptainer"),
        ({"podman"}, "podman"),
        (set(), "apptainer"),
    ],
)
def test_detect_runtime(monkeypatch, present, name):
    monkeypatch.setattr(runtime_mod.shutil, "which", fake_which(present))
    assert detect_runtime() == name


def test_make_runtime(monkeypatch):
    monkeypatch.setattr(runtime_mod.shutil, "which", fake_which({"singularity", "podman"}))
    rt = make_runtime("singularity")
    assert isinstance(rt, ApptainerRuntime) and rt.executable == "/usr/bin/singularity"
    rt = make_runtime("apptainer")
    assert rt.executable == "/usr/bin/singularity"  # apptainer absent: the singularity it provides
    rt = make_runtime("singularity", executable="/opt/sing/bin/singularity")
    assert rt.executable == "/opt/sing/bin/singularity"
    assert isinstance(make_runtime("podman"), PodmanRuntime)
    assert isinstance(make_runtime(None), ApptainerRuntime)
    # one image format for both: the SIF
    assert make_runtime("apptainer").image_format == "sif" == make_runtime("podman").image_format
    with pytest.raises(ValueError, match="unknown container runtime 'docker'"):
        make_runtime("docker")
    monkeypatch.setattr(runtime_mod.shutil, "which", fake_which(set()))
    assert make_runtime("apptainer").executable == "apptainer"
    assert make_runtime("singularity").executable == "singularity"


def test_apptainer_needs_no_stop_or_special_removal():
    rt = ApptainerRuntime(executable="apptainer")
    assert rt.stop_command() == ""  # the container is a child of the job script
    assert rt.remove_command() == "rm -rf --"


def session_setup_of(rt, scratch_root="/tmp"):
    """The setup a session job of `rt` gets, as the spawner renders it."""
    return templates.render_setup(
        host_python="python3",
        scratch_root=scratch_root,
        env_exports="\n".join(rt.env_exports(["JUPYTER_TOKEN"])),
        remove=rt.remove_command(),
        stop=rt.stop_command(),
        prepare="\n".join(rt.prepare(IMAGE)),
    )


@pytest.mark.parametrize("rt", [ApptainerRuntime(executable="apptainer"), PodmanRuntime(executable="podman")])
def test_the_doctors_check_script_is_the_sessions_setup_without_the_port_report(rt):
    """Line for line the session's setup and command, minus the port report
    and the lines only a session prints; only the scratch's name differs."""
    check = rt.check_script(IMAGE, SERVER, env_names=["JUPYTER_TOKEN"]).splitlines()
    session = session_setup_of(rt).replace("/binder-session.", "/binder-check.").splitlines()
    report_at = next(i for i, line in enumerate(session) if "<<'BINDER_PY'" in line)
    report_end = next(i for i, line in enumerate(session) if line.startswith('echo "binderhub-hpc: server port'))
    shared = session[:report_at] + session[report_end + 1 :]
    shared.remove('  echo "binderhub-hpc: session ended, scratch removed"')
    assert shared == check[1:-2]
    assert check[0] == "set -euo pipefail"
    assert check[-2:] == [rt.shell_command(IMAGE, SERVER, ["JUPYTER_TOKEN"]) + " &", "binder_wait $!"]
    assert not any("BINDER_PY" in line or "JUPYTERHUB_API" in line for line in check)


@pytest.mark.parametrize("rc", [0, 3])
def test_the_check_script_reports_the_commands_exit_and_last_line_and_removes_its_scratch(tmp_path, rc):
    """Run with a stand-in apptainer that prints its image and exits `rc`:
    the doctor reads the command's status and last line, and the scratch
    is gone either way."""
    fake = tmp_path / "apptainer"
    fake.write_text(
        '#!/bin/sh\ncase " $* " in *" cp -a "*) exit 0;; esac\n'
        'echo "ran in $(pwd) with $BINDER_CONTAINER"\necho "image $FAKE_IMAGE"\nexit "$FAKE_RC"\n'
    )
    fake.chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rt = ApptainerRuntime(executable=str(fake))
    script = rt.check_script(IMAGE, ["true"], scratch_root=str(scratch), after=["echo AFTER"])
    env = {"PATH": os.environ["PATH"], "FAKE_RC": str(rc), "FAKE_IMAGE": "x"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == rc, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == ("AFTER" if rc == 0 else "image x")
    assert lines[0].startswith(f"ran in {tmp_path} with binder-check.")
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------- real SIF
@pytest.fixture(scope="module")
def sif(cluster):
    """The dev cluster's base image as a SIF, made by our own converter, in
    a directory the job account can read (pytest's temporaries are private)."""
    from binderhub_hpc.registry import SIFRegistry
    from binderhub_hpc_testing.repo import publish_podman_image

    for tool in ("mksquashfs", "siftool"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    image = cluster.ensure_base_image()
    d = cluster.root / "test-registries" / uuid.uuid4().hex[:8]
    d.mkdir(parents=True)
    for p in (d, d.parent):
        os.chmod(p, 0o755)
    reg = SIFRegistry(root=str(d))
    try:
        path = publish_podman_image(reg, "test/base:1", image)
        yield SessionImage(str(path), sifformat.root_partition(path).offset)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def runtime_named(name):
    exe = shutil.which(name)
    if not exe:
        pytest.skip(f"{name} is not installed")
    return make_runtime(name)


@pytest.mark.cluster
@pytest.mark.parametrize("name", ["apptainer", "podman"])
def test_real_session_as_the_job_account(cluster, sif, name):
    """As the job account, the way a job runs it: the session opens in
    /home/jovyan with the repository's files and may write there, /tmp is
    the session's scratch, the account's home is out of sight, the session
    has a PID namespace of its own, and only named variables and the
    scheduler's reach it."""
    rt = runtime_named(name)
    marker = cluster.service_home / f"private-{uuid.uuid4().hex[:6]}"
    marker.write_text("private")
    probe = (
        "pwd; echo HOME=$HOME; ls -a /home/jovyan; touch /home/jovyan/written && echo WROTE; "
        f"ls {shlex.quote(str(cluster.service_home))} 2>&1; touch /tmp/in-scratch; "
        "echo TOKEN=$JUPYTER_TOKEN; echo JOB=${SLURM_JOB_ID:-}; echo HUBTOKEN=${JUPYTERHUB_API_TOKEN:-none}; "
        "echo PROCS=$(ls -d /proc/[0-9]* | wc -l); echo PATH=$PATH"
    )
    script = "export JUPYTER_TOKEN=tok123 SLURM_JOB_ID=4242 JUPYTERHUB_API_TOKEN=hub-secret\n" + rt.check_script(
        sif,
        ["sh", "-c", probe],
        env_names=["JUPYTER_TOKEN"],
        after=['echo SCRATCH=$(ls "$BINDER_SCRATCH")', 'echo HOMECOPY=$(ls "$BINDER_HOME")'],
    )
    try:
        proc = cluster.as_service_user(["bash", "-c", script], check=False, timeout=300)
    finally:
        marker.unlink()
    out = proc.stdout
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert "/home/jovyan" in lines and "HOME=/home/jovyan" in lines, out
    assert ".bashrc" in lines and "WROTE" in lines, out
    assert marker.name not in out
    assert "TOKEN=tok123" in lines and "JOB=4242" in lines and "HUBTOKEN=none" in lines, out
    assert "/opt/venv/bin" in next(x for x in lines if x.startswith("PATH="))  # the image's ENV
    assert int(next(x for x in lines if x.startswith("PROCS="))[6:]) < 10, out
    assert "SCRATCH=in-scratch" in lines, out  # /tmp in the container is the session scratch
    assert "written" in next(x for x in lines if x.startswith("HOMECOPY=")), out


#: values a session must see as they are: shell syntax Apptainer would
#: evaluate without --no-eval, quotes, backslashes, blanks, newlines, UTF-8
SESSION_VALUES = {
    "BINDER_REF_URL": "https://example.org/$(touch /tmp/pwned)/`id`/${HOME}/$HOME",
    "JUPYTERHUB_USER": 'o\'brien "x" \\ ü,$(id)',
    "JUPYTER_TOKEN": "tok\\en\"'$x \n trailing  ",
}


@pytest.mark.cluster
@pytest.mark.parametrize("name", ["apptainer", "podman"])
def test_real_values_reach_the_session_as_they_are(cluster, sif, name):
    rt = runtime_named(name)
    names = sorted(SESSION_VALUES)
    probe = (
        f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {names!r}}}), os.path.exists('/tmp/pwned'))"
    )
    script = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in SESSION_VALUES.items())
    script += rt.check_script(sif, ["python3", "-c", probe], env_names=sorted(SESSION_VALUES))
    proc = cluster.as_service_user(["bash", "-c", script], check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout
    seen, pwned = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert json.loads(seen) == SESSION_VALUES
    assert pwned == "False"
