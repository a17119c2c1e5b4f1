# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the main job on the built-in synthetic faces
#   make test   installs into .venv and runs the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-quick mutation clean

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the versions this machine serves from disk (see README).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) tune/run_search.py --stage virface

# Two test processes (pytest-xdist), each test to whichever is free (one at a time:
# --maxschedchunk 1; by default xdist hands out the first quarter in two contiguous blocks, all
# the end-to-end runs to one process), the end-to-end Ray runs first (tests/conftest.py); each
# process keeps one Ray head that the search tests join.
# TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= 2
# --durations: the 25 slowest tests at the end of every run (where the suite's time goes).
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1 --durations=25

test: $(STAMP)
	$(PYTEST)

test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

# Mutation testing (not in CI; see docs/RESULTS.md "Mutation testing"): GROUPS="heads steps" for some.
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	PY=$(PY) benchmarks/mutation.sh $(GROUPS)

clean:
	rm -rf $(VENV) *.egg-info mutants
