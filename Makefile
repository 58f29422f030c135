# Everything a newcomer needs: `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-soak test-loaded mutate bench clean

# constraints.txt pins the versions the suite last passed with, so a new release on the index
# cannot change (or break) a fresh set-up; pyproject.toml keeps the ranges users install with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m unit tests

# The chaos seeds `make test` leaves out (marker soak), about 4 minutes more.
test-soak: setup
	$(BIN)/python -m pytest -q -m soak tests

# The daemon, mirror and chaos tiers with both cores kept busy: timing must not matter.
test-loaded: setup
	bash scripts/test_loaded.sh

# Break one invariant at a time and check the tests catch it (not part of CI: slow).
mutate: setup
	$(BIN)/python scripts/mutate.py

bench: setup
	bash scripts/bench.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
