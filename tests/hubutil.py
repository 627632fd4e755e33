"""The tests' JupyterHub: :class:`binderhub_hpc.dev.hub.DevHub` plus waiting
helpers. Servers outlive a stopped hub, so a test can restart the hub under
running jobs."""

import time

from binderhub_hpc.dev.hub import DevHub, free_port  # noqa: F401  (free_port: re-exported)


class Hub(DevHub):
    def __init__(self, workdir, extra_config="", env=None):
        super().__init__(workdir, extra_config, env=env, cleanup_servers=False)
        self.workdir = str(workdir)

    def wait_for(self, predicate, timeout=120, interval=0.5, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}; hub log:\n{self.log_tail()}")

    def server_ready(self, name):
        s = self.user(name).get("servers", {}).get("")
        return s if s and s.get("ready") else None
