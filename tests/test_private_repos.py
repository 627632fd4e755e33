"""Private repositories: BinderHub's git_credentials reach git (and only
git, and only for the repository's host), through a real git smart-HTTP
server that requires basic auth; without them, or with wrong ones, the
build fails saying so. repo2docker 2026.4 ignores GIT_CREDENTIAL_ENV, so
before this they were silently unused and every such build failed."""

import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from binderhub_hpc.builder.pipeline import BuildRequest
from binderhub_hpc_testing.repo import make_repo

from build_fixtures import git_server_for, make_pipeline, sif_cat, write_config

pytestmark = pytest.mark.cluster

REPO = str(Path(__file__).resolve().parent.parent)
FAST = {"SquashfsSIFConverter__compressor": "lz4"}


@pytest.fixture
def private_server(cluster, build_base):
    """(server, repo name, sha, password): one repository behind basic auth."""
    root = cluster.root / "test-repos" / f"private-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    os.chmod(root.parent, 0o755)
    os.chmod(root, 0o755)
    password = secrets.token_urlsafe(16) + "$ 'x"
    sha = make_repo(root / "private", build_base, marker=root.name)
    server = git_server_for(cluster, root, user="alice", password=password).start()
    yield server, "private", sha, password
    server.stop()
    subprocess.run(["rm", "-rf", str(root)], check=False)


def creds(password, user="alice"):
    return f"username={user}\npassword={password}\n"


def test_a_private_repository_builds_with_binderhubs_credentials_which_reach_only_git(
    private_server, tmp_path, monkeypatch
):
    server, name, sha, password = private_server
    url = server.url(name)
    # git wrapped on PATH: what it was given (argv, environment)
    wrappers, dumps = tmp_path / "bin", tmp_path / "dumps"
    wrappers.mkdir()
    dumps.mkdir()
    (wrappers / "git").write_text(
        f'#!/bin/sh\n{{ printf "%s\\n" "$@"; env; }} > "{dumps}/git.$$"\nexec /usr/bin/git "$@"\n'
    )
    (wrappers / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    pipeline = make_pipeline(tmp_path / "registry", Repo2Docker__scratch_dir=str(scratch), **FAST)
    image = f"binderhub-hpc/test-private:{sha}"
    log = []
    result = pipeline.run(
        BuildRequest(url, sha, image, git_credentials=creds(password)), lambda kind, payload: log.append(payload)
    )
    assert result.outcome == "success", (result.error, "".join(log)[-3000:])
    # the server saw alice clone it
    assert any(r["user"] == "alice" and r["path"].endswith("git-upload-pack") for r in server.requests())
    # the secret: not in git's argv or environment, not in the log or the image
    dumped = [p.read_text() for p in dumps.glob("git.*")]
    assert dumped and not any(password in d for d in dumped)
    assert password not in "".join(log)
    sif = Path(result.path)
    for path in ("/.singularity.d/labels.json", "/.singularity.d/env/10-docker2singularity.sh"):
        assert password not in sif_cat(sif, path)
    assert password not in json.dumps(pipeline.registry.metadata(image))
    # and its file went with the build's scratch directory
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("given", ["none", "wrong"])
def test_a_private_repository_without_or_with_wrong_credentials_fails_saying_so(private_server, tmp_path, given):
    server, name, sha, password = private_server
    pipeline = make_pipeline(tmp_path / "registry", **FAST)
    image = f"binderhub-hpc/test-private-{given}:{sha}"
    log = []
    result = pipeline.run(
        BuildRequest(server.url(name), sha, image, git_credentials="" if given == "none" else creds("nope")),
        lambda kind, payload: log.append(json.loads(payload)),
    )
    assert result.outcome == "failure"
    words = {
        "none": "asks for credentials and none were given",
        "wrong": "asks for credentials and refused those given",
    }[given]
    assert words in result.error, result.error
    assert words in log[-1]["message"] and log[-1]["phase"] == "failed"
    assert not pipeline.registry.exists(image)


def test_the_build_command_resolves_a_private_branch_with_credentials_from_stdin(private_server, tmp_path):
    server, name, sha, password = private_server
    cfg = write_config(tmp_path / "c.py", tmp_path / "registry", **FAST)
    argv = [
        sys.executable,
        "-m",
        "binderhub_hpc.cli",
        "build",
        "--config",
        str(cfg),
        "--json-logs",
        "--git-credentials-stdin",
        "--image",
        "binderhub-hpc/test-private-cli:x",
        server.url(name),
        "HEAD",
    ]
    assert password not in " ".join(argv)
    p = subprocess.run(
        argv, input=creds(password), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])["result"]
    assert result["outcome"] == "success" and result["metadata"]["resolved_ref"] == sha
    # without them the ref cannot even be resolved: a clear error, not a prompt
    p = subprocess.run(
        argv[:7] + argv[8:],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=120,
    )
    assert p.returncode == 2 and "cannot resolve 'HEAD'" in p.stderr, p.stderr


@pytest.mark.parametrize("runner", ["slurm", "ssh"])
def test_a_private_repository_builds_on_the_build_node_through_each_runner(
    build_node, private_server, site_registry, runner, tmp_path
):
    from test_build_node import RUNNERS, Log

    server, name, sha, password = private_server
    reg = site_registry("private")
    cfg = write_config(server.root / f"build-config-{runner}.py", reg.root, **FAST)
    pipeline = make_pipeline(reg.root, **FAST)
    image = f"binderhub-hpc/test-private-{runner}:{sha}"
    log = Log()
    result = RUNNERS[runner](build_node, cfg).run(
        pipeline, BuildRequest(server.url(name), sha, image, git_credentials=creds(password)), log
    )
    assert result.outcome == "success", (result.error, log.messages()[-3000:])
    assert f"Building on build as {build_node.build_user}" in log.messages()
    assert any(r["user"] == "alice" and r["client"] == build_node.build_host.address for r in server.requests())
    assert password not in log.messages()
