"""Hosts of the multi-node dev cluster: network namespaces on one machine.

Each host is a network namespace with its own address on a private bridge
(and, for the daemons started in it, its own hostname and, on compute
nodes, its own mounts). Only the bridge's addresses and loopback are ever
used: the namespaces have no default route, so a compute node reaches the
hub, the proxy and the scheduler, and nothing beyond the cluster network.

``nsenter --net`` joins a namespace without remounting /sys the way
``ip netns exec`` does (slurmd then finds no cgroup filesystem and refuses
to start).
"""

import ipaddress
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("binderhub_hpc_testing.network")

NETNS_DIR = Path("/var/run/netns")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# binderhub-hpc devcluster"
BRIDGE = "bhpc0"


@dataclass(frozen=True)
class Host:
    """One host of the dev cluster: `netns` is None for the machine itself
    (the head node, where slurmctld and munged run)."""

    name: str
    address: str
    role: str  # head, hub, build, compute
    netns: str = None

    @property
    def netns_path(self):
        return str(NETNS_DIR / self.netns) if self.netns else None

    def enter(self, argv, hostname=True, extra_unshare=()):
        """argv run inside this host: its network namespace and, with
        `hostname`, a UTS namespace named after it."""
        if not self.netns:
            return list(argv)
        prefix = ["nsenter", f"--net={self.netns_path}"]
        if hostname or extra_unshare:
            prefix += ["unshare", "--uts", *extra_unshare]
        if hostname:
            return prefix + ["sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]
        return prefix + list(argv)

    def run_in(self, argv):
        """argv in this host's network namespace only (clients, checks)."""
        if not self.netns:
            return list(argv)
        return ["nsenter", f"--net={self.netns_path}", *argv]


def _ip(*args, check=True):
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def plan(nodes, subnet="10.213.0.0/24"):
    """The hosts of a cluster of `nodes` hosts besides the head: a hub node,
    a build node and nodes - 2 compute nodes (c1, c2, ...)."""
    if nodes < 3:
        raise ValueError("a multi-node dev cluster has a hub, a build and at least one compute node (--nodes >= 3)")
    net = ipaddress.ip_network(subnet)
    addr = list(net.hosts())
    hosts = [
        Host("head", str(addr[0]), "head"),
        Host("hub", str(addr[9]), "hub", "bhpc-hub"),
        Host("build", str(addr[10]), "build", "bhpc-build"),
    ]
    for i in range(1, nodes - 1):
        hosts.append(Host(f"c{i}", str(addr[19 + i]), "compute", f"bhpc-c{i}"))
    return hosts, net.prefixlen


def ensure_bridge(head, prefixlen):
    if _ip("link", "show", BRIDGE, check=False).returncode:
        _ip("link", "add", BRIDGE, "type", "bridge")
    cidr = f"{head.address}/{prefixlen}"
    if cidr not in _ip("-4", "addr", "show", BRIDGE).stdout:
        _ip("addr", "add", cidr, "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def ensure_netns(host, prefixlen):
    """The host's namespace, its veth on the bridge, its address, lo up."""
    if not (NETNS_DIR / host.netns).exists():
        _ip("netns", "add", host.netns)
    veth = host.netns[:15]  # the host side carries the namespace's name
    peer = ("p-" + host.netns)[:15]
    if _ip("link", "show", veth, check=False).returncode:
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", host.netns)
        _ip("link", "set", veth, "master", BRIDGE)
        _ip("link", "set", veth, "up")
    ns = ["-n", host.netns]
    cidr = f"{host.address}/{prefixlen}"
    if cidr not in _ip(*ns, "-4", "addr", "show", peer).stdout:
        _ip(*ns, "addr", "add", cidr, "dev", peer)
    _ip(*ns, "link", "set", peer, "up")
    _ip(*ns, "link", "set", "lo", "up")


def remove_netns(host):
    if not host.netns:
        return
    _ip("link", "del", host.netns[:15], check=False)
    if (NETNS_DIR / host.netns).exists():
        _ip("netns", "del", host.netns, check=False)


def remove_bridge():
    _ip("link", "del", BRIDGE, check=False)


def write_hosts(hosts, mark=HOSTS_MARK):
    """Name every host in /etc/hosts (shared by all namespaces), replacing
    the lines this cluster wrote before and nothing else."""
    lines = [line for line in HOSTS_FILE.read_text().splitlines() if not line.endswith(mark)]
    lines += [f"{h.address} {h.name}  {mark}" for h in hosts]
    _write(HOSTS_FILE, "\n".join(lines) + "\n")


def remove_hosts(mark=HOSTS_MARK):
    lines = [line for line in HOSTS_FILE.read_text().splitlines() if not line.endswith(mark)]
    _write(HOSTS_FILE, "\n".join(lines) + "\n")


def _write(path, text):
    # /etc/hosts may be a bind mount (containers): write in place
    with open(path, "w") as f:
        f.write(text)
