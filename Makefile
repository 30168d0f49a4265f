# Quick start: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-floor test-thorough lint typecheck pytest coverage clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  else \
	    echo "make: python3 cannot create virtual environments; run: sudo apt install python3-venv" >&2; exit 1; \
	  fi; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

run: $(STAMP)
	@mkdir -p .relayd
	$(BIN)/relayd --config examples/relayd.toml --admin-socket .relayd/admin.sock --state-dir .relayd

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy relayd

# The suite runs on PYTEST_JOBS workers (pytest-xdist; 0 = in this process, serially).
# Twice as many workers as this machine's 2 cores: most tests wait (on timeouts,
# drains, daemon start-ups) rather than compute, so 4 workers fill the cores that 2
# leave idle. Tests marked xdist_group("heavy") (floods, timed waits) all go to
# one worker, so that they never overlap each other. RELAYD_TEST_TIMEOUT_SCALE=3 widens
# every bounded wait on a loaded host; RELAYD_TEST_THOROUGH=1 (`make test-thorough`)
# runs the property tests with their full example counts.
PYTEST_JOBS ?= 4
ifeq ($(PYTEST_JOBS),0)
XDIST :=
else
XDIST := -n $(PYTEST_JOBS) --dist loadgroup
endif

# Bytecode caching on, whatever the environment says (containers and CI images often set
# PYTHONDONTWRITEBYTECODE=1): without it every xdist worker and each of the suite's
# relayd and relayctl processes compiles relayd again, and pytest rewrites and compiles
# every test module and plugin again (collection: 5.8 -> 2.1 CPU-s per worker here).
PYCACHE := PYTHONDONTWRITEBYTECODE=

# asyncio's debug mode (PYTHONASYNCIODEBUG=1: never-awaited coroutines with where they
# were made, slow callbacks, non-thread-safe calls) costs pytest 4-15 % of its time
# here (bench/RESULTS.md), so the quick everyday run goes without it; test-floor,
# test-thorough and coverage keep it, and CI runs test-floor on every commit, so every
# change still runs once in debug mode. `make pytest ASYNCIO_DEBUG=1` turns it on here too.
ASYNCIODEBUG := $(if $(filter 1,$(ASYNCIO_DEBUG)),PYTHONASYNCIODEBUG=1,)

pytest: $(STAMP)
	$(PYCACHE) $(ASYNCIODEBUG) $(BIN)/pytest $(XDIST) $(PYTEST_ARGS)

test-thorough: $(STAMP)
	$(PYCACHE) RELAYD_TEST_THOROUGH=1 PYTHONASYNCIODEBUG=1 $(BIN)/pytest $(XDIST) $(PYTEST_ARGS)

test: lint typecheck pytest

# Line and branch coverage of relayd by the in-process tests (subprocesses are not counted).
coverage: $(STAMP)
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest --cov=relayd --cov-branch --cov-report=term-missing $(PYTEST_ARGS)

# The suite again on the library versions Debian 13 ships (tests/constraints/debian13.txt).
FLOOR_VENV := .venv-floor
$(FLOOR_VENV)/.installed-stamp: pyproject.toml tests/constraints/debian13.txt $(STAMP)
	@[ -x $(FLOOR_VENV)/bin/python ] || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q -c tests/constraints/debian13.txt -e '.[dev]'
	@touch $@

test-floor: $(FLOOR_VENV)/.installed-stamp
	$(PYCACHE) PYTHONASYNCIODEBUG=1 $(FLOOR_VENV)/bin/pytest -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

clean: deb-clean
	rm -rf $(VENV) $(FLOOR_VENV) .relayd .pytest_cache .mypy_cache .ruff_cache

# Packaging (make deb, make e2e) and benchmarks (make bench); last, so that `make`
# alone still means nothing new.
include packaging/packaging.mk
include bench/bench.mk
bench-deps: $(STAMP)
include tests/soak/soak.mk
