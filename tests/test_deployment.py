"""The deployment as README's "Deploying on a cluster" describes it, end to
end on the dev cluster, in authenticated mode (BINDERHUB_HPC_AUTHENTICATED=1):

- JupyterHub as the account `jupyterhub`, the command and environment of
  charts-free-config/systemd/jupyterhub.service, reading
  charts-free-config/jupyterhub_config.py as shipped (the dev cluster's values
  in $BINDERHUB_HPC_EXTRA_CONFIG); sudoers/binderhub-hpc installed after
  `visudo -cf`; nginx with nginx/binder.conf in front (TLS, a throw-away
  certificate);
- two real Unix users with passwords log in through the hub's login form
  (PAM) over nginx, start sessions with their own tokens, and work in them
  through a kernel's websocket over nginx: the session runs under the
  user's own uid, as the user's job in the queue, its files where README
  says; one user cannot reach the other's session, processes or files;
- a second launch starts a named server; user_options (BinderHub's
  binder_persistent_request) survive logout and login, and a hub restart;
- the idle culler stops sessions and keeps the users.

The anonymous mode runs too: temporary users, jobs as `binder` through the
same sudoers file.

With BinderHub installed where its unit runs it (/opt/binderhub-hpc), or a
Python that the `binderhub` account can run with BinderHub and this checkout
in $BINDERHUB_HPC_TEST_BINDERHUB_PYTHON, BinderHub runs as `binderhub`
(systemd/binderhub.service) with auth_enabled and a Binder link launches
named servers of the logged-in user; with Chromium and playwright-core (found
by node, or in $BINDERHUB_HPC_TEST_NODE_PATH), a browser logs in and opens the
notebook (screenshots in $BINDERHUB_HPC_TEST_SCREENSHOTS, else a temporary
directory). Without them (CI) those parts are skipped, saying why. The
services' logs are kept in $BINDERHUB_HPC_TEST_LOGS (default /tmp).

The tests at the top need no cluster: what the deployment helpers take from
the shipped files, and the user's home in a session (account_home_mount).
"""

import asyncio
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import sessionutil

from binderhub_hpc.registry import SIFRegistry
from binderhub_hpc_testing.deploy import (
    SUDOERS_PATH,
    Deployment,
    add_user,
    deployment_dir,
    ensure_job_dir,
    job_dir_of,
    nginx_site_config,
    read_unit,
    remove_user,
)
from binderhub_hpc_testing.repo import publish_podman_image

#: the charts-free job_dir (jupyterhub_config.py), used as shipped
JOB_DIR = "/shared/binder/jobs/{username}"
BINDERHUB_PYTHON_ENV = "BINDERHUB_HPC_TEST_BINDERHUB_PYTHON"


# ------------------------------------------------------------ offline


def test_units_run_what_readme_says():
    hub = read_unit(deployment_dir() / "systemd" / "jupyterhub.service")
    assert hub["User"] == ["jupyterhub"] and hub["ExecStart"] == [
        "/opt/binderhub-hpc/bin/jupyterhub -f /etc/binderhub-hpc/jupyterhub_config.py"
    ]
    binder = read_unit(deployment_dir() / "systemd" / "binderhub.service")
    assert binder["User"] == ["binderhub"] and binder["Group"] == ["binder-build"]
    assert binder["ExecStart"] == [
        "/opt/binderhub-hpc/bin/python -m binderhub --config=/etc/binderhub-hpc/binderhub_config.py"
    ]
    for unit in (hub, binder):
        assert "/etc/binderhub-hpc/secrets.env" in unit["EnvironmentFile"]
        assert "-/etc/binderhub-hpc/binderhub-hpc.env" in unit["EnvironmentFile"]


def test_sudoers_paths_are_the_job_dir():
    text = (deployment_dir() / "sudoers" / "binderhub-hpc").read_text()
    conf = (deployment_dir() / "jupyterhub_config.py").read_text()
    job_dir = re.search(r'spawner\.job_dir = "([^"]+)"', conf).group(1)
    assert job_dir == JOB_DIR
    paths = set(re.findall(r"(/\S+)/\.binder-secrets\.\*", text))
    assert paths == {job_dir.replace("{username}", "*")}, paths
    assert re.search(r"^Runas_Alias BINDER_JOB_ACCOUNTS = binder, %binder-users$", text, re.M)
    if shutil.which("visudo"):
        p = subprocess.run(
            ["visudo", "-cf", str(deployment_dir() / "sudoers" / "binderhub-hpc")], capture_output=True, text=True
        )
        assert p.returncode == 0, p.stdout + p.stderr


