"""The dev cluster's accounts (the service account, the build account, a
stranger) and its shared directories."""

import grp
import os
import pwd
import subprocess
from pathlib import Path

from .base import (
    DevClusterError,
    _run,
)


class Accounts:
    # ----------------------------------------------------------------- steps
    @staticmethod
    def _require_root():
        if os.geteuid() != 0:
            raise DevClusterError("the dev cluster must be set up as root")

    def _ensure_accounts(self):
        try:
            grp.getgrnam(self.build_group)
        except KeyError:
            _run(["groupadd", "--system", self.build_group])
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        # jobs of anonymous users; builds, as a site's BinderHub account
        # (primary group binder-build: it writes the registry)
        self._ensure_account(self.service_user, self.service_home, ["--user-group"], "binderhub-hpc service account")
        self._ensure_account(
            self.build_user, self.build_home, ["--gid", self.build_group], "binderhub-hpc build account"
        )
        # sshd without PAM refuses a locked account ('!'): '*' has no
        # password either, and lets a key in
        shadow = _run(["getent", "shadow", self.build_user], check=False).stdout
        if shadow.split(":")[1:2] == ["!"]:
            _run(["usermod", "-p", "*", self.build_user])
        self.ensure_stranger()

    def ensure_stranger(self):
        """The stranger: another cluster user, with no rights of the
        service's (its own group, no subordinate ids, no part in the
        registry or the jobs directory), whom the attack tests submit jobs
        as. Its name: `stranger_user`."""
        self._require_root()
        try:
            pwd.getpwnam(self.stranger_user)
        except KeyError:
            _run(
                [
                    "useradd",
                    "--create-home",
                    "--home-dir",
                    self.stranger_home,
                    "--shell",
                    "/bin/bash",
                    "--user-group",
                    "--comment",
                    "a cluster user who is not the service",
                    self.stranger_user,
                ]
            )
        pw = pwd.getpwnam(self.stranger_user)
        self.stranger_home.mkdir(parents=True, exist_ok=True)
        os.chown(self.stranger_home, pw.pw_uid, pw.pw_gid)
        os.chmod(self.stranger_home, 0o700)
        return self.stranger_user

    def as_stranger(self, cmd, check=True, timeout=120):
        """Run `cmd` as the stranger, with a login's environment, from its
        home. Arguments may be bytes (text that is not UTF-8 reaches the
        command as it is); stdout and stderr come back apart, as text."""
        argv = self._user_argv([], self.stranger_user) + list(cmd)
        p = subprocess.run(argv, capture_output=True, cwd=str(self.stranger_home), timeout=timeout)
        p.stdout, p.stderr = (x.decode(errors="replace") for x in (p.stdout, p.stderr))
        if check and p.returncode:
            raise DevClusterError(f"as {self.stranger_user}: {cmd[0]} exited {p.returncode}: {p.stderr.strip()[:500]}")
        return p

    def _ensure_account(self, user, home, group_args, comment):
        try:
            pwd.getpwnam(user)
        except KeyError:
            _run(
                [
                    "useradd",
                    "--system",
                    "--create-home",
                    "--home-dir",
                    home,
                    "--shell",
                    "/bin/bash",
                    *group_args,
                    "--comment",
                    comment,
                    user,
                ]
            )
        pw = pwd.getpwnam(user)
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o750)
        # subordinate ids for rootless podman: a 65536 range not used by anyone
        for path in ("/etc/subuid", "/etc/subgid"):
            self._ensure_subid(Path(path), user)
        # a runtime dir, as pam_systemd would make at login (no systemd here)
        rd = Path(f"/run/user/{pw.pw_uid}")
        rd.parent.mkdir(mode=0o755, exist_ok=True)
        rd.mkdir(mode=0o700, exist_ok=True)
        os.chown(rd, pw.pw_uid, pw.pw_gid)
        os.chmod(rd, 0o700)

    @staticmethod
    def subid_range(user, path="/etc/subuid"):
        """(first, count) of `user`'s subordinate ids, or None."""
        for line in Path(path).read_text().splitlines():
            parts = line.split(":")
            if len(parts) == 3 and parts[0] == user:
                return int(parts[1]), int(parts[2])
        return None

    def _ensure_subid(self, path, user=None):
        user = user or self.service_user
        lines = path.read_text().splitlines() if path.exists() else []
        if any(line.split(":")[0] == user for line in lines):
            return
        top = 100000
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                top = max(top, int(parts[1]) + int(parts[2]))
        with path.open("a") as f:
            f.write(f"{user}:{top}:65536\n")

    def _ensure_dirs(self):
        uid = self.service_uid
        gid = pwd.getpwnam(self.service_user).pw_gid
        bgid = grp.getgrnam(self.build_group).gr_gid
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        # registry: root-owned, world-readable; builds (root, or accounts in the
        # build group) write; jobs (the service account) only read.
        self.registry_dir.mkdir(exist_ok=True)
        os.chown(self.registry_dir, 0, bgid)
        os.chmod(self.registry_dir, 0o2775)
        self.jobs_dir.mkdir(exist_ok=True)
        os.chown(self.jobs_dir, uid, gid)
        os.chmod(self.jobs_dir, 0o700)
        # state dir: readable by all (clients read slurm.conf), spool private
        for d in (self.state_dir, self._run_dir, self._log_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        for d in (self.state_dir / "slurmctld", self._started_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        # slurmd's spool: job scripts there are executed as the job's user, so
        # it must stay traversable (slurmd itself keeps per-job dirs private)
        spool = self.state_dir / "slurmd"
        spool.mkdir(exist_ok=True)
        os.chmod(spool, 0o755)
