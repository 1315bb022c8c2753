# Each target creates/reuses the local virtual environment .venv itself.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlprompt-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: demo world test lint format bench mutate clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlprompt demo $(DEMO_ARGS)

# every method x every world base-to-new set x seeds 1-3 on the bundled vlp-world, then the report
world: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/vlprompt world bench --jobs 2 $(WORLD_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

bench: $(STAMP)
	$(VENV)/bin/vlprompt bench $(BENCH_ARGS)

# Mutation testing (slow, not part of CI; see docs/testing.md). The four hand-written one-line bugs first,
# then mutmut over what [tool.mutmut] in pyproject.toml names; MUTANTS narrows it by mutant-name glob,
# e.g. make mutate MUTANTS='vlprompt.data.fewshot*'.
MUTANTS ?=
MUTATE_JOBS ?= 2
$(VENV)/.vlprompt-mutate: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,mutate]'
	@touch $@

mutate: $(VENV)/.vlprompt-mutate
	OMP_NUM_THREADS=1 nice -n 10 $(PY) tests/mutation/hand_mutants.py
	OMP_NUM_THREADS=1 nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache mutants