def test_nginx_site_values_are_the_only_edits():
    text = nginx_site_config(
        http_port=8080,
        https_port=8443,
        server_name="binder.test",
        cert="/c.pem",
        key="/c.key",
        proxy_port=9000,
        binder_port=9001,
    )
    shipped = (deployment_dir() / "nginx" / "binder.conf").read_text()
    assert len(text.splitlines()) == len(shipped.splitlines())
    assert "listen 8443 ssl http2;" in text and "listen [::]:8080;" in text
    assert "server 127.0.0.1:9000;" in text and "server 127.0.0.1:9001;" in text
    # redirects and OAuth callbacks are built from Host: keep its port
    assert "proxy_set_header Host              $http_host;" in text


def _spawner(name, **config):
    from jupyterhub.objects import Hub, Server

    from binderhub_hpc.spawner import SlurmBinderSpawner
    from binderhub_hpc.spawner.runtime import SessionImage

    from spawnerutil import StubUser

    config.setdefault("container_runtime", "apptainer")
    sp = SlurmBinderSpawner(
        user=StubUser(name),
        hub=Hub(ip="127.0.0.1", port=8081, base_url="/hub/"),
        api_token="t" * 32,
        oauth_client_id=f"jupyterhub-user-{name}",
        **config,
    )
    sp.server = Server(base_url=f"/user/{name}/")
    sp.user_options = {"image": "binder/x:abc", "repo_url": "https://example.org/r.git"}
    sp._image_path = SessionImage("/shared/registry/binder/x/abc.sif", 36864)
    return sp


def test_account_home_mount_in_authenticated_sessions_only():
    from tornado import web

    me = pwd.getpwuid(os.getuid()).pw_name
    auth = {"jobs_as_hub_user": True, "auth_enabled": True, "exec_prefix": "sudo -E -u {username}"}
    sp = _spawner(me, account_home_mount="/home/{username}", **auth)
    script = asyncio.run(sp._get_batch_script(**sp.template_vars()))
    assert 'BINDER_ACCOUNT_HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"' in script
    assert f'--bind "$BINDER_ACCOUNT_HOME":/home/{me} ' in script
    assert sp.get_env()["BINDER_ACCOUNT_HOME_MOUNT"] == f"/home/{me}"
    assert "BINDER_ACCOUNT_HOME_MOUNT" in sp.container_env_names()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # off by default: no home, as before
    plain = _spawner(me, **auth)
    assert "BINDER_ACCOUNT_HOME" not in asyncio.run(plain._get_batch_script(**plain.template_vars()))
    # anonymous sessions share the service account: refused
    with pytest.raises(web.HTTPError) as e:
        _spawner("anon-1", job_user=me, account_home_mount="/home/x").template_vars()
    assert "authenticated" in str(e.value)
    # podman's user namespace would make the home's files root's: refused
    with pytest.raises(web.HTTPError) as e:
        _spawner(me, container_runtime="podman", account_home_mount="/home/x", **auth).template_vars()
    assert "apptainer" in str(e.value)


# ------------------------------------------------------------ on the dev cluster


def binderhub_python():
    """A Python that runs BinderHub as the `binderhub` account, or None."""
    for python in (os.environ.get(BINDERHUB_PYTHON_ENV), "/opt/binderhub-hpc/bin/python"):
        if not python or not os.path.exists(python):
            continue
        p = subprocess.run(
            [
                "setpriv",
                "--reuid=binderhub",
                "--regid=binder-build",
                "--init-groups",
                "--",
                python,
                "-c",
                "import binderhub.app",
            ],
            capture_output=True,
            cwd="/",
        )
        if p.returncode == 0:
            return python
    return None


class _Session(requests.Session):
    """A browser's cookies; trusts the deployment's certificate (whatever
    REQUESTS_CA_BUNDLE says: requests lets it override Session.verify)."""

    def __init__(self, ca):
        super().__init__()
        self.ca = ca

    def request(self, method, url, **kw):
        kw.setdefault("verify", self.ca)
        return super().request(method, url, **kw)


