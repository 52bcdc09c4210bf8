#!/usr/bin/env bash
# Builds, on the controller, what the roles install on hosts without a package index:
# the gpufleet wheel (from daemons/) and a wheelhouse of all its dependencies, for the
# hosts' Python version and CPU architecture, packed in one tarball the roles copy.
#
#   dist/wheelhouse-cp311-x86_64/          gpufleet-*.whl + every dependency's wheel
#   dist/wheelhouse-cp311-x86_64.tar       the same, packed reproducibly (one copy per host)
#   dist/wheelhouse-cp311-x86_64.sha256    its checksum (the roles restart on a change)
#
# Usage: scripts/build-wheelhouse.sh [--python 3.11] [--arch x86_64] [--force]
#   --python  the hosts' Python (Debian 12: 3.11, Ubuntu 22.04: 3.10, Ubuntu 24.04: 3.12);
#             default: the controller's own
#   --arch    the hosts' CPU architecture (x86_64, aarch64); default: the controller's
#   --force   rebuild even when up to date
# Env: PYTHON (the controller's interpreter, default .venv/bin/python or python3),
#      PIP_INDEX_URL / PIP_EXTRA_INDEX_URL as pip reads them, DIST (default dist).
#
# `pip download --only-binary` fetches the manylinux wheels of the target Python and
# platform (every dependency of gpufleet publishes them), whatever the controller runs.
# Nothing is rebuilt when the tarball is newer than daemons/.
set -euo pipefail

me=build-wheelhouse
# shellcheck source=scripts/build-wheelhouse-common.sh
. "$(dirname "$0")/build-wheelhouse-common.sh"
wheelhouse_init
wheelhouse_args "$@"

dist="${DIST:-dist}"
tag="cp${target_py/./}-${target_arch}"
house="$dist/wheelhouse-$tag"
tarball="$house.tar"

newest_source="$(find daemons -type f -not -path '*/__pycache__/*' -not -path '*.egg-info*' -not -path '*/build/*' -newer "$tarball" -print -quit 2>/dev/null || true)"
if [ "$force" = 0 ] && [ -f "$tarball" ] && [ -f "$house.sha256" ] && [ -z "$newest_source" ]; then
  echo "build-wheelhouse: $tarball is up to date (--force rebuilds it)"
  exit 0
fi

start=$(date +%s)
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip"
"$python" -c 'import build' 2>/dev/null || "$python" -m pip install -q build

work="$(mktemp -d "${TMPDIR:-/tmp}/gpufleet-wheelhouse.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The gpufleet wheel itself (pure Python: one wheel serves every target).
"$python" -m build --wheel --outdir "$work/own" daemons >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log" >&2; exit 1; }
wheel="$(ls "$work"/own/gpufleet-*.whl)"

mkdir -p "$work/house"
cp "$wheel" "$work/house/"
# Binary wheels for the target Python and platform.
abi="cp${target_py/./}"
fetch() {
  "$python" -m pip download -q --dest "$work/house" --only-binary=:all: \
    --python-version "$target_py" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --platform "manylinux_2_28_$target_arch" --platform "manylinux_2_17_$target_arch" \
    --platform "manylinux2014_$target_arch" --platform "manylinux_2_5_$target_arch" \
    --platform "manylinux1_$target_arch" --platform any \
    "$@" >"$work/pip.log" 2>&1 || { tail -n 30 "$work/pip.log" >&2; exit 1; }
}
fetch "$wheel"
# pip evaluates the dependencies' environment markers against the controller's Python,
# not the target's: a dependency only some patch releases need (redis wants
# async-timeout below 3.11.3, and Debian 12 ships 3.11.2) would be missing. Add every
# requirement whose marker depends on the Python version only; pip on the host then
# installs what applies to it.
for _ in 1 2 3; do
  mapfile -t extra < <("$python" - "$work/house" <<'PY'
import pathlib, re, sys, zipfile
house = pathlib.Path(sys.argv[1])
have = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in house.glob("*.whl")}
want = set()
for wheel in house.glob("*.whl"):
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        for line in zf.read(meta).decode("utf-8", "replace").splitlines():
            if not line.startswith("Requires-Dist:") or ";" not in line:
                continue
            req, marker = line[len("Requires-Dist:"):].split(";", 1)
            if "extra" in marker or "python_" not in marker or re.search(r"sys_platform|platform_|os_name|implementation", marker):
                continue
            name = re.split(r"[ <>=!~\[(]", req.strip(), maxsplit=1)[0]
            if re.sub(r"[-_.]+", "-", name).lower() not in have:
                want.add(req.strip().replace(" ", ""))
print("\n".join(sorted(want)))
PY
)
  [ "${#extra[@]}" -gt 0 ] && [ -n "${extra[0]}" ] || break
  fetch "${extra[@]}"
done

# Replace the previous build atomically enough for a controller: new dir, then swap.
mkdir -p "$dist"
rm -rf "$house.new"
mv "$work/house" "$house.new"
rm -rf "$house"
mv "$house.new" "$house"
pack_wheelhouse "$house" "$tarball" "$house.sha256"
