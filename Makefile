# `make demo` and `make test` install the exact versions of requirements/lock.txt (what CI tested).
# `make lock` regenerates that file from the ranges in pyproject.toml; `make test-latest` and
# `make test-oldest` run the suite on the newest and the oldest versions those ranges allow.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
PIP_VERSION := 26.3
TORCH_VERSION := 2.13.0
PYTEST = OMP_NUM_THREADS=2 $(1)/bin/python -m pytest -q

.PHONY: demo test lint format clean lock test-latest test-oldest

$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unimoe demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(call PYTEST,$(VENV))

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The newest versions pyproject.toml allows, with torch at its CPU pin, frozen into the lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q pip==$(PIP_VERSION)
	.venv-lock/bin/pip install -q torch==$(TORCH_VERSION)
	.venv-lock/bin/pip install -q -e '.[dev]'
	.venv-lock/bin/pip check
	{ echo "# Exact versions for 'make test' and 'make demo', written by 'make lock' from pyproject.toml"; \
	  echo "# (extra: dev) on Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())')."; \
	  echo "# torch is the CPU build; its +cpu label is dropped so the line also resolves where no CPU index is set."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(LOCK)
	rm -rf .venv-lock

# A separate venv with the newest versions the ranges allow (torch included), then the whole suite.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/pip check
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/versions.txt
	grep -i -E '^(torch|transformers|peft|accelerate|tokenizers|deepspeed)==' .venv-latest/versions.txt
	$(call PYTEST,.venv-latest)

# A separate venv with every direct dependency at its lower bound, then the whole suite.
test-oldest:
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install -q pip==$(PIP_VERSION)
	$(PYTHON) scripts/lower_bounds.py dev > .venv-oldest/lower-bounds.txt
	.venv-oldest/bin/pip install -q -c .venv-oldest/lower-bounds.txt -e '.[dev]'
	.venv-oldest/bin/pip check
	cat .venv-oldest/lower-bounds.txt | tr '\n' ' '; echo
	$(call PYTEST,.venv-oldest)

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .venv-oldest runs .pytest_cache