class User:
    """A cluster account and its browser-like session through nginx."""

    def __init__(self, dep, name):
        self.dep = dep
        self.name = name
        self.password = secrets.token_urlsafe(12)
        self.pw = None
        self.http = None
        self.token = None

    def create(self):
        self.pw = add_user(self.name, self.password)
        ensure_job_dir(JOB_DIR, self.name)

    def new_session(self):
        self.http = _Session(str(self.dep.ca_cert))

    def login(self):
        """The hub's login form, as a browser fills it in."""
        self.new_session()
        url = self.dep.public_url + "hub/login"
        page = self.http.get(url, timeout=30)
        assert page.status_code == 200, page.text[:500]
        xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', page.text).group(1)
        r = self.http.post(
            url,
            data={"username": self.name, "password": self.password, "_xsrf": xsrf},
            timeout=60,
            allow_redirects=False,
        )
        # logged in: off to the front page (the Binder UI, c.JupyterHub.default_url)
        assert r.status_code == 302 and "/hub/login" not in r.headers["Location"], (r.status_code, r.text[-800:])
        me = self.http.get(self.dep.public_url + "hub/api/user", timeout=30)
        assert me.status_code == 200 and me.json()["name"] == self.name, me.text
        return r

    def ensure_logged_in(self):
        if self.http is None or self.token is None:
            self.login()
            self.make_token()

    def xsrf(self):
        page = self.http.get(self.dep.public_url + "hub/token", timeout=30)
        m = re.search(r'xsrf_token:\s*"([^"]+)"', page.text)
        return m.group(1) if m else self.http.cookies.get("_xsrf", path="/hub/")

    def cookie_api(self, method, path, **kw):
        """The hub's API with the login cookie (and its XSRF token), as the hub's pages call it."""
        headers = {"X-XSRFToken": self.xsrf(), **kw.pop("headers", {})}
        return self.http.request(method, self.dep.public_url + "hub/api" + path, headers=headers, timeout=60, **kw)

    def make_token(self):
        r = self.cookie_api("POST", f"/users/{self.name}/tokens", json={"note": "deployment test", "expires_in": 3600})
        assert r.status_code in (200, 201), r.text
        self.token = r.json()["token"]
        return self.token

    def api(self, method, path, token=None, **kw):
        headers = {"Authorization": f"token {token or self.token}", **kw.pop("headers", {})}
        return requests.request(
            method,
            self.dep.public_url + "hub/api" + path,
            headers=headers,
            verify=str(self.dep.ca_cert),
            timeout=kw.pop("timeout", 60),
            **kw,
        )

    def server_url(self, server=""):
        return self.dep.public_url + f"user/{self.name}/{server + '/' if server else ''}"

    def launch(self, server, options, timeout=300):
        """Start a (named) server with BinderHub's user_options; its progress
        events, followed through nginx until ready."""
        path = f"/users/{self.name}/servers/{server}" if server else f"/users/{self.name}/server"
        r = self.api("POST", path, json=options)
        assert r.status_code in (201, 202), r.text
        events = []
        with requests.get(
            self.dep.public_url + "hub/api" + path + "/progress",
            headers={"Authorization": f"token {self.token}"},
            verify=str(self.dep.ca_cert),
            stream=True,
            timeout=timeout,
        ) as stream:
            for line in stream.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    ev = json.loads(line[5:])
                    events.append(ev)
                    if ev.get("ready") or ev.get("failed"):
                        break
        assert events and events[-1].get("ready"), (events, self.dep.log_tail("jupyterhub"))
        return events


def run_code(user, server_url, code, timeout=120):
    """Run `code` in a new kernel of the server, through nginx: REST to make
    the kernel, the kernel's websocket (wss) to execute; what it printed."""
    return sessionutil.run_code(server_url, user.token, code, timeout, ca_certs=str(user.dep.ca_cert))


SESSION_FACTS = r"""
import json, os, socket, subprocess
with open("saved-by-session.txt", "w") as f:
    f.write("written in the session\n")
home_mount = os.environ.get("BINDER_ACCOUNT_HOME_MOUNT", "")
if home_mount:
    with open(os.path.join(home_mount, "saved-in-home.txt"), "w") as f:
        f.write("written in the session\n")
print(json.dumps({
    "id": subprocess.run(["id"], capture_output=True, text=True).stdout.strip(),
    "uid": os.getuid(),
    "job": os.environ.get("SLURM_JOB_ID"),
    "job_user": os.environ.get("SLURM_JOB_USER"),
    "node": socket.gethostname(),
    "cwd": os.getcwd(),
    "files": sorted(os.listdir(".")),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "home_mount": home_mount,
}))
"""


def session_facts(user, server):
    return json.loads(run_code(user, user.server_url(server), SESSION_FACTS).strip().splitlines()[-1])


def as_hub(argv, input=None):
    """`argv` as the hub's account, as the hub runs its exec_prefix."""
    return subprocess.run(
        ["setpriv", "--reuid=jupyterhub", "--regid=jupyterhub", "--init-groups", "--", *argv],
        input=input,
        capture_output=True,
        text=True,
        cwd="/",
    )


def check_sudoers_secrets_file(account):
    """What the PBS spawner does through the sudoers file with the session's
    private file in the account's job_dir: create it 0600, fill it, remove it."""
    path = str(job_dir_of(JOB_DIR, account) / f".binder-secrets.{secrets.token_hex(8)}")
    sudo = ["sudo", "-n", "-E", "-u", account]
    for argv, stdin in ((["install", "-m", "600", "/dev/null", path], None), (["tee", path], "A=1\n")):
        p = as_hub(sudo + argv, stdin)
        assert p.returncode == 0, (argv, p.stderr)
    st = os.stat(path)
    assert st.st_uid == pwd.getpwnam(account).pw_uid and st.st_mode & 0o777 == 0o600
    p = as_hub(sudo + ["rm", "-f", "--", path])
    assert p.returncode == 0 and not os.path.exists(path), p.stderr
    # nothing beyond: other paths, other accounts
    assert as_hub(sudo + ["tee", "/tmp/binder-secrets-elsewhere"], "x").returncode != 0
    for other in ("root", "binderhub"):
        assert as_hub(["sudo", "-n", "-u", other, "/usr/bin/sbatch", "--version"]).returncode != 0


