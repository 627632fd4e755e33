"""`binderhub-hpc launch` end to end, without BinderHub: a fixture repository
is built for real (repo2docker, podman, SIF) into a registry, then launched
through a real JupyterHub as a Slurm job on the dev cluster, in Apptainer
and in podman."""

import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import requests

from binderhub_hpc_testing.hub import spawner_config

from build_fixtures import make_repo
from hubutil import Hub

pytestmark = pytest.mark.cluster

URL_LINE = re.compile(r"^(http://\S+/user/([^/\s]+)/)\?token=(\S+)$", re.M)


@pytest.fixture
def registry(site_registry):
    """A registry the job accounts can read, which compute nodes see at their path."""
    return site_registry("cli")


def site_config(reg):
    return (
        f"c.SIFRegistry.root = {reg.root!r}\n"
        f"c.SIFRegistry.compute_root = {reg.compute_root!r}\n"
        "c.Repo2Docker.egress_restricted = True\n"
    )


def hub_config(reg, runtime):
    # the site config names the registry and the build
    return spawner_config(reg.root, runtime=runtime, compute_root=reg.compute_root) + site_config(reg)


def jobs_named(cluster, names):
    out = subprocess.run(
        ["squeue", "--noheader", "--user=binder", "--format=%i %j"],
        env=cluster.full_env(),
        capture_output=True,
        text=True,
    ).stdout
    wanted = {f"binder-{n}"[:64] for n in names}
    return [line.split()[0] for line in out.splitlines() if line.split()[1] in wanted]


@pytest.fixture
def site(cluster, registry, runtime, tmp_path):
    cfg = tmp_path / "binderhub_hpc_config.py"
    cfg.write_text(site_config(registry))
    hubdir = tmp_path / "hub"
    hubdir.mkdir()
    hub = Hub(str(hubdir), hub_config(registry, runtime), env=cluster.env).start()
    users = []
    yield hub, cfg, users
    hub.stop()
    # cancel only the jobs of the sessions this test started
    ids = jobs_named(cluster, users)
    if ids:
        subprocess.run(["scancel", *ids], env=cluster.full_env(), check=False)


def run_launch(hub, cfg, repo, *extra, users=None, timeout=900):
    env = dict(os.environ, JUPYTERHUB_API_TOKEN=hub.token)
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "binderhub_hpc.cli",
            "launch",
            "--hub-url",
            hub.url,
            "--config",
            str(cfg),
            "--timeout",
            "300",
            *extra,
            str(repo),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    m = re.search(r"Launching server for (\S+) ", out)
    if m and users is not None:
        users.append(m.group(1))
    assert hub.token not in out, "the hub API token was printed"
    return proc, out, elapsed


def metric(text, name, **labels):
    total = None
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total = (total or 0) + float(m.group(3))
    return total


