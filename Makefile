# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it needs (Debian packages, a virtualenv) on first run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-clients lint fuzz bench soak diagrams check deps clean

demo: $(STAMP)
	$(VENV)/bin/hsmfsm demo

test: $(STAMP)
	$(PY) -m pytest -q

# Real signers through `hsmfsm serve` (OpenDNSSEC: a member killed for good while it signs), a few
# minutes, installing what they need. `make test` leaves tests/clients out (pyproject norecursedirs).
# -rA prints each passing test's timeline.
test-clients: $(STAMP)
	scripts/ensure-client-debs
	$(PY) -m pytest -q -rA tests/clients

# ruff and mypy --strict over the package: CI runs this before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check hsmfsm tests scripts
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/hsmfsm bench

# A bounded chaos run: 120 s, default seed; exits non-zero when a must-be row of the tally fails.
soak: $(STAMP)
	mkdir -p build
	$(VENV)/bin/hsmfsm soak --duration 120 --seed 1 --json build/soak-tally.json

diagrams: $(STAMP)
	$(VENV)/bin/hsmfsm diagram --all diagrams

# Structure only: a pool's unset ${VAR} (HSMFSM_RUN) is a warning here; `hsmfsm check --strict` at deploy time.
check: $(STAMP)
	$(VENV)/bin/hsmfsm check policies/*.yaml

# The deep, random search behind the derandomized hypothesis tests of `make test` (tests/conftest.py profiles).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_hostile_input.py tests/test_policy.py tests/test_pool_config.py

deps: $(STAMP)

.debs: scripts/ensure-debs
	scripts/ensure-debs
	touch $@

$(STAMP): pyproject.toml .debs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .debs build *.egg-info
