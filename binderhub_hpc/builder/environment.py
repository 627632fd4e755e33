"""The environment of everything a build runs: an allowlist, by construction.

BinderHub's process holds the hub API token (and whatever else a site puts in
its environment). A build runs strangers' code: repo2docker, git and podman,
and through podman the repository's ``RUN`` steps. None of them gets the
parent's environment; each gets :func:`build_environment`, which copies only
the names listed here (locale, home, path, proxies, what rootless podman and
repo2docker need) plus what the build itself adds (git's credential helper
path, a scratch directory). A new variable in BinderHub's environment stays
out of builds unless a site names it in ``c.Repo2Docker.env_keep``.
"""

import os
import pwd
from pathlib import Path

PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
)

#: what a build may see of its parent's environment (besides the proxies)
ALLOWED = (
    "HOME",
    "PATH",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    # rootless podman: its runtime directory and configuration
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "CONTAINERS_CONF",
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_REGISTRIES_CONF",
    "CONTAINERS_GRAPHROOT",
    "CONTAINERS_RUNROOT",
    "REGISTRY_AUTH_FILE",
    # what `podman unshare` tells the podman commands run inside it
    "_CONTAINERS_USERNS_CONFIGURED",
    "_CONTAINERS_ROOTLESS_UID",
    "_CONTAINERS_ROOTLESS_GID",
    # a site CA for git and pip on the host side
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
#: the directory binderhub_hpc is imported from in this process
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def build_environment(base=None, keep=(), proxies=True, extra=None):
    """The environment for a build's processes, from `base` (os.environ).

    Only ALLOWED names, the proxies (unless `proxies` is False) and the
    names in `keep` are copied; `extra` is added last. HOME, PATH and, where
    the runtime directory exists, XDG_RUNTIME_DIR are filled in when the
    parent lacks them (a batch job started with ``--export=NONE``, an ssh
    session), so rootless podman finds its storage and its pause process.
    """
    base = os.environ if base is None else base
    names = set(ALLOWED) | set(keep) | (set(PROXY_VARIABLES) if proxies else set())
    env = {k: v for k, v in base.items() if k in names}
    try:
        pw = pwd.getpwuid(os.getuid())
        env.setdefault("HOME", pw.pw_dir)
        env.setdefault("USER", pw.pw_name)
        env.setdefault("LOGNAME", pw.pw_name)
    except KeyError:
        pass
    env.setdefault("PATH", DEFAULT_PATH)
    # our own helpers (`python -m binderhub_hpc...` under podman unshare) and
    # repo2docker's engine entry point import the code of this process, not
    # whatever binderhub_hpc another install puts first
    env["PYTHONPATH"] = PACKAGE_ROOT
    runtime = f"/run/user/{os.getuid()}"
    if "XDG_RUNTIME_DIR" not in env and os.getuid() != 0 and _owned_dir(runtime):
        env["XDG_RUNTIME_DIR"] = runtime
    # git must never ask a terminal for a password in a service
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.update(extra or {})
    return env


def _owned_dir(path):
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.getuid()