def test_launch_builds_then_runs_then_skips_the_build(cluster, site, tmp_path, build_base):  # noqa: F811
    hub, cfg, users = site
    repo = tmp_path / "repo"
    make_repo(repo, build_base, marker=uuid.uuid4().hex)

    proc, out, first = run_launch(hub, cfg, repo, users=users)
    assert proc.returncode == 0, out + "\nhub log:\n" + hub.log_tail()
    assert "Building file://" in out and "Build success" in out, out
    assert "Using DockerBuildPack builder" in out, out  # repo2docker's progress, printed
    m = URL_LINE.search(out)
    assert m, out
    url, name, token = m.groups()
    assert url.startswith(hub.url + "/user/")

    # the session answers with its token, in the repository's files
    r = requests.get(url + "api/contents", headers={"Authorization": f"token {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert "hello.ipynb" in [c["name"] for c in r.json()["content"]]
    r = requests.get(url + "api/contents", timeout=30)
    assert r.status_code in (401, 403)

    # one format, the SIF, for both runtimes
    from traitlets.config.loader import PyFileConfigLoader

    from binderhub_hpc.registry import SIFRegistry

    reg = SIFRegistry(config=PyFileConfigLoader(cfg.name, path=str(cfg.parent)).load_config())
    images = reg.images()
    assert len(images) == 1, images
    image = images[0].image
    assert reg.lookup(image, "sif") and not reg.path(image, "oci-archive").exists()
    meta_mtime = reg.metadata_path(image).stat().st_mtime

    # the hub's metrics saw the launch
    text = requests.get(hub.url + "/hub/metrics", timeout=30).text
    assert (metric(text, "binderhub_hpc_launches_total", outcome="success", scheduler="slurm") or 0) >= 1, text
    assert (metric(text, "binderhub_hpc_launch_queue_seconds_count") or 0) >= 1, text
    assert (metric(text, "binderhub_hpc_registry_lookups_total", result="hit") or 0) >= 1, text

    hub.stop_server(name)
    hub.wait_for(lambda: not jobs_named(cluster, [name]), timeout=60, what="the first job to end")

    # a second launch of the same repository and ref: no build; --stop leaves nothing
    proc, out2, second = run_launch(hub, cfg, repo, "--stop", users=users)
    assert proc.returncode == 0, out2 + "\nhub log:\n" + hub.log_tail()
    assert "skipping the build" in out2 and "Building" not in out2, out2
    assert reg.metadata_path(image).stat().st_mtime == meta_mtime
    m2 = URL_LINE.search(out2)
    assert m2 and m2.group(2) != name
    assert "Server answered (HTTP 200); stopped the server" in out2
    assert not jobs_named(cluster, [m2.group(2)])
    assert hub.request("GET", f"/users/{m2.group(2)}").status_code == 404
    build = re.search(r"Build success in ([\d.]+) s", out).group(1)
    ready = re.search(r"Server ready in ([\d.]+) s", out).group(1)
    ready2 = re.search(r"Server ready in ([\d.]+) s", out2).group(1)
    print(
        f"\nlaunch CLI: first {first:.1f} s (build {build} s, server ready {ready} s); "
        f"second {second:.1f} s (no build, server ready {ready2} s, then stopped)"
    )


def test_launch_fails_clearly(cluster, site, tmp_path, build_base):  # noqa: F811
    hub, cfg, users = site
    good = tmp_path / "good"
    make_repo(good, build_base)
    cli = [sys.executable, "-m", "binderhub_hpc.cli", "launch", "--hub-url", hub.url, "--config", str(cfg)]
    # a token the hub refuses: said before any build starts
    proc = subprocess.run(
        cli + [str(good)],
        env=dict(os.environ, JUPYTERHUB_API_TOKEN="not-a-token"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "refused $JUPYTERHUB_API_TOKEN" in proc.stderr, proc.stderr
    assert "not-a-token" not in proc.stdout + proc.stderr and "Building" not in proc.stdout
    # no such repository
    proc = subprocess.run(
        cli + [str(tmp_path / "nowhere")],
        env=dict(os.environ, JUPYTERHUB_API_TOKEN=hub.token),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "cannot resolve" in proc.stderr, proc.stderr

    # a repository that cannot be built: a non-zero exit and the reason, no server
    bad = tmp_path / "bad"
    make_repo(bad, "localhost/binderhub-hpc-no-such-base:none")
    proc, out, _ = run_launch(hub, cfg, bad, users=users, timeout=600)
    assert proc.returncode == 1, out
    assert "binderhub-hpc launch: build failure" in out, out
    assert not users, "a server was started for a failed build"


# -- what the CLI sends, compared with BinderHub's own code where it is installed ----------


def test_user_options_are_binderhubs():
    from binderhub_hpc.binderlink import binder_spec, temporary_username, user_options

    sha = "a" * 40
    opts = user_options("p/img:" + sha, "https://github.com/Org/Repo.git", "main", sha, "https://hub/")
    assert set(opts) == {
        "image",
        "token",
        "repo_url",
        "binder_ref_url",
        "binder_launch_host",
        "binder_request",
        "binder_persistent_request",
    }
    assert opts["binder_request"] == "v2/gh/Org/Repo/main"
    assert opts["binder_persistent_request"] == f"v2/gh/Org/Repo/{sha}"
    assert opts["binder_ref_url"] == f"https://github.com/Org/Repo/tree/{sha}"
    assert len(opts["token"]) == 22 and "=" not in opts["token"]
    assert binder_spec("file:///srv/x", "HEAD")[1] == "file%3A%2F%2F%2Fsrv%2Fx/HEAD"
    name = temporary_username("https://github.com/Org/Repo.git")
    assert re.fullmatch(r"org-repo-[a-z0-9]{8}", name), name
    long = temporary_username("file:///" + "x" * 50 + "/repo")
    assert len(long) == 15 + 1 + 15 + 1 + 8
    for hostile in ("https://x/r\x00b", "https://x/r\nb\u2028c", "https://x/r%0Ab"):
        assert re.fullmatch(r"[a-z0-9._-]+", temporary_username(hostile)), hostile


def test_image_name_and_username_match_binderhub():
    pytest.importorskip("binderhub")
    import random

    from binderhub.builder import _safe_build_slug
    from binderhub.launcher import Launcher

    from binderhub_hpc.binderlink import image_name, temporary_username

    prefix, sha = "binderhub-hpc/binder-", "b" * 40
    for url in ("file:///tmp/some_repo", "https://gitlab.example.org/A/b_c.git"):
        theirs = f"{prefix}{_safe_build_slug(url, limit=255 - len(prefix))}:{sha}".replace("_", "-").lower()
        assert image_name(url, sha, prefix) == theirs
        random.seed(1)
        upstream = Launcher.unique_name_from_repo(None, url)
        random.seed(1)
        assert temporary_username(url) == upstream