def squeue(cluster, *args):
    return subprocess.run(
        ["squeue", "--noheader", *args], env=cluster.full_env(), capture_output=True, text=True
    ).stdout


def job_scratch(job_dir, job_id):
    """(node, scratch path on the node) from the job's log in its job directory."""
    log = (job_dir / f"{job_id}.log").read_text()
    m = re.search(r"server port \d+ on (\S+), scratch (\S+)", log)
    assert m, log
    return m.groups()


@pytest.fixture(scope="module")
def image(cluster, base_image):
    root, compute_root = cluster.site_registry(f"deploy-{uuid.uuid4().hex[:8]}")
    reg = SIFRegistry(root=str(root), compute_root=compute_root)
    name = "binderhub-hpc/binder-deploy-test:" + secrets.token_hex(20)
    publish_podman_image(reg, name, base_image)
    yield reg, name
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(cluster, image):
    if not cluster.multi:
        pytest.skip(
            "the deployment runs as a site runs it, with the hub, a build node and compute nodes "
            "of their own and the site virtualenv there: `binderhub-hpc devcluster up --nodes 4`"
        )
    reg, _ = image
    state = cluster.root / "test-deployments" / uuid.uuid4().hex[:8]
    state.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(state.parent, 0o755)
    python = binderhub_python()
    dev = f"""
        # -- the dev cluster's site
        c.SIFRegistry.root = {str(reg.root)!r}
        c.SIFRegistry.compute_root = {reg.compute_root!r}
        c.BinderBatchMixin.req_partition = "interactive"
        c.BinderBatchMixin.req_memory = "1G"
        c.BinderBatchMixin.req_nprocs = "1"
        c.BinderBatchMixin.req_runtime = "00:30:00"
        c.BinderBatchMixin.queue_poll_interval = 1.0
        # the users' homes, mounted in their sessions (README: authenticated Binder)
        c.BinderBatchMixin.account_home_mount = "/home/{{username}}"
        c.HealthChecks.partition = "interactive"
        c.SchedulerLaunchQuota.total_quota = 20
        c.GitRepoProvider.allowed_protocols = {{"http", "https"}}
        """
    dep = Deployment(cluster, state, authenticated=True, dev_config=dev, binderhub_python=python)
    tag = uuid.uuid4().hex[:6]
    dep.users = [User(dep, f"bhd{tag}a"), User(dep, f"bhd{tag}b")]
    try:
        for u in dep.users:
            u.create()
        t0 = time.monotonic()
        dep.start(binderhub=python is not None)
        dep.started_in = time.monotonic() - t0
        yield dep
    finally:
        names = [u.name for u in dep.users]
        try:
            for u in dep.users:
                if u.pw is None:
                    continue
                r = (
                    requests.get(
                        f"http://{dep.address}:{dep.hub_port}/hub/api/users/{u.name}",
                        headers={"Authorization": f"token {dep.token}"},
                        timeout=10,
                    )
                    if "jupyterhub" in dep.procs
                    else None
                )
                for server in r.json().get("servers", {}) if r is not None and r.ok else {}:
                    requests.delete(
                        f"http://{dep.address}:{dep.hub_port}/hub/api/users/{u.name}/servers/{server}",
                        headers={"Authorization": f"token {dep.token}"},
                        timeout=60,
                    )
        except (requests.RequestException, ValueError, OSError):
            pass
        dep.stop()
        left = subprocess.run(
            ["squeue", "--noheader", "--format=%i", "--user", ",".join(names)],
            env=cluster.full_env(),
            capture_output=True,
            text=True,
        ).stdout.split()
        if left:
            subprocess.run(["scancel", *left], env=cluster.full_env(), check=False)
            time.sleep(2)
        for u in dep.users:
            remove_user(u.name)
            shutil.rmtree(job_dir_of(JOB_DIR, u.name), ignore_errors=True)
        # the services' logs outlive the deployment, for a failure's reader
        logs = Path(os.environ.get("BINDERHUB_HPC_TEST_LOGS", "/tmp")) / f"deployment-{state.name}"
        logs.mkdir(parents=True, exist_ok=True)
        for log in state.glob("*.log"):
            shutil.copy(log, logs)
        shutil.rmtree(state, ignore_errors=True)


