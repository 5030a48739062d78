# Two entry points matter (README): `make lab` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
export LLMSTACK_CACHE ?= $(CURDIR)/.cache
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Scenarios in two lanes that run side by side, each in order; cheap proofs of the lab first. vllm also covers
# the sglang role (one host), tabbyapi the router role (tabby-tarball: both llama.cpp server kinds behind the
# router). A lane is a comma-separated list; `make molecule LANES=default` runs one scenario.
LANES ?= lab,default,fleet tabbyapi,vllm,ollama

.PHONY: deps venv locks locks-check docs docs-check lint sanity units pytest molecule prefetch test lab lab-destroy build clean

# Debian packages a bare Debian 12 machine lacks for the lab (installed only when missing).
DEB_PACKAGES := debootstrap systemd-container iproute2 nftables openssh-client python3-venv unzip git ca-certificates
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# Everything from hashed locks (make locks): uv first, with pip, then the tools with uv. A file whose hash
# does not match its lock fails here, naming the package (a compromised release, a tampered mirror).
venv: deps $(VENV)/.stamp
$(VENV)/.stamp: requirements/controller.lock requirements/uv.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --require-hashes -r requirements/uv.lock
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --require-hashes -r requirements/controller.lock
	mkdir -p .collections/ansible_collections/llmstack
	ln -sfn ../../.. .collections/ansible_collections/llmstack/inference
	touch $@

# The one place locks are refreshed: requirements/*.in (and controller.txt) compiled with
# `uv pip compile --generate-hashes` into requirements/*.lock (tools/locks.py). Needs the package index,
# and for llamacpp.lock the built llama-cpp-python wheel in $(LLMSTACK_CACHE)/wheelhouse.
locks: venv
	$(VENV)/bin/python tools/locks.py write

# No network: each lock was made from its .in, and each .in agrees with the versions the roles default to.
locks-check: venv
	$(VENV)/bin/python tools/locks.py check

# Role READMEs: hand-written intro, variable tables generated from meta/argument_specs.yml (tools/role-docs.sh).
docs: venv
	tools/role-docs.sh write

# A stale README fails `make lint` and with it `make test`; the message says to run `make docs`.
docs-check: venv
	tools/role-docs.sh check

lint: venv docs-check locks-check
	ruff check .
	yamllint --strict .
	ansible-lint

sanity: venv
	tools/ansible-test.sh sanity

units: venv
	tools/ansible-test.sh units

pytest: venv
	# The slowest cases in the CI log: where the pytest stage of the budget goes.
	pytest -q --durations=15 tests/integration_py router/tests

# `stage X took N s` lines show in the CI log where the 75-minute budget goes (one per scenario too).
TIMED = start=$$(date +%s); status=0; $(2) || status=$$?; echo "stage $(1) took $$(( $$(date +%s) - start )) s"; [ $$status -eq 0 ]

# Side by side because a scenario mostly waits (ssh round trips, model loads, package downloads) and leaves a
# core idle; the lanes share nothing but locked caches (hosts and ephemeral dirs are named after the scenario,
# shared artifacts are built under the builds' locks). Each line carries its lane's first scenario; a failed
# lane fails the stage after the other lane has finished.
molecule: venv
	pids=(); for lane in $(LANES); do \
	  { for s in $${lane//,/ }; do echo "=== molecule test -s $$s"; $(call TIMED,molecule:$$s,molecule test -s $$s); done; } 2>&1 \
	    | sed -u "s/^/[$${lane%%,*}] /" & pids+=($$!); \
	done; status=0; for pid in "$${pids[@]}"; do wait $$pid || status=1; done; [ $$status -eq 0 ]

# The cold cache's artifacts: the lab rootfs, the lab model, llama-server (about 10 min of CPU) and the
# llama-cpp-python wheel (about 9 min of CPU). `make test` builds them in the background at nice 19 while
# lint, sanity and units keep one core busy, so they take the idle core; a test that needs one earlier waits
# on its build's lock (each script flocks and then finds the artifact), so nothing is built twice.
prefetch: venv
	$(call TIMED,prefetch,python3 tools/lab/labctl.py rootfs >/dev/null && tools/fetch-lab-model.sh && \
	  { tools/build-llama-server.sh & server=$$!; \
	    tools/build-llamacpp-wheel.sh && wait $$server; })

# Stages run in sequence through sub-makes so each one is timed; the first failing stage stops the run (and
# the background prefetch: its own process group, killed on exit; a failed prefetch fails the run too).
# check-clean fails the run if any lab process, mount, namespace or link survived the tests.
PREFETCH_LOG = $(LLMSTACK_CACHE)/logs/prefetch.log
test: venv
	mkdir -p $(dir $(PREFETCH_LOG))
	setsid nice -n 19 $(MAKE) --no-print-directory prefetch >$(PREFETCH_LOG) 2>&1 & prefetch=$$!; \
	trap 'kill -- -'$$prefetch' 2>/dev/null || true' EXIT; \
	for stage in lint sanity units pytest molecule; do $(call TIMED,$$stage,$(MAKE) --no-print-directory $$stage); done; \
	status=0; wait $$prefetch || status=$$?; tail -n 3 $(PREFETCH_LOG); [ $$status -eq 0 ]
	$(call TIMED,check-clean,python3 tools/lab/labctl.py check-clean)

build: venv
	ansible-galaxy collection build --force --output-path .cache/dist

lab: venv
	tools/lab/lab-up.sh

lab-destroy:
	tools/lab/lab-down.sh

clean: lab-destroy
	rm -rf .collections .pytest_cache tests/output
