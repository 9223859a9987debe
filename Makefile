# Two entry points for a fresh machine: `make demo` (main job) and `make test` (test suite);
# `make test-compose` runs the compose cluster for real (deploy/compose_check.sh, pytest -m compose).
# Both create the virtual environment, install the project and build the offline metric
# parameters first, so they work on a clean clone with nothing installed. The monitor's browser
# test needs Chromium from the system's packages: `make browser` once, before `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup weights demo test test-cluster test-compose browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch and torchvision first: pip takes the pinned builds from the local wheel store.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

weights: setup
	$(BIN)/qualiteacher weights prepare

demo: weights
	$(BIN)/qualiteacher demo --config configs/quickstart.yaml

test: weights
	$(BIN)/python -m pytest -q

# A three-node Ray cluster of its own (tests/test_cluster.py), in a pytest session of its own.
test-cluster: weights
	$(BIN)/python -m pytest -q -m cluster

# Needs a Docker engine, or root to start Debian's (it skips, with the reason, where none can run).
test-compose: setup
	$(BIN)/python -m pytest -q -s -m compose tests/test_compose_cluster.py

# Debian's Chromium and ChromeDriver for tests/test_monitor.py's browser test; nothing to do
# where both are on PATH. Installing needs apt-get, as root or through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver: already installed"; \
	else \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