def test_hub_runs_unprivileged_behind_nginx(deployment):
    dep = deployment
    # the hub and its proxy run as `jupyterhub`, as systemd/jupyterhub.service says
    hub = dep.procs["jupyterhub"]
    status = Path(f"/proc/{hub.pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    assert pwd.getpwuid(uid).pw_name == "jupyterhub", status
    # its children: the proxy and the idle culler
    children = subprocess.run(["pgrep", "-P", str(hub.pid), "-a"], capture_output=True, text=True).stdout
    assert "configurable-http-proxy" in children and "jupyterhub_idle_culler" in children, children
    for line in children.splitlines():
        pid = int(line.split()[0])
        owner = Path(f"/proc/{pid}").stat().st_uid
        assert pwd.getpwuid(owner).pw_name == "jupyterhub", line
    # BinderHub as `binderhub` (systemd/binderhub.service), where it runs
    if "binderhub" in dep.procs:
        owner = Path(f"/proc/{dep.procs['binderhub'].pid}").stat().st_uid
        assert pwd.getpwuid(owner).pw_name == "binderhub"
    # the sudoers file, as shipped, where sudo reads it
    assert SUDOERS_PATH.read_text() == (deployment_dir() / "sudoers" / "binderhub-hpc").read_text()
    # nginx: plain http goes to https; the hub answers over TLS
    r = requests.get(f"http://{dep.address}:{dep.http_port}/hub/", allow_redirects=False, timeout=10)
    assert r.status_code == 301 and r.headers["Location"].startswith("https://"), r.headers
    r = requests.get(dep.public_url + "hub/api/", verify=str(dep.ca_cert), timeout=10)
    assert r.status_code == 200 and "version" in r.json()
    assert r.headers.get("Strict-Transport-Security"), r.headers
    # BinderHub's metrics stay inside
    assert (
        requests.get(dep.public_url + "services/binder/metrics", verify=str(dep.ca_cert), timeout=10).status_code == 403
    )
    print(
        f"\ndeployment up in {dep.started_in:.1f} s (hub as jupyterhub, nginx"
        f"{', BinderHub as binderhub' if 'binderhub' in dep.procs else ''})"
    )


def options(image_name, public_url, spec="v2/git/deploy-test/HEAD"):
    """BinderHub's user_options for a launch."""
    return {
        "image": image_name,
        "repo_url": "https://example.org/deploy-test",
        "binder_ref_url": "https://example.org/deploy-test/tree/HEAD",
        "binder_launch_host": public_url + "services/binder/",
        "binder_request": spec,
        "binder_persistent_request": spec,
    }


def test_users_sessions_run_as_themselves_alone(deployment, image, cluster):
    dep = deployment
    _, image_name = image
    alice, bob = dep.users
    # a wrong password is refused; the right one logs in (PAM, as `jupyterhub`)
    good = alice.password
    alice.password = "not-" + good
    alice.new_session()
    page = alice.http.get(dep.public_url + "hub/login", timeout=30)
    xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', page.text).group(1)
    r = alice.http.post(
        dep.public_url + "hub/login",
        timeout=60,
        data={"username": alice.name, "password": alice.password, "_xsrf": xsrf},
    )
    assert "/hub/login" in r.url or r.status_code == 403, (r.status_code, r.url)
    alice.password = good
    t0 = time.monotonic()
    for u in (alice, bob):
        u.login()
        u.make_token()
    t_login = time.monotonic() - t0

    t1 = time.monotonic()
    events = alice.launch("first", options(image_name, dep.public_url))
    t_launch = time.monotonic() - t1
    assert any("running on" in (e.get("message") or "") for e in events), events
    facts = session_facts(alice, "first")
    t_cell = time.monotonic() - t1
    # the session runs under the user's own uid, as the user's job
    assert facts["uid"] == alice.pw.pw_uid, facts
    assert f"uid={alice.pw.pw_uid}({alice.name})" in facts["id"], facts
    assert facts["job_user"] == alice.name, facts
    queue = squeue(cluster, "--jobs", facts["job"], "--format=%u %T %N")
    assert queue.split()[:2] == [alice.name, "RUNNING"], queue
    assert re.fullmatch(r"c\d+", facts["node"]) or not cluster.multi, facts
    # the session's files: the repository (a copy of the image's home on the
    # node's scratch, where the server starts) and the user's own home
    assert facts["cwd"] == "/home/jovyan", facts
    job_dir = job_dir_of(JOB_DIR, alice.name)
    node, scratch = job_scratch(job_dir, facts["job"])
    saved = cluster.host_path(node, scratch) / "home" / "saved-by-session.txt"
    assert saved.read_text() == "written in the session\n"
    assert saved.stat().st_uid == alice.pw.pw_uid
    assert facts["home_mount"] == f"/home/{alice.name}", facts
    in_home = Path(alice.pw.pw_dir) / "saved-in-home.txt"
    assert in_home.read_text() == "written in the session\n" and in_home.stat().st_uid == alice.pw.pw_uid
    # the job's files: the user's job directory, private
    assert (job_dir / f"{facts['job']}.log").stat().st_uid == alice.pw.pw_uid
    assert (job_dir.stat().st_mode & 0o777) == 0o700

    # the hub may act as a member of binder-users (the PBS session file too), no one else
    check_sudoers_secrets_file(alice.name)

    # -- one user cannot reach another's session
    bob.launch("first", options(image_name, dep.public_url))
    bob_facts = session_facts(bob, "first")
    assert bob_facts["uid"] == bob.pw.pw_uid and bob_facts["job"] != facts["job"]
    # alice's server refuses bob's token and bob's login cookie
    r = requests.get(
        alice.server_url("first") + "api/contents",
        verify=str(dep.ca_cert),
        timeout=30,
        headers={"Authorization": f"token {bob.token}"},
    )
    assert r.status_code == 403, (r.status_code, r.text[:300])
    r = bob.http.get(alice.server_url("first") + "api/contents", timeout=30)
    assert r.status_code in (403, 404) or "saved-by-session.txt" not in r.text, (r.status_code, r.url)
    assert "saved-by-session.txt" not in r.text
    # ... and the hub's API refuses bob anything of alice's
    assert bob.api("GET", f"/users/{alice.name}").status_code in (403, 404)
    assert bob.api("POST", f"/users/{alice.name}/servers/x", json={"image": image_name}).status_code in (403, 404)
    # bob's session sees its own processes only
    assert len(bob_facts["pids"]) < 30 and len(facts["pids"]) < 30, (facts["pids"], bob_facts["pids"])
    # bob's account cannot read alice's session scratch or job files (homes
    # are as private as the site makes them: useradd's HOME_MODE)
    for path in (scratch, str(job_dir)):
        p = cluster.on_node(node, ["ls", path], user=bob.name)
        assert p.returncode != 0, (path, p.stdout)
    probe = f"import os\ntry:\n    os.listdir({scratch!r}); print('READ')\nexcept OSError as e:\n    print(type(e).__name__)\n"
    assert "READ" not in run_code(bob, bob.server_url("first"), probe)

    # -- a second launch by the same user: another named server, another job
    second = alice.launch("second", options(image_name, dep.public_url, spec="v2/git/deploy-test-2/HEAD"))
    assert second[-1]["ready"]
    facts2 = session_facts(alice, "second")
    assert facts2["job"] != facts["job"] and facts2["uid"] == alice.pw.pw_uid
    servers = alice.api("GET", f"/users/{alice.name}").json()["servers"]
    assert {"first", "second"} <= set(servers) and all(s["ready"] for s in servers.values()), servers
    print(
        f"\nlogin (2 users, PAM through nginx) {t_login:.1f} s; launch → ready {t_launch:.1f} s; "
        f"→ first cell answered through nginx {t_cell:.1f} s"
    )
    dep.jobs = {alice.name: [facts["job"], facts2["job"]], bob.name: [bob_facts["job"]]}


def test_user_options_survive_logout_login_and_restart(deployment):
    dep = deployment
    alice = dep.users[0]
    alice.http.get(dep.public_url + "hub/logout", timeout=30)
    r = alice.http.get(dep.public_url + "hub/api/user", timeout=30)
    assert r.status_code in (401, 403), r.status_code
    alice.login()
    servers = alice.cookie_api("GET", f"/users/{alice.name}").json()["servers"]
    assert servers["first"]["ready"], servers
    assert servers["second"]["user_options"]["binder_persistent_request"] == "v2/git/deploy-test-2/HEAD", servers
    # a restarted hub finds the sessions and their options (jobs outlive it)
    dep.restart_hub()
    servers = alice.api("GET", f"/users/{alice.name}").json()["servers"]
    assert servers["first"]["user_options"]["binder_persistent_request"] == "v2/git/deploy-test/HEAD"
    assert servers["first"]["ready"], servers
    assert "saved-by-session.txt" in run_code(alice, alice.server_url("first"), "import os; print(os.listdir('.'))")


def binder_events(http, url, timeout=300):
    """BinderHub's build/launch event stream (through nginx, unbuffered)."""
    events = []
    with http.get(url, headers={"Accept": "text/event-stream"}, stream=True, timeout=(30, timeout)) as r:
        assert r.status_code == 200, r.text[:500]
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                ev = json.loads(line[5:])
                events.append(ev)
                if ev.get("phase") in ("ready", "failed") and (ev.get("url") or ev.get("phase") == "failed"):
                    break
    return events


@pytest.fixture(scope="module")
def binder_repo(deployment, image, git_server, build_base):
    """A repository BinderHub resolves through its git provider (served by
    the head node), whose image is already in the registry: launches skip
    the build."""
    from binderhub_hpc.binderlink import image_name
    from binderhub_hpc_testing.repo import make_repo

    if "binderhub" not in deployment.procs:
        pytest.skip(
            "BinderHub is not importable by the binderhub account (not installed in "
            f"/opt/binderhub-hpc, no ${BINDERHUB_PYTHON_ENV}): the Binder link parts are skipped"
        )
    reg, _ = image
    name = f"deploy-{uuid.uuid4().hex[:8]}"
    sha = make_repo(git_server.root / name, build_base, marker=name)
    url = git_server.url(name)
    # the image a build would make (the repository in /home/jovyan), made here
    tag = f"localhost/binderhub-hpc-deploy-test:{name}"
    subprocess.run(["podman", "build", "-q", "-t", tag, str(git_server.root / name)], check=True, capture_output=True)
    try:
        publish_podman_image(reg, image_name(url, sha, "binderhub-hpc/binder-"), tag)
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
    yield url, sha
    shutil.rmtree(git_server.root / name, ignore_errors=True)


def test_binder_link_launches_named_servers_of_the_user(deployment, binder_repo):
    """BinderHub (auth_enabled) as `binderhub`, behind nginx: the logged-in
    user's launches are named servers of theirs, running as them."""
    dep = deployment
    alice, bob = dep.users
    url, sha = binder_repo
    alice.ensure_logged_in()
    bob.ensure_logged_in()
    binder = dep.public_url + "services/binder/"
    # /health: the registry, rootless podman as binderhub, the scheduler, the hub
    health = requests.get(binder + "health", verify=str(dep.ca_cert), timeout=60)
    assert health.status_code == 200 and health.json()["ok"], health.text
    # BinderHub's page sends a stranger to the hub's login, a user through OAuth
    anon = _Session(str(dep.ca_cert))
    r = anon.get(binder, timeout=60)
    assert "/hub/login" in r.url, r.url
    r = alice.http.get(binder, timeout=60)
    assert r.status_code == 200 and r.url.startswith(binder), (r.status_code, r.url)
    build = binder + f"build/git/{quote(url, safe='')}/{sha}"
    t0 = time.monotonic()
    events = binder_events(alice.http, build)
    first = time.monotonic() - t0
    ready = events[-1]
    assert ready.get("phase") == "ready", events[-5:]
    assert "Found built image" in "".join(e.get("message", "") for e in events)
    assert f"/user/{alice.name}/" in ready["url"], ready
    server = ready["url"].rstrip("/").rsplit("/", 1)[-1]
    facts = session_facts(alice, server)
    assert facts["uid"] == alice.pw.pw_uid and facts["job_user"] == alice.name, facts
    assert {"hello.ipynb", "Dockerfile", "saved-by-session.txt"} <= set(facts["files"]), facts
    # the second click: another named server of the same user
    again = binder_events(alice.http, build)
    server2 = again[-1]["url"].rstrip("/").rsplit("/", 1)[-1]
    assert server2 != server and f"/user/{alice.name}/" in again[-1]["url"], again[-1]
    servers = alice.api("GET", f"/users/{alice.name}").json()["servers"]
    assert {server, server2} <= set(servers)
    assert servers[server]["user_options"]["binder_persistent_request"] == f"v2/git/{quote(url, safe='')}/{sha}"
    # bob's browser cannot open alice's Binder session
    r = bob.http.get(ready["url"] + "api/contents", timeout=30)
    assert r.status_code in (403, 404) or "hello.ipynb" not in r.text
    print(f"\nBinder link, logged in: launch through BinderHub {first:.1f} s")
    dep.jobs = getattr(dep, "jobs", {})
    dep.jobs.setdefault(alice.name, []).extend([facts["job"]])


def test_browser_logs_in_and_opens_the_notebook(deployment, binder_repo, tmp_path):
    """Chromium follows a Binder link: the hub's login form, then the
    notebook interface of the user's session. Needs playwright-core."""
    dep = deployment
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    node = shutil.which("node")
    if not chromium or not node:
        pytest.skip("no Chromium or node: the browser part is skipped")
    node_env = dict(os.environ)
    if os.environ.get("BINDERHUB_HPC_TEST_NODE_PATH"):
        node_env["NODE_PATH"] = os.environ["BINDERHUB_HPC_TEST_NODE_PATH"]
    if subprocess.run([node, "-e", "require.resolve('playwright-core')"], env=node_env, capture_output=True).returncode:
        pytest.skip(
            "playwright-core is not installed for node ($BINDERHUB_HPC_TEST_NODE_PATH): the browser part is skipped"
        )
    bob = dep.users[1]
    url, sha = binder_repo
    link = dep.public_url + f"services/binder/v2/git/{quote(url, safe='')}/{sha}?urlpath=lab"
    shots = Path(os.environ.get("BINDERHUB_HPC_TEST_SCREENSHOTS", tmp_path)) / "browser"
    env = dict(node_env, BINDER_USER=bob.name, BINDER_PASSWORD=bob.password, CHROMIUM=chromium)
    p = subprocess.run(
        [node, str(Path(__file__).with_name("binder_browser.js")), link, str(shots), "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    result = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
    assert p.returncode == 0 and result.get("ok"), (result, p.stderr[-3000:])
    assert f"/user/{bob.name}/" in result["url"], result
    times = result["times"]
    print(
        f"\nbrowser: login submitted → notebook rendered {(times['notebook'] - times['login_submitted']) / 1000:.1f} s "
        f"(→ session URL {(times['session_url'] - times['login_submitted']) / 1000:.1f} s); screenshots: "
        + ", ".join(result["shots"])
    )


@pytest.fixture
def anonymous_deployment(cluster, image):
    """The same files in the default, anonymous mode: temporary hub users,
    every job as `binder` through the sudoers file."""
    reg, _ = image
    state = cluster.root / "test-deployments" / uuid.uuid4().hex[:8]
    dev = f"""
        c.SIFRegistry.root = {str(reg.root)!r}
        c.SIFRegistry.compute_root = {reg.compute_root!r}
        c.BinderBatchMixin.req_partition = "interactive"
        c.BinderBatchMixin.req_memory = "1G"
        c.BinderBatchMixin.req_nprocs = "1"
        c.BinderBatchMixin.queue_poll_interval = 1.0
        """
    dep = Deployment(cluster, state, authenticated=False, dev_config=dev)
    ensure_job_dir(JOB_DIR, "binder")
    dep.temporary_users = []
    try:
        dep.start()
        yield dep
    finally:
        api = f"http://{dep.address}:{dep.hub_port}/hub/api"
        for name in dep.temporary_users:
            try:
                requests.delete(
                    f"{api}/users/{name}/server", headers={"Authorization": f"token {dep.token}"}, timeout=60
                )
            except requests.RequestException:
                pass
        dep.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_anonymous_binder_sessions_run_as_the_service_account(anonymous_deployment, image, cluster):
    """What BinderHub's launcher does without auth, through nginx: a
    temporary user, a server with a Binder token; the job is `binder`'s."""
    dep = anonymous_deployment
    _, image_name = image
    hub = dep.procs["jupyterhub"]
    children = subprocess.run(["pgrep", "-P", str(hub.pid), "-a"], capture_output=True, text=True).stdout
    assert "jupyterhub_idle_culler" in children and "--cull-users=True" in children, children
    name = f"deploy-test-{uuid.uuid4().hex[:8]}"
    dep.temporary_users.append(name)
    token = secrets.token_urlsafe(16)
    launcher = User(dep, name)
    launcher.token = dep.token  # BinderHub's service token
    r = launcher.api("POST", f"/users/{name}")
    assert r.status_code == 201, r.text
    launcher.launch("", {**options(image_name, dep.public_url), "token": token})
    session = User(dep, name)
    session.token = token  # the Binder token opens the session
    facts = json.loads(run_code(session, session.server_url(), SESSION_FACTS).strip().splitlines()[-1])
    binder = pwd.getpwnam("binder")
    assert facts["uid"] == binder.pw_uid and facts["job_user"] == "binder", facts
    assert squeue(cluster, "--jobs", facts["job"], "--format=%u").split() == ["binder"]
    assert not facts["home_mount"]
    # the session refuses requests without its token
    r = requests.get(session.server_url() + "api/contents", verify=str(dep.ca_cert), timeout=30)
    assert r.status_code in (302, 403) or "saved-by-session.txt" not in r.text
    assert (job_dir_of(JOB_DIR, "binder") / f"{facts['job']}.log").stat().st_uid == binder.pw_uid
    # the PBS session file's commands, through the same sudoers file
    check_sudoers_secrets_file("binder")


def test_idle_culler_stops_sessions_keeps_users(deployment, cluster):
    dep = deployment
    jobs = [j for js in getattr(dep, "jobs", {}).values() for j in js]
    if not jobs:
        pytest.skip("no sessions were started")
    # the shipped culler (--timeout=3600, no --cull-users), with a short timeout
    dep.idle_timeout = 10
    dep.restart_hub()
    admin = {"Authorization": f"token {dep.token}"}
    api = f"http://{dep.address}:{dep.hub_port}/hub/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        servers = {
            u.name: requests.get(f"{api}/users/{u.name}", headers=admin, timeout=10).json()["servers"]
            for u in dep.users
        }
        if not any(servers.values()):
            break
        time.sleep(2)
    assert not any(servers.values()), (servers, dep.log_tail("jupyterhub"))
    # the users remain (authenticated mode: no --cull-users); their jobs are gone
    for u in dep.users:
        r = requests.get(f"{api}/users/{u.name}", headers=admin, timeout=10)
        assert r.status_code == 200 and r.json()["name"] == u.name
    deadline = time.monotonic() + 30
    while squeue(cluster, "--jobs", ",".join(jobs), "--format=%i").split() and time.monotonic() < deadline:
        time.sleep(1)
    assert not squeue(cluster, "--jobs", ",".join(jobs), "--format=%i").split()
    # the culler did it, deleting the named servers (--remove-named-servers=True)
    log = dep.log_path("jupyterhub").read_text(errors="replace")
    for u in dep.users:
        assert f"Culling server {u.name}/first" in log
        assert re.search(rf"DELETE /hub/api/users/{u.name}/servers/first \(idle-culler@", log)
