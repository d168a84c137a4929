#!/usr/bin/env bash
# Builds (once) an aarch64 Debian bookworm userland with the project's pinned requirements in a venv,
# runnable on this x86 machine under qemu user-mode emulation (what `make test-arm64` uses).
#
#   harness/arm64_userland.sh ROOT
#
# Each step is skipped when its result exists: ROOT (debootstrap, built in ROOT.partial and moved
# into place), ROOT/opt/venv/.requirements (the requirements list it was installed from: the base,
# serve, train, dev and grpc pins of pyproject.toml, as `make setup` installs them (`ARM64_UNIT=tests/unit`
# imports every client module, clients/grpc_api.py included), generated on the host by deploy/pins.py
# with their platform markers, which the aarch64 pip evaluates; a changed list re-runs pip, which
# installs only what changed). Needs root, apt and binfmt_misc: without them it says which is
# missing in one line and exits 1.
set -euo pipefail

root="${1:?usage: $0 ROOT}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "[arm64] $*"; }
die() { echo "make test-arm64: $*" >&2; exit 1; }
# Any other failing command still says which one it was (set -e alone exits silently).
trap 'echo "make test-arm64: $0 line $LINENO failed: $BASH_COMMAND" >&2' ERR
# Commands in the userland get a clean environment: the host's TMPDIR etc. do not exist inside.
run() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || die "unsupported host $(uname -m)"
if [ "$(uname -m)" = x86_64 ]; then
  [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and binfmt_misc); run it with sudo"
  command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu) to install qemu-user-static, binfmt-support, debootstrap"
  if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
      || ! command -v update-binfmts >/dev/null; then
    say "installing qemu-user-static binfmt-support debootstrap (apt)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        qemu-user-static binfmt-support debootstrap >/dev/null; } || die "apt-get install qemu-user-static binfmt-support debootstrap failed"
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || die "binfmt_misc is not available (mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc failed; a container needs it from the host)"
  fi
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
    || die "binfmt for aarch64 could not be enabled (update-binfmts --enable qemu-aarch64)"
  grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt qemu-aarch64 is registered but disabled"
fi

if [ ! -x "$root/usr/bin/python3" ]; then
  say "debootstrap: aarch64 Debian bookworm -> $root (~3-4 min)"
  rm -rf "$root.partial"
  mkdir -p "$(dirname "$root")"
  start=$SECONDS
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root.partial" http://deb.debian.org/debian > "$root.debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $root.debootstrap.log"
  mv "$root.partial" "$root"
  say "debootstrap done in $((SECONDS - start)) s"
else
  say "userland exists: $root"
fi

# pip in the userland needs the host's CA certificates (a proxy's CA here) and DNS.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" \
    || die "could not copy the host's CA certificates into $root"
  out="$(run /usr/sbin/update-ca-certificates 2>&1)" || die "update-ca-certificates failed in the userland: $out"
fi
cp -L /etc/resolv.conf "$root/etc/resolv.conf" || die "could not copy /etc/resolv.conf into $root"

pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
py="$here/.venv/bin/python"; [ -x "$py" ] || py=python3  # deploy/pins.py needs python >= 3.11 (tomllib)
"$py" "$here/deploy/pins.py" serve train dev grpc > "$pins" || die "could not read the pins of $here/pyproject.toml"
if ! cmp -s "$pins" "$root/opt/venv/.requirements"; then
  say "installing pyproject.toml's pins (base, serve, train, dev, grpc) into $root/opt/venv (aarch64 pip, ~10 min)"
  start=$SECONDS
  cp "$pins" "$root/opt/requirements.txt"
  [ -x "$root/opt/venv/bin/pip" ] || run python3 -m venv /opt/venv || die "python3 -m venv /opt/venv failed in the userland"
  # The venv's python is a symlink to /usr/bin/python3.11; run from the host (QEMU_LD_PREFIX, no
  # chroot) the kernel would resolve it to the host's x86 python. A copy stays aarch64.
  for exe in "$root"/opt/venv/bin/python*; do
    [ -L "$exe" ] && cp --remove-destination "$root/usr/bin/python3.11" "$exe"
  done
  run pip install --disable-pip-version-check --no-cache-dir -q -r /opt/requirements.txt \
    || die "pip install of pyproject.toml's pins failed in the aarch64 userland"
  cp "$pins" "$root/opt/venv/.requirements"
  say "requirements installed in $((SECONDS - start)) s"
else
  say "requirements up to date in $root/opt/venv"
fi
say "aarch64 python: $(QEMU_LD_PREFIX="$root" "$root/opt/venv/bin/python" -c 'import platform, torch; print(platform.machine(), "torch", torch.__version__)')"
