"""The compute nodes' egress firewall, as a site sets it: sessions reach
the hub's API and nothing else of the service.

Every account but root (the service account whose jobs run anonymous
sessions, users' own accounts, and the subordinate uids their rootless
containers map to) is refused the cluster's addresses except:

- the hub node's hub and proxy ports (:data:`.firewall.HUB_PORTS`): a
  session reports its port to the hub's API and talks to it; not
  BinderHub's port (its /build/ and /metrics, which nginx keeps from the
  outside), not the proxy's API;
- slurmctld's port on the head: what a job's own sbatch, squeue, scontrol
  and srun ask the controller;
- the node's own address, like its loopback (which the policy leaves
  alone: a node's own sessions share an account anyway): srun hands a job
  step to its node's slurmd at the node's address, and slurmstepd,
  running as the job's account, connects back to srun's ports there
  (without it srun fails: "Communication connection failure", "Slurmd
  could not connect IO"). Job steps across nodes would need slurmd's port
  and srun's (SrunPortRange) between compute nodes too; sessions are one
  node's jobs, so the dev cluster does not open those;
- DNS.

Root's daemons are not touched (slurmd runs as root and talks to
slurmctld). Replies on connections that came in pass: the proxy on the hub
node connects *to* a session, which is ingress. mybinder.org keeps user
pods away from BinderHub with network policies; this is the same on a
batch cluster.
"""

from . import firewall

#: every uid but root's: job accounts and their subordinate uid ranges
JOB_UIDS = "1-4294967294"


class ComputeNodes:
    COMPUTE_CHAIN = "BHPC-COMPUTE-EGRESS"

    def compute_firewall_rules(self, node):
        """iptables rules (argv tails) of the egress chain of the compute
        node `node` (a network.Host)."""
        chain = self.COMPUTE_CHAIN
        by = ["-m", "owner", "--uid-owner", JOB_UIDS]
        lo, hi = firewall.HUB_PORTS
        tcp_to = ["-p", "tcp", "--dport"]
        return [
            # replies on connections that were let in (the proxy's to a session)
            ["-A", chain, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
            *firewall.dns_rules(chain, by),
            ["-A", chain, "-d", self.hub_host.address, *tcp_to, f"{lo}:{hi}", *by, "-j", "RETURN"],
            ["-A", chain, "-d", self.host("head").address, *tcp_to, str(self.slurmctld_port), *by, "-j", "RETURN"],
            ["-A", chain, "-d", node.address, *by, "-j", "RETURN"],
            *firewall.reject_rules(chain, self.subnet, by),
        ]

    def ensure_compute_firewall(self):
        """The chain on every compute node (multi-node clusters: a single
        node is this machine itself, whose egress is not the dev cluster's
        to set)."""
        if not self.multi:
            return
        for h in self.compute_hosts:
            firewall.ensure_chain(h.run_in, self.COMPUTE_CHAIN, self.compute_firewall_rules(h))

    def lift_compute_firewall(self):
        """Every compute node lets job accounts reach everything (the chain
        emptied): for tests that show what the policy keeps out.
        ensure_compute_firewall() puts it back."""
        for h in self.compute_hosts:
            firewall.flush_chain(h.run_in, self.COMPUTE_CHAIN)
