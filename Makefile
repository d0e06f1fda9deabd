# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The demo installs only what it runs; the test tools come on top for `make test`.
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP  := $(VENV)/.installed-dev

.PHONY: test demo lint typecheck pytest fuzz faults bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEMO_STAMP): requirements-demo.txt pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements-demo.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(DEMO_STAMP)

$(DEV_STAMP): $(DEMO_STAMP) requirements-dev.txt requirements-torch.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -r requirements-torch.txt
	touch $(DEV_STAMP)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check pcp pcp_dev functions infra tests bench examples

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy pcp/core

pytest: $(DEV_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

demo: $(DEMO_STAMP)
	$(PY) -m pcp_dev.local.demo

# The long fuzzing run (`make test` runs the same targets with a small fixed budget).
FUZZ_EXAMPLES ?= 10000
fuzz: $(DEV_STAMP)
	PCP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/fuzz

faults: $(DEV_STAMP)
	$(PY) -m pcp_dev.faults --schedules 10000

bench: $(DEV_STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
