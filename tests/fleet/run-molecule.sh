#!/usr/bin/env bash
# Runs gpufleet's molecule scenarios on podman + systemd, one after another, and
# prints pass/fail and the duration of each, then a summary line. Exits non-zero if
# any scenario failed.
#
#   tests/fleet/run-molecule.sh                  every scenario: roles/*/molecule/default
#                                                and tests/fleet/molecule/*, except those
#                                                with a file named only-when-named
#   tests/fleet/run-molecule.sh redis fleet      a subset, by role or scenario name
#   tests/fleet/run-molecule.sh --list           what would run
#
# Env: MOLECULE_COMMAND (default "test"; e.g. "converge" while developing a role),
#      KEEP_LOGS=1 keeps each scenario's log under .cache/molecule-logs even when it passes,
#      VERBOSE=1 streams molecule's output instead of showing it only on failure.
# A scenario may list secrets it uses in molecule/<scenario>/must-not-log.txt (one per
# line): the scenario fails if any of them appears in molecule's output.
# Molecule's state lives in .cache/molecule/<name> (MOLECULE_EPHEMERAL_DIRECTORY), so
# separate checkouts on one machine do not share it.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

export PATH="$repo/.venv/bin:$PATH"
# crun refuses hybrid-cgroup hosts and podman's default ulimits exceed CI hard
# limits: use our own containers.conf instead of editing /etc/containers.
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
export ANSIBLE_ROLES_PATH="$repo/roles"
export ANSIBLE_FORCE_COLOR="${ANSIBLE_FORCE_COLOR:-0}"
export ANSIBLE_NOCOWS=1
export ANSIBLE_DEPRECATION_WARNINGS=false
export PY_COLORS="${PY_COLORS:-0}"
command="${MOLECULE_COMMAND:-test}"
logdir="$repo/.cache/molecule-logs"

# name<TAB>directory from which `molecule` runs<TAB>scenario name<TAB>"named" when the
# scenario runs only when named (a file only-when-named in it says why)
discover() {
  local d
  for d in "$repo"/roles/*/molecule/default; do
    [ -f "$d/molecule.yml" ] || continue
    local role_dir="${d%/molecule/default}"
    printf '%s\t%s\t%s\n' "$(basename "$role_dir")" "$role_dir" default
  done
  for d in "$here"/molecule/*/; do
    d="${d%/}"
    [ -f "$d/molecule.yml" ] || continue
    printf '%s\t%s\t%s\t%s\n' "$(basename "$d")" "$here" "$(basename "$d")" "$([ -f "$d/only-when-named" ] && echo named)"
  done
}

mapfile -t all < <(discover)
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${all[@]}" | cut -f1
  exit 0
fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

selected=()
if [ $# -eq 0 ]; then
  for line in "${all[@]}"; do
    [ "${line##*$'\t'}" = named ] || selected+=("$line")
  done
else
  for want in "$@"; do
    found=""
    for line in "${all[@]}"; do
      if [ "${line%%$'\t'*}" = "$want" ]; then selected+=("$line"); found=1; fi
    done
    if [ -z "$found" ]; then
      echo "run-molecule: no scenario named '$want'; known: $(printf '%s\n' "${all[@]}" | cut -f1 | tr '\n' ' ')" >&2
      exit 2
    fi
  done
fi
if [ ${#selected[@]} -eq 0 ]; then
  echo "run-molecule: no molecule scenarios found"
  exit 0
fi

for tool in podman molecule ansible-playbook; do
  command -v "$tool" >/dev/null || { echo "run-molecule: $tool is missing (make deps venv installs what is needed)" >&2; exit 2; }
done
"$here/build-base-image.sh" || { echo "run-molecule: could not build the base image" >&2; exit 2; }

mkdir -p "$logdir"
passed=0; failed=0; failures=(); total_start=$(date +%s)
for line in "${selected[@]}"; do
  IFS=$'\t' read -r name workdir scenario _ <<<"$line"
  log="$logdir/$name.log"
  # molecule keys its state (instances, inventory) on the basename of the project
  # directory only: two checkouts on one machine (a CI clone, a second engineer) would
  # share ~/.cache/molecule/…/roles-x state. Keep it in this checkout instead.
  export MOLECULE_EPHEMERAL_DIRECTORY="$repo/.cache/molecule/$name"
  mkdir -p "$MOLECULE_EPHEMERAL_DIRECTORY"
  start=$(date +%s)
  printf 'run-molecule: %-16s molecule %s ...\n' "$name" "$command"
  if [ "${VERBOSE:-0}" = 1 ]; then
    (cd "$workdir" && molecule "$command" -s "$scenario") 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    (cd "$workdir" && molecule "$command" -s "$scenario") >"$log" 2>&1
    rc=$?
  fi
  secs=$(( $(date +%s) - start ))
  # Secrets a scenario uses (one per line in <scenario>/must-not-log.txt) must not
  # appear anywhere in molecule's output: converge, idempotence, check, verify.
  scenario_dir="$workdir/molecule/$scenario"
  if [ "$rc" -eq 0 ] && [ -f "$scenario_dir/must-not-log.txt" ]; then
    while IFS= read -r secret; do
      [ -n "$secret" ] || continue
      if grep -qF -- "$secret" "$log"; then
        echo "run-molecule: $name: a secret from must-not-log.txt appears in the output (line $(grep -nF -- "$secret" "$log" | head -1 | cut -d: -f1) of the log)"
        rc=3
      fi
    done <"$scenario_dir/must-not-log.txt"
  fi
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    printf 'run-molecule: %-16s PASS  %4ds\n' "$name" "$secs"
    [ "${KEEP_LOGS:-0}" = 1 ] || rm -f "$log"
  else
    failed=$((failed + 1)); failures+=("$name")
    printf 'run-molecule: %-16s FAIL  %4ds (exit %s; log: %s)\n' "$name" "$secs" "$rc" "${log#"$repo"/}"
    if [ "${VERBOSE:-0}" != 1 ]; then
      echo "----- last 60 lines of $name's log -----"
      tail -n 60 "$log"
      echo "-----"
    fi
    # A failed test may leave its containers behind: take them down (other commands,
    # e.g. converge while developing, keep them for a look inside).
    if [ "$command" = test ]; then
      (cd "$workdir" && molecule destroy -s "$scenario") >/dev/null 2>&1 || true
    fi
  fi
done
total=$(( $(date +%s) - total_start ))
echo "run-molecule: ${total}s in all${failures:+ (failed: ${failures[*]})}"
# the closing line alone, in the plain "N passed, N failed" form CI reads
echo "molecule: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
