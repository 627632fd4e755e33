#!/usr/bin/env bash
# Install what binderhub-hpc needs on a Debian 12 machine: the dev cluster
# (Slurm, munge), the build engine (podman), the SIF tools, Apptainer (built
# from its Go module), the proxy, and the Python packages. Idempotent; safe to
# re-run.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

apt_pkgs=(
  slurm-wlm munge                       # the dev cluster
  podman runc uidmap slirp4netns        # rootless build engine / runtime
  fuse-overlayfs
  siftool squashfs-tools squashfuse     # SIF conversion and inspection
  debootstrap                           # local base images (no registry pulls)
  nginx-light openssl                   # charts-free-config/nginx in front of the hub (test_deployment:
                                        # TLS with a throw-away certificate, websockets)
  sudo                                  # the deployment's exec_prefix (sudo -E -u binder), its sudoers file
  libpam-modules passwd                 # PAM logins of authenticated Binder (JupyterHub's pamela), useradd/chpasswd
  openssh-server openssh-client         # the build node's sshd (SSHRunner), started by devcluster
  iptables                              # the build node's egress firewall (multi-node dev cluster)
  git curl ca-certificates python3 python3-venv
)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  # the packages' own services (sshd on port 22 of this machine) are not
  # wanted: the dev cluster starts its daemons itself, where it needs them
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Apptainer, the compute nodes' runtime: no Debian package, so from its Go
# module (skipped when the pinned version is installed).
bash "$here/scripts/install-apptainer.sh"

# configurable-http-proxy: JupyterHub's default proxy, from npm.
command -v npm >/dev/null || apt-get install -y -qq --no-install-recommends nodejs npm
command -v configurable-http-proxy >/dev/null || npm install -g --no-fund --no-audit configurable-http-proxy@4

# The Python side (hub, spawner, build). BinderHub itself is optional and
# installed separately (see README).
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e "$here[test,docs]"
# the dev cluster, demo and benchmarks commands (testing/, not in the package)
python3 -m pip install -q -e "$here/testing"
