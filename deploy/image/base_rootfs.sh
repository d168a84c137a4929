#!/usr/bin/env bash
# Builds (once) the base image of `make image` without any container registry: a Debian bookworm
# rootfs made by debootstrap (amd64, minbase + python3 and venv, what python:3.11-slim-bookworm
# gives a Docker user), cached outside the clone, imported into podman's storage as BASE_IMAGE.
#
#   deploy/image/base_rootfs.sh CACHE_DIR BASE_IMAGE
#
# Each step is skipped when its result exists: CACHE_DIR/rootfs (debootstrap, built in
# rootfs.partial and moved into place) and the podman image BASE_IMAGE. Installs podman, runc and
# debootstrap with apt when they are missing (as `make browser` does for chromium). Needs root and
# apt; without them it says which is missing in one line and exits 1. The host's extra CA
# certificates (an egress proxy's) go into the rootfs, so pip inside the build trusts what the host trusts.
set -euo pipefail

cache="${1:?usage: $0 CACHE_DIR BASE_IMAGE}"
image="${2:?usage: $0 CACHE_DIR BASE_IMAGE}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$cache/rootfs"
say() { echo "[image] $*"; }
die() { echo "make image: $*" >&2; exit 1; }
trap 'echo "make image: $0 line $LINENO failed: $BASH_COMMAND" >&2' ERR

[ "$(uname -m)" = x86_64 ] || die "the base rootfs is built for amd64; this host is $(uname -m)"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, podman with runc); run it with sudo"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || die "needs podman, runc and debootstrap: install them (no apt-get here)"
  say "installing podman runc debootstrap (apt)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null; } \
    || die "apt-get install podman runc debootstrap failed"
fi
export CONTAINERS_CONF="$here/containers.conf"

if [ ! -x "$root/usr/bin/python3" ]; then
  say "debootstrap: amd64 Debian bookworm -> $root (~3-5 min)"
  rm -rf "$root.partial"
  mkdir -p "$cache"
  start=$SECONDS
  debootstrap --arch=amd64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root.partial" http://deb.debian.org/debian > "$cache/debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $cache/debootstrap.log"
  # What the image's apt-get needs (debootstrap writes only the main suite) and nothing of the host's.
  printf '%s\n' "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" > "$root.partial/etc/apt/sources.list"
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$root.partial/usr/local/share/ca-certificates/"
    env -u TMPDIR chroot "$root.partial" /usr/sbin/update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in $root.partial"
  fi
  rm -rf "$root.partial"/var/cache/apt/archives/*.deb "$root.partial"/var/lib/apt/lists/*
  mv "$root.partial" "$root"
  say "debootstrap done in $((SECONDS - start)) s"
else
  say "rootfs exists: $root"
fi

if ! podman image exists "$image"; then
  say "importing $root as $image"
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$image" >/dev/null \
    || die "podman import of $root failed"
fi
say "base image: $image ($(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
