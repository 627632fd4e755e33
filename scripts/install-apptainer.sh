#!/usr/bin/env bash
# Build and install Apptainer (non-setuid: unprivileged user namespaces) from
# its Go module, when `apptainer --version` is not the pinned version. Debian 12
# has no apptainer package and only the Go module proxy is reachable, so the
# source is the module zip (no .git: we write VERSION for mconfig). The FUSE
# helpers (squashfuse_ll, fuse-overlayfs, fuse2fs) come from Debian, not from
# Apptainer's download-dependencies (which fetches from GitHub).
# Idempotent; safe to re-run. Env: APPTAINER_VERSION, APPTAINER_PREFIX,
# APPTAINER_BUILD_ROOT.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

version="${APPTAINER_VERSION:-1.5.3}"
prefix="${APPTAINER_PREFIX:-/usr/local}"
build_root="${APPTAINER_BUILD_ROOT:-/var/tmp/apptainer-build}"
# Go lives in /usr/local/go on these machines; PATH may lack it.
export PATH="$prefix/bin:$PATH:/usr/local/go/bin"
start=$SECONDS
lap=$SECONDS
step() { echo "install-apptainer: $1 ($((SECONDS - lap)) s)"; lap=$SECONDS; }

# Rootless SIF mounts open /dev/fuse as the user. Without udev (fresh
# machines) it stays 0600 and squashfuse_ll fails with "fuse: failed to open
# /dev/fuse: Permission denied"; 0666 is udev's default for it.
if [[ -c /dev/fuse && "$(stat -c %a /dev/fuse)" != 666 ]]; then
  chmod 0666 /dev/fuse
  echo "install-apptainer: /dev/fuse made 0666 (as udev does)"
fi

# One build at a time on this machine; a second caller waits, then sees it done.
mkdir -p "$build_root"
exec 9>"$build_root/.lock"
flock 9

have="$(apptainer --version 2>/dev/null || true)"
if [[ "$have" == "apptainer version $version" ]]; then
  echo "$have already installed"
  exit 0
fi

# Build deps (the module's INSTALL.md, Debian section) and runtime helpers for
# unprivileged mounts: SIF (squashfuse_ll), --overlay/--writable-tmpfs
# (fuse-overlayfs), ext3 overlay images (fuse2fs), encrypted SIF (gocryptfs).
apt_pkgs=(
  build-essential pkg-config libseccomp-dev libtalloc-dev libattr1-dev
  libprotobuf-c-dev libsubid-dev uidmap fakeroot cryptsetup tzdata curl git
  squashfuse fuse-overlayfs fuse3 fuse2fs squashfs-tools gocryptfs
)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
step "apt: ${#missing[@]} package(s) installed"

command -v go >/dev/null || { echo "install-apptainer: go not found (expected /usr/local/go/bin/go)" >&2; exit 1; }

# The proxy lists no versions but serves exact ones; its refusal (e.g. 403)
# is in the JSON's "Error" field, printed as is.
cd "$build_root"   # outside any go.mod
if ! json="$(GOFLAGS=-mod=mod go mod download -json "github.com/apptainer/apptainer@v$version")"; then
  echo "$json" >&2
  echo "install-apptainer: go mod download github.com/apptainer/apptainer@v$version failed" >&2
  exit 1
fi
moddir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
[[ -n "$moddir" && -f "$moddir/mconfig" ]] || { echo "$json" >&2; echo "install-apptainer: no module Dir" >&2; exit 1; }
step "go mod download v$version"

# The module cache is read-only: build in a writable copy. Module zips keep
# no file modes, so give every #! script back its exec bit (mconfig, makeit/,
# scripts/).
src="$build_root/apptainer-$version"
rm -rf "$src"
cp -r "$moddir" "$src"
chmod -R u+w "$src"
while IFS= read -r -d '' f; do
  IFS= read -r -n2 magic <"$f" || true
  if [[ "$magic" == '#!' ]]; then chmod +x "$f"; fi
done < <(find "$src" -type f ! -name '*.go' -print0)
echo "$version" >"$src/VERSION"

# Apptainer's Makefile runs `go clean -cache` before building the starter:
# give it a build cache of its own (fresh each build) so it never wipes the
# user's. Fresh, it holds nothing stale, so skip that clean (saves ~2 min).
export GOCACHE="$build_root/go-build"
rm -rf "$GOCACHE"
cd "$src"
./mconfig --without-suid -p "$prefix" -b builddir >mconfig.log 2>&1 || { cat mconfig.log >&2; exit 1; }
touch builddir/.clean-starter
step "mconfig"
make -C builddir -j"$(nproc)" >make.log 2>&1 || { tail -n 60 make.log >&2; exit 1; }
step "make (log: $src/make.log)"
make -C builddir install >install.log 2>&1 || { tail -n 60 install.log >&2; exit 1; }
rm -rf "$GOCACHE"
step "make install"

have="$(apptainer --version)"
[[ "$have" == "apptainer version $version" ]] || { echo "install-apptainer: got '$have'" >&2; exit 1; }
echo "apptainer $version installed in $((SECONDS - start)) s"
