#!/usr/bin/env bash
# Builds localhost/debian-systemd:bookworm, the base image every molecule scenario
# of gpufleet boots (systemd as PID 1), with debootstrap: no registry is needed.
# Does nothing when the image already exists; FORCE=1 rebuilds it.
#
# Usage: tests/fleet/build-base-image.sh            (as root)
# Env:   BASE_IMAGE (default localhost/debian-systemd:bookworm)
#        DEBIAN_MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm)
#        FORCE=1 to rebuild
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
image="${BASE_IMAGE:-localhost/debian-systemd:bookworm}"
suite="${SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

if [ "${FORCE:-0}" != 1 ] && podman image exists "$image"; then
  echo "build-base-image: $image is present (FORCE=1 rebuilds it)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "build-base-image: debootstrap needs root; run it as root (or through sudo)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "build-base-image: debootstrap is missing: apt-get install -y debootstrap (or run scripts/install-deps.sh)" >&2; exit 1; }

start=$(date +%s)
root="$(mktemp -d /var/tmp/gpufleet-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT

# What Ansible and the roles' tests need, nothing more: systemd as init, Python for
# Ansible's modules (python3-apt for the apt module), sudo for become, iproute2 for
# network facts, curl for the verify steps, gnupg for the roles' repository keyrings.
packages=systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,iproute2,ca-certificates,sudo,curl,gnupg,procps
echo "build-base-image: debootstrap $suite from $mirror into $root"
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# HTTPS from the containers may go through an intercepting proxy whose CA only the
# host trusts: carry the host's bundle over.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi

# Quiet, container-friendly systemd: no getty on a console nobody reads, no
# units that need hardware or kernel features a container lacks.
for unit in getty@tty1.service console-getty.service systemd-remount-fs.service \
            systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service \
            sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
            systemd-firstboot.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# apt: no recommends and no documentation, so the roles' installs stay small and quick.
cat >"$root/etc/apt/apt.conf.d/90gpufleet-test" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Retries "3";
APT
cat >"$root/etc/dpkg/dpkg.cfg.d/90gpufleet-nodoc" <<'DPKG'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
  "$mirror" "$suite" "$mirror" "$suite" "$suite" >"$root/etc/apt/sources.list"
# No package lists in the image, and an old mtime on their directory: Ansible's apt
# module judges cache_valid_time by that mtime and would otherwise skip the update.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* "$root"/usr/share/man/*
touch -d 2000-01-01 "$root"/var/lib/apt/lists
: >"$root/etc/machine-id"
echo "debian-systemd" >"$root/etc/hostname"

tar -C "$root" -c . | podman import -q \
  --change 'CMD ["/sbin/init"]' --change 'STOPSIGNAL SIGRTMIN+3' \
  - "$image" >/dev/null
echo "build-base-image: built $image in $(( $(date +%s) - start ))s"
