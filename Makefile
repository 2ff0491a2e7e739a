# The two commands a new operator types (see README.md):
#   make demo   a working hub on http://127.0.0.1:8000 whose users get JupyterLab in containers
#   make test   the whole test suite, after setting up everything it needs
# Both install what is missing and are fast when it is already there.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Daemons the tests run against: the whole suite on Incus, the client and a spawn on LXD too.
# Their sockets, bridges and addresses are in scripts/topology.env (LXDSP_<DAEMON>_*).
TEST_DAEMONS ?= incus lxd
PYTEST_ARGS ?=

.PHONY: test demo setup venv daemons images tools lint unit integration e2e cluster cluster-down cluster-test

# The cluster tier runs beside the rest (scripts/run-tests.sh): they share no daemon.
test: setup lint
	LXDSPAWNER_TEST_DAEMONS="$(TEST_DAEMONS)" PYTHON=$(PY) scripts/run-tests.sh $(PYTEST_ARGS)

demo: venv
	scripts/setup-lxd.sh incus
	VENV=$(VENV) lxdspawner/images/ensure-image.sh jupyter-base incus
	source scripts/topology.env && \
	  $(VENV)/bin/lxdspawner prepull --image jupyter-base --endpoint "unix://$$LXDSP_INCUS_SOCKET"
	VENV=$(VENV) scripts/demo.sh

setup: venv daemons images tools

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@python3 -m venv --help >/dev/null 2>&1 || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; }
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

daemons:
	@for d in $(TEST_DAEMONS); do scripts/setup-lxd.sh $$d || exit 1; done

# Each daemon holds the images, and the shared read-only copy of the image's /opt/jupyterhub
# (see lxdspawner/sharing.py) is made before the tests, so every spawn in them mounts it.
images: venv daemons
	@source scripts/topology.env; for d in $(TEST_DAEMONS); do \
	  socket=LXDSP_$${d^^}_SOCKET; \
	  VENV=$(VENV) lxdspawner/images/ensure-image.sh lxdspawner-tiny $$d || exit 1; \
	  VENV=$(VENV) lxdspawner/images/ensure-image.sh jupyter-base $$d || exit 1; \
	  $(VENV)/bin/lxdspawner prepull --image jupyter-base \
	    --endpoint "unix://$${!socket}" || exit 1; \
	done

tools:
	scripts/ensure-tools.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The in-process tier (no daemon), with the package's coverage (pytest-cov).
unit: venv
	$(PY) -m pytest -q tests/unit --cov=lxdspawner --cov-report=term-missing

integration: setup
	LXDSPAWNER_TEST_DAEMONS="$(TEST_DAEMONS)" $(PY) -m pytest -ra -m "integration and not cluster"

e2e: setup
	LXDSPAWNER_TEST_DAEMONS="$(TEST_DAEMONS)" $(PY) -m pytest -ra -m e2e

# A three-member Incus cluster on this machine (network namespaces), for the cluster tests;
# `make test` builds it and tears it down by itself.
cluster: venv daemons images
	VENV=$(VENV) scripts/cluster.sh up

cluster-down:
	VENV=$(VENV) scripts/cluster.sh down

cluster-test: setup
	$(PY) -m pytest -ra -m cluster
