"""Processes of a node: which belong to it, and killing them all at once
(a node that dies)."""

import os
import signal
import time
from pathlib import Path

from binderhub_hpc.proc import pid_alive

from .base import (
    DevClusterError,
)


class Nodes:
    def node_pids(self, node):
        """Every process of a node: those in its network namespace and all
        below them (a RUN step's container has a network of its own)."""
        host = self.host(node)
        want = os.stat(host.netns_path).st_ino
        members, children = set(), {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.stat(d / "ns" / "net").st_ino == want:
                    members.add(int(d.name))
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
        todo, found = list(members), set(members)
        while todo:
            for c in children.get(todo.pop(), ()):
                if c not in found:
                    found.add(c)
                    todo.append(c)
        return sorted(found)

    def kill_node(self, node):
        """The node dies: SIGKILL to all its processes at once (slurmd, job
        steps, sshd, builds, podman's pause process) and so its mounts
        (/run/user ...) go too, as in a power cut. ``up()`` brings it back
        (its local disk, /tmp and /var/tmp, survives). Returns the pids."""
        if not self.multi:
            raise DevClusterError("only a node of a multi-node dev cluster can die alone")
        pids = self.node_pids(node)
        for _ in range(20):
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            left = [p for p in self.node_pids(node) if pid_alive(p)]
            if not left:
                break
            pids = sorted(set(pids) | set(left))
            time.sleep(0.1)
        (self._started_dir / self._slurmd(node)).unlink(missing_ok=True)
        if node == self.build_node:
            (self._started_dir / "sshd@build").unlink(missing_ok=True)
        return pids
