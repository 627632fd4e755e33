"""The job's port reporter (binderhub_hpc.spawner.reporter), run as a job
runs it: its source on the standard input of a bare Python (no site
packages, nothing of ours importable), against a small local HTTP server
that answers as the hub's batchspawner API does."""

import http.server
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from binderhub_hpc.spawner import reporter, templates


class Hub(http.server.BaseHTTPRequestHandler):
    """Records each report; meanwhile looks at the command line of every
    process on this machine for the token it was sent."""

    status = 200
    posts = []
    argv_with_token = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        token = (self.headers.get("Authorization") or "").split(" ", 1)[-1].encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes()
            except OSError:
                continue  # gone meanwhile
            if token and token in argv:
                Hub.argv_with_token.append(argv.replace(b"\0", b" ").decode(errors="replace"))
        Hub.posts.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(Hub.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    Hub.status, Hub.posts, Hub.argv_with_token = 200, [], []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/hub/api/"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def token():
    return "tok-" + secrets.token_hex(16)


def run_reporter(env):
    """The reporter as the job script runs it, on a Python that can import
    nothing but its standard library."""
    return subprocess.run(
        [sys.executable, "-I", "-S", "-"],
        input=templates.reporter_source(),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_the_reporter_posts_its_port_and_node_with_the_token_from_the_environment(hub, token):
    proc = run_reporter(
        {
            "JUPYTERHUB_API_URL": hub,
            "JUPYTERHUB_API_TOKEN": token,
            "SLURMD_NODENAME": "c9",
            "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:0/user/alice/",
            "SLURM_JOB_END_TIME": "1999999999",
        }
    )
    assert proc.returncode == 0, proc.stderr
    (post,) = Hub.posts
    port = post["body"]["port"]
    assert post["path"] == "/hub/api/batchspawner"
    assert post["headers"]["Authorization"] == f"token {token}"
    assert post["headers"]["Content-Type"] == "application/json"
    assert post["body"] == {"port": port, "node": "c9"}
    assert isinstance(port, int) and 0 < port < 65536
    assert proc.stdout.splitlines() == [str(port), f"http://0.0.0.0:{port}/user/alice/", "1999999999"]
    assert token not in proc.stdout + proc.stderr
    assert Hub.argv_with_token == []


def test_without_a_service_url_the_server_listens_on_every_address_at_the_port(hub, token):
    proc = run_reporter({"JUPYTERHUB_API_URL": hub, "JUPYTERHUB_API_TOKEN": token, "SLURMD_NODENAME": "c9"})
    assert proc.returncode == 0, proc.stderr
    port = Hub.posts[0]["body"]["port"]
    assert proc.stdout.splitlines()[:2] == [str(port), f"http://0.0.0.0:{port}/"]


def node_file(tmp_path, text):
    path = tmp_path / "nodefile"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "env, node",
    [
        ({"SLURMD_NODENAME": "c9", "PBS_NODEFILE": "nodes:p1\np1\n"}, "c9"),
        ({"PBS_NODEFILE": "nodes:  p1.cluster  \np2\n"}, "p1.cluster"),
        ({"SLURMD_NODENAME": "", "PBS_NODEFILE": "nodes:p1\n"}, "p1"),
        ({}, socket.gethostname()),
        ({"SLURMD_NODENAME": "", "PBS_NODEFILE": ""}, socket.gethostname()),
    ],
    ids=["slurm-first", "pbs-node-file-first-line", "empty-slurm-name-skipped", "hostname-last", "all-empty"],
)
def test_the_node_is_slurms_name_then_pbss_node_file_then_the_host_name(hub, token, tmp_path, env, node):
    env = {k: node_file(tmp_path, v[6:]) if v.startswith("nodes:") else v for k, v in env.items()}
    proc = run_reporter({"JUPYTERHUB_API_URL": hub, "JUPYTERHUB_API_TOKEN": token, **env})
    assert proc.returncode == 0, proc.stderr
    assert Hub.posts[0]["body"]["node"] == node


@pytest.mark.parametrize(
    "env, expect",
    [
        ({"SLURM_JOB_END_TIME": "1999999999", "BINDER_WALLTIME_SECONDS": "600"}, "slurm"),
        ({"BINDER_WALLTIME_SECONDS": "600"}, "walltime"),
        ({}, "none"),
        ({"BINDER_WALLTIME_SECONDS": ""}, "none"),
    ],
)
def test_the_end_time_is_slurms_else_the_start_plus_the_walltime_else_zero(hub, token, env, expect):
    before = int(time.time())
    proc = run_reporter({"JUPYTERHUB_API_URL": hub, "JUPYTERHUB_API_TOKEN": token, **env})
    after = int(time.time())
    assert proc.returncode == 0, proc.stderr
    end = int(proc.stdout.splitlines()[2])
    if expect == "slurm":
        assert end == 1999999999
    elif expect == "walltime":
        assert before + 600 <= end <= after + 600
    else:
        assert end == 0


def test_a_refused_report_fails_printing_no_port_and_no_token(hub, token):
    Hub.status = 403
    proc = run_reporter({"JUPYTERHUB_API_URL": hub, "JUPYTERHUB_API_TOKEN": token})
    assert proc.returncode != 0
    assert len(Hub.posts) == 1
    assert proc.stdout == ""
    assert "403" in proc.stderr and token not in proc.stderr


def test_an_unreachable_hub_fails_printing_no_port(token):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once closed
    proc = run_reporter({"JUPYTERHUB_API_URL": f"http://127.0.0.1:{closed}/hub/api", "JUPYTERHUB_API_TOKEN": token})
    assert proc.returncode != 0 and proc.stdout == ""


def test_the_job_script_pastes_the_modules_source_whole_into_a_quoted_heredoc():
    setup = templates.render_setup(host_python="python3")
    opening = "python3 - <<'BINDER_PY'\n"
    start = setup.index(opening) + len(opening)
    end = setup.index("\nBINDER_PY\n", start) + 1
    assert setup[start:end] == Path(reporter.__file__).read_text()
    assert "BINDER_PY" not in Path(reporter.__file__).read_text().splitlines()
    assert subprocess.run(["bash", "-n"], input=setup, text=True).returncode == 0


def test_the_job_scripts_setup_reads_what_the_reporter_printed_and_no_argv_holds_the_token(hub, token, tmp_path):
    """The whole session setup, rendered, run by bash: the variables the
    server gets come from the reporter, and while it reports no process on
    this machine has the token in its command line."""
    setup = templates.render_setup(host_python=sys.executable, scratch_root=str(tmp_path))
    script = (
        "set -euo pipefail\n" + setup + '\necho "READ $JUPYTER_PORT $JUPYTERHUB_SERVICE_URL $BINDER_JOB_END_TIME"\n'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "JUPYTERHUB_API_URL": hub,
        "JUPYTERHUB_API_TOKEN": token,
        "SLURMD_NODENAME": "c9",
        "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:0/user/bob/",
    }
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (post,) = Hub.posts
    port = post["body"]["port"]
    assert f"READ {port} http://0.0.0.0:{port}/user/bob/ 0" in proc.stdout.splitlines()
    assert Hub.argv_with_token == []
    assert token not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # the scratch went with the exit


def test_a_refused_report_stops_the_job_before_the_server(hub, token, tmp_path):
    """`read` meets the end of the reporter's output at once and `set -e`
    ends the job: no server the hub would never find."""
    Hub.status = 403
    setup = templates.render_setup(host_python=sys.executable, scratch_root=str(tmp_path))
    script = "set -euo pipefail\n" + setup + "\necho SERVER-STARTED\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JUPYTERHUB_API_URL": hub, "JUPYTERHUB_API_TOKEN": token}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert "SERVER-STARTED" not in proc.stdout
    assert "HTTP Error 403" in proc.stderr  # the job's log says why
    assert list(tmp_path.iterdir()) == []
