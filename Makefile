# Every target sets itself up on a fresh Debian machine: system packages (apt, as root) when
# missing, the virtualenv in .venv/, the build. `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := g++ pkg-config python3-venv libfabric-dev libfabric-bin libibverbs-dev \
                iperf3 iproute2
CORE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h') setup.py

.PHONY: all build sysdeps venv test test-fast lint demo bench stubs clean

all: build

sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root (or sudo) for apt-get install$$missing"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.stamp: requirements-dev.txt pyproject.toml | sysdeps
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-dev.txt
	@touch $@

venv: sysdeps $(VENV)/.stamp

# The first build is an editable install (it also installs the `kvtransfer` command and the
# conformance suite's pytest plugin); later ones rebuild only what changed, in place.
kvtransfer/_core.stamp: $(VENV)/.stamp $(CORE_SOURCES) pyproject.toml
	@if [ ! -f $(VENV)/.editable ] || [ pyproject.toml -nt $(VENV)/.editable ]; then \
	  $(VPY) -m pip install -q --no-build-isolation --no-deps -e . && touch $(VENV)/.editable; \
	else \
	  $(VPY) setup.py -q build_ext --inplace; \
	fi
	@touch $@

build: sysdeps kvtransfer/_core.stamp

lint: build
	$(VENV)/bin/ruff check kvtransfer tests benchmarks examples scripts

test: build
	@bash scripts/run_tests.sh

# Quick local loop: no vLLM servers, no long fuzzing.
test-fast: build
	$(VPY) -m pytest -q -m "not vllm and not slow" tests

demo: build
	$(VPY) -m kvtransfer.demo

# Regenerates BENCHMARKS.md: kvtransfer, NIXL and Mooncake side by side, limits, sweeps, micro.
bench: build
	$(VPY) -m pip install -q -r requirements-peers.txt
	$(VPY) benchmarks/regenerate.py

# Type stubs of the compiled core, regenerated from the built module.
stubs: build
	$(VENV)/bin/pybind11-stubgen kvtransfer._core -o build/stubs
	cp build/stubs/kvtransfer/_core.pyi kvtransfer/_core.pyi

clean:
	rm -rf build kvtransfer/*.so kvtransfer/_core.stamp
