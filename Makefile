# The README's two commands:  `make run`  and  `make test`.
# Each does its own set-up: a virtual environment with the project installed, and
# Debian's redis-server and redis-sentinel when missing (tests and `make run` start their own);
# `make test` also Debian's prometheus (promtool and a Prometheus for tests/test_monitoring.py).

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast lint docs setup redis-server prometheus bench clean

run: setup redis-server
	@bash scripts/run-local.sh

# Six processes on two cores: most of the suite waits on the processes it starts. Whole
# modules go to a process, in the order tests/conftest.py's ORDER gives.
test: setup redis-server prometheus
	$(VENV)/bin/pytest -q -n 6 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The edit loop: everything but the tests that start workers, beat, Sentinels or CLI processes.
test-fast: lint redis-server prometheus
	$(VENV)/bin/pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

# pyflakes, pycodestyle and import order ([tool.ruff] in pyproject.toml): zero findings.
lint: setup
	$(VENV)/bin/ruff check .

# The docs site (docs/), warnings as errors: a broken link or a reference the code no longer matches fails.
docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + ")")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server from Debian's packages"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; \
	  $(SUDO) systemctl disable --now redis-server >/dev/null 2>&1 || true; }
	@command -v redis-sentinel >/dev/null 2>&1 || { \
	  echo "installing redis-sentinel from Debian's packages (tests/test_sentinel.py)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-sentinel >/dev/null; \
	  $(SUDO) systemctl disable --now redis-sentinel >/dev/null 2>&1 || true; }

# The alerting rules' checks and the live alert test (tests/test_monitoring.py) run `promtool`
# and a `prometheus` of their own; the package's own service is not left running.
prometheus:
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { \
	  echo "installing prometheus (promtool) from Debian's packages"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  $(SUDO) systemctl disable --now prometheus >/dev/null 2>&1 || true; }

clean:
	rm -rf $(VENV) var .pytest_cache docs/_build
