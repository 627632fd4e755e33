"""Exact command lines and generated files of the build steps."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading

import pytest

from binderhub_hpc.binderlink import image_name, safe_build_slug
from binderhub_hpc.builder.convert import (
    ApptainerConverter,
    SquashfsSIFConverter,
    env_script,
    runscript,
    write_overlay,
)
from binderhub_hpc.builder.export import ImageConfig, PodmanImage
from binderhub_hpc.builder.pipeline import BuildRequest
from binderhub_hpc.builder.process import BuildCancelled, run_streaming
from binderhub_hpc.builder.protocol import as_json_log
from binderhub_hpc.builder.repo2docker import Repo2Docker
from binderhub_hpc.builder.runners import SlurmBatchRunner, SSHRunner
from binderhub_hpc.cli.build import parse_size


def test_repo2docker_argv_is_binderhubs_plus_engine():
    r = Repo2Docker(command=["jupyter-repo2docker"], extra_args=["--target-repo-dir=/srv/repo"])
    argv = r.argv(
        "https://github.com/org/repo",
        "a" * 40,
        "p/img:tag",
        appendix="RUN true",
        extra_args=["--subdir=x"],
        config_file="/tmp/c.py",
        labels={"org.x": "p/img:tag"},
    )
    assert argv == [
        "jupyter-repo2docker",
        f"--ref={'a' * 40}",
        "--image=p/img:tag",
        "--no-clean",
        "--no-run",
        "--json-logs",
        "--user-name=jovyan",
        "--user-id=1000",
        "--appendix",
        "RUN true",
        "--target-repo-dir=/srv/repo",
        "--subdir=x",
        "--label",
        "org.x=p/img:tag",
        "--engine",
        "podman-hpc",
        "--config",
        "/tmp/c.py",
        "https://github.com/org/repo",
    ]
    with pytest.raises(ValueError):
        r.argv("--help", "x", "p/img:tag")


def test_repo2docker_is_the_one_beside_this_python_so_a_site_virtualenv_needs_no_path():
    beside = os.path.join(os.path.dirname(sys.executable), "jupyter-repo2docker")
    if not os.access(beside, os.X_OK):
        pytest.skip("no jupyter-repo2docker beside this python")
    assert Repo2Docker().command == [beside]


def test_repo2docker_config_file_restricts_providers_mounts_ca_and_sets_the_network():
    r = Repo2Docker(egress_restricted=True, ca_bundle="/etc/site-ca.pem", build_network="none")
    text = r.config_text()
    ns = {"get_config": lambda: __import__("traitlets.config", fromlist=["Config"]).Config()}
    exec(compile(text, "cfg", "exec"), ns)
    c = ns["c"]
    from repo2docker import contentproviders as cp

    assert c.Repo2Docker.content_providers == [cp.Local, cp.Git]
    assert c.PodmanEngine.extra_buildx_build_args == [
        "--volume",
        "/etc/site-ca.pem:/etc/ssl/certs/ca-certificates.crt:ro",
        "--network=none",
    ]
    assert not Repo2Docker().needs_config_file()


def test_the_build_environment_is_an_allowlist_of_the_parents():
    base = {
        "PATH": "/bin",
        "HOME": "/h",
        "LANG": "C.UTF-8",
        "https_proxy": "http://proxy:3128",
        "NO_PROXY": ".site",
        "GIT_CREDENTIAL_ENV": "stale",
        "JUPYTERHUB_API_TOKEN": "hub-secret",
        "BINDERHUB_API_TOKEN": "s2",
        "AWS_SECRET_ACCESS_KEY": "s3",
        "GIT_CONFIG_PARAMETERS": "'x.y=z'",
        "LD_PRELOAD": "/evil.so",
        "SITE_THING": "kept",
    }
    env = Repo2Docker(env_keep=["SITE_THING"]).environment(base=base, extra={"TMPDIR": "/scratch"})
    assert {k: env[k] for k in ("PATH", "HOME", "LANG", "https_proxy", "NO_PROXY", "SITE_THING", "TMPDIR")} == {
        "PATH": "/bin",
        "HOME": "/h",
        "LANG": "C.UTF-8",
        "https_proxy": "http://proxy:3128",
        "NO_PROXY": ".site",
        "SITE_THING": "kept",
        "TMPDIR": "/scratch",
    }
    for name in (
        "GIT_CREDENTIAL_ENV",
        "JUPYTERHUB_API_TOKEN",
        "BINDERHUB_API_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "GIT_CONFIG_PARAMETERS",
        "LD_PRELOAD",
    ):
        assert name not in env
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    env = Repo2Docker(pass_proxy_env=False).environment(base=base)
    assert "https_proxy" not in env and "SITE_THING" not in env


def test_a_builds_helpers_run_the_code_of_the_builder_not_another_install(tmp_path):
    """The guard and `python -m binderhub_hpc...` helpers ran whatever
    binderhub_hpc the interpreter found first once the environment lost
    the parent's PYTHONPATH (seen: 'No module named binderhub_hpc.builder.guard')."""
    import binderhub_hpc
    from binderhub_hpc.builder.environment import build_environment
    from binderhub_hpc.builder.guard import guarded

    here = os.path.dirname(os.path.dirname(os.path.abspath(binderhub_hpc.__file__)))
    env = build_environment(base={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"] == here
    code = "import binderhub_hpc, os; print(os.path.dirname(os.path.dirname(binderhub_hpc.__file__)))"
    out = subprocess.run(guarded([sys.executable, "-c", code]), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_git_credentials_are_a_private_file_behind_a_helper_for_the_repositorys_host_only(tmp_path):
    from binderhub_hpc.builder.credentials import CredentialsError, helper_environment, write_credentials

    path = write_credentials("username=u\npassword=p w$x\n", str(tmp_path))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    env = helper_environment("https://git.example.org:8443/org/private.git", path)
    assert env["GIT_CONFIG_KEY_1"] == "credential.https://git.example.org:8443.helper"
    assert "p w$x" not in json.dumps(env)
    # the helper answers `get` with the file, and nothing else
    helper = env["GIT_CONFIG_VALUE_1"][1:]
    out = subprocess.run(["sh", "-c", helper + ' "$@"', "sh", "get"], capture_output=True, text=True).stdout
    assert out == "username=u\npassword=p w$x\n"
    assert subprocess.run(["sh", "-c", helper + ' "$@"', "sh", "store"], capture_output=True, text=True).stdout == ""
    with pytest.raises(CredentialsError, match="not an http"):
        helper_environment("git@github.com:org/repo.git", path)
    with pytest.raises(CredentialsError):
        write_credentials("no equals sign", str(tmp_path / "x"))


def test_log_lines_are_json_with_phase():
    assert json.loads(as_json_log("plain text\n")) == {"phase": "unknown", "message": "plain text\n"}
    assert json.loads(as_json_log('{"message": "m"}')) == {"message": "m", "phase": "unknown"}
    line = '{"phase": "building", "message": "x"}'
    assert as_json_log(line + "\n") == line
    # repo2docker's failure lines stay visible, but only our code fails a build
    assert json.loads(as_json_log('{"phase": "failed", "message": "m"}')) == {"phase": "unknown", "message": "m"}


def test_run_streaming_kills_the_process_group_on_stop(tmp_path):
    stop = threading.Event()
    pidfile = tmp_path / "child"
    argv = ["/bin/sh", "-c", f"sleep 300 & echo $! > {pidfile}; echo started; wait"]
    lines = []

    def on_line(line):
        lines.append(line)
        stop.set()

    with pytest.raises(BuildCancelled):
        run_streaming(argv, on_line, stop_event=stop, kill_grace=1)
    child = int(pidfile.read_text())
    import time

    for _ in range(50):
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("grandchild survived")


def test_env_script_reproduces_values_in_sh():
    env = [
        "PATH=/opt/venv/bin:/usr/bin:/bin",
        'TRICKY=a "b" $HOME `x` \\ c',
        "EMPTY=",
        "not-an-identifier=1",
        "NOEQUALS",
        "CAFÉ=1",
        "ÜBER_X=2",
    ]
    script = env_script(env) + '\nprintf "%s|%s|%s" "$PATH" "$TRICKY" "${EMPTY-unset}"'
    out = subprocess.run(
        ["/bin/sh", "-c", script], env={"PATH": "/host"}, capture_output=True, text=True, check=True
    ).stdout
    assert out == '/opt/venv/bin:/usr/bin:/bin|a "b" $HOME `x` \\ c|'
    # keys no shell can name (not ASCII identifiers) are left out, not fatal
    assert "CAF" not in script and "BER_X" not in script
    # a value given to the runtime (--env) wins, PATH does not
    out = subprocess.run(
        ["/bin/sh", "-c", script], env={"PATH": "/host", "TRICKY": "mine"}, capture_output=True, text=True, check=True
    ).stdout
    assert out.split("|")[:2] == ["/opt/venv/bin:/usr/bin:/bin", "mine"]


@pytest.mark.parametrize(
    "entrypoint,cmd,args,expected",
    [
        ([], ["echo", "default arg"], [], "default arg"),
        ([], ["echo", "default"], ["echo", "given"], "given"),
        (["echo", "ep"], ["cmd"], [], "ep cmd"),
        (["echo", "ep"], ["cmd"], ["x y"], "ep x y"),
    ],
)
def test_runscript_semantics(tmp_path, entrypoint, cmd, args, expected):
    rs = tmp_path / "runscript"
    rs.write_text(runscript(entrypoint, cmd))
    out = subprocess.run(["/bin/sh", str(rs), *args], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_overlay_pseudo_file(tmp_path):
    cfg = ImageConfig(env=["PATH=/x"], labels={"a": "b"})
    rootfs = tmp_path / "root"
    (rootfs / "tmp").mkdir(parents=True)
    pseudo = write_overlay(cfg, tmp_path / "w", {"extra": "1"}, rootfs=rootfs)
    lines = pseudo.read_text().splitlines()
    assert lines[0] == '"/.singularity.d" d 755 0 0'
    assert '"/singularity" s 777 0 0 .singularity.d/runscript' in lines
    assert not any(x.startswith('"/tmp"') for x in lines)
    assert '"/proc" d 755 0 0' in lines
    labels_line = next(x for x in lines if x.startswith('"/.singularity.d/labels.json"'))
    host = labels_line.split(" l ", 1)[1]
    assert json.loads(open(host).read()) == {"a": "b", "extra": "1"}


def test_mksquashfs_and_siftool_argv(tmp_path):
    c = SquashfsSIFConverter(compressor="zstd", processors=2, arch="x86_64")
    argv = c.mksquashfs_argv("/root", "/out.sq", "/pseudo")
    assert argv == [
        "mksquashfs",
        "/root",
        "/out.sq",
        "-pf",
        "/pseudo",
        "-comp",
        "zstd",
        "-Xcompression-level",
        "3",
        "-noappend",
        "-no-progress",
        "-processors",
        "2",
        "-e",
        ".singularity.d",
    ]
    new, add = c.siftool_argvs("/out.sq", "/x.sif")
    assert new == ["siftool", "new", "/x.sif"]
    assert add == [
        "siftool",
        "add",
        "--datatype",
        "4",
        "--parttype",
        "2",
        "--partfs",
        "1",
        "--partarch",
        "2",
        "--groupid",
        "1",
        "/x.sif",
        "/out.sq",
    ]
    assert SquashfsSIFConverter(compressor="auto", runtime_supports_zstd=False).compression_args() == [
        "-comp",
        "gzip",
        "-Xcompression-level",
        "9",
    ]


def test_apptainer_build_argv():
    c = ApptainerConverter(executable="/usr/bin/apptainer", extra_args=["--fakeroot"])
    assert c.build_argv("/reg/.x.oci.tar.1.tmp", "/reg/.x.sif.2.tmp") == [
        "/usr/bin/apptainer",
        "build",
        "--force",
        "--fakeroot",
        "/reg/.x.sif.2.tmp",
        "oci-archive:/reg/.x.oci.tar.1.tmp",
    ]


def test_rootless_mount_wraps_command_in_unshare():
    p = PodmanImage(rootless=True)
    argv = p.run_mounted_argv("img:tag", ["mksquashfs", "{rootfs}", "/o"])
    assert argv == [
        "podman",
        "unshare",
        sys.executable,
        "-m",
        "binderhub_hpc.builder.export",
        "--podman",
        "podman",
        "img:tag",
        "--",
        "mksquashfs",
        "{rootfs}",
        "/o",
    ]


def test_ssh_runner_quotes_one_remote_command():
    r = SSHRunner(host="builder@build01", remote_config="/etc/binderhub-hpc/config.py", ssh=["ssh", "-T"])
    req = BuildRequest("https://x/y; rm -rf ~", "$(reboot)", "p/i:t", git_credentials="secret")
    argv = r.argv(req)
    assert argv[:3] == ["ssh", "-T", "--"]
    assert argv[3] == "builder@build01" and len(argv) == 5
    assert shlex.split(argv[4]) == [
        "binderhub-hpc",
        "build",
        "--json-logs",
        "--stop-with-parent",
        "--result-key-stdin",
        "--image",
        "p/i:t",
        "--config",
        "/etc/binderhub-hpc/config.py",
        "--git-credentials-stdin",
        "--",
        "https://x/y; rm -rf ~",
        "$(reboot)",
    ]
    assert "secret" not in " ".join(argv)
    assert "ServerAliveInterval=15" in SSHRunner().ssh


def test_slurm_batch_script_and_submit_argv():
    r = SlurmBatchRunner(partition="build", extra_sbatch_args=["--cpus-per-task=4"])
    req = BuildRequest("https://x/y'z", "main", "p/i:t", git_credentials="secret")
    script = r.script(req, "/jobs/stdin")
    assert "#SBATCH --partition=build" in script
    assert "secret" not in script
    last = script.strip().splitlines()[-1]
    assert last.startswith("exec ")
    assert shlex.split(last[5:]) == [
        "binderhub-hpc",
        "build",
        "--json-logs",
        "--stop-with-parent",
        "--result-key-stdin",
        "--image",
        "p/i:t",
        "--git-credentials-stdin",
        "--",
        "https://x/y'z",
        "main",
        "<",
        "/jobs/stdin",
    ]
    # BinderHub's environment (its hub token) never reaches the job; a job
    # whose node died is not run again behind the user's back
    # stderr apart, in a file of its own: shown, never parsed
    assert r.submit_argv("/jobs/s.sh", "/jobs/s.out", "/jobs", "/jobs/s.err") == [
        "sbatch",
        "--wait",
        "--parsable",
        "--no-requeue",
        "--export=NONE",
        "--output=/jobs/s.out",
        "--error=/jobs/s.err",
        "--chdir=/jobs",
        "--cpus-per-task=4",
        "/jobs/s.sh",
    ]


def test_image_name_like_binderhub():
    sha = "b" * 40
    name = image_name("https://github.com/Org/My_Repo", sha, "binderhub-hpc/binder-")
    assert name.startswith("binderhub-hpc/binder-org-2dmy-5frepo-") and name.endswith(":" + sha)
    builder = pytest.importorskip("binderhub.builder")
    slug = builder._safe_build_slug("Org-My_Repo", limit=255 - len("p/"))
    assert safe_build_slug("Org-My_Repo", 255 - len("p/")) == slug


def test_parse_size():
    assert parse_size("10G") == 10 * 1024**3
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("100") == 100


@pytest.mark.parametrize(
    "files,expect",
    [
        ({"requirements.txt": "numpy\n"}, ["requirements.txt", "pip install"]),
        ({"environment.yml": "dependencies:\n  - python=3.11\n  - numpy\n"}, ["environment.yml", "mamba"]),
    ],
)
def test_dockerfile_generation_for_buildpacks(tmp_path, files, expect):
    """repo2docker --no-build renders the Dockerfile (the conda/pip builds
    themselves need the internet)."""
    if not shutil.which("jupyter-repo2docker"):
        pytest.skip("repo2docker missing")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, text in files.items():
        (repo / name).write_text(text)
    r = Repo2Docker(egress_restricted=True)
    argv = r.argv(str(repo), "HEAD", "p/gen:1", extra_args=["--no-build", "--debug"])
    argv.remove("--ref=HEAD")  # a plain directory, not a git checkout
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "FROM " in text
    for e in expect:
        assert e in text


@pytest.mark.cluster
def test_real_apptainer_build(tmp_path):
    from binderhub_hpc.builder.convert import find_apptainer

    if not find_apptainer():
        pytest.skip("apptainer/singularity not on PATH")
    if subprocess.run(["podman", "image", "exists", "localhost/binderhub-hpc-base:bookworm"]).returncode:
        pytest.skip("base image missing")
    from binderhub_hpc.builder.convert import ConversionSource
    from binderhub_hpc.builder.export import PodmanImage

    p = PodmanImage()
    image = "localhost/binderhub-hpc-base:bookworm"
    archive = tmp_path / "img.oci.tar"
    p.save_oci_archive(image, archive)
    dest = tmp_path / "out.sif"
    ApptainerConverter().convert(ConversionSource(image, p.inspect(image), p, archive), dest)
    # --userns: root here lacks capabilities that a privileged apptainer run asks for
    out = subprocess.run(
        [find_apptainer(), "exec", "--userns", str(dest), "sh", "-c", "echo $PATH"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "/opt/venv/bin" in out


def test_cli_images_and_gc(tmp_path, capsys):
    from binderhub_hpc.cli import main
    from binderhub_hpc.registry import SIFRegistry

    reg = SIFRegistry(root=str(tmp_path))
    for i, size in enumerate((3000, 5000)):
        tmp = reg.tempfile(f"p/img{i}:t", "sif")
        tmp.write_bytes(b"x" * size)
        reg.publish(f"p/img{i}:t", {"sif": tmp}, {"repo_url": "u"})
        os.utime(reg.used_path(f"p/img{i}:t"), (1000 + i, 1000 + i))
    assert main(["images", "--registry-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "IMAGE" in out and "p/img0:t" in out and "p/img1:t" in out and "2 images" in out
    cfg = tmp_path / "conf.py"
    cfg.write_text(f"c.SIFRegistry.root = {str(tmp_path)!r}\n")
    assert main(["gc", "--config", str(cfg), "--max-size", "6000"]) == 0
    out = capsys.readouterr().out
    assert "evicted p/img0:t" in out
    assert [r.image for r in reg.images()] == ["p/img1:t"]
