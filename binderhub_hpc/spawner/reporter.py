"""The session job's port report: the first thing a job does on its node.

It picks a free port on the node, tells the hub where the server will
listen (batchspawner's API: ``POST $JUPYTERHUB_API_URL/batchspawner`` with
``{"port": ..., "node": ...}``), and prints three lines the job script
reads: the port, the server's URL on that port, and when the job's walltime
runs out (epoch seconds; 0: no limit).

The job script does not import this module: the compute node need not have
binderhub-hpc installed. :func:`binderhub_hpc.spawner.templates.render_setup`
pastes this file's source into a quoted heredoc for the node's own Python
(``host_python``), so it must stay standard library only, stay runnable by
the oldest ``python3`` a site's nodes may have (3.6, as on RHEL 8: no
walrus, no ``from __future__ import annotations``), and never hold a line
that is just ``BINDER_PY`` (the heredoc's end). Keeping it a real module lets
linters and unit tests read it as Python.

The hub's token comes from the job's environment (``JUPYTERHUB_API_TOKEN``)
and goes only into the request's header: never into argv, where ``ps``
would show it to every user of the node, nor into what is printed.
"""

import json
import os
import socket
import time
import urllib.parse
import urllib.request

#: what the hub is given the server's URL as when the spawner sets none
DEFAULT_SERVICE_URL = "http://0.0.0.0:0/"


def free_port():
    """A port nothing listens on now; the kernel picks it, as Jupyter would."""
    s = socket.socket()
    try:
        s.bind(("", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def node_name(environ):
    """The node as the scheduler names it, which the hub resolves: Slurm's
    SLURMD_NODENAME, else the first line of PBS's node file, else the host
    name (which may differ from the scheduler's name for the node, hence
    last)."""
    node = environ.get("SLURMD_NODENAME", "")
    if not node and environ.get("PBS_NODEFILE"):
        with open(environ["PBS_NODEFILE"]) as f:
            node = f.readline().strip()
    return node or socket.gethostname()


def report(environ, port, node, timeout=60):
    """POST the port and node to the hub's batchspawner API; an HTTP error
    or no answer raises, so the job fails before starting a server the hub
    would never find."""
    api = environ["JUPYTERHUB_API_URL"].rstrip("/") + "/batchspawner"
    req = urllib.request.Request(
        api,
        data=json.dumps({"port": port, "node": node}).encode(),
        method="POST",
        headers={
            "Authorization": "token " + environ["JUPYTERHUB_API_TOKEN"],
            "Content-Type": "application/json",
        },
    )
    urllib.request.urlopen(req, timeout=timeout).read()


def service_url(environ, port):
    """The server's URL as the spawner gave it, on the chosen port."""
    url = urllib.parse.urlparse(environ.get("JUPYTERHUB_SERVICE_URL", DEFAULT_SERVICE_URL))
    url = url._replace(netloc=f"{url.hostname or '0.0.0.0'}:{int(port)}")
    return urllib.parse.urlunparse(url)


def end_time(environ, now):
    """When the walltime runs out, in epoch seconds: Slurm says so
    (SLURM_JOB_END_TIME); otherwise the start plus the requested walltime
    (BINDER_WALLTIME_SECONDS, set by the spawner); 0 when there is no limit."""
    walltime = int(environ.get("BINDER_WALLTIME_SECONDS") or 0)
    return environ.get("SLURM_JOB_END_TIME") or (int(now) + walltime if walltime else 0)


def main(environ=None):
    """Report the port, then print port, service URL and end time, a line each."""
    environ = os.environ if environ is None else environ
    port = free_port()
    report(environ, port, node_name(environ))
    print(port)
    print(service_url(environ, port))
    print(end_time(environ, time.time()))


if __name__ == "__main__":
    main()
