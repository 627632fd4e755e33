"""Egress firewalls of the dev cluster's hosts, as a site sets them: an
iptables chain in a host's network namespace, hooked into its OUTPUT, that
refuses what some accounts send to the cluster's addresses except what
they need. The build node keeps builds off the cluster
(:mod:`.buildnode`); compute nodes keep sessions off every service but the
hub's API and the proxy (:mod:`.computenode`)."""

from pathlib import Path

from .base import _run

#: the ports a hub's API and its proxy's public side listen on in the dev
#: cluster (a site's 8081 and 8000): compute nodes let job accounts reach
#: these on the hub node, and nothing else of it. Every dev hub and the
#: demo take theirs from here; BinderHub's port and the proxy's API never
#: (those come from the kernel's ephemeral range, 32768 and up), so no hub
#: has to register its ports and a hub killed without stopping leaves no
#: rule behind that could later let a session reach something else.
HUB_PORTS = (18100, 18299)


def nameservers(resolv_conf="/etc/resolv.conf"):
    """The IPv4 nameservers every host uses (DNS stays reachable)."""
    try:
        lines = Path(resolv_conf).read_text().splitlines()
    except OSError:
        return []
    return [p[1] for p in (line.split() for line in lines) if len(p) > 1 and p[0] == "nameserver" and ":" not in p[1]]


def dns_rules(chain, by):
    """RETURN for DNS to the nameservers, for the accounts `by` matches."""
    return [
        ["-A", chain, "-d", ns, "-p", proto, "--dport", "53", *by, "-j", "RETURN"]
        for ns in nameservers()
        for proto in ("udp", "tcp")
    ]


def reject_rules(chain, dest, by):
    """Refuse the rest to `dest`: a reset for TCP, so a client fails at once
    ("connection refused") instead of waiting out its timeout (behind
    slirp4netns too), and an ICMP admin-prohibited for everything else."""
    return [
        ["-A", chain, "-d", dest, "-p", "tcp", *by, "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["-A", chain, "-d", dest, *by, "-j", "REJECT", "--reject-with", "icmp-admin-prohibited"],
    ]


def ensure_chain(run_in, chain, rules):
    """`chain` in the namespace `run_in` enters holding exactly `rules`
    (replaced in one iptables-restore: no moment without them, whoever
    else sets it up at the same time), hooked first into OUTPUT."""

    def ipt(*args, check=True):
        return _run(run_in(["iptables", "-w", *args]), check=check, timeout=30)

    text = "*filter\n" + f":{chain} - [0:0]\n" + "".join(" ".join(r) + "\n" for r in rules) + "COMMIT\n"
    _run(run_in(["iptables-restore", "-w", "--noflush"]), input=text, timeout=30)
    if ipt("-C", "OUTPUT", "-j", chain, check=False).returncode:
        ipt("-I", "OUTPUT", "1", "-j", chain)


def flush_chain(run_in, chain):
    """Empty `chain` (its hook stays): the host lets everything out. Tests
    lift a policy with it to show what it keeps out; ensure_chain restores."""
    _run(run_in(["iptables", "-w", "-F", chain]), timeout=30)
