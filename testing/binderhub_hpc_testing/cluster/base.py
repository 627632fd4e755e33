"""What every part of the dev cluster shares: its places, its base image's
recipe, and running a command."""

import logging
import subprocess
from pathlib import Path

from binderhub_hpc.proc import pid_alive

log = logging.getLogger("binderhub_hpc_testing.cluster")

DEFAULT_ROOT = "/var/lib/binderhub-hpc"
#: hosts besides this machine when nothing else was asked or runs: a hub
#: node, a build node and two compute nodes, as a site has them (what the
#: demo and every test need)
DEFAULT_NODES = 4
STATE_DIR_ENV = "BINDERHUB_HPC_DEVCLUSTER_DIR"
CONTAINERS_CONF = "/etc/containers/containers.conf"
CONTAINERS_CONF_MARKER = "# written by binderhub-hpc devcluster"
BASE_IMAGE = "localhost/binderhub-hpc-base:bookworm"
ROOTFS_IMAGE = "localhost/binderhub-hpc-rootfs:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

BASE_CONTAINERFILE = """\
FROM {rootfs}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
RUN apt-get update -qq \\
 && apt-get install -y -qq --no-install-recommends \\
      python3 python3-venv ca-certificates git \\
 && apt-get clean \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
# system site packages on, so `pip install --user` works in sessions as
# it does in repo2docker's images
RUN python3 -m venv --system-site-packages /opt/venv \\
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -q \\
      --cert /run/host-ca.crt "jupyterhub=={jupyterhub_major}.*" jupyter_server notebook \\
 && /opt/venv/bin/python -m compileall -q /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN useradd --create-home --home-dir /home/jovyan --uid 1000 --user-group \\
      --shell /bin/bash jovyan
USER jovyan
ENV HOME=/home/jovyan USER=jovyan
WORKDIR /home/jovyan
LABEL {major_label}="{jupyterhub_major}" {revision_label}="{revision}"
"""
#: the image label that says which JupyterHub major the single-user server
#: in the base image belongs to (it must match the hub's)
MAJOR_LABEL = "org.binderhub-hpc.jupyterhub-major"
#: and which version of BASE_CONTAINERFILE made it: bump it with the file
REVISION_LABEL = "org.binderhub-hpc.base-revision"
BASE_REVISION = "2"


def hub_major():
    """The major version of the JupyterHub installed beside us."""
    from importlib.metadata import version

    return int(version("jupyterhub").split(".")[0])


class DevClusterError(RuntimeError):
    pass


def _run(cmd, check=True, env=None, capture=True, timeout=None, cwd=None, input=None):
    log.debug("run: %s", " ".join(map(str, cmd)))
    p = subprocess.run(
        [str(c) for c in cmd],
        env=env,
        cwd=cwd,
        input=input,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        stdin=subprocess.DEVNULL if input is None else None,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise DevClusterError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout or ''}")
    return p


def _read_pid(path):
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pgrep_exact(name):
    """pids of processes whose executable name is exactly ``name``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if comm == name and pid_alive(int(d.name)):
            pids.append(int(d.name))
    return sorted(pids)


def _tail(path, n=30):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e})"
    return "\n".join(lines[-n:])
