#!/usr/bin/env bash
# Installs the system packages gpufleet's tests, demo and benchmarks need on Debian/Ubuntu,
# only those that are missing. Runs apt-get as root (or through sudo).
set -euo pipefail

want=()
have() { command -v "$1" >/dev/null 2>&1; }
have redis-server || want+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || have initdb || want+=(postgresql)
have runuser || want+=(util-linux)
have openssl || want+=(openssl)
# Prometheus 2.42 from Debian: promtool for the rule tests, prometheus for the live-fleet test and the demo
have promtool || want+=(prometheus)
if [ "${GPUFLEET_WITH_PODMAN:-1}" = 1 ]; then
  have podman || want+=(podman)
  have runc || want+=(runc)
  have debootstrap || want+=(debootstrap)
  have newuidmap || want+=(uidmap)
  have slirp4netns || want+=(slirp4netns)
  have fuse-overlayfs || want+=(fuse-overlayfs)
fi
if [ "${GPUFLEET_WITH_BENCH:-0}" = 1 ]; then
  have nginx || want+=(nginx)
  have wrk || want+=(wrk)
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || want+=(python3-venv)

if [ ${#want[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${want[*]}"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
# Debian's redis-server, nginx and prometheus packages start system services; the tests run their own.
for svc in redis-server nginx prometheus prometheus-node-exporter; do
  $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || $sudo service "$svc" stop >/dev/null 2>&1 || true
done
