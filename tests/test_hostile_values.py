"""Values from strangers that used to get through as server errors or hang:
NUL bytes, lone surrogates and huge values in user_options, refs that look
like options, and a git server that never answers."""

import socket
import subprocess
import threading

import pytest
from tornado import web

from binderhub_hpc.binderlink import RefError, resolve_ref
from binderhub_hpc.spawner.spawner import MAX_OPTION_BYTES, SlurmBinderSpawner

from spawnerutil import StubUser


def spawner(**opts):
    sp = SlurmBinderSpawner(user=StubUser("alice"), job_user="nobody")
    sp.user_options = {"image": "binder/x:abc", "token": "t" * 16, **opts}
    return sp


@pytest.mark.parametrize(
    "value, why",
    [
        ("v2/gh/org/repo/\0main", "NUL"),
        ("v2/gh/org/\ud800repo", "lone surrogate"),
        ("x" * (MAX_OPTION_BYTES + 1), "longer than 64 KiB"),
        ("é" * (MAX_OPTION_BYTES // 2 + 1), "longer than 64 KiB"),  # bytes, not characters
    ],
)
def test_user_options_that_cannot_travel_in_an_environment_are_refused_with_400(value, why):
    with pytest.raises(web.HTTPError) as e:
        spawner(binder_request=value).validate_user_options()
    assert e.value.status_code == 400 and why in e.value.log_message


def test_the_largest_accepted_value_fits_in_a_real_environment():
    value = "x" * MAX_OPTION_BYTES
    opts = spawner(binder_request=value).validate_user_options()
    out = subprocess.run(
        ["sh", "-c", 'printf %s "$BINDER_REQUEST" | wc -c'],
        env={"BINDER_REQUEST": opts["binder_request"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(out) == MAX_OPTION_BYTES
    with pytest.raises(OSError):  # what the limit protects from: E2BIG
        subprocess.run(["true"], env={"BIG": "x" * 200 * 1024})


@pytest.mark.parametrize("ref", ["-x", "--upload-pack=touch /tmp/p", "main\nother", "a\0b"])
def test_refs_that_are_not_refs_are_refused_before_git_runs(tmp_path, ref):
    with pytest.raises(RefError, match="is not a git ref"):
        resolve_ref(str(tmp_path), ref)


def test_a_git_server_that_never_answers_times_out():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        held = []
        threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
        with pytest.raises(RefError, match="no answer in 2 s"):
            resolve_ref(f"git://127.0.0.1:{port}/repo.git", "main", timeout=2)


def test_a_local_ref_resolves_and_a_missing_one_says_why(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    sha = resolve_ref(str(tmp_path), "HEAD")
    assert len(sha) == 40
    with pytest.raises(RefError, match="cannot resolve 'nope'"):
        resolve_ref(str(tmp_path), "nope")
