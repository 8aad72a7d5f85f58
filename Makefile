# lung_nodule_ct_semantic_clip: set-up, tests, demo and benchmarks.
#
#   make demo    create .venv (once) and run the end-to-end demo on synthetic data
#   make test    create .venv (once), install the Debian test tools (as root), lint, run pytest offline
#
# Everything Python lives in .venv; nothing is installed into the system interpreter.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
RUFF ?= $(VENV)/bin/ruff
PYTEST_ARGS ?=
CI ?=

# Debian packages the tests use, and one command from each to check that it is there.
APT_PACKAGES := dicom3tools dcmtk orthanc orthanc-dicomweb iproute2
TOOLS := dciodvfy dsrdump storescu Orthanc ip

# CI=true (or 1/yes): a missing tool or an unusable network namespace is an error, not a warning.
STRICT := $(filter true 1 yes TRUE True YES,$(CI))

.PHONY: help venv tools test test-slow pytest-offline demo bench lint clean distclean

help:  ## list the targets
	@echo "Targets:"
	@grep -E '^[a-z][a-z_-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z_-]+):.*## (.*)/  make \1\t\2/' | expand -t 20
	@echo "Variables: PYTHON=$(PYTHON)  PYTEST_ARGS='-k name'  CI=true (missing tools fail)"

# One pip command for everything: torch and torchvision must resolve together with the rest,
# or pip pulls a second torch (see docs/architecture.md, "Environment").
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt
	touch $@

venv: $(STAMP)  ## create .venv from requirements.txt (only when requirements.txt changed)

# Orthanc's package starts a system service on install, and Orthanc binds every interface: a
# policy-rc.d that answers 101 keeps it from ever starting; the previous policy-rc.d is restored.
tools:  ## install the Debian test tools when root and missing (dicom3tools dcmtk orthanc iproute2)
	@missing=""; \
	for t in $(TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then echo "test tools present: $(TOOLS)"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		msg="missing test tools:$$missing; not root, so not installing them (as root: apt-get install $(APT_PACKAGES))"; \
		if [ -n "$(STRICT)" ]; then echo "error: $$msg" >&2; exit 1; fi; \
		echo "warning: $$msg; the tests that need them will be skipped" >&2; exit 0; \
	fi; \
	echo "missing test tools:$$missing; installing: $(APT_PACKAGES)"; \
	prc=/usr/sbin/policy-rc.d; backup=""; \
	if [ -e $$prc ]; then backup=$$(mktemp); cp -p $$prc "$$backup"; fi; \
	trap 'if [ -n "$$backup" ]; then mv -f "$$backup" /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi' EXIT; \
	printf '#!/bin/sh\n# installed by make tools: no service starts during this install\nexit 101\n' > $$prc; \
	chmod 755 $$prc; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update || exit 1; \
	apt-get install -y --no-install-recommends $(APT_PACKAGES) || exit 1; \
	service orthanc stop >/dev/null 2>&1 || true; \
	if command -v systemctl >/dev/null 2>&1; then systemctl disable orthanc >/dev/null 2>&1 || true; fi; \
	if command -v update-rc.d >/dev/null 2>&1; then update-rc.d orthanc disable >/dev/null 2>&1 || true; fi; \
	still=""; \
	for t in $(TOOLS); do command -v $$t >/dev/null 2>&1 || still="$$still $$t"; done; \
	if [ -n "$$still" ]; then echo "error: still missing after apt-get install:$$still" >&2; exit 1; fi; \
	echo "test tools installed; the orthanc system service is stopped and disabled"

test: $(STAMP) tools  ## lint, then the fast suite offline in a private network namespace (PYTEST_ARGS=...)
	$(RUFF) check .
	@$(MAKE) --no-print-directory pytest-offline MARKERS='not slow'

test-slow: $(STAMP) tools  ## the slow end-to-end tests (training, demo, Orthanc, standalone copy); CI runs them too
	@$(MAKE) --no-print-directory pytest-offline MARKERS='slow'

# pytest runs in a private network namespace (unshare -rn): nothing it starts (Orthanc, DICOM
# listeners) is reachable from outside, and no test can reach the network. LNSC_PRIVATE_NETNS=1
# tells the tests that they are isolated.
pytest-offline:
	@run="HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests -m '$(MARKERS)' $(PYTEST_ARGS)"; \
	if unshare -rn ip link set lo up >/dev/null 2>&1; then \
		echo "+ unshare -rn sh -c 'ip link set lo up && LNSC_PRIVATE_NETNS=1 $$run'"; \
		unshare -rn sh -c "ip link set lo up && LNSC_PRIVATE_NETNS=1 $$run"; \
	else \
		msg="cannot create a private network namespace (unshare -rn + ip link set lo up failed: user namespaces disabled, or iproute2 missing)"; \
		if [ -n "$(STRICT)" ]; then echo "error: $$msg" >&2; exit 1; fi; \
		echo "warning: $$msg; running pytest without network isolation (tests that start servers must see LNSC_PRIVATE_NETNS unset and skip)" >&2; \
		echo "+ $$run"; \
		sh -c "$$run"; \
	fi

demo: $(STAMP)  ## phantom DICOM study -> deploy app (demo model) -> SR + PDF report in demo_output/
	$(PY) -m demo

bench: $(STAMP)  ## run the benchmarks (preprocessing, training step, writers, evaluation, phantoms, deploy app)
	$(PY) bench/bench_preprocessing.py
	$(PY) bench/bench_training_step.py
	$(PY) bench/bench_writers.py
	$(PY) bench/bench_evaluate.py
	$(PY) bench/bench_phantoms.py
	$(PY) bench/bench_inference.py --device cpu --folds 5
	$(PY) bench/bench_cpu_backends.py
	$(PY) bench/bench_deploy.py

lint: $(STAMP)  ## ruff check
	$(RUFF) check .

clean:  ## remove caches and demo_output/ (keeps .venv)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache demo_output

distclean: clean  ## clean, and remove .venv too
	rm -rf $(VENV)
