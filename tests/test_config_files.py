"""The deployment files in charts-free-config/ load, name real classes,
parse (systemd units, nginx), and the metrics are documented and charted."""

import configparser
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from jinja2 import Environment
from traitlets.config.loader import PyFileConfigLoader

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "charts-free-config"
TOKEN = "0123456789abcdef0123456789abcdef"


def load(name, monkeypatch, **env):
    monkeypatch.setenv("BINDERHUB_API_TOKEN", TOKEN)
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    monkeypatch.delenv("BINDERHUB_HPC_AUTHENTICATED", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return PyFileConfigLoader(name, path=str(CONF)).load_config()


def importable(dotted):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_site_config_is_shared(monkeypatch):
    cfg = load("binderhub_hpc_config.py", monkeypatch)
    from binderhub_hpc.registry import SIFRegistry

    reg = SIFRegistry(config=cfg)
    assert reg.root == "/shared/binder/registry" and reg.formats == ["sif"]


def test_binderhub_config(monkeypatch):
    cfg = load("binderhub_config.py", monkeypatch)
    bh = cfg.BinderHub
    assert bh.use_registry is True and bh.builder_required is False
    assert "/" in bh.image_prefix
    assert bh.hub_api_token == TOKEN
    assert bh.base_url == "/services/binder/"
    assert bh.hub_url.startswith("https://") and bh.hub_url_local.startswith("http://127.0.0.1")
    assert "auth_enabled" not in bh
    # the site config came along
    assert cfg.SIFRegistry.root == "/shared/binder/registry"
    names = [
        bh.build_class,
        bh.registry_class,
        bh.health_handler_class,
        bh.launch_quota_class,
        cfg.SIFBuildExecutor.runner_class,
    ]
    assert names[:4] == [
        "binderhub_hpc.binderhub.SIFBuildExecutor",
        "binderhub_hpc.binderhub.SIFDockerRegistry",
        "binderhub_hpc.binderhub.SIFHealthHandler",
        "binderhub_hpc.binderhub.SchedulerLaunchQuota",
    ]
    assert cfg.SchedulerLaunchQuota.job_user == "binder" and cfg.SchedulerLaunchQuota.total_quota > 0
    assert importable(cfg.SIFBuildExecutor.runner_class).__name__ == "LocalRunner"
    if importlib.util.find_spec("binderhub") is None:
        return
    from binderhub.build import BuildExecutor
    from binderhub.health import HealthHandler
    from binderhub.registry import DockerRegistry

    assert issubclass(importable(bh.build_class), BuildExecutor)
    assert issubclass(importable(bh.registry_class), DockerRegistry)
    assert issubclass(importable(bh.health_handler_class), HealthHandler)
    from binderhub.quota import LaunchQuota

    assert issubclass(importable(bh.launch_quota_class), LaunchQuota)
    # every trait set in the file exists on BinderHub (a typo would be ignored silently)
    from binderhub.app import BinderHub

    assert set(bh) <= set(BinderHub.class_trait_names(config=True)), set(bh) - set(
        BinderHub.class_trait_names(config=True)
    )


def test_binderhub_config_managed_and_authenticated(monkeypatch):
    cfg = load(
        "binderhub_config.py",
        monkeypatch,
        JUPYTERHUB_API_TOKEN="managed-token",
        JUPYTERHUB_SERVICE_PREFIX="/services/bhub/",
        BINDERHUB_HPC_AUTHENTICATED="1",
    )
    assert cfg.BinderHub.hub_api_token == "managed-token"
    assert cfg.BinderHub.base_url == "/services/bhub/"
    assert cfg.BinderHub.auth_enabled is True
    assert cfg.HubOAuth.api_token == "managed-token"


def test_jupyterhub_config_anonymous(monkeypatch):
    cfg = load("jupyterhub_config.py", monkeypatch)
    jh = cfg.JupyterHub
    cls = importable(jh.spawner_class)
    from binderhub_hpc.spawner.spawner import SlurmBinderSpawner
    from binderhub_hpc.spawner.templates import SLURM_SCRIPT

    assert cls is SlurmBinderSpawner
    # settings for either spawner, checked when the file loads
    sp = cfg.BinderBatchMixin
    assert sp.job_user == "binder" and sp.exec_prefix == "sudo -E -u {username}"
    assert sp.auth_enabled is False and "jobs_as_hub_user" not in sp
    assert sp.container_runtime in ("apptainer", "singularity", "podman")
    # every spawner setting is a real trait of the spawner
    assert set(sp) <= set(cls.class_trait_names(config=True)), set(sp) - set(cls.class_trait_names(config=True))
    # the job script comes from the package: not copied into the config
    assert "batch_script" not in sp
    assert SlurmBinderSpawner(config=cfg).batch_script == SLURM_SCRIPT
    assert jh.authenticator_class == "null"
    assert jh.hub_connect_ip and jh.hub_bind_url.startswith("http://0.0.0.0")
    services = {s["name"]: s for s in jh.services}
    assert services["binder"]["api_token"] == TOKEN
    assert "url" in services["binder"]
    culler = services["idle-culler"]["command"]
    assert "--cull-users=True" in culler and "--remove-named-servers=True" in culler
    culler_module = importlib.import_module(culler[2])  # python -m jupyterhub_idle_culler
    if hasattr(culler_module, "IdleCuller"):  # 2.x: its own parser takes the arguments
        culler_module.IdleCuller().parse_command_line(culler[3:])
    roles = {r["name"]: r for r in jh.load_roles}
    assert {"admin:users", "admin:servers"} <= set(roles["binder"]["scopes"])
    assert roles["binder"]["services"] == ["binder"]
    assert "admin:users" in roles["idle-culler"]["scopes"]  # deletes temporary users
    assert "prometheus" not in roles
    # the prologue example is read from templates/
    assert "module load" in sp.req_prologue


def test_jupyterhub_config_authenticated(monkeypatch):
    cfg = load("jupyterhub_config.py", monkeypatch, BINDERHUB_HPC_AUTHENTICATED="1", PROMETHEUS_API_TOKEN="p" * 32)
    jh, sp = cfg.JupyterHub, cfg.BinderBatchMixin
    assert jh.authenticator_class == "pam"
    assert sp.auth_enabled is True and sp.jobs_as_hub_user is True
    assert sp.exec_prefix == "sudo -E -u {username}"
    assert "job_user" not in sp
    services = {s["name"]: s for s in jh.services}
    assert not [a for a in services["idle-culler"]["command"] if a.startswith("--cull-users")]
    roles = {r["name"]: r for r in jh.load_roles}
    assert "access:services!service=binder" in roles["user"]["scopes"]
    assert roles["prometheus"]["scopes"] == ["read:metrics"] and "prometheus" in services


def test_pbs_spawner_alternative_is_importable(monkeypatch):
    text = (CONF / "jupyterhub_config.py").read_text()
    m = re.search(r'# c.JupyterHub.spawner_class = "([\w.]+)"', text)
    from binderhub_hpc.spawner.spawner import PBSBinderSpawner

    assert importable(m.group(1)) is PBSBinderSpawner
    cfg = load("jupyterhub_config.py", monkeypatch)
    sp = PBSBinderSpawner(config=cfg)
    assert sp.req_queue == "jupyter" and sp.exec_prefix == "sudo -E -u {username}" and sp.job_user == "binder"


def test_a_bad_setting_in_the_deployment_files_stops_the_load(monkeypatch, tmp_path):
    from binderhub_hpc.config import ConfigError

    extra = tmp_path / "extra_config.py"
    extra.write_text('c.BinderBatchMixin.container_runtime = "dockr"\n')
    for name in ("jupyterhub_config.py", "binderhub_config.py"):
        with pytest.raises(ConfigError, match="container_runtime = 'dockr'"):
            load(name, monkeypatch, BINDERHUB_HPC_EXTRA_CONFIG=str(extra))


@pytest.mark.parametrize("name", ["slurm-batch-script.j2", "pbs-batch-script.j2"])
def test_template_overrides_keep_the_session_pieces(name):
    text = (CONF / "templates" / name).read_text()
    Environment().parse(text)
    for piece in ("{{binder_setup}}", "{{cmd}} &", "binder_wait $!", "{{keepvars}}"):
        assert piece in text, piece
    assert "token" not in text.lower().replace("tokens travel", "")


# ------------------------------------------------------------------ systemd units

REQUIRED = {"Unit": {"Description"}, "Service": {"ExecStart", "User"}, "Install": {"WantedBy"}}


@pytest.mark.parametrize("unit", ["jupyterhub.service", "binderhub.service"])
def test_systemd_unit(unit, tmp_path):
    path = CONF / "systemd" / unit
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(path.read_text())
    for section, keys in REQUIRED.items():
        assert keys <= set(parser[section]), (section, keys - set(parser[section]))
    user = parser["Service"]["User"]
    assert user not in ("root", "0")
    exec_start = parser["Service"]["ExecStart"]
    assert "/etc/binderhub-hpc/" in exec_start
    if unit == "binderhub.service":
        assert re.search(r"python -m binderhub --config=\S+binderhub_config.py", exec_start)
    assert "TOKEN" not in exec_start  # secrets via EnvironmentFile only
    if not shutil.which("systemd-analyze"):
        return
    # verify with an executable that exists here (the install path does not)
    exe = exec_start.split()[0]
    copy = tmp_path / unit
    copy.write_text(path.read_text().replace(exe, "/bin/true"))
    p = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert str(copy) not in p.stderr, p.stderr  # no warnings about the unit itself


# ------------------------------------------------------------------ nginx


def test_nginx_config(tmp_path):
    text = (CONF / "nginx" / "binder.conf").read_text()
    for needle in (
        "ssl_certificate",
        "proxy_set_header Upgrade",
        "$connection_upgrade",
        "127.0.0.1:8000",
        "127.0.0.1:8585",
        "proxy_buffering off",
    ):
        assert needle in text, needle
    if not shutil.which("nginx"):
        pytest.skip("nginx not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=binder.example.org",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    text = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", text)
    text = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", text)
    (tmp_path / "binder.conf").write_text(text)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n access_log off;\n include {tmp_path}/binder.conf;\n}}\n"
    )
    p = subprocess.run(
        ["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------ metrics


def metric_names():
    source = (ROOT / "binderhub_hpc" / "metrics.py").read_text()
    names = re.findall(r'^\w+ = \w+\(\s*"(binderhub_hpc_\w+)"', source, flags=re.M)
    assert len(names) >= 10
    # an Info metric is exported with the suffix _info
    names += [n + "_info" for n in re.findall(r'^\w+ = Info\(\s*"(binderhub_hpc\w*)"', source, flags=re.M)]
    return names


def test_every_metric_is_documented_in_the_metrics_reference():
    text = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    rows = re.findall(r"^\| `(binderhub_hpc_\w+)` \|", text, flags=re.M)
    missing = [n for n in metric_names() if n not in rows]
    assert not missing, missing
    unknown = [n for n in rows if n not in metric_names()]
    assert not unknown, f"documented but not defined: {unknown}"
    assert "/hub/metrics" in text and "/metrics" in text


def test_every_metric_is_on_the_dashboard():
    dash = json.loads((CONF / "grafana" / "binderhub-hpc.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    # the version (an Info metric) is no time series to draw
    missing = [n for n in metric_names() if n not in exprs and not n.endswith("_info")]
    assert not missing, missing
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
