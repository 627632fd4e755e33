"""The build node as a site lays it out: the build account's rootless
podman, its egress firewall, the site virtualenv and sshd for the SSH
runner."""

import hashlib
import os
import pwd
import shutil
import signal
import tempfile
import textwrap
import time
from pathlib import Path

from binderhub_hpc.proc import cmdline, pid_alive

from . import firewall
from .base import (
    DevClusterError,
    _pgrep_exact,
    _read_pid,
    _run,
    _tail,
    log,
)


class BuildNode:
    # the build node ------------------------------------------------------
    @staticmethod
    def _runtime_dir_sh(user):
        pw = pwd.getpwnam(user)
        d = f"/run/user/{pw.pw_uid}"
        return f"mkdir -p -m 700 {d} && chown {pw.pw_uid}:{pw.pw_gid} {d} && chmod 700 {d}"

    def _ensure_build_node(self):
        """What a site's build node has: the build account's runtime dir and
        node-local rootless podman storage, binderhub-hpc in the site's
        virtualenv, an sshd for the SSH runner, and a firewall that keeps the
        build account (and so every RUN step) off the cluster's addresses."""
        p = self.on_node(self.build_node, ["sh", "-c", self._runtime_dir_sh(self.build_user)])
        if p.returncode:
            raise DevClusterError(f"runtime dir of {self.build_user} on {self.build_node}: {p.stdout}")
        self._ensure_rootless_storage(self.build_user, graphroot=self.build_graphroot)
        self._ensure_build_firewall()
        self.ensure_site_venv()
        self._ensure_sshd()

    @property
    def build_graphroot(self):
        """The build account's podman storage: on the build node's local disk
        (its /var/tmp), as rootless overlay storage cannot live on NFS."""
        return f"/var/tmp/{self.build_user}-containers/storage"

    # the build node's firewall, as a site would set it: the build account's
    # traffic (its own uid and its subordinate uids, i.e. every process of a
    # RUN step, whether it runs behind slirp4netns or on the host network)
    # to the cluster network and to the node's own loopback is refused,
    # except DNS and the services a site lets builds use (here: an internal
    # git server on the head node, SITE_GIT_PORTS); the outside world is not
    # touched (the dev cluster has none)
    FIREWALL_CHAIN = "BHPC-BUILD-EGRESS"
    #: ports of the head node the build account may reach, as a site allows
    #: its internal git server (the private-repository tests serve git there)
    SITE_GIT_PORTS = (18418, 18427)

    def build_firewall_rules(self):
        """iptables rules (argv tails) of the build account's egress chain."""
        uid = self.build_uid
        first, count = self.subid_range(self.build_user) or (0, 0)
        owners = [str(uid)] + ([f"{first}-{first + count - 1}"] if count else [])
        head = self.host("head").address
        ports = ":".join(map(str, self.SITE_GIT_PORTS))
        chain = self.FIREWALL_CHAIN
        rules = []
        for owner in owners:
            by = ["-m", "owner", "--uid-owner", owner]
            rules += firewall.dns_rules(chain, by)
            rules.append(["-A", chain, "-d", head, "-p", "tcp", "--dport", ports, *by, "-j", "RETURN"])
            for dest in (self.subnet, "127.0.0.0/8"):
                rules += firewall.reject_rules(chain, dest, by)
        return rules

    def _ensure_build_firewall(self):
        firewall.ensure_chain(self.build_host.run_in, self.FIREWALL_CHAIN, self.build_firewall_rules())

    #: what a site's install of binderhub-hpc is made of (the rest of a
    #: checkout, tests and testing/ among them, is not installed)
    PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "binderhub_hpc")

    @classmethod
    def checkout_digest(cls, checkout):
        """A digest of what a site install of `checkout` holds (the package's
        files and its metadata): the site virtualenv is reinstalled when it
        changes."""
        h = hashlib.sha256()
        for name in cls.PACKAGE_FILES:
            top = Path(checkout) / name
            paths = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
            for path in paths:
                if "__pycache__" in path.parts or path.suffix == ".pyc":
                    continue
                h.update(str(path.relative_to(checkout)).encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()[:16]

    def ensure_site_venv(self):
        """``/opt/binderhub-hpc``: Debian's python3 (every account can run
        it) with binderhub-hpc installed from this checkout, as a site
        installs it: a copy, not an editable link, so the build account runs
        it wherever the checkout lives (a node's own /tmp, a 0700 /root)
        and runs exactly the code under test. Reinstalled when the
        package's files change; its dependencies (repo2docker among them)
        only when pyproject.toml does."""
        import binderhub_hpc

        checkout = Path(binderhub_hpc.__file__).resolve().parents[1]
        if not (checkout / "pyproject.toml").is_file():
            raise DevClusterError(f"the site virtualenv installs a source checkout; {checkout} is none")
        venv, marker = self.site_venv, self.site_venv / ".binderhub-hpc-install"
        deps = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()[:16]
        want = f"{self.checkout_digest(checkout)} {deps}"
        have = marker.read_text().strip() if marker.exists() else ""
        if have == want and (venv / "bin" / "binderhub-hpc").exists():
            return venv
        t0 = time.monotonic()
        pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if not (venv / "bin" / "python").exists():
            _run(["/usr/bin/python3", "-m", "venv", venv], timeout=300)
        # same dependencies as before: only the package changed
        same_deps = have.split(" ")[1:] == [deps]
        if not same_deps:
            # what builds the package (without build isolation: no index
            # needed for a reinstall)
            _run([*pip, "--upgrade", "pip", "setuptools>=77"], timeout=600)
        # build from a copy of the package's files: nothing is written into
        # the checkout (which may be read-only), nothing else of it installed
        with tempfile.TemporaryDirectory(prefix="bhpc-site-install-") as src:
            for name in self.PACKAGE_FILES:
                if (checkout / name).is_dir():
                    shutil.copytree(
                        checkout / name, Path(src) / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                elif (checkout / name).exists():
                    shutil.copy2(checkout / name, Path(src) / name)
            no_deps = ["--no-deps"] if same_deps else []
            _run([*pip, *no_deps, "--force-reinstall", "--no-build-isolation", src], timeout=1800)
        _run(["chmod", "-R", "a+rX", venv])
        marker.write_text(want + "\n")
        log.info("site virtualenv %s (binderhub-hpc from %s) in %.1f s", venv, checkout, time.monotonic() - t0)
        return venv

    # sshd on the build node, for the SSH runner: own host key and config
    # in the state dir, keys only, the build account only
    @property
    def sshd_dir(self):
        return self.state_dir / "sshd"

    @property
    def ssh_key(self):
        """The private key BinderHub's host logs in to the build node with."""
        return self.sshd_dir / "client_ed25519"

    @property
    def ssh_known_hosts(self):
        return self.sshd_dir / "known_hosts"

    def ssh_argv(self):
        """The ssh command prefix that reaches the build account (SSHRunner.ssh)."""
        return [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-T",
            "-i",
            str(self.ssh_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.ssh_known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
        ]

    @property
    def ssh_target(self):
        return f"{self.build_user}@{self.build_node}"

    def sshd_config_text(self):
        d = self.sshd_dir
        return textwrap.dedent(f"""\
            # binderhub-hpc dev cluster: sshd of the build node (generated)
            ListenAddress {self.build_host.address}:22
            HostKey {d / "host_ed25519"}
            PidFile {self._run_dir / "sshd-build.pid"}
            AuthorizedKeysFile {d / "authorized_keys" / "%u"}
            AllowUsers {self.build_user}
            PermitRootLogin no
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            X11Forwarding no
            AllowTcpForwarding no
            AllowAgentForwarding no
            PermitTunnel no
            PermitUserEnvironment no
            PrintMotd no
            LogLevel VERBOSE
            """)

    def _sshd_pid(self):
        pid = _read_pid(self._run_dir / "sshd-build.pid")
        conf = str(self.sshd_dir / "sshd_config")
        if pid and pid_alive(pid) and conf in cmdline(pid):
            return pid
        pids = [p for p in _pgrep_exact("sshd") if conf in cmdline(p)]
        return pids[0] if pids else None

    def _ensure_sshd(self):
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            raise DevClusterError("sshd is missing: apt-get install openssh-server (scripts/install-deps.sh)")
        d = self.sshd_dir
        (d / "authorized_keys").mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        os.chmod(d / "authorized_keys", 0o755)
        for key, comment in ((d / "host_ed25519", "build host key"), (self.ssh_key, "binderhub-hpc builds")):
            if not key.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key])
            os.chmod(key, 0o600)
        host_pub = (d / "host_ed25519.pub").read_text().split()
        self._write_if_changed(
            self.ssh_known_hosts, f"{self.build_node},{self.build_host.address} {host_pub[0]} {host_pub[1]}\n"
        )
        # only this key, only without a terminal or forwarding
        opts = "restrict"
        self._write_if_changed(
            d / "authorized_keys" / self.build_user, f"{opts} {self.ssh_key.with_suffix('.pub').read_text().strip()}\n"
        )
        changed = self._write_if_changed(d / "sshd_config", self.sshd_config_text())
        pid = self._sshd_pid()
        if pid and changed:
            os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid, 10)
            pid = None
        if pid:
            return
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        _run(
            self.node_argv(self.build_node, [sshd, "-f", d / "sshd_config", "-E", self._log_dir / "sshd-build.log"]),
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while not (pid := self._sshd_pid()):
            if time.monotonic() > deadline:
                raise DevClusterError("sshd did not start:\n" + _tail(self._log_dir / "sshd-build.log"))
            time.sleep(0.1)
        self._mark_started("sshd@build", pid)

    def _stop_sshd(self):
        if self._started_by_us("sshd@build") is None:
            return False
        pid = self._sshd_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid, 10)
        (self._started_dir / "sshd@build").unlink(missing_ok=True)
        return True

    def build_image_id(self, image=None):
        """The image's id in the build account's storage on the build node (None: missing)."""
        p = self.on_node(
            self.build_node,
            ["podman", "image", "inspect", "--format", "{{.Id}}", image or self.base_image],
            user=self.build_user,
            timeout=120,
        )
        return p.stdout.strip() if p.returncode == 0 else None

    def ensure_build_image(self, image=None):
        """The base image (made if missing) in the build account's rootless
        storage on the build node, the same image as root's."""
        image = image or self.ensure_base_image()
        want = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image], timeout=60).stdout.strip()
        if self.build_image_id(image) != want:
            self.copy_image_to_user(image, self.build_user, self.build_node)
        return image
